//! The one resolver for file references: where a `(type, subfolder, filename)` lives, as the
//! gate knows it. Uploads of every type are in the gate's store; output and temp files are on
//! the backend the alias index names (or the gate's store, for its own uploads); anything else
//! is unknown to the gate and may still be on a backend (a file made before the gate saw it,
//! a backend's own input file), which the callers ask or leave to the backend to judge.

use std::path::PathBuf;

use http::{Method, StatusCode};

use super::Files;
use super::alias::GATE_OWNER;
use crate::error::GateError;
use crate::fleet::Fleet;
use comfy_wire::files::refs::{FileRef, Kind};

/// Where a reference lives.
#[derive(Clone, Debug, PartialEq)]
pub enum Location {
    /// In the gate's store, at this path (which may not exist: a temp upload from before a
    /// restart, as ComfyUI empties `temp/` at start).
    Gate(PathBuf),
    /// On a backend (its configured name), under its real reference there (the shown name may
    /// differ: the alias index renames colliding outputs).
    Backend { backend: String, real: FileRef },
    /// Not known to the gate.
    Unknown,
}

impl Files {
    /// Where `r` lives (see [`Location`]).
    pub fn locate(&self, r: &FileRef) -> Location {
        let gate_path = || self.dirs.path_of(r);
        if r.kind == Kind::Input {
            return match gate_path() {
                Some(p) if self.uploads.load().contains(&r.rel()) => Location::Gate(p),
                _ => Location::Unknown,
            };
        }
        let alias = self.index().by_alias.get(&r.key()).cloned();
        match alias {
            Some((owner, real)) if owner == GATE_OWNER => match gate_path() {
                Some(p) => Location::Gate(p.with_file_name(real)),
                None => Location::Unknown,
            },
            Some((backend, real)) => Location::Backend {
                backend,
                real: FileRef::new(r.kind, &r.subfolder, &real),
            },
            None => match gate_path() {
                Some(p) if p.is_file() => Location::Gate(p),
                _ => Location::Unknown,
            },
        }
    }

    /// The bytes of the file at `at`: read from the gate's store, or fetched from the owner's
    /// `/view`. `Ok(None)` when it does not exist there (or is unknown); `Err` when the owner
    /// could not be asked.
    pub async fn read(&self, fleet: &Fleet, at: &Location) -> Result<Option<Vec<u8>>, GateError> {
        match at {
            Location::Gate(path) => Ok(std::fs::read(path).ok()),
            Location::Backend { backend, real } => {
                let Some(i) = fleet.index_of(backend) else {
                    return Ok(None);
                };
                read_from(fleet, i, real).await
            }
            Location::Unknown => Ok(None),
        }
    }
}

/// Whether backend `i` has `r` (`HEAD /view` answered 200).
pub async fn exists_on(fleet: &Fleet, i: usize, r: &FileRef) -> Result<bool, GateError> {
    Ok(size_on(fleet, i, r).await?.is_some())
}

/// The size of `r` on backend `i` (`HEAD /view`: its `Content-Length`, 0 when absent), or
/// `None` when it does not have it.
pub async fn size_on(fleet: &Fleet, i: usize, r: &FileRef) -> Result<Option<u64>, GateError> {
    let (code, headers, _) = fleet
        .upstream
        .call(
            &fleet.get(i).config,
            Method::HEAD,
            &format!("/view?{}", view_query(r)),
            None,
            None,
            None,
        )
        .await?;
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((code == StatusCode::OK).then_some(length))
}

/// `/view`'s query for `r`.
fn view_query(r: &FileRef) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("filename", &r.name)
        .append_pair("subfolder", &r.subfolder)
        .append_pair("type", r.kind.as_str())
        .finish()
}

/// `GET /view` of `r` on backend `i`; `Ok(None)` for a 404 (or any other refusal).
pub async fn read_from(fleet: &Fleet, i: usize, r: &FileRef) -> Result<Option<Vec<u8>>, GateError> {
    let query = view_query(r);
    let (code, _, body) = fleet
        .upstream
        .call(
            &fleet.get(i).config,
            Method::GET,
            &format!("/view?{query}"),
            None,
            None,
            None,
        )
        .await?;
    Ok((code == StatusCode::OK).then(|| body.to_vec()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::files::{AliasStore, FileKey};

    struct NoStore;
    impl AliasStore for NoStore {
        fn save_alias(&self, _: &FileKey, _: &(String, String)) -> Result<(), String> {
            Ok(())
        }
        fn remove_aliases(&self, _: &[FileKey]) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn references_resolve_to_the_gate_a_backend_or_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path(), Arc::new(NoStore), Vec::new(), usize::MAX).unwrap();
        let saved = |name: &str, sub: &str, kind: &str| serde_json::json!({"name": name, "subfolder": sub, "type": kind});
        files.note_upload(&saved("cat.png", "pets", "input"));
        files.note_upload(&saved("ComfyUI_00001_.png", "", "output"));
        let mut out = serde_json::json!({"images": [
            {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
        ]});
        files.alias_outputs("a", &mut out);
        assert_eq!(out["images"][0]["filename"], "ComfyUI_00002_.png");

        let loc = |v: &str| files.locate(&FileRef::from_loader(v).unwrap());
        assert_eq!(
            loc("pets/cat.png"),
            Location::Gate(files.dirs.input.join("pets").join("cat.png"))
        );
        assert_eq!(loc("pets/cat.png [input]"), loc("pets/cat.png"));
        assert_eq!(
            loc("ComfyUI_00001_.png [output]"),
            Location::Gate(files.dirs.output.join("ComfyUI_00001_.png"))
        );
        assert_eq!(
            loc("ComfyUI_00002_.png [output]"),
            Location::Backend {
                backend: "a".into(),
                real: FileRef::new(Kind::Output, "", "ComfyUI_00001_.png"),
            }
        );
        assert_eq!(loc("cat.png"), Location::Unknown);
        assert_eq!(loc("ComfyUI_00003_.png [output]"), Location::Unknown);
        assert!(files.uploaded("pets/cat.png [input]"));
        assert!(files.taken_by_backend(Kind::Output, "", "ComfyUI_00002_.png"));
        assert!(!files.taken_by_backend(Kind::Output, "", "ComfyUI_00001_.png"));
    }
}
