//! The gate's durable state (design §2 "Recovery"): every accepted prompt, its owner, finished
//! history entries, the file alias index and the GPU usage ledger, in one redb file under the
//! state directory.
//!
//! Every change goes through one writer ([`super::writer`]): callers append changes to an
//! ordered log (under the lock that ordered them) and wait for their commit; one thread applies
//! everything appended meanwhile in one transaction and commits it durably (group commit: one
//! fsync for many requests' changes, never under the scheduler's lock). A change is durable
//! before the gate answers for it, so a gate killed at any moment restarts knowing every prompt
//! it had acknowledged. A file that is corrupt, from another program or
//! from an incompatible schema is refused with a message naming it, never silently replaced.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::Value;

use super::prompts::PromptRecord;
use super::writer::{Table, Ticket, Write, Writer};

pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
pub(super) const PROMPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("prompts");
pub(super) const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");
pub(super) const ALIASES: TableDefinition<&str, &[u8]> = TableDefinition::new("aliases");
/// `[hour, tenant key]` → a usage row (`sched::usage`). Created by its first write: a store
/// from before it reads as having none, and an older gate ignores it.
pub(super) const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: &str = "1";
/// Memory redb may keep for pages it read or wrote (its default is 1 GiB, which a history of
/// big entries fills: the entries are read from the store on demand, not held).
const CACHE_BYTES: usize = 32 << 20;
/// Marks the file as comfy-gate's.
const MAGIC: &str = "comfy-gate state";

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {message}")]
    Refused { path: String, message: String },
    #[error("state store write failed: {0}")]
    Write(String),
}

/// A shown file `(type, subfolder, name)` and the `(backend name, real name)` behind it.
pub type AliasRow = ((String, String, String), (String, String));

/// What a restart finds.
#[derive(Default)]
pub struct Loaded {
    pub gate_id: String,
    pub counter: i64,
    pub records: Vec<PromptRecord>,
    /// `(prompt_id, finished_at_ms, entry)`, oldest first.
    pub history: Vec<(String, i64, Value)>,
    /// `((type, subfolder, shown), (backend name, real name))`.
    pub aliases: Vec<AliasRow>,
    /// Usage rows as stored: `(key, row)` (read by `sched::usage::Usage::new`).
    pub usage: Vec<(String, Value)>,
}

/// The store: reads open their own transaction; every write goes through [`Store::append`].
pub struct Store {
    /// Declared first: dropping the store commits what was appended before the file closes.
    writer: Writer,
    db: Arc<Database>,
    path: PathBuf,
}

fn write_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Write(e.to_string())
}

impl Store {
    /// The store file inside a state directory.
    pub fn file(state_dir: &Path) -> PathBuf {
        state_dir.join("comfy-gate.redb")
    }

    /// Opens (or creates) the store and loads everything in it. `backend_names` (in
    /// configuration order) reads files written before backends were keyed by name, which
    /// named them by position.
    pub fn open(state_dir: &Path, backend_names: &[String]) -> Result<(Store, Loaded), StoreError> {
        let path = Self::file(state_dir);
        let refuse = |message: String| StoreError::Refused {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(state_dir)
            .map_err(|e| refuse(format!("cannot create its directory: {e}")))?;
        let existed = path.exists();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| {
            refuse(format!(
                "cannot be opened ({e}); it is corrupt, in use by another comfy-gate, or not a comfy-gate store. \
                 Nothing was changed: move it aside to start with an empty state"
            ))
        })?;
        let db = Arc::new(db);
        let writer = Writer::start(db.clone())
            .map_err(|e| refuse(format!("cannot start its writer thread: {e}")))?;
        let store = Store {
            writer,
            db,
            path: path.clone(),
        };
        let read = store.db.begin_read().map_err(|e| refuse(e.to_string()))?;
        let meta = read.open_table(META);
        let magic = match &meta {
            Ok(t) => t
                .get("magic")
                .map_err(|e| refuse(e.to_string()))?
                .map(|v| v.value().to_string()),
            Err(_) => None,
        };
        let version = match &meta {
            Ok(t) => t
                .get("schema")
                .map_err(|e| refuse(e.to_string()))?
                .map(|v| v.value().to_string()),
            Err(_) => None,
        };
        drop(meta);
        drop(read);
        match (magic.as_deref(), version.as_deref()) {
            (Some(MAGIC), Some(SCHEMA_VERSION)) => {}
            (Some(MAGIC), Some(other)) => {
                return Err(refuse(format!(
                    "has schema version {other}; this comfy-gate reads version {SCHEMA_VERSION}. \
                     Nothing was changed: run the matching comfy-gate, or move the file aside"
                )));
            }
            (None, None) if !existed || store.is_empty()? => store.init()?,
            _ => {
                return Err(refuse(
                    "is not a comfy-gate state store. Nothing was changed: move it aside".into(),
                ));
            }
        }
        let loaded = store
            .load(backend_names)
            .map_err(|e| refuse(format!("cannot be read: {e}")))?;
        Ok((store, loaded))
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        let read = self.db.begin_read().map_err(write_err)?;
        Ok(read.list_tables().map_err(write_err)?.next().is_none())
    }

    fn init(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert("magic", MAGIC).map_err(write_err)?;
            meta.insert("schema", SCHEMA_VERSION).map_err(write_err)?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            meta.insert("gate_id", id.as_str()).map_err(write_err)?;
            meta.insert("counter", "0").map_err(write_err)?;
            txn.open_table(PROMPTS).map_err(write_err)?;
            txn.open_table(HISTORY).map_err(write_err)?;
            txn.open_table(ALIASES).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    fn load(&self, names: &[String]) -> Result<Loaded, Box<dyn std::error::Error>> {
        let read = self.db.begin_read()?;
        let meta = read.open_table(META)?;
        let get = |k: &str| -> Result<String, Box<dyn std::error::Error>> {
            Ok(meta
                .get(k)?
                .map(|v| v.value().to_string())
                .unwrap_or_default())
        };
        let mut loaded = Loaded {
            gate_id: get("gate_id")?,
            counter: get("counter")?.parse().unwrap_or(0),
            ..Default::default()
        };
        for row in read.open_table(PROMPTS)?.iter()? {
            let (_, v) = row?;
            let mut record: Value = serde_json::from_slice(v.value())?;
            by_name(&mut record["owner"], names);
            for t in record["tried"].as_array_mut().into_iter().flatten() {
                by_name(t, names);
            }
            let mut record: PromptRecord = serde_json::from_value(record)?;
            if record.stage == super::record::Stage::Done {
                record.shed_body();
            }
            loaded.records.push(record);
        }
        for row in read.open_table(HISTORY)?.iter()? {
            let (k, v) = row?;
            let stored: Value = serde_json::from_slice(v.value())?;
            // Memory keeps entries slim; the store keeps them whole ([`Store::history_entry`]).
            loaded.history.push((
                k.value().to_string(),
                stored["finished_at"].as_i64().unwrap_or(0),
                super::history::slim(&stored["entry"]),
            ));
        }
        loaded.history.sort_by_key(|(_, t, _)| *t);
        for row in read.open_table(ALIASES)?.iter()? {
            let (k, v) = row?;
            let key: (String, String, String) = serde_json::from_str(k.value())?;
            let mut target: Value = serde_json::from_slice(v.value())?;
            by_name(&mut target[0], names);
            loaded.aliases.push((key, serde_json::from_value(target)?));
        }
        match read.open_table(USAGE) {
            Ok(t) => {
                for row in t.iter()? {
                    let (k, v) = row?;
                    let row: Value = serde_json::from_slice(v.value())?;
                    loaded.usage.push((k.value().to_string(), row));
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(loaded)
    }

    /// Appends changes to the store's log, in order after every change appended before; the
    /// [`Ticket`] says when they are durable (or why their batch failed). Cheap, no I/O: call
    /// it under the lock that ordered the changes, and wait after releasing it.
    pub fn append(&self, writes: Vec<Write>) -> Ticket {
        self.writer.append(writes)
    }

    /// Persists records (and the number counter) durably. Blocking.
    pub fn save(&self, records: &[&PromptRecord], counter: Option<i64>) -> Result<(), StoreError> {
        let mut writes = records
            .iter()
            .map(|r| record_write(r))
            .collect::<Result<Vec<_>, _>>()?;
        writes.extend(counter.map(Write::Counter));
        self.append(writes).wait()
    }

    /// How many entries each table holds: `(prompts, history, aliases)` (for `/admin/records`).
    pub fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let read = self.db.begin_read().map_err(write_err)?;
        let count = |t: TableDefinition<&str, &[u8]>| -> Result<u64, StoreError> {
            match read.open_table(t) {
                Ok(t) => t.len().map_err(write_err),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(write_err(e)),
            }
        };
        Ok((count(PROMPTS)?, count(HISTORY)?, count(ALIASES)?))
    }

    /// Removes prompts' records and history entries durably. Blocking.
    pub fn remove(&self, ids: &[String]) -> Result<(), StoreError> {
        self.append(ids.iter().flat_map(|id| forget_writes(id)).collect())
            .wait()
    }

    /// The whole history entry of prompt `id` as written by [`Store::save_history`], as JSON
    /// text (not parsed: `GET /history/{id}` sends it as it is); `Ok(None)` if there is none.
    pub fn history_entry_json(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        /// A stored row, its entry left unparsed.
        #[derive(serde::Deserialize)]
        struct Stored<'a> {
            #[serde(borrow)]
            entry: &'a serde_json::value::RawValue,
        }
        let read = self.db.begin_read().map_err(write_err)?;
        let table = match read.open_table(HISTORY) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(write_err(e)),
        };
        let Some(row) = table.get(id).map_err(write_err)? else {
            return Ok(None);
        };
        let stored: Stored<'_> = serde_json::from_slice(row.value()).map_err(write_err)?;
        Ok(Some(stored.entry.get().as_bytes().to_vec()))
    }

    /// Stores a finished prompt's history entry together with its final record. Blocking.
    pub fn save_history(
        &self,
        record: &PromptRecord,
        finished_at: i64,
        entry: &Value,
    ) -> Result<(), StoreError> {
        self.append(history_writes(record, finished_at, entry)?)
            .wait()
    }

    /// Writes usage rows (`(key, row as JSON)`) and removes others, in one batch. Blocking.
    pub fn save_usage(
        &self,
        rows: &[(String, Vec<u8>)],
        removed: &[String],
    ) -> Result<(), StoreError> {
        let puts = rows.iter().map(|(k, v)| Write::Put {
            table: Table::Usage,
            key: k.clone(),
            value: v.clone(),
        });
        let deletes = removed.iter().map(|k| Write::Delete {
            table: Table::Usage,
            key: k.clone(),
        });
        self.append(puts.chain(deletes).collect()).wait()
    }

    /// Stores a shown file name's target durably. Blocking.
    pub fn save_alias(
        &self,
        key: &(String, String, String),
        target: &(String, String),
    ) -> Result<(), StoreError> {
        let write = Write::Put {
            table: Table::Aliases,
            key: serde_json::to_string(key).map_err(write_err)?,
            value: serde_json::to_vec(target).map_err(write_err)?,
        };
        self.append(vec![write]).wait()
    }

    /// Removes shown names from the alias table, in one batch. Blocking.
    pub fn remove_aliases(&self, keys: &[(String, String, String)]) -> Result<(), StoreError> {
        let writes = keys
            .iter()
            .map(|key| {
                Ok(Write::Delete {
                    table: Table::Aliases,
                    key: serde_json::to_string(key).map_err(write_err)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.append(writes).wait()
    }

    /// Makes the next batch's commit fail (tests of the error path).
    #[cfg(test)]
    pub fn fail_next_commit(&self) {
        self.writer.fail_next_commit();
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl crate::files::AliasStore for Store {
    fn save_alias(
        &self,
        shown: &crate::files::FileKey,
        target: &(String, String),
    ) -> Result<(), String> {
        Store::save_alias(self, shown, target).map_err(|e| e.to_string())
    }

    fn remove_aliases(&self, shown: &[crate::files::FileKey]) -> Result<(), String> {
        Store::remove_aliases(self, shown).map_err(|e| e.to_string())
    }
}

/// A prompt's record as the change that stores it. Errors: a record that cannot be encoded.
pub fn record_write(record: &PromptRecord) -> Result<Write, StoreError> {
    Ok(Write::Put {
        table: Table::Prompts,
        key: record.id.clone(),
        value: serde_json::to_vec(record).map_err(write_err)?,
    })
}

/// A finished prompt's history entry (`finished_at` in ms) and its final record, as changes.
pub fn history_writes(
    record: &PromptRecord,
    finished_at: i64,
    entry: &Value,
) -> Result<Vec<Write>, StoreError> {
    let stored = serde_json::json!({ "finished_at": finished_at, "entry": entry });
    Ok(vec![
        Write::Put {
            table: Table::History,
            key: record.id.clone(),
            value: serde_json::to_vec(&stored).map_err(write_err)?,
        },
        record_write(record)?,
    ])
}

/// The changes that forget prompt `id`: its record and its history entry.
pub fn forget_writes(id: &str) -> [Write; 2] {
    [Table::Prompts, Table::History].map(|table| Write::Delete {
        table,
        key: id.to_string(),
    })
}

/// A backend named by its position (schema 1 before names) becomes its configured name; a
/// position no longer configured becomes a name no backend has.
fn by_name(v: &mut Value, names: &[String]) {
    if let Some(i) = v.as_u64() {
        *v = Value::String(
            names
                .get(i as usize)
                .cloned()
                .unwrap_or_else(|| format!("#{i}")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Store::file(dir.path()), vec![0x5Au8; 8192]).unwrap();
        let err = Store::open(dir.path(), &[])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("comfy-gate.redb"), "{err}");
        assert!(err.contains("Nothing was changed"), "{err}");
        assert_eq!(
            std::fs::read(Store::file(dir.path())).unwrap(),
            vec![0x5Au8; 8192],
            "left as it was"
        );
    }

    #[test]
    fn incompatible_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, loaded) = Store::open(dir.path(), &[]).unwrap();
            assert_eq!(loaded.counter, 0);
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema", "99")
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(dir.path(), &[])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[test]
    fn owners_stored_by_position_are_read_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), &[]).unwrap();
            let txn = store.db.begin_write().unwrap();
            {
                let mut t = txn.open_table(PROMPTS).unwrap();
                let old = serde_json::json!({"id": "p", "number": 1, "body": {}, "client_id": null,
                    "identity": "x", "stage": "on_backend", "owner": 1, "create_time": 0, "tried": [0]});
                t.insert("p", serde_json::to_vec(&old).unwrap().as_slice())
                    .unwrap();
                let mut a = txn.open_table(ALIASES).unwrap();
                a.insert(r#"["output","","x.png"]"#, br#"[1,"y.png"]"#.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let names = ["a".to_string(), "b".to_string()];
        let (_, loaded) = Store::open(dir.path(), &names).unwrap();
        assert_eq!(loaded.records[0].owner.as_deref(), Some("b"));
        assert_eq!(loaded.records[0].tried, ["a"]);
        assert_eq!(loaded.aliases[0].1, ("b".to_string(), "y.png".to_string()));
    }

    /// A row of the usage table (the test rows are JSON numbers, so a reopen loads them).
    fn prompt_row(store: &Store, id: &str) -> Option<Vec<u8>> {
        let read = store.db.begin_read().unwrap();
        let t = read.open_table(USAGE).unwrap();
        t.get(id).unwrap().map(|v| v.value().to_vec())
    }

    fn put(id: &str, value: &[u8]) -> Write {
        Write::Put {
            table: Table::Usage,
            key: id.into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn appends_from_many_threads_commit_in_their_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), &[]).unwrap();
            let store = Arc::new(store);
            // Each thread rewrites its own key; the last value appended must be what stays.
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        for i in 0..50u32 {
                            let key = format!("k{t}");
                            let ticket = store.append(vec![
                                put(&key, i.to_string().as_bytes()),
                                Write::Counter(i64::from(i)),
                            ]);
                            ticket.wait().unwrap();
                            assert_eq!(prompt_row(&store, &key).unwrap(), i.to_string().as_bytes());
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            // Put then delete in one append: applied in order, nothing stays.
            store
                .append(vec![
                    put("gone", b"0"),
                    Write::Delete {
                        table: Table::Usage,
                        key: "gone".into(),
                    },
                ])
                .wait()
                .unwrap();
            assert_eq!(prompt_row(&store, "gone"), None);
            // Appended and not waited for: still committed before the store closes.
            drop(store.append(vec![put("late", b"1")]));
        }
        let (store, loaded) = Store::open(dir.path(), &[]).unwrap();
        assert_eq!(loaded.counter, 49);
        for t in 0..8 {
            assert_eq!(prompt_row(&store, &format!("k{t}")).unwrap(), b"49");
        }
        assert_eq!(prompt_row(&store, "late").unwrap(), b"1");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_fails_every_write_of_its_batch_and_writes_none() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &[]).unwrap();
        store.append(vec![put("before", b"1")]).wait().unwrap();
        store.fail_next_commit();
        // Both may land in the failed batch, or the second in the next: either way a ticket
        // that says durable means the row is there, and an error means it is not.
        let first = store.append(vec![put("a", b"2")]);
        let second = store.append(vec![put("b", b"3")]);
        let a = first.durable().await;
        let b = second.wait();
        assert!(a.is_err(), "the batch after the hook fails");
        assert_eq!(prompt_row(&store, "a"), None);
        assert_eq!(b.is_ok(), prompt_row(&store, "b").is_some());
        // The writer goes on after a failed batch.
        store.append(vec![put("after", b"4")]).wait().unwrap();
        assert!(prompt_row(&store, "after").is_some());
        assert!(prompt_row(&store, "before").is_some());
    }

    #[test]
    fn reopening_keeps_the_gate_id() {
        let dir = tempfile::tempdir().unwrap();
        let id = Store::open(dir.path(), &[]).unwrap().1.gate_id;
        assert_eq!(Store::open(dir.path(), &[]).unwrap().1.gate_id, id);
    }
}
