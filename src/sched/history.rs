//! Finished prompts' history entries, as `GET /history` shows them: kept by the gate (not the
//! backends, which forget on restart and never saw the gate's numbers), bounded by count and
//! age (`recovery.history_max_entries`, `recovery.history_max_age_hours`), persisted with the
//! prompt's final record.

use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde_json::Value;

use super::prompts::PromptRecord;
use super::store::Store;
use crate::config::RecoveryConfig;
use crate::protocol::now_ms;

/// Milliseconds in an hour.
const HOUR_MS: i64 = 3_600_000;

/// The gate's history: `id → (finished_at_ms, entry)`, oldest first.
pub struct History {
    entries: Mutex<IndexMap<String, (i64, Arc<Value>)>>,
    store: Arc<Store>,
    max_entries: usize,
    max_age_ms: i64,
}

impl History {
    /// The history a restart loaded (`(id, finished_at_ms, entry)`, oldest first).
    pub fn new(store: Arc<Store>, loaded: Vec<(String, i64, Value)>, cfg: &RecoveryConfig) -> Self {
        Self {
            entries: Mutex::new(
                loaded
                    .into_iter()
                    .map(|(id, t, e)| (id, (t, Arc::new(e))))
                    .collect(),
            ),
            store,
            max_entries: cfg.history_max_entries,
            max_age_ms: cfg.history_max_age_hours as i64 * HOUR_MS,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexMap<String, (i64, Arc<Value>)>> {
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
        h.insert(id.to_string(), (finished_at, entry));
        let mut dropped = Vec::new();
        while let Some((oldest, (t, _))) = h.first() {
            let over = h.len() > self.max_entries || now_ms() - *t > self.max_age_ms;
            if !over || oldest == id {
                break;
            }
            if let Some((oldest, (_, entry))) = h.shift_remove_index(0) {
                dropped.push((oldest, entry));
            }
        }
        dropped
    }

    /// Writes a kept entry to disk with its prompt's final record.
    pub fn save(&self, record: &PromptRecord, finished_at: i64, entry: &Value) {
        if let Err(e) = self.store.save_history(record, finished_at, entry) {
            tracing::error!(error = %e, prompt = %record.id, "could not persist a history entry");
        }
    }

    /// Drops an entry from memory (`POST /history` delete; the caller removes it from disk),
    /// returning it.
    pub fn remove(&self, id: &str) -> Option<Arc<Value>> {
        self.lock().shift_remove(id).map(|(_, entry)| entry)
    }

    /// One entry (shared: entries do not change once kept).
    pub fn get(&self, id: &str) -> Option<Arc<Value>> {
        self.lock().get(id).map(|(_, e)| e.clone())
    }

    /// How many entries are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every entry as `(finished_at_ms, id, entry)`, oldest first.
    pub fn all(&self) -> Vec<(i64, String, Arc<Value>)> {
        self.lock()
            .iter()
            .map(|(id, (t, e))| (*t, id.clone(), e.clone()))
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
