//! Files across backends (design §2 "Files follow prompts"): one ComfyUI's `input/`, `output/`
//! and `temp/` as a client sees them through the gate.
//!
//! - Uploads of every type are kept by the gate (ComfyUI's collision rules, in its state
//!   directory); an output or temp upload reserves its name in the alias index ([`alias`]).
//! - Outputs and temp files stay on the backend that made them; the alias index maps each shown
//!   name to (backend, real name).
//! - [`resolve`] answers where any reference lives (gate store, a backend, unknown), for
//!   `/view`, `/upload/mask`'s `original_ref` and every loader input of a prompt.
//! - [`place`] makes the files a prompt names present on the backend that runs it, just before
//!   it is forwarded, rewriting the reference in the forwarded copy when the file had to be
//!   copied under another name.

pub mod alias;
pub mod place;
pub mod resolve;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde_json::Value;

use alias::{AliasIndex, GATE_OWNER};
use comfy_wire::files::Dirs;
use comfy_wire::files::refs::{FileRef, Kind};

/// `(type, subfolder, filename)`.
pub type FileKey = (String, String, String);

/// Where the alias index is made durable (the scheduler's store): a shown name, and the
/// backend (by configured name, or [`GATE_OWNER`]) and real name behind it.
pub trait AliasStore: Send + Sync {
    fn save_alias(&self, shown: &FileKey, target: &(String, String)) -> Result<(), String>;
    /// Removes shown names (absent ones are no error).
    fn remove_aliases(&self, shown: &[FileKey]) -> Result<(), String>;
}

/// `(target backend, the source: owner and real reference)` → the copy placed on the target
/// and its size.
type PlacedCopies = HashMap<(String, String, FileRef), (FileRef, u64)>;

/// Held while one file is placed on one backend.
type PlacementSlot = Arc<tokio::sync::Mutex<()>>;

/// The gate's files: uploads it keeps, and the one namespace of outputs across backends.
pub struct Files {
    index: Mutex<AliasIndex>,
    store: Arc<dyn AliasStore>,
    /// The gate's own store, laid out as ComfyUI's (`input/`, `output/`, `temp/`).
    pub dirs: Dirs,
    /// `(backend name, relative path)` → sha256 of the content last placed there.
    placed: Mutex<HashMap<(String, String), [u8; 32]>>,
    /// One placement at a time per `(backend name, relative path)`: two prompts naming the same
    /// new file must not both write it (the second write truncates it under the first's run).
    placing: Mutex<HashMap<(String, String), PlacementSlot>>,
    /// Output and temp files copied to a backend that did not make them.
    copies: Mutex<PlacedCopies>,
    /// Names of the input uploads held (`cat.png`, `sub/cat.png`): read from the directory once
    /// at open, then kept by [`Files::note_upload`], so placement never touches the disk.
    uploads: ArcSwap<HashSet<String>>,
}

/// Every file under `dir`, as paths relative to `root` with `/` separators.
fn walk(root: &Path, dir: &Path, out: &mut HashSet<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(root, &path, out),
            Ok(t) if t.is_file() => {
                if let Some(rel) = path.strip_prefix(root).ok().and_then(|r| r.to_str()) {
                    out.insert(rel.replace('\\', "/"));
                }
            }
            _ => {}
        }
    }
}

impl Files {
    /// Opens the upload store under `state_dir` with the alias index a restart loaded
    /// (`(shown, (owner, real name))`; the gate's own output and temp uploads are in it).
    /// At most `max_output_names` names of backends' files are kept
    /// (`recovery.max_output_names`; the oldest go first).
    pub fn open(
        state_dir: &Path,
        store: Arc<dyn AliasStore>,
        aliases: Vec<(FileKey, (String, String))>,
        max_output_names: usize,
    ) -> std::io::Result<Self> {
        let dirs = Dirs::create(&state_dir.join("files"))?;
        // The cap applies once the kept history has said which names it lists
        // ([`Files::hold_kept_history`]).
        let mut index = AliasIndex::with_cap(usize::MAX);
        for (shown, (backend, real)) in aliases {
            index.insert(shown, backend, real);
        }
        index.set_cap(max_output_names);
        let mut uploads = HashSet::new();
        walk(&dirs.input, &dirs.input, &mut uploads);
        Ok(Self {
            index: Mutex::new(index),
            store,
            dirs,
            placed: Mutex::new(HashMap::new()),
            placing: Mutex::new(HashMap::new()),
            copies: Mutex::new(HashMap::new()),
            uploads: ArcSwap::from_pointee(uploads),
        })
    }

    /// What the gate holds about files, for `/admin/records`: `backend_aliases` (names shown
    /// for backends' outputs; owned by the history entries that list them), `gate_aliases`
    /// (output and temp uploads; owned by the upload store), `uploads` (input uploads),
    /// `copies` (files copied to a backend that did not make them; go with their source's
    /// name) and `placed` (uploads placed on backends).
    pub fn counts(&self) -> serde_json::Value {
        let (backend_aliases, gate_aliases) = self.index().counts();
        serde_json::json!({
            "backend_aliases": backend_aliases,
            "gate_aliases": gate_aliases,
            "uploads": self.uploads.load().len(),
            "copies": self.copies.lock().unwrap_or_else(|e| e.into_inner()).len(),
            "placed": self.placed.lock().unwrap_or_else(|e| e.into_inner()).len(),
        })
    }

    /// At start: the history entries the store kept hold their outputs' names
    /// ([`Files::hold_outputs`]); then the cap on the rest applies.
    pub fn hold_kept_history<'a>(&self, entries: impl IntoIterator<Item = &'a Value>) {
        for entry in entries {
            self.hold_outputs(entry);
        }
        let over = self.index().enforce_cap();
        self.unpersist_aliases(&over);
    }

    /// A history entry is kept: the names its outputs are shown under stay while it does (and
    /// while any other kept entry lists them).
    pub fn hold_outputs(&self, entry: &Value) {
        let mut shown = Vec::new();
        collect_file_items(&entry["outputs"], &mut shown);
        let mut index = self.index();
        for key in &shown {
            index.list(key);
        }
    }

    /// A history entry was deleted or aged out: the names its outputs (backend files, any
    /// type but `input`) were shown under, unless another kept entry lists them too, are
    /// forgotten, in memory and in the store, with the copies made of them. The files stay on their backends, as ComfyUI keeps an output
    /// whose history entry is gone; a later `/view` of the forgotten name finds the file
    /// again only where that real name exists, and a new output may take the name.
    pub fn forget_outputs(&self, entry: &Value) {
        let mut shown = Vec::new();
        collect_file_items(&entry["outputs"], &mut shown);
        let mut forgotten = Vec::new();
        {
            let mut index = self.index();
            for key in shown {
                if index.unlist(&key)
                    && let Some(target) = index.forget(&key)
                {
                    forgotten.push((key, target));
                }
            }
        }
        if forgotten.is_empty() {
            return;
        }
        {
            let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
            for ((kind, sub, _), (owner, real)) in &forgotten {
                let Some(kind) = Kind::parse(kind) else {
                    continue;
                };
                let source = FileRef::new(kind, sub, real);
                copies.retain(|(_, o, r), _| !(o == owner && *r == source));
            }
        }
        let keys: Vec<FileKey> = forgotten.into_iter().map(|(k, _)| k).collect();
        self.unpersist_aliases(&keys);
    }

    fn index(&self) -> std::sync::MutexGuard<'_, AliasIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unpersist_aliases(&self, shown: &[FileKey]) {
        if !shown.is_empty()
            && let Err(e) = self.store.remove_aliases(shown)
        {
            tracing::error!(error = %e, "could not forget file aliases");
        }
    }

    fn persist_alias(&self, shown: &FileKey, target: (String, String)) {
        if let Err(e) = self.store.save_alias(shown, &target) {
            tracing::error!(error = %e, "could not persist a file alias");
        }
    }

    /// Rewrites every file item (`{"filename", "subfolder", "type"}`) in a UI output from
    /// `backend` to its gate-wide name.
    pub fn alias_outputs(&self, backend: &str, value: &mut Value) {
        match value {
            Value::Object(map) => {
                if let Some(item) = file_item(map) {
                    let Some(key) = item else { return };
                    let (shown, new, forgotten) = self.index().alias(backend, key.clone());
                    if new {
                        let shown_key = (key.0, key.1, shown.clone());
                        self.persist_alias(&shown_key, (backend.to_string(), key.2));
                    }
                    self.unpersist_aliases(&forgotten);
                    map.insert("filename".into(), Value::String(shown));
                } else {
                    for v in map.values_mut() {
                        self.alias_outputs(backend, v);
                    }
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.alias_outputs(backend, v);
                }
            }
            _ => {}
        }
    }

    /// Whether the gate holds an input upload of this loader value (`name`, `sub/name`,
    /// `name [input]`).
    pub fn uploaded(&self, name: &str) -> bool {
        FileRef::from_loader(name)
            .is_some_and(|r| r.kind == Kind::Input && self.uploads.load().contains(&r.rel()))
    }

    /// The names of the input uploads held (shared: a snapshot for one dispatch pass).
    pub fn upload_names(&self) -> Arc<HashSet<String>> {
        self.uploads.load_full()
    }

    /// Whether `(type, subfolder, name)` is shown for a backend's file (an upload of that name
    /// must step over it, as over an existing file).
    pub fn taken_by_backend(&self, kind: Kind, subfolder: &str, name: &str) -> bool {
        kind != Kind::Input
            && self
                .index()
                .held_by_backend(&FileRef::new(kind, subfolder, name).key())
    }

    /// An upload was stored: `saved` is ComfyUI's answer, `{"name", "subfolder", "type"}`.
    /// An input joins the upload names; an output or temp file reserves its shown name.
    pub fn note_upload(&self, saved: &Value) {
        let (Some(name), Some(kind)) = (
            saved["name"].as_str(),
            saved["type"].as_str().and_then(Kind::parse),
        ) else {
            return;
        };
        // The subfolder as `/view` and loaders will spell it (`./webcam` is `webcam`).
        let Ok(r) = FileRef::from_view(
            Some(name),
            Some(saved["subfolder"].as_str().unwrap_or("")),
            Some(kind.as_str()),
        ) else {
            return;
        };
        if kind != Kind::Input {
            let key = r.key();
            self.index().reserve(key.clone());
            self.persist_alias(&key, (GATE_OWNER.to_string(), r.name.clone()));
            return;
        }
        let rel = r.rel();
        self.uploads.rcu(|old| {
            let mut next = HashSet::clone(old);
            next.insert(rel.clone());
            next
        });
    }
}

/// The `(type, subfolder, shown name)` of every file a history entry's `outputs` lists (any
/// type but `input`, at any depth: `images`, `gifs`, `audio`, … as ComfyUI's UI outputs name
/// them), in order.
pub fn output_files(entry: &Value) -> Vec<FileKey> {
    let mut out = Vec::new();
    collect_file_items(&entry["outputs"], &mut out);
    out
}

/// A file item (`{"filename", "type", "subfolder"?}`, both strings): `Some(Some(key))` for a
/// backend's file of any type but `input`, `Some(None)` for an input; `None` for anything else.
fn file_item(map: &serde_json::Map<String, Value>) -> Option<Option<FileKey>> {
    let name = map.get("filename")?.as_str()?;
    let kind = map.get("type")?.as_str()?;
    let sub = map.get("subfolder").and_then(Value::as_str).unwrap_or("");
    Some((kind != "input").then(|| (kind.to_string(), sub.to_string(), name.to_string())))
}

/// The `(type, subfolder, filename)` of every file item (type not `input`) in a history
/// entry's `outputs`, at any depth.
pub(crate) fn collect_file_items(value: &Value, out: &mut Vec<FileKey>) {
    match value {
        Value::Object(map) => match file_item(map) {
            Some(key) => out.extend(key),
            None => map.values().for_each(|v| collect_file_items(v, out)),
        },
        Value::Array(items) => items.iter().for_each(|v| collect_file_items(v, out)),
        _ => {}
    }
}
