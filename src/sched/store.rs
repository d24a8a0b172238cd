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
/// Memory redb may keep for pages it read or wrote, 8 MiB (its default is 1 GiB, which a
/// history of big entries fills: the entries are read from the store on demand, not held). At
/// 32 MiB the history bench held 313.5 MB with group commit against 285.6 MB at 8 MiB
/// (`cargo bench --bench overhead -- memory`, issue 16's 300 MB target).
const CACHE_BYTES: usize = 8 << 20;
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

    /// Marks a new file as the gate's. The one write that bypasses the writer: it runs while
    /// the store is being opened, before anything can be appended.
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

    /// The whole history entry of prompt `id` as written by [`history_writes`], as JSON
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

    /// Makes the next `n` batches fail (tests of the error paths; see
    /// [`Writer::fail_next_commits`]).
    pub fn fail_next_commits(&self, n: usize) {
        self.writer.fail_next_commits(n);
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
#[path = "store_tests.rs"]
mod tests;
