//! Making the files a prompt names present on the backend that runs it (design §2 "Files follow
//! prompts"), just before the prompt is forwarded there.
//!
//! Every string input of every node is read as a loader value ([`FileRef::from_loader`]: what
//! `folder_paths.get_annotated_filepath` opens) and resolved ([`Files::locate`]):
//! - an input upload of the gate's is copied to the same path in the backend's `input/` (the
//!   gate's input namespace is the one clients see; backends' are copies of it);
//! - an output or temp file on that same backend is named by its real name there;
//! - an output or temp file held by the gate or another backend is copied into the backend's
//!   `input/comfy-gate/` under a name made from its content (so it never overwrites a file of
//!   the backend's own) and the forwarded prompt names the copy;
//! - an output or temp file the gate never saw is looked for on the backends (`HEAD /view`)
//!   and copied from the first that has it, when the backend that runs the prompt lacks it;
//! - anything else is left to the backend to judge, as ComfyUI would.
//!
//! What was placed where is remembered, and checked with a `HEAD /view` before it is relied
//! on (a backend restarted on an empty directory gets its copies again).
//!
//! The client's prompt is never changed: [`Files::ensure_inputs`] returns the rewrites for the
//! copy that is forwarded.

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Files;
use super::resolve::{self, Location};
use crate::error::GateError;
use crate::fleet::Fleet;
use comfy_wire::files::refs::{FileRef, Kind};

/// The subfolder of a backend's `input/` that holds copies of files made elsewhere.
pub const COPIES_SUBFOLDER: &str = "comfy-gate";

/// One input of the forwarded prompt to change: `prompt[node].inputs[input] = value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rewrite {
    pub node: String,
    pub input: String,
    pub value: String,
}

/// Applies `rewrites` to a prompt (the forwarded copy).
pub fn apply(prompt: &mut Value, rewrites: &[Rewrite]) {
    for r in rewrites {
        if let Some(slot) = prompt
            .get_mut(&r.node)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(|i| i.get_mut(&r.input))
        {
            *slot = Value::String(r.value.clone());
        }
    }
}

/// `POST /upload/image` of `bytes` as `(kind, subfolder, name)` on backend `i`, overwriting,
/// with the body built by reqwest's multipart encoder (the file name is escaped as RFC 7578
/// asks, so quotes and non-ASCII names arrive as sent).
pub async fn upload_to(
    fleet: &Fleet,
    i: usize,
    target: &FileRef,
    bytes: Vec<u8>,
) -> Result<(), GateError> {
    let b = fleet.get(i);
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(target.name.clone())
        .mime_str("application/octet-stream")
        .map_err(|e| GateError::BadRequest(e.to_string()))?;
    let form = reqwest::multipart::Form::new()
        .text("type", target.kind.as_str())
        .text("subfolder", target.subfolder.clone())
        .text("overwrite", "true")
        .part("image", part);
    let content_type = format!("multipart/form-data; boundary={}", form.boundary());
    let stream = http_body_util::StreamBody::new(futures_util::StreamExt::map(
        form.into_stream(),
        |chunk| chunk.map(hyper::body::Frame::data),
    ));
    let body: Bytes = stream
        .collect()
        .await
        .map_err(|e| GateError::BadRequest(format!("multipart body: {e}")))?
        .to_bytes();
    let (code, _, _) = fleet
        .upstream
        .call(
            &b.config,
            Method::POST,
            "/upload/image",
            Some(body),
            Some(&content_type),
            None,
        )
        .await?;
    if !code.is_success() {
        // The backend answered, and will not take this file (too large, a name it cannot
        // write): the prompt cannot run there, but the backend is not down.
        return Err(GateError::BadRequest(format!(
            "backend {} refused the file {}: {code}",
            b.name(),
            target.rel()
        )));
    }
    Ok(())
}

/// Whether a file placed on backend `i` earlier is still there (the backend may have been
/// restarted on an empty directory): `HEAD /view` finds it with the placed size.
async fn still_there(
    fleet: &Fleet,
    i: usize,
    r: &FileRef,
    bytes: &[u8],
) -> Result<bool, GateError> {
    Ok(resolve::size_on(fleet, i, r).await? == Some(bytes.len() as u64))
}

/// Every string input of a prompt: `(node id, input name, value)`.
fn string_inputs(prompt: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (id, node) in prompt.as_object().into_iter().flatten() {
        for (input, v) in node["inputs"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.push((id.clone(), input.clone(), s.to_string()));
            }
        }
    }
    out
}

impl Files {
    /// Makes every file `prompt` names present on backend `backend` (see the module docs),
    /// once per content; returns the rewrites the forwarded copy needs. `Err` when a copy
    /// could not be made (the backend or the file's owner failed).
    pub async fn ensure_inputs(
        &self,
        fleet: &Fleet,
        backend: usize,
        prompt: &Value,
    ) -> Result<Vec<Rewrite>, GateError> {
        let target = fleet.get(backend).name().to_string();
        let mut rewrites = Vec::new();
        for (node, input, value) in string_inputs(prompt) {
            let Some(r) = FileRef::from_loader(&value) else {
                continue;
            };
            let at = self.locate(&r);
            let placed = match &at {
                // An output or temp file the gate never saw (made before it, or not through
                // it): the backend that has it is asked for.
                Location::Unknown if r.kind != Kind::Input => {
                    match self.owner_elsewhere(fleet, backend, &r).await? {
                        Some(owner) => self.place_copy(fleet, backend, &owner, &r).await?,
                        None => None,
                    }
                }
                Location::Unknown => None,
                Location::Gate(path) if r.kind == Kind::Input => {
                    self.place_upload(fleet, backend, &r, path).await?;
                    None
                }
                Location::Backend {
                    backend: owner,
                    real,
                } if *owner == target => (real.name != r.name).then(|| real.loader_value()),
                _ => self.place_copy(fleet, backend, &at, &r).await?,
            };
            if let Some(value) = placed {
                rewrites.push(Rewrite { node, input, value });
            }
        }
        Ok(rewrites)
    }

    /// Where an output or temp file unknown to the gate lives when `backend` lacks it: the
    /// first other backend that is up and has it; `None` when `backend` has it or no one does.
    async fn owner_elsewhere(
        &self,
        fleet: &Fleet,
        backend: usize,
        r: &FileRef,
    ) -> Result<Option<Location>, GateError> {
        if resolve::exists_on(fleet, backend, r).await? {
            return Ok(None);
        }
        for i in fleet.up().into_iter().filter(|i| *i != backend) {
            if resolve::exists_on(fleet, i, r).await.unwrap_or(false) {
                return Ok(Some(Location::Backend {
                    backend: fleet.get(i).name().to_string(),
                    real: r.clone(),
                }));
            }
        }
        Ok(None)
    }

    /// Copies the gate's input upload `r` (at `path`) to the same place on `backend`, unless
    /// that content is already there.
    async fn place_upload(
        &self,
        fleet: &Fleet,
        backend: usize,
        r: &FileRef,
        path: &std::path::Path,
    ) -> Result<(), GateError> {
        let Ok(bytes) = std::fs::read(path) else {
            return Ok(());
        };
        self.place_once(fleet, backend, r, bytes).await
    }

    /// Writes `bytes` as `r` on `backend` unless this content is the last placed there and still
    /// is; one placement at a time per file and backend.
    async fn place_once(
        &self,
        fleet: &Fleet,
        backend: usize,
        r: &FileRef,
        bytes: Vec<u8>,
    ) -> Result<(), GateError> {
        let key = (fleet.get(backend).name().to_string(), r.rel());
        let slot = self
            .placing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let _one_at_a_time = slot.lock().await;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let last = self.placed_lock().get(&key).copied();
        if last == Some(digest) && still_there(fleet, backend, r, &bytes).await? {
            return Ok(());
        }
        upload_to(fleet, backend, r, bytes).await?;
        self.placed_lock().insert(key, digest);
        Ok(())
    }

    /// Copies an output or temp file made elsewhere (`at`) into `backend`'s
    /// `input/comfy-gate/`; the loader value naming the copy. `Err(BadRequest)` when the file cannot be had (gone, or its owner cannot be asked) or the
    /// target refused it: the prompt's error, never a reason to forward the shown name; other
    /// errors when the target could not be reached.
    async fn place_copy(
        &self,
        fleet: &Fleet,
        backend: usize,
        at: &Location,
        r: &FileRef,
    ) -> Result<Option<String>, GateError> {
        let target = fleet.get(backend).name().to_string();
        let source = match at {
            Location::Backend { backend, real } => Some((backend.clone(), real.clone())),
            _ => None,
        };
        // A backend's outputs do not change: one copy per target. The gate's own files can
        // (an upload with overwrite), so those are compared by content below.
        let known = source.as_ref().and_then(|(owner, real)| {
            self.copies_lock()
                .get(&(target.clone(), owner.clone(), real.clone()))
                .cloned()
        });
        if let Some((copy, size)) = known
            && resolve::size_on(fleet, backend, &copy).await? == Some(size)
        {
            return Ok(Some(copy.loader_value()));
        }
        // A file the gate cannot copy is never forwarded under its shown name: the target may
        // hold another file of that name (outputs collide across backends). An owner that
        // cannot be asked is not the target's fault either, so this is the prompt's error.
        let unavailable = |why: String| {
            GateError::BadRequest(format!("{} is not available: {why}", r.loader_value()))
        };
        let bytes = match self.read(fleet, at).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(unavailable("it no longer exists where it was made".into())),
            Err(e) => return Err(unavailable(e.to_string())),
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let name = source.as_ref().map_or(&r.name, |(_, real)| &real.name);
        if name.chars().any(char::is_control) {
            // It would go into a multipart header; ComfyUI on POSIX writes such names, the gate
            // does not copy them.
            return Err(unavailable("its name has control characters".into()));
        }
        let copy = FileRef::new(Kind::Input, COPIES_SUBFOLDER, &format!("{hex}-{name}"));
        let size = bytes.len() as u64;
        self.place_once(fleet, backend, &copy, bytes).await?;
        let value = copy.loader_value();
        if let Some((owner, real)) = source {
            self.copies_lock()
                .insert((target, owner, real), (copy, size));
        }
        Ok(Some(value))
    }

    fn placed_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), [u8; 32]>> {
        self.placed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn copies_lock(&self) -> std::sync::MutexGuard<'_, super::PlacedCopies> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_change_only_the_named_inputs() {
        let mut prompt = serde_json::json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "x.png [output]"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}
        });
        let before = prompt.clone();
        apply(
            &mut prompt,
            &[
                Rewrite {
                    node: "1".into(),
                    input: "image".into(),
                    value: "comfy-gate/ab-x.png".into(),
                },
                Rewrite {
                    node: "9".into(),
                    input: "image".into(),
                    value: "ignored".into(),
                },
            ],
        );
        assert_eq!(prompt["1"]["inputs"]["image"], "comfy-gate/ab-x.png");
        assert_eq!(prompt["2"], before["2"]);
        assert!(prompt.get("9").is_none());
        let found = string_inputs(&before);
        assert_eq!(
            found,
            [
                (
                    "1".to_string(),
                    "image".to_string(),
                    "x.png [output]".to_string()
                ),
                (
                    "2".to_string(),
                    "filename_prefix".to_string(),
                    "p".to_string()
                )
            ]
        );
    }
}
