//! File references from clients: a `/view` query (with `Range` / `If-None-Match` headers) served
//! from real directories, the same fields as a file item, a loader value (`"sub/x.png
//! [temp]"`), `/upload/mask`'s `original_ref`, the `/api/jobs` query and `%XX` path segments.
//! The input is `query\nheader: value\n…`. No parse may panic, and no reference a parser
//! accepts may name a path outside its type's directory.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use comfy_wire::files::refs::FileRef;
use comfy_wire::files::{Dirs, normalize, original_ref, view};
use comfy_wire::protocol::jobs;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

/// Input, output and temp directories holding one small PNG each (kept for the process).
static DIRS: LazyLock<(tempfile::TempDir, Dirs)> = LazyLock::new(|| {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dirs = Dirs::create(tmp.path()).expect("the ComfyUI directories");
    let png = comfy_wire::files::images::Image::solid(4, 4, 0x336699).to_png(&[], true);
    for dir in [&dirs.input, &dirs.output, &dirs.temp] {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("example.png"), &png).unwrap();
        std::fs::write(dir.join("sub").join("example.png"), &png).unwrap();
    }
    (tmp, dirs)
});

fn inside(dirs: &Dirs, r: &FileRef) {
    if let Some(path) = dirs.path_of(r) {
        let base = normalize(dirs.by_type(r.kind.as_str()).unwrap());
        assert!(
            normalize(&path).starts_with(&base),
            "{path:?} leaves {base:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let dirs = &DIRS.1;
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let query_line = lines.next().unwrap_or("");
    let query: Vec<(String, String)> = form_pairs(query_line);
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    let _ = view(dirs, &query, &Method::GET, &headers);
    let _ = view(dirs, &query, &Method::HEAD, &headers);
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    if let Ok(r) = FileRef::from_view(get("filename"), get("subfolder"), get("type")) {
        assert!(!r.name.contains('/') && !r.subfolder.split('/').any(|c| c == ".."));
        inside(dirs, &r);
    }
    if let Some(r) = FileRef::from_loader(query_line) {
        assert!(
            !r.subfolder.split('/').any(|c| c == ".." || c == "."),
            "{r:?}"
        );
        inside(dirs, &r);
        assert_eq!(FileRef::from_loader(&r.loader_value()), Some(r.clone()));
    }
    if let Ok(r) = original_ref(Some(query_line)) {
        inside(dirs, &r);
    }
    let _ = jobs::parse_query(&query);
    let _ = comfy_wire::http::percent_decode(query_line);
    let _ = Path::new(query_line);
});

fn form_pairs(q: &str) -> Vec<(String, String)> {
    let uri: http::Uri = match format!("/view?{q}").parse() {
        Ok(u) => u,
        Err(_) => return Vec::new(),
    };
    comfy_wire::http::query_pairs(&uri)
}
