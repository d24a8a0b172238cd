//! What a caller may see and touch when auth is on: its own user's prompts (admins: all), and
//! the files it may read: its own uploads (kept under its own folder,
//! [`Caller::upload_subfolder`]), the outputs its own prompts made (listed in their history
//! entries or, while they run, their `executed` events), and every file of the backends' own
//! that no user owns (an input folder's shared files). Admins, and everyone with auth off, may
//! read every file (ComfyUI's open model).
//!
//! Why by listing, not by folder: an output's name is the client's `filename_prefix` and
//! ComfyUI's counter, in one folder for everyone, and a user may name any subfolder; what the
//! gate knows for sure is which prompt listed which file.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::Scheduler;
use super::tenant::Caller;
use crate::protocol::errors;
use comfy_wire::files::refs::{FileRef, Kind};

impl Scheduler {
    /// Whether `caller` may see or act on prompt `id`: always with auth off or for an admin;
    /// otherwise only a prompt of the gate's that the caller's user submitted (a prompt the
    /// gate does not know is nobody's to touch).
    pub fn may_touch(&self, caller: &Caller, id: &str) -> bool {
        caller.sees_all()
            || self
                .lock()
                .table
                .get(id)
                .is_some_and(|r| caller.may_access(r.tenant.user.as_deref()))
    }

    /// Ids of the prompts user `name` submitted (auth on), every stage.
    pub fn ids_of_user(&self, name: &str) -> HashSet<String> {
        self.lock()
            .table
            .records_of_user(name)
            .map(|r| r.id.clone())
            .collect()
    }

    /// Whether `caller` may read file `r` (`/view`, a mask's original, a loader input).
    pub fn may_read_file(&self, caller: &Caller, r: &FileRef) -> bool {
        let Some(name) = caller.user_name().filter(|_| !caller.sees_all()) else {
            return true;
        };
        // The folder as a backend's file system will read it: `a//b` and `a/./b` are `a/b`; one
        // that climbs (`..`) is nobody's to read.
        let Some(subfolder) = plain_subfolder(&r.subfolder) else {
            return false;
        };
        let folder_owner = Caller::upload_owner(&subfolder);
        if folder_owner == Some(name) {
            return true;
        }
        if r.kind == Kind::Input {
            // Another user's upload folder, or the backends' shared inputs.
            return folder_owner.is_none();
        }
        let s = self.lock();
        for rec in s.table.records_of_user(name) {
            let entry = self.history.get(&rec.id);
            let listed = |v: &Value| lists(v, r);
            if rec.log.outputs.values().any(listed)
                || entry.as_deref().is_some_and(|e| listed(&e["outputs"]))
            {
                return true;
            }
        }
        false
    }

    /// ComfyUI's 400 for a prompt of `caller` that names a file it may not read, as ComfyUI
    /// answers for a file it does not have (LoadImage's `Invalid image file`); `None` if it
    /// names none.
    pub fn foreign_file_refusal(&self, caller: &Caller, prompt: &Value) -> Option<Value> {
        if caller.sees_all() {
            return None;
        }
        let nodes = prompt.as_object()?;
        for (id, node) in nodes {
            let Some(inputs) = node["inputs"].as_object() else {
                continue;
            };
            for (input, value) in inputs {
                let Some(text) = value.as_str() else {
                    continue;
                };
                let readable = match FileRef::from_loader(text) {
                    Some(r) => self.may_read_file(caller, &r),
                    // Not a file of the input, output or temp folders: a path that leaves them
                    // (absolute, or through `..`) naming a file is refused too, since ComfyUI's
                    // loaders would open it as it stands.
                    None => !names_a_file_outside(text),
                };
                if readable {
                    continue;
                }
                let reason = format!("Invalid image file: {}", value.as_str().unwrap_or(""));
                let error = errors::custom_validation_failed(input, &reason);
                let node_errors = json!({ id.as_str(): {
                    "errors": [error],
                    "dependent_outputs": [],
                    "class_type": node["class_type"],
                }});
                return Some(errors::outputs_failed("", node_errors));
            }
        }
        None
    }
}

/// `subfolder` with empty and `.` segments dropped; `None` if a segment is `..` or it uses `\\`.
fn plain_subfolder(subfolder: &str) -> Option<String> {
    if subfolder.contains('\\') {
        return None;
    }
    let mut kept = Vec::new();
    for segment in subfolder.split('/') {
        match segment {
            "" | "." => {}
            ".." => return None,
            s => kept.push(s),
        }
    }
    Some(kept.join("/"))
}

/// Whether a string input reads as a path to a file outside ComfyUI's folders: absolute (`/…`,
/// `\\…`, `C:…`) or climbing (`..` segment), with a file extension on its last segment (so text
/// such as `/imagine a cat` is not taken for one).
fn names_a_file_outside(text: &str) -> bool {
    let t = text.trim();
    let absolute = t.starts_with('/')
        || t.starts_with('\\')
        || t.as_bytes().get(1) == Some(&b':') && t.as_bytes()[0].is_ascii_alphabetic();
    let climbs = t.split(['/', '\\']).any(|s| s == "..");
    let last = t.rsplit(['/', '\\']).next().unwrap_or(t);
    let has_extension = last.rsplit_once('.').is_some_and(|(stem, ext)| {
        !stem.is_empty()
            && (1..=5).contains(&ext.len())
            && ext.chars().all(|c| c.is_ascii_alphanumeric())
    });
    (absolute || climbs) && has_extension
}

/// Whether a UI output value lists file `r` (a file item `{filename, subfolder, type}` at any
/// depth).
fn lists(value: &Value, r: &FileRef) -> bool {
    match value {
        Value::Object(map) => {
            let is = map.get("filename").and_then(Value::as_str) == Some(r.name.as_str())
                && map.get("subfolder").and_then(Value::as_str).unwrap_or("") == r.subfolder
                && map.get("type").and_then(Value::as_str) == Some(r.kind.as_str());
            is || map.values().any(|v| lists(v, r))
        }
        Value::Array(items) => items.iter().any(|v| lists(v, r)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subfolders_as_a_file_system_reads_them() {
        assert_eq!(plain_subfolder("users//bob").as_deref(), Some("users/bob"));
        assert_eq!(
            plain_subfolder("./users/./bob/").as_deref(),
            Some("users/bob")
        );
        assert_eq!(plain_subfolder("").as_deref(), Some(""));
        assert_eq!(plain_subfolder("users/alice/../bob"), None);
        assert_eq!(plain_subfolder("users\\bob"), None);
        assert_eq!(
            Caller::upload_owner(&plain_subfolder("users//bob/x").unwrap()),
            Some("bob")
        );
    }

    #[test]
    fn paths_outside_the_folders_are_told_from_text() {
        for path in [
            "/srv/comfy/output/ComfyUI_00001_.png",
            "../output/a.png",
            "x/../../y.webp",
            "C:\\data\\a.jpg",
            "\\\\host\\a.png",
        ] {
            assert!(names_a_file_outside(path), "{path}");
        }
        for text in [
            "/imagine a cat",
            "a photo of a cat.",
            "cat.png",
            "sub/cat.png",
            "...and then",
            "/",
            "..",
        ] {
            assert!(!names_a_file_outside(text), "{text}");
        }
    }
}
