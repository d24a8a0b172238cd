//! File references as ComfyUI reads them: a file is `(type, subfolder, filename)`, with `type`
//! one of `input`, `output`, `temp` (`folder_paths.get_directory_by_type`).
//!
//! Two spellings reach a server:
//! - a loader value (`LoadImage`'s `image`, and any input that `folder_paths.
//!   get_annotated_filepath` opens): `"sub/name.png"` means subfolder `sub` of `input/`, and an
//!   annotation suffix ` [input]`, ` [output]` or ` [temp]` picks the directory
//!   (`folder_paths.annotated_filepath`);
//! - `/view`'s query and a UI output's file item: `filename` (its annotation, if any, overrides
//!   `type`), `subfolder`, `type` (default `output`); `/view` keeps only the basename of
//!   `filename` and refuses a `filename` with `..` or a leading `/` (400) and a subfolder that
//!   leaves the directory (403) (`server.py::view_image`).

use std::fmt;
use std::path::Path;

use http::StatusCode;

use super::normalize;

/// Which of an instance's three file directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Input,
    Output,
    Temp,
}

impl Kind {
    /// `input`, `output`, `temp`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "input" => Some(Kind::Input),
            "output" => Some(Kind::Output),
            "temp" => Some(Kind::Temp),
            _ => None,
        }
    }

    /// The name ComfyUI uses in `type` fields and annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Input => "input",
            Kind::Output => "output",
            Kind::Temp => "temp",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits an annotation suffix off `name` (`folder_paths.annotated_filepath`: the suffix and the
/// character before it, normally a space, are cut).
pub fn split_annotation(name: &str) -> (&str, Option<Kind>) {
    for (suffix, kind) in [
        ("[output]", Kind::Output),
        ("[input]", Kind::Input),
        ("[temp]", Kind::Temp),
    ] {
        if name.ends_with(suffix) {
            let cut = name.len().saturating_sub(suffix.len() + 1);
            let cut = (0..=cut)
                .rev()
                .find(|i| name.is_char_boundary(*i))
                .unwrap_or(0);
            return (&name[..cut], Some(kind));
        }
    }
    (name, None)
}

/// One file: `(type, subfolder, filename)`; `subfolder` uses `/` and has no leading or trailing
/// `/`, `name` is a bare file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileRef {
    pub kind: Kind,
    pub subfolder: String,
    pub name: String,
}

/// A subfolder as a relative path with `/` separators, or `None` if it leaves its directory
/// (ComfyUI joins it to the directory and checks the common path). A `\\` is an ordinary
/// character, as on the POSIX hosts ComfyUI and the gate run on: it is never turned into a
/// separator after the check (that would let `..\\..` escape).
fn clean_subfolder(sub: &str) -> Option<String> {
    if Path::new(sub).is_absolute() || sub.contains('\0') {
        return None;
    }
    let root = Path::new("/dir");
    let norm = normalize(&root.join(sub));
    let rel = norm.strip_prefix(root).ok()?;
    Some(rel.to_str()?.trim_matches('/').to_string())
}

impl FileRef {
    /// A reference from its parts (leading and trailing `/` of `subfolder` dropped; nothing
    /// else is checked: parse client input with [`FileRef::from_loader`] or
    /// [`FileRef::from_view`]).
    pub fn new(kind: Kind, subfolder: &str, name: &str) -> FileRef {
        FileRef {
            kind,
            subfolder: subfolder.trim_matches('/').to_string(),
            name: name.to_string(),
        }
    }

    /// A loader value (`"photo.png"`, `"webcam/shot.png [temp]"`, `"ComfyUI_00002_.png
    /// [output]"`): type `input` unless annotated, the part before the last `/` is the
    /// subfolder. `None` for a value that cannot name a file in a directory: empty, a leading
    /// `/`, a `.` or `..` path component, a `\\` or NUL (the gate never places such a file;
    /// `photo..png` is an ordinary name, as LoadImage takes it).
    pub fn from_loader(value: &str) -> Option<FileRef> {
        let (path, kind) = split_annotation(value);
        let parent = path.split('/').any(|c| c == ".." || c == ".");
        if path.is_empty() || path.starts_with('/') || parent || path.contains(['\\', '\0']) {
            return None;
        }
        let (sub, name) = path.rsplit_once('/').unwrap_or(("", path));
        if name.is_empty() {
            return None;
        }
        Some(FileRef::new(kind.unwrap_or(Kind::Input), sub, name))
    }

    /// `/view`'s and a file item's spelling: `filename` (annotation overrides `kind`, only the
    /// basename is kept), `subfolder`, `kind` (default `output`). Errors as `/view` answers:
    /// 404 without a filename, 400 for an unknown type, a `..` or a leading `/`, 403 for a
    /// subfolder outside the directory.
    pub fn from_view(
        filename: Option<&str>,
        subfolder: Option<&str>,
        kind: Option<&str>,
    ) -> Result<FileRef, StatusCode> {
        let raw = filename.ok_or(StatusCode::NOT_FOUND)?;
        let (name, annotated) = split_annotation(raw);
        if name.is_empty() || name.starts_with('/') || name.contains("..") {
            return Err(StatusCode::BAD_REQUEST);
        }
        let kind = match annotated {
            Some(k) => k,
            None => Kind::parse(kind.unwrap_or("output")).ok_or(StatusCode::BAD_REQUEST)?,
        };
        let sub = clean_subfolder(subfolder.unwrap_or("")).ok_or(StatusCode::FORBIDDEN)?;
        let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
        Ok(FileRef::new(kind, &sub, base))
    }

    /// `subfolder/name` (or `name`), relative to the type's directory.
    pub fn rel(&self) -> String {
        if self.subfolder.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.subfolder, self.name)
        }
    }

    /// As a loader value: `rel`, annotated unless the type is `input` (and then too when the
    /// name itself ends in an annotation, `x [output]`: ComfyUI strips one suffix, so the value
    /// reads back as the same file).
    pub fn loader_value(&self) -> String {
        let rel = self.rel();
        match self.kind {
            Kind::Input if split_annotation(&rel).1.is_none() => rel,
            k => format!("{rel} [{k}]"),
        }
    }

    /// `(type, subfolder, filename)` as strings (the alias index's key).
    pub fn key(&self) -> (String, String, String) {
        (
            self.kind.as_str().to_string(),
            self.subfolder.clone(),
            self.name.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loader_value_reads_back_as_the_same_file() {
        // An input named like an annotated value keeps its own annotation (the file_refs fuzz
        // target checks this round trip on every input).
        for r in [
            FileRef::new(Kind::Input, "", "x [output]"),
            FileRef::new(Kind::Input, "sub", "y.png"),
            FileRef::new(Kind::Output, "", "z [temp]"),
            FileRef::new(Kind::Temp, "a/b", "w.png"),
        ] {
            assert_eq!(
                FileRef::from_loader(&r.loader_value()),
                Some(r.clone()),
                "{r:?}"
            );
        }
        assert_eq!(
            FileRef::new(Kind::Input, "", "x [output]").loader_value(),
            "x [output] [input]"
        );
        assert_eq!(
            FileRef::new(Kind::Input, "", "y.png").loader_value(),
            "y.png"
        );
    }

    #[test]
    fn loader_values_as_comfyui_reads_them() {
        let r = FileRef::from_loader("webcam/shot.png [temp]").unwrap();
        assert_eq!(r, FileRef::new(Kind::Temp, "webcam", "shot.png"));
        assert_eq!(r.loader_value(), "webcam/shot.png [temp]");
        let r = FileRef::from_loader("ComfyUI_00002_.png [output]").unwrap();
        assert_eq!(r, FileRef::new(Kind::Output, "", "ComfyUI_00002_.png"));
        let r = FileRef::from_loader("a/b/cat.png").unwrap();
        assert_eq!((r.kind, r.subfolder.as_str()), (Kind::Input, "a/b"));
        assert_eq!(r.loader_value(), "a/b/cat.png");
        assert_eq!(
            FileRef::from_loader("cat.png [input]").unwrap().rel(),
            "cat.png"
        );
        for bad in [
            "",
            "../x.png",
            "/etc/passwd",
            "a/../../x.png",
            " [temp]",
            "a\\..\\x.png",
        ] {
            assert_eq!(FileRef::from_loader(bad), None, "{bad:?}");
        }
        let dots = FileRef::from_loader("photo..png").unwrap();
        assert_eq!(dots.rel(), "photo..png", "an ordinary name");
    }

    #[test]
    fn view_queries_as_comfyui_reads_them() {
        let v = |f: Option<&str>, s: Option<&str>, t: Option<&str>| FileRef::from_view(f, s, t);
        assert_eq!(
            v(Some("x.png"), None, None).unwrap(),
            FileRef::new(Kind::Output, "", "x.png")
        );
        assert_eq!(
            v(Some("x.png [temp]"), Some("webcam/"), Some("input")).unwrap(),
            FileRef::new(Kind::Temp, "webcam", "x.png")
        );
        assert_eq!(v(None, None, None), Err(StatusCode::NOT_FOUND));
        assert_eq!(
            v(Some("x.png"), None, Some("models")),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            v(Some("../x.png"), None, None),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            v(Some("x.png"), Some("../.."), None),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(v(Some("a/x.png"), None, None).unwrap().name, "x.png");
    }
}
