//! Files across backends (design §2 "Files follow prompts").
//!
//! Output names collide across backends (`ComfyUI_00001_.png` everywhere), so the gate presents
//! one namespace, as a single ComfyUI would: the first file seen under a name keeps it, a later
//! file from another backend under the same name is shown under the next free counter
//! (`ComfyUI_00002_.png`). The alias index maps each shown name back to (backend, real name),
//! and `/view` follows it. Uploads are kept by the gate (ComfyUI's collision rules, in its state
//! directory) and copied to a backend just before a prompt that names them runs there.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::GateError;
use crate::fleet::Fleet;
use comfy_wire::files::Dirs;

/// `(type, subfolder, filename)`.
pub type FileKey = (String, String, String);

/// Where the alias index is made durable (the scheduler's store): a shown name, and the
/// backend (by configured name) and real name behind it.
pub trait AliasStore: Send + Sync {
    fn save_alias(&self, shown: &FileKey, target: &(String, String)) -> Result<(), String>;
}

#[derive(Default)]
struct AliasIndex {
    by_real: HashMap<(String, FileKey), String>,
    by_alias: HashMap<FileKey, (String, String)>,
}

/// The next name in ComfyUI's `<prefix>_<counter>_.<ext>` sequence, or `name (n).ext`.
fn bump(name: &str, n: u32) -> String {
    let Some((before_ext, ext)) = name.rsplit_once('.') else {
        return format!("{name} ({n})");
    };
    let counter = before_ext
        .strip_suffix('_')
        .and_then(|body| body.rsplit_once('_'))
        .filter(|(_, digits)| !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()));
    match counter {
        Some((prefix, digits)) => {
            let value = digits.parse::<u64>().unwrap_or(0) + u64::from(n);
            format!("{prefix}_{value:0width$}_.{ext}", width = digits.len())
        }
        None => format!("{before_ext} ({n}).{ext}"),
    }
}

impl AliasIndex {
    fn insert(&mut self, shown: FileKey, backend: String, real: String) {
        let (kind, sub, name) = shown.clone();
        self.by_real
            .insert((backend.clone(), (kind, sub, real.clone())), name);
        self.by_alias.insert(shown, (backend, real));
    }

    /// The shown name of a backend's file; `Some(new)` when it was just assigned.
    fn alias(&mut self, backend: &str, key: FileKey) -> (String, bool) {
        if let Some(a) = self.by_real.get(&(backend.to_string(), key.clone())) {
            return (a.clone(), false);
        }
        let (kind, sub, name) = key.clone();
        let mut shown = name.clone();
        let mut n = 0;
        while self
            .by_alias
            .contains_key(&(kind.clone(), sub.clone(), shown.clone()))
        {
            n += 1;
            shown = bump(&name, n);
        }
        self.by_alias
            .insert((kind, sub, shown.clone()), (backend.to_string(), name));
        self.by_real
            .insert((backend.to_string(), key), shown.clone());
        (shown, true)
    }
}

/// The gate's files: uploads it keeps, and the one namespace of outputs across backends.
pub struct Files {
    index: Mutex<AliasIndex>,
    store: Arc<dyn AliasStore>,
    /// Uploaded inputs, by ComfyUI's rules.
    pub dirs: Dirs,
    /// `(backend name, relative path, sha256)` already copied.
    placed: Mutex<HashSet<(String, String, [u8; 32])>>,
    /// Names of the uploads held (`cat.png`, `sub/cat.png`): read from the directory once at
    /// open, then kept by [`Files::note_upload`], so placement never touches the disk.
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
    /// (`(shown, (backend name, real name))`).
    pub fn open(
        state_dir: &Path,
        store: Arc<dyn AliasStore>,
        aliases: Vec<(FileKey, (String, String))>,
    ) -> std::io::Result<Self> {
        let dirs = Dirs::create(&state_dir.join("files"))?;
        let mut index = AliasIndex::default();
        for (shown, (backend, real)) in aliases {
            index.insert(shown, backend, real);
        }
        let mut uploads = HashSet::new();
        walk(&dirs.input, &dirs.input, &mut uploads);
        Ok(Self {
            index: Mutex::new(index),
            store,
            dirs,
            placed: Mutex::new(HashSet::new()),
            uploads: ArcSwap::from_pointee(uploads),
        })
    }

    /// Rewrites every file item (`{"filename", "subfolder", "type"}`) in a UI output from
    /// `backend` to its gate-wide name.
    pub fn alias_outputs(&self, backend: &str, value: &mut Value) {
        match value {
            Value::Object(map) => {
                let is_file = map.get("filename").is_some_and(Value::is_string)
                    && map.get("type").is_some_and(Value::is_string);
                if is_file && map["type"] != "input" {
                    let key = (
                        map["type"].as_str().unwrap_or("").to_string(),
                        map.get("subfolder")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        map["filename"].as_str().unwrap_or("").to_string(),
                    );
                    let (shown, new) = self
                        .index
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .alias(backend, key.clone());
                    if new {
                        let shown_key = (key.0, key.1, shown.clone());
                        let target = (backend.to_string(), key.2);
                        if let Err(e) = self.store.save_alias(&shown_key, &target) {
                            tracing::error!(error = %e, "could not persist a file alias");
                        }
                    }
                    map.insert("filename".into(), Value::String(shown));
                    return;
                }
                for v in map.values_mut() {
                    self.alias_outputs(backend, v);
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

    /// Whether the gate holds an upload of this name (`name [input]` too).
    pub fn uploaded(&self, name: &str) -> bool {
        let plain = name.strip_suffix(" [input]").unwrap_or(name);
        !plain.contains("..") && self.uploads.load().contains(plain)
    }

    /// The names of the uploads held (shared: a snapshot for one dispatch pass).
    pub fn upload_names(&self) -> Arc<HashSet<String>> {
        self.uploads.load_full()
    }

    /// An upload was stored: `saved` is ComfyUI's answer, `{"name", "subfolder", "type"}`.
    pub fn note_upload(&self, saved: &Value) {
        let Some(name) = saved["name"].as_str() else {
            return;
        };
        let rel = match saved["subfolder"].as_str().filter(|s| !s.is_empty()) {
            Some(sub) => format!("{}/{name}", sub.trim_matches('/')),
            None => name.to_string(),
        };
        self.uploads.rcu(|old| {
            let mut next = HashSet::clone(old);
            next.insert(rel.clone());
            next
        });
    }

    /// The backend (by name) and real name behind a shown `(type, subfolder, filename)`.
    pub fn resolve(&self, kind: &str, subfolder: &str, name: &str) -> Option<(String, String)> {
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_alias
            .get(&(kind.to_string(), subfolder.to_string(), name.to_string()))
            .cloned()
    }

    /// Copies every upload the prompt names (LoadImage `image` values and any other string input
    /// naming a stored file) to `backend`, once per content.
    pub async fn ensure_inputs(
        &self,
        fleet: &Fleet,
        backend: usize,
        prompt: &Value,
    ) -> Result<(), GateError> {
        let b = fleet.get(backend);
        let mut names = Vec::new();
        for node in prompt.as_object().into_iter().flat_map(|m| m.values()) {
            for v in node["inputs"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
            {
                if let Some(s) = v.as_str() {
                    let plain = s.strip_suffix(" [input]").unwrap_or(s);
                    if !plain.is_empty() && !plain.contains("..") && !plain.starts_with('/') {
                        names.push(plain.to_string());
                    }
                }
            }
        }
        for rel in names {
            let path = self.dirs.input.join(&rel);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            let key = (b.name().to_string(), rel.clone(), digest);
            if self
                .placed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&key)
            {
                continue;
            }
            let (subfolder, name) = match rel.rsplit_once('/') {
                Some((s, n)) => (s.to_string(), n.to_string()),
                None => (String::new(), rel.clone()),
            };
            let boundary = format!("comfygate{}", uuid::Uuid::new_v4().simple());
            let mut body = Vec::with_capacity(bytes.len() + 512);
            for (field, value) in [
                ("type", "input"),
                ("subfolder", subfolder.as_str()),
                ("overwrite", "true"),
            ] {
                body.extend_from_slice(
                    format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n").as_bytes(),
                );
            }
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(&bytes);
            body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
            let (code, _, _) = fleet
                .upstream
                .call(
                    &b.config,
                    Method::POST,
                    "/upload/image",
                    Some(Bytes::from(body)),
                    Some(&format!("multipart/form-data; boundary={boundary}")),
                    None,
                )
                .await?;
            if !code.is_success() {
                return Err(GateError::Backend {
                    backend: b.name().to_string(),
                    message: format!("upload of {rel} answered {code}"),
                });
            }
            self.placed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collisions_get_the_next_counter() {
        let mut idx = AliasIndex::default();
        let key = |n: &str| ("output".to_string(), String::new(), n.to_string());
        let mut shown = |b: &str, n: &str| idx.alias(b, key(n)).0;
        assert_eq!(shown("a", "ComfyUI_00001_.png"), "ComfyUI_00001_.png");
        assert_eq!(shown("b", "ComfyUI_00001_.png"), "ComfyUI_00002_.png");
        assert_eq!(shown("a", "ComfyUI_00002_.png"), "ComfyUI_00003_.png");
        assert_eq!(
            shown("b", "ComfyUI_00001_.png"),
            "ComfyUI_00002_.png",
            "stable"
        );
        assert_eq!(shown("a", "x.webp"), "x.webp");
        assert_eq!(shown("b", "x.webp"), "x (1).webp");
        assert_eq!(
            idx.by_alias[&key("ComfyUI_00003_.png")],
            ("a".into(), "ComfyUI_00002_.png".into())
        );
    }
}
