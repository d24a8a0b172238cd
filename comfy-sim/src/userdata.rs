//! `/userdata`, `/v2/userdata`, `/settings` and `/users` of ComfyUI's user manager, for the
//! single-user mode (user `default`). The `{file}` segment arrives still percent-encoded, so
//! `workflows%2Fa.json` names a file in a subdirectory, as with aiohttp.

use std::path::{Path, PathBuf};

use http::{Method, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::instance::Instance;
use comfy_wire::files::normalize;
use comfy_wire::http::{Body, json as json_resp, percent_decode, status, text};

fn user_root(inst: &Instance) -> PathBuf {
    inst.dirs.user.join("default")
}

/// `get_request_user_filepath`: decodes `%`-escapes and refuses paths that leave the user root.
fn user_path(inst: &Instance, raw: &str) -> Option<PathBuf> {
    let decoded = percent_decode(raw);
    let decoded = if decoded.contains('%') {
        percent_decode(&decoded)
    } else {
        decoded
    };
    let root = user_root(inst);
    let path = normalize(&root.join(decoded));
    if !path.starts_with(&root) {
        return None;
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    Some(path)
}

fn file_info(path: &Path, relative_to: &Path) -> Value {
    let meta = std::fs::metadata(path).ok();
    let secs = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    json!({
        "path": rel(path, relative_to),
        "size": meta.as_ref().map(|m| m.len()).unwrap_or(0),
        "modified": secs(meta.as_ref().and_then(|m| m.modified().ok())),
        "created": secs(meta.as_ref().and_then(|m| m.created().ok())),
    })
}

fn rel(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default()
}

/// The entries of `dir`, sorted; none if it cannot be read.
fn sorted_entries(dir: &Path) -> std::vec::IntoIter<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    entries.into_iter()
}

/// Visits `dir` depth-first in sorted order (a directory's content right after it), on an
/// explicit stack: a client can nest user directories as deep as the file system allows.
fn visit(dir: &Path, recurse: bool, mut each: impl FnMut(&Path, bool)) {
    let mut stack = vec![sorted_entries(dir)];
    while let Some(entries) = stack.last_mut() {
        let Some(p) = entries.next() else {
            stack.pop();
            continue;
        };
        let is_dir = p.is_dir();
        each(&p, is_dir);
        if is_dir && recurse {
            stack.push(sorted_entries(&p));
        }
    }
}

fn walk(dir: &Path, recurse: bool, out: &mut Vec<PathBuf>) {
    visit(dir, recurse, |p, is_dir| {
        if !is_dir {
            out.push(p.to_path_buf());
        }
    });
}

/// Routes under `/userdata`, `/v2/userdata`, `/settings` and `/users`; `None` if not one of them.
pub async fn handle(
    inst: &Instance,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> Option<Response<Body>> {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let _guard = inst.userdata_lock.lock().await;
    let root = user_root(inst);
    match (method, path) {
        (&Method::GET, "/users") => Some(json_resp(
            StatusCode::OK,
            &json!({ "storage": "server", "migrated": root.exists() }),
        )),
        (&Method::POST, "/users") => {
            let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let name = parsed["username"].as_str().unwrap_or("").trim().to_string();
            if name.is_empty() {
                return Some(json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": "username not provided" }),
                ));
            }
            if name.starts_with("__") {
                return Some(json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": "System User prefix not allowed" }),
                ));
            }
            let id: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            Some(json_resp(
                StatusCode::OK,
                &json!(format!("{id}_{}", uuid::Uuid::new_v4())),
            ))
        }
        (&Method::GET, "/userdata") => {
            let Some(dir) = q("dir").filter(|d| !d.is_empty()) else {
                return Some(text(StatusCode::BAD_REQUEST, "Directory not provided"));
            };
            let Some(path) = user_path(inst, dir) else {
                return Some(text(StatusCode::FORBIDDEN, "Invalid directory"));
            };
            if !path.exists() {
                return Some(text(StatusCode::NOT_FOUND, "Directory not found"));
            }
            let flag = |k: &str| q(k).is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let mut files = Vec::new();
            walk(&path, flag("recurse"), &mut files);
            let out: Vec<Value> = files
                .iter()
                .map(|f| {
                    if flag("full_info") {
                        file_info(f, &path)
                    } else if flag("split") {
                        let r = rel(f, &path);
                        let mut parts = vec![json!(r)];
                        parts.extend(r.split('/').map(|p| json!(p)));
                        Value::Array(parts)
                    } else {
                        json!(rel(f, &path))
                    }
                })
                .collect();
            Some(json_resp(StatusCode::OK, &Value::Array(out)))
        }
        (&Method::GET, "/v2/userdata") => {
            let sub = q("path").unwrap_or("");
            let Some(start) = user_path(inst, sub) else {
                return Some(text(StatusCode::BAD_REQUEST, "Invalid path requested"));
            };
            if !start.exists() {
                return Some(if sub.is_empty() {
                    json_resp(StatusCode::OK, &json!([]))
                } else {
                    text(StatusCode::NOT_FOUND, "Requested path not found")
                });
            }
            if !start.is_dir() {
                return Some(text(
                    StatusCode::BAD_REQUEST,
                    "Requested path is not a directory",
                ));
            }
            let mut dirs = Vec::new();
            let mut files = Vec::new();
            visit(&start, true, |p, is_dir| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let path = rel(p, &root);
                if is_dir {
                    dirs.push(json!({ "name": name, "path": path, "type": "directory" }));
                } else {
                    let info = file_info(p, &root);
                    files.push(json!({ "name": name, "path": path, "type": "file", "size": info["size"], "modified": info["modified"] }));
                }
            });
            dirs.extend(files);
            Some(json_resp(StatusCode::OK, &Value::Array(dirs)))
        }
        (_, p) if p.starts_with("/userdata/") => Some(userdata_file(
            inst,
            method,
            &p["/userdata/".len()..],
            query,
            body,
        )),
        (&Method::GET, "/settings") => Some(json_resp(
            StatusCode::OK,
            &Value::Object(read_settings(&root)),
        )),
        (&Method::POST, "/settings") => {
            let Ok(Value::Object(update)) = serde_json::from_slice::<Value>(body) else {
                return Some(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500 Internal Server Error\n\nServer got itself in trouble",
                ));
            };
            let mut settings = read_settings(&root);
            settings.extend(update);
            write_settings(&root, &settings);
            Some(status(StatusCode::OK))
        }
        (_, p) if p.starts_with("/settings/") => {
            let id = percent_decode(&p["/settings/".len()..]);
            let mut settings = read_settings(&root);
            if method == Method::GET {
                return Some(json_resp(
                    StatusCode::OK,
                    settings.get(&id).unwrap_or(&Value::Null),
                ));
            }
            let Ok(value) = serde_json::from_slice::<Value>(body) else {
                return Some(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500 Internal Server Error\n\nServer got itself in trouble",
                ));
            };
            settings.insert(id, value);
            write_settings(&root, &settings);
            Some(status(StatusCode::OK))
        }
        _ => None,
    }
}

fn read_settings(root: &Path) -> Map<String, Value> {
    std::fs::read(root.join("comfy.settings.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_settings(root: &Path, settings: &Map<String, Value>) {
    let _ = std::fs::create_dir_all(root);
    let _ = std::fs::write(
        root.join("comfy.settings.json"),
        serde_json::to_vec_pretty(settings).unwrap_or_default(),
    );
}

fn userdata_file(
    inst: &Instance,
    method: &Method,
    rest: &str,
    query: &[(String, String)],
    body: &[u8],
) -> Response<Body> {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (file, dest) = match rest.split_once("/move/") {
        Some((f, d)) if method == Method::POST => (f, Some(d)),
        _ => (rest, None),
    };
    if file.is_empty()
        || file.contains('/')
        || dest.is_some_and(|d| d.contains('/') || d.is_empty())
    {
        return status(StatusCode::NOT_FOUND);
    }
    let Some(path) = user_path(inst, file) else {
        return status(StatusCode::FORBIDDEN);
    };
    let root = user_root(inst);
    let overwrite = q("overwrite").unwrap_or("true") != "false";
    let full_info = q("full_info")
        .unwrap_or("false")
        .eq_ignore_ascii_case("true");
    let answer = |p: &Path| {
        if full_info {
            json_resp(StatusCode::OK, &file_info(p, &root))
        } else {
            json_resp(StatusCode::OK, &json!(rel(p, &root)))
        }
    };
    match (method, dest) {
        // ComfyUI answers with aiohttp's `FileResponse` (validators, `Accept-Ranges`).
        (&Method::GET, None) => {
            let ctype = mime_guess::from_path(&path)
                .first_raw()
                .unwrap_or("application/octet-stream");
            let no_conditions = http::HeaderMap::new();
            comfy_wire::files::serve::serve_file(&path, method, &no_conditions, ctype, None)
        }
        (&Method::POST, None) => {
            if !overwrite && path.exists() {
                return text(StatusCode::CONFLICT, "File already exists");
            }
            if std::fs::write(&path, body).is_err() {
                return status(StatusCode::BAD_REQUEST);
            }
            answer(&path)
        }
        (&Method::DELETE, None) => {
            if !path.exists() {
                return status(StatusCode::NOT_FOUND);
            }
            let _ = std::fs::remove_file(&path);
            status(StatusCode::NO_CONTENT)
        }
        (&Method::POST, Some(dest)) => {
            if !path.exists() {
                return status(StatusCode::NOT_FOUND);
            }
            let Some(target) = user_path(inst, dest) else {
                return status(StatusCode::FORBIDDEN);
            };
            if !overwrite && target.exists() {
                return text(StatusCode::CONFLICT, "File already exists");
            }
            if std::fs::rename(&path, &target).is_err() {
                return status(StatusCode::BAD_REQUEST);
            }
            answer(&target)
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED),
    }
}
