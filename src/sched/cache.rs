//! The result cache (issue 16, `[cache]`, off by default): a prompt identical to one that
//! already finished successfully is answered from the earlier run's outputs without a GPU.
//!
//! ComfyUI caches node outputs inside one process; a fleet behind a gate loses that as soon as
//! the same prompt lands on another backend, and a service whose users repeat prompts (a
//! shared link, a retried request, a page reload that posts again) pays a GPU run each time.
//! The gate sees every prompt and every result, so it can keep the one cache the fleet lacks.
//!
//! **Identical** means the same [`Key`]: the graph after normalising (each node's
//! `class_type` and `inputs`, objects in key order, `_meta` and other UI fields left out), so
//! the same seeds and checkpoint names; the contents (SHA-256)
//! of every input file the gate holds that the graph names, and the backend and real name of
//! every output it names; `partial_execution_targets`; and the caller's scope (with `[auth]` on,
//! the user, unless `share_between_users`). `extra_data` (the UI workflow, the client id) is
//! not part of it: ComfyUI's own cache ignores it too.
//!
//! What is kept per key ([`CachedRun`]) is the earlier history entry's outputs of its output
//! nodes, their `meta` and the output nodes: the files stay on the backends that made them,
//! under the names the gate showed for them, which the cache holds (as a kept history entry
//! does) until it forgets the run. A hit is served only while those backends are up; a run with
//! `temp` outputs (previews, emptied when a ComfyUI restarts) is not remembered. Bounded by
//! `[cache] max_entries` (least recently used first), `max_bytes` and `max_age_s`. Kept in
//! memory only: a restart starts with an empty cache.
//!
//! Holds on the names are taken under the cache's lock ([`ResultCache::get`] for the prompt a
//! hit answers, until its own history entry holds them; [`ResultCache::remember`] is called
//! under the scheduler's lock, with the entry's own hold), so no delete in between can free a
//! name a remembered run still shows. Lock order: scheduler, cache, files.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::CacheConfig;
use crate::files::Files;
use crate::files::resolve::Location;
use comfy_wire::files::refs::FileRef;

/// A prompt's identity for the cache: SHA-256 of its scope, normalised graph and files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

/// What a finished run left for later identical prompts.
#[derive(Debug)]
pub struct CachedRun {
    /// The earlier history entry's `outputs` of its output nodes: UI dicts by node id, with
    /// the gate's file names.
    pub outputs: Value,
    /// Their `meta` (`node_id`, `display_node`, `parent_node`, `real_node_id` by node).
    pub meta: Value,
    /// Its output nodes (`prompt[4]` of the entry).
    pub outputs_to_execute: Vec<String>,
    /// The backends (configured names) its output files are on: a hit needs them up.
    pub owners: Vec<String>,
    /// The prompt that ran on a GPU.
    pub from: String,
    /// Bytes of `outputs` and `meta` as JSON (what `max_bytes` counts).
    size: usize,
    /// When it was remembered (its run's end).
    at: Instant,
}

/// Whether the client asked for this prompt to run whatever the cache holds:
/// `"extra_data": {"comfy_gate": {"cache": false}}`.
pub fn opted_out(body: &Map<String, Value>) -> bool {
    body.get("extra_data")
        .and_then(|e| e.get("comfy_gate"))
        .and_then(|g| g.get("cache"))
        .is_some_and(|c| c == &Value::Bool(false))
}

/// `v` as canonical JSON into `out`: object keys sorted; numbers as sent (`1` and `1.0` differ:
/// ComfyUI turns a STRING input into `str(value)` before its own cache compares it).
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(&Value::String(k.clone()), out);
                out.push(b':');
                canonical(&m[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// The graph as the cache compares it: each node's `class_type` and `inputs` only.
fn normalised_graph(graph: &Value) -> Value {
    let nodes = graph.as_object().into_iter().flatten().map(|(id, node)| {
        let mut kept = Map::new();
        for field in ["class_type", "inputs"] {
            kept.insert(
                field.into(),
                node.get(field).cloned().unwrap_or(Value::Null),
            );
        }
        (id.clone(), Value::Object(kept))
    });
    Value::Object(nodes.collect())
}

/// What a file the graph names is, for the key: the content digest of a file the gate holds,
/// the backend and real name of an output it showed; `None` for a string that names no file the
/// gate knows (a backend's own input file, or not a file at all: the string itself is in the
/// graph).
fn file_identity(files: &Files, value: &str) -> Option<Vec<u8>> {
    let r = FileRef::from_loader(value)?;
    match files.locate(&r) {
        Location::Gate(path) => {
            let bytes = std::fs::read(path).ok()?;
            Some(Sha256::digest(&bytes).to_vec())
        }
        Location::Backend { backend, real } => {
            Some(format!("{backend}\0{}", real.loader_value()).into_bytes())
        }
        Location::Unknown => None,
    }
}

/// The key of a `POST /prompt` body in `scope` (`""`: shared; `user:NAME`). Reads the input
/// files the gate holds that the graph names (their SHA-256).
pub fn key_of(scope: &str, body: &Map<String, Value>, files: &Files) -> Key {
    let graph = body.get("prompt").unwrap_or(&Value::Null);
    let mut text = Vec::new();
    canonical(&normalised_graph(graph), &mut text);
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(&text);
    h.update([0]);
    let mut targets = Vec::new();
    canonical(
        body.get("partial_execution_targets")
            .unwrap_or(&Value::Null),
        &mut targets,
    );
    h.update(&targets);
    let mut ids: Vec<&String> = graph
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    ids.sort();
    for id in ids {
        let mut inputs: Vec<(&String, &Value)> = graph[id]["inputs"]
            .as_object()
            .into_iter()
            .flatten()
            .collect();
        inputs.sort_by(|a, b| a.0.cmp(b.0));
        for (input, v) in inputs {
            let Some(identity) = v.as_str().and_then(|s| file_identity(files, s)) else {
                continue;
            };
            h.update([0]);
            h.update(id.as_bytes());
            h.update([0]);
            h.update(input.as_bytes());
            h.update([0]);
            h.update(&identity);
        }
    }
    Key(h.finalize().into())
}

/// The cache: remembered runs by key, least recently used first.
pub struct ResultCache {
    cfg: CacheConfig,
    files: Arc<Files>,
    runs: Mutex<IndexMap<Key, Arc<CachedRun>>>,
}

impl ResultCache {
    /// An empty cache (`[cache]` as the gate started).
    pub fn new(cfg: CacheConfig, files: Arc<Files>) -> Self {
        Self {
            cfg,
            files,
            runs: Mutex::new(IndexMap::new()),
        }
    }

    /// `[cache] enabled`.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// The scope of a caller's prompts: `user:NAME` with auth on (unless
    /// `share_between_users`), else `""` (one cache for everyone).
    pub fn scope(&self, user: Option<&str>) -> String {
        match user {
            Some(name) if !self.cfg.share_between_users => format!("user:{name}"),
            _ => String::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexMap<Key, Arc<CachedRun>>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.cfg.max_age_s)
    }

    /// The run remembered for `key`, if it is not older than `max_age_s` (an older one is
    /// forgotten); it becomes the most recently used. The names its outputs are shown under
    /// are held once more for the caller, taken under the cache's lock: the caller gives the
    /// hold back with [`ResultCache::release`] once its own history entry holds them.
    pub fn get(&self, key: &Key) -> Option<Arc<CachedRun>> {
        let mut runs = self.lock();
        let run = runs.get(key)?.clone();
        if run.at.elapsed() > self.max_age() {
            runs.shift_remove(key);
            self.release(&run);
            return None;
        }
        if let Some(i) = runs.get_index_of(key) {
            let last = runs.len() - 1;
            runs.move_index(i, last);
        }
        self.hold(&run);
        Some(run)
    }

    /// Remembers a successful run's history `entry` under `key`: the outputs of its output
    /// nodes (`prompt[4]`), their `meta`, holding the names they are shown under; then forgets
    /// the expired, and the least recently used beyond `max_entries` and `max_bytes`. Called
    /// under the scheduler's lock, right after the entry itself holds its names. A run with a
    /// `temp` output is not remembered (ComfyUI empties `temp/` when it restarts).
    pub fn remember(&self, key: Key, from: &str, entry: &Value) {
        let outputs_to_execute: Vec<String> = entry["prompt"][4]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let pick = |field: &str| -> Value {
            let of = |n: &String| entry[field].get(n).map(|v| (n.clone(), v.clone()));
            Value::Object(outputs_to_execute.iter().filter_map(of).collect())
        };
        let (outputs, meta) = (pick("outputs"), pick("meta"));
        let mut items = Vec::new();
        crate::files::collect_file_items(&outputs, &mut items);
        if items.iter().any(|(kind, _, _)| kind == "temp") {
            return;
        }
        let mut owners: Vec<String> = items
            .iter()
            .filter_map(|(kind, sub, name)| {
                let r = FileRef::new(comfy_wire::files::refs::Kind::parse(kind)?, sub, name);
                match self.files.locate(&r) {
                    Location::Backend { backend, .. } => Some(backend),
                    _ => None,
                }
            })
            .collect();
        owners.sort();
        owners.dedup();
        let size = outputs.to_string().len() + meta.to_string().len();
        if size > self.cfg.max_bytes {
            return;
        }
        let run = Arc::new(CachedRun {
            outputs,
            meta,
            outputs_to_execute,
            owners,
            from: from.to_string(),
            size,
            at: Instant::now(),
        });
        let mut runs = self.lock();
        self.hold(&run);
        if let Some(old) = runs.shift_remove(&key) {
            self.release(&old);
        }
        runs.insert(key, run);
        let max_age = self.max_age();
        let expired: Vec<Key> = runs
            .iter()
            .filter(|(_, r)| r.at.elapsed() > max_age)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(old) = runs.shift_remove(&k) {
                self.release(&old);
            }
        }
        let mut bytes: usize = runs.values().map(|r| r.size).sum();
        while runs.len() > self.cfg.max_entries || bytes > self.cfg.max_bytes {
            let Some((_, old)) = runs.shift_remove_index(0) else {
                break;
            };
            bytes -= old.size;
            self.release(&old);
        }
    }

    /// Runs remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hold(&self, run: &CachedRun) {
        self.files
            .hold_outputs(&serde_json::json!({ "outputs": run.outputs }));
    }

    /// Gives back one hold on the names of `run`'s outputs (taken by [`ResultCache::get`]).
    pub fn release(&self, run: &CachedRun) {
        self.files
            .forget_outputs(&serde_json::json!({ "outputs": run.outputs }));
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
