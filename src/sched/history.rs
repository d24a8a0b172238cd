//! Finished prompts' history entries, as `GET /history` shows them: kept by the gate (not the
//! backends, which forget on restart and never saw the gate's numbers), bounded by count and
//! age (`recovery.history_max_entries`, `recovery.history_max_age_hours`), persisted with the
//! prompt's final record.
//!
//! Bodies live in the store, not in memory (issue 16): an entry carries the prompt's graph and
//! `extra_data`, whose UI workflow (`extra_pnginfo`) is often tens of KB and can be megabytes,
//! and a history of 10,000 such entries must not hold them all. Memory keeps each entry
//! [`slim`] (outputs, status, meta, and of the prompt only what `/api/jobs` lists: number, id,
//! `create_time`, `client_id`, the workflow's id); [`History::get`] reads the whole entry from
//! the store. An entry is kept whole in memory from the moment it is kept until it is written
//! ([`History::written`]), so a reader never misses it in between.

use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde_json::{Map, Value, json};

use super::store::Store;
use crate::config::RecoveryConfig;
use crate::protocol::now_ms;

/// Milliseconds in an hour.
const HOUR_MS: i64 = 3_600_000;

/// One kept entry in memory.
struct Kept {
    /// When its prompt finished (ms since the epoch): orders `GET /history`.
    finished_at: i64,
    /// The whole entry until it is written, then [`slim`].
    entry: Arc<Value>,
    /// `entry` is the whole entry (not yet written, or the store could not take it).
    whole: bool,
}

/// An entry as memory keeps it once it is in the store: everything but the prompt's graph and
/// `extra_data`, of which `create_time`, `client_id` and `extra_pnginfo.workflow.id` stay
/// (what `/api/jobs` lists). Shapes: ComfyUI's history entry (`execution.py`'s `history_result`
/// with `prompt` = `[number, id, graph, extra_data, outputs_to_execute]`).
pub fn slim(entry: &Value) -> Value {
    let item = &entry["prompt"];
    let extra = &item[3];
    let mut kept = Map::new();
    for key in ["create_time", "client_id"] {
        if let Some(v) = extra.get(key) {
            kept.insert(key.into(), v.clone());
        }
    }
    let workflow_id = &extra["extra_pnginfo"]["workflow"]["id"];
    if !workflow_id.is_null() {
        kept.insert(
            "extra_pnginfo".into(),
            json!({ "workflow": { "id": workflow_id } }),
        );
    }
    let mut slim = Map::new();
    if let Some(m) = entry.as_object() {
        for (k, v) in m {
            if k != "prompt" {
                slim.insert(k.clone(), v.clone());
            }
        }
    }
    slim.insert(
        "prompt".into(),
        json!([item[0], item[1], {}, Value::Object(kept), item[4]]),
    );
    Value::Object(slim)
}

/// The gate's history: `id → kept entry`, oldest first.
pub struct History {
    entries: Mutex<IndexMap<String, Kept>>,
    store: Arc<Store>,
    max_entries: usize,
    max_age_ms: i64,
}

impl History {
    /// The history a restart loaded (`(id, finished_at_ms, entry)`, oldest first; entries
    /// [`slim`], as the store's loader gives them).
    pub fn new(store: Arc<Store>, loaded: Vec<(String, i64, Value)>, cfg: &RecoveryConfig) -> Self {
        Self {
            entries: Mutex::new(
                loaded
                    .into_iter()
                    .map(|(id, finished_at, e)| {
                        let kept = Kept {
                            finished_at,
                            entry: Arc::new(e),
                            whole: false,
                        };
                        (id, kept)
                    })
                    .collect(),
            ),
            store,
            max_entries: cfg.history_max_entries,
            max_age_ms: cfg.history_max_age_hours as i64 * HOUR_MS,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexMap<String, Kept>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a finished prompt's entry in memory (the caller holds the scheduler's lock, so the
    /// entry appears with the prompt's move to `Done`; see `sched::views`). `finished_at` (ms)
    /// orders `GET /history`. Returns the entries pruned to stay within the bounds, oldest
    /// first, never `id` itself (their records, and the names their outputs were shown under,
    /// can go too).
    pub fn insert(
        &self,
        id: &str,
        finished_at: i64,
        entry: Arc<Value>,
    ) -> Vec<(String, Arc<Value>)> {
        let mut h = self.lock();
        h.shift_remove(id);
        let kept = Kept {
            finished_at,
            entry,
            whole: true,
        };
        h.insert(id.to_string(), kept);
        let mut dropped = Vec::new();
        while let Some((oldest, kept)) = h.first() {
            let over = h.len() > self.max_entries || now_ms() - kept.finished_at > self.max_age_ms;
            if !over || oldest == id {
                break;
            }
            if let Some((oldest, kept)) = h.shift_remove_index(0) {
                dropped.push((oldest, kept.entry));
            }
        }
        dropped
    }

    /// Entry `entry` of prompt `id` is in the store (written with its prompt's final record by
    /// `Scheduler::end`, `store::history_writes`): memory keeps it [`slim`] from now on, unless
    /// another entry replaced it meanwhile. Until this is called memory keeps it whole, so a
    /// reader never misses it.
    pub fn written(&self, id: &str, entry: &Arc<Value>) {
        let slim = Arc::new(slim(entry));
        if let Some(kept) = self.lock().get_mut(id)
            && Arc::ptr_eq(&kept.entry, entry)
        {
            kept.entry = slim;
            kept.whole = false;
        }
    }

    /// Drops an entry from memory (`POST /history` delete; the caller removes it from disk),
    /// returning it as memory held it (its outputs are there).
    pub fn remove(&self, id: &str) -> Option<Arc<Value>> {
        self.lock().shift_remove(id).map(|kept| kept.entry)
    }

    /// One entry, whole, as JSON text: written from memory until it is in the store, then read
    /// from the store as it was written. If the store cannot be read, the [`slim`] entry.
    pub fn get_json(&self, id: &str) -> Option<Vec<u8>> {
        let (entry, whole) = {
            let h = self.lock();
            let kept = h.get(id)?;
            (kept.entry.clone(), kept.whole)
        };
        let from_memory = || serde_json::to_vec(&*entry).ok();
        if whole {
            return from_memory();
        }
        match self.store.history_entry_json(id) {
            Ok(Some(text)) => Some(text),
            // Deleted between the two reads: gone.
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, prompt = id, "could not read a history entry");
                from_memory()
            }
        }
    }

    /// One entry, whole (see [`History::get_json`]).
    pub fn get(&self, id: &str) -> Option<Value> {
        serde_json::from_slice(&self.get_json(id)?).ok()
    }

    /// One entry as memory keeps it (whole or [`slim`]: its outputs, status and meta are
    /// there), without reading the store.
    pub fn summary(&self, id: &str) -> Option<Arc<Value>> {
        self.lock().get(id).map(|kept| kept.entry.clone())
    }

    /// Whether prompt `id`'s entry is kept and in the store ([`History::written`] was called
    /// for it; a restart would find it).
    pub fn is_written(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|kept| !kept.whole)
    }

    /// How many entries are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every entry as memory keeps it (see [`History::summary`]), as `(finished_at_ms, id,
    /// entry)`, oldest first.
    pub fn all(&self) -> Vec<(i64, String, Arc<Value>)> {
        self.lock()
            .iter()
            .map(|(id, kept)| (kept.finished_at, id.clone(), kept.entry.clone()))
            .collect()
    }
}

/// The timestamp (ms) of an entry's last status message.
pub fn completion_time(entry: &Value) -> Option<i64> {
    entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m[1]["timestamp"].as_i64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::prompts::PromptRecord;

    fn entry() -> Arc<Value> {
        let workflow =
            json!({"id": "wf-1", "nodes": vec![json!({"widgets_values": "x".repeat(1000)}); 80]});
        Arc::new(json!({
            "prompt": [3, "p", {"1": {"class_type": "SaveImage", "inputs": {}}},
                       {"create_time": 5, "client_id": "c", "extra_pnginfo": {"workflow": workflow}}, ["1"]],
            "outputs": {"1": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
            "status": {"status_str": "success", "completed": true, "messages": []},
            "meta": {"1": {"node_id": "1"}},
        }))
    }

    /// Prompt `p`'s record (what `store::history_writes` stores beside the entry).
    fn record() -> PromptRecord {
        PromptRecord::new(
            "p".into(),
            3.into(),
            Default::default(),
            None,
            "x".into(),
            Default::default(),
        )
    }

    #[test]
    fn memory_keeps_an_entry_slim_once_written_and_the_store_keeps_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &[]).unwrap();
        let history = History::new(Arc::new(store), Vec::new(), &RecoveryConfig::default());
        let whole = entry();
        history.insert("p", 10, whole.clone());
        assert_eq!(history.summary("p").unwrap(), whole, "whole until written");
        let record = record();
        let writes = crate::sched::store::history_writes(&record, 10, &whole).unwrap();
        history.store.append(writes).wait().unwrap();
        history.written("p", &whole);
        let kept = history.summary("p").unwrap();
        assert_eq!(
            kept["prompt"],
            json!([3, "p", {}, {"create_time": 5, "client_id": "c", "extra_pnginfo": {"workflow": {"id": "wf-1"}}}, ["1"]])
        );
        for field in ["outputs", "status", "meta"] {
            assert_eq!(kept[field], whole[field], "{field}");
        }
        assert!(kept.to_string().len() < 1000, "the workflow left memory");
        assert_eq!(
            history.get("p").unwrap(),
            *whole,
            "read whole from the store"
        );
        let text = history.get_json("p").unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&text).unwrap(), *whole);
        assert_eq!(history.remove("p").unwrap(), kept);
        assert!(history.get("p").is_none());
    }

    #[test]
    fn a_restart_loads_entries_slim() {
        let dir = tempfile::tempdir().unwrap();
        let whole = entry();
        {
            let (store, _) = Store::open(dir.path(), &[]).unwrap();
            let record = record();
            let writes = crate::sched::store::history_writes(&record, 10, &whole).unwrap();
            store.append(writes).wait().unwrap();
        }
        let (store, loaded) = Store::open(dir.path(), &[]).unwrap();
        assert_eq!(loaded.history.len(), 1);
        assert_eq!(loaded.history[0].2, slim(&whole));
        let history = History::new(Arc::new(store), loaded.history, &RecoveryConfig::default());
        assert_eq!(history.get("p").unwrap(), *whole);
    }
}
