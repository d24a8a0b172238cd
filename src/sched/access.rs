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
use comfy_wire::files::refs::{FileRef, Kind, split_annotation};

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
        match folder_verdict(name, r) {
            Some(verdict) => verdict,
            None => self.listed_for(name, std::slice::from_ref(r))[0],
        }
    }

    /// For each of `refs`, whether one of user `name`'s prompts listed it (its history entry's
    /// outputs, or the `executed` outputs of its run): one pass over the user's prompts for
    /// all of them.
    fn listed_for(&self, name: &str, refs: &[FileRef]) -> Vec<bool> {
        let mut found = vec![false; refs.len()];
        let s = self.lock();
        for rec in s.table.records_of_user(name) {
            let entry = self.history.summary(&rec.id);
            let outputs = rec
                .log
                .outputs
                .values()
                .chain(entry.as_deref().map(|e| &e["outputs"]));
            for v in outputs {
                for (i, r) in refs.iter().enumerate() {
                    found[i] = found[i] || lists(v, r);
                }
            }
            if found.iter().all(|f| *f) {
                break;
            }
        }
        found
    }

    /// ComfyUI's 400 for a prompt of `caller` that names a file it may not read (or saves into
    /// another user's folder), as ComfyUI answers for a file it does not have (LoadImage's
    /// `Invalid image file`); `None` if it names none.
    pub fn foreign_file_refusal(&self, caller: &Caller, prompt: &Value) -> Option<Value> {
        let name = caller.user_name().filter(|_| !caller.sees_all())?;
        let nodes = prompt.as_object()?;
        // (node, input, value) of the file references whose verdict needs the user's listings.
        let mut to_list: Vec<(&str, &str, &str, FileRef)> = Vec::new();
        for (id, node) in nodes {
            let Some(inputs) = node["inputs"].as_object() else {
                continue;
            };
            for (input, value) in inputs {
                let Some(text) = value.as_str() else {
                    continue;
                };
                let verdict = if input == "filename_prefix" {
                    // A save goes to its own folder, not into another user's.
                    Some(saves_in_own_folder(name, text))
                } else {
                    match FileRef::from_loader(text) {
                        Some(r) => match folder_verdict(name, &r) {
                            None => {
                                to_list.push((id, input, text, r));
                                continue;
                            }
                            verdict => verdict,
                        },
                        // Not a file of the input, output or temp folders: a path that leaves
                        // them (absolute, climbing) is refused, since ComfyUI's loaders would
                        // open it as it stands.
                        None => Some(!names_a_file_outside(text)),
                    }
                };
                if verdict == Some(false) {
                    return Some(refusal(id, node, input, text));
                }
            }
        }
        let refs: Vec<FileRef> = to_list.iter().map(|(.., r)| r.clone()).collect();
        let listed = self.listed_for(name, &refs);
        let (id, input, text, _) = to_list.iter().zip(listed).find(|(_, l)| !l)?.0;
        Some(refusal(id, &nodes[*id], input, text))
    }
}

/// ComfyUI's 400 body for `node`'s `input` naming a file `text` it cannot have.
fn refusal(id: &str, node: &Value, input: &str, text: &str) -> Value {
    let error = errors::custom_validation_failed(input, &format!("Invalid image file: {text}"));
    let node_errors = json!({ id: {
        "errors": [error],
        "dependent_outputs": [],
        "class_type": node["class_type"],
    }});
    errors::outputs_failed("", node_errors)
}

/// What the folder of `r` decides for user `name`: `Some(true)` its own upload folder,
/// `Some(false)` another user's (or a folder that climbs), for an input a shared file
/// `Some(true)`; `None` for an output or temp file outside the upload folders, which only the
/// user's own prompts' listings decide.
fn folder_verdict(name: &str, r: &FileRef) -> Option<bool> {
    // The folder as a backend's file system will read it: `a//b` and `a/./b` are `a/b`; one
    // that climbs (`..`) is nobody's to read.
    let Some(subfolder) = plain_subfolder(&r.subfolder) else {
        return Some(false);
    };
    // Case ignored: one folder on a backend whose file system ignores case.
    match Caller::upload_owner(&subfolder) {
        Some(owner) => Some(owner.eq_ignore_ascii_case(name)),
        None if r.kind == Kind::Input => Some(true),
        None => None,
    }
}

/// Whether a `filename_prefix` of user `name` saves outside other users' upload folders.
fn saves_in_own_folder(name: &str, prefix: &str) -> bool {
    let Some(dir) = plain_subfolder(prefix) else {
        return false;
    };
    Caller::upload_owner(&dir).is_none_or(|owner| owner.eq_ignore_ascii_case(name))
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
/// `\\…`, `C:…`), climbing (a `..` segment) or Windows-separated (`\\`), and file-like: an
/// annotation (` [output]`), a file extension on its last segment, or no space at all (so text
/// such as `/imagine a cat` is not taken for one).
fn names_a_file_outside(text: &str) -> bool {
    let (t, annotation) = split_annotation(text.trim());
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
    let file_like = annotation.is_some() || has_extension || !t.contains(char::is_whitespace);
    (absolute || climbs || t.contains('\\')) && file_like && t.len() > 1
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
        assert_eq!(Caller::upload_owner("Users/Bob/x"), Some("Bob"));
        assert!(saves_in_own_folder("alice", "users/alice/x"));
        assert!(saves_in_own_folder("alice", "ComfyUI"));
        assert!(!saves_in_own_folder("alice", "users/bob/x"));
        assert!(!saves_in_own_folder("alice", "USERS//Bob/x"));
        assert!(!saves_in_own_folder("alice", "../x"));
    }

    #[test]
    fn paths_outside_the_folders_are_told_from_text() {
        for path in [
            "/srv/comfy/output/ComfyUI_00001_.png",
            "../output/a.png",
            "x/../../y.webp",
            "C:\\data\\a.jpg",
            "\\\\host\\a.png",
            "../input/users/bob/x.png [output]",
            "/srv/comfy/input/users/bob/x [input]",
            "users\\bob\\x.png",
            "/etc/passwd",
            "..",
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
            "a cat [output]",
        ] {
            assert!(!names_a_file_outside(text), "{text}");
        }
    }
}
