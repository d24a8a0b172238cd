//! Files as one ComfyUI would serve them (design §2 "Files follow prompts"), through the one
//! resolver (`files::resolve`): `GET`/`HEAD /view` of a file in the gate's store is served by
//! the gate as aiohttp's `FileResponse` would (ranges, validators); of a backend's file, the
//! request goes to that backend with the client's `Range` and conditional headers and its
//! answer (status, `Content-Range`, validators) comes back streamed. Uploads of every type are
//! stored by the gate under ComfyUI's collision rules; `/upload/mask` finds its original
//! wherever it lives. With auth on, a user's uploads go to their own folder and a user reads
//! only their own files (`sched::access`).

use http::{HeaderMap, Method, Response, StatusCode, header};
use serde_json::Value;

use super::Ctx;
use crate::error::GateError;
use crate::files::resolve::{self, Location};
use crate::http::{Body, status};
use crate::sched::tenant::Caller;
use comfy_wire::files::refs::{FileRef, Kind};
use comfy_wire::files::{self, Original, UploadOutcome};

/// Request headers a file server answers by, forwarded to the backend that holds the file.
const FORWARDED: [header::HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

/// Response headers of a file answer, passed back to the client.
const RETURNED: [header::HeaderName; 8] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_DISPOSITION,
    header::CACHE_CONTROL,
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
    header::ETAG,
    header::LAST_MODIFIED,
];

/// `POST /upload/image` and `/upload/mask` (`mask`), any type (`input` default, `temp`,
/// `output`): stored by the gate with ComfyUI's collision rule, stepping over names the alias
/// index shows for backends' files. A mask's `original_ref` is read wherever it lives (the
/// gate's store, the owner backend; unknown: the backends are asked, home first). Errors:
/// 400 for a malformed form, an unknown type or a missing `original_ref` (ComfyUI answers
/// 500), ComfyUI's own status otherwise.
pub async fn upload(
    ctx: &Ctx,
    caller: &Caller,
    content_type: &str,
    body: &[u8],
    mask: bool,
) -> Result<Result<Value, StatusCode>, GateError> {
    let mut form = files::parse_upload_form(content_type, body)
        .await
        .map_err(|e| GateError::BadRequest(format!("malformed multipart body: {e}")))?;
    // A user's uploads live in their own folder (see `Caller::upload_subfolder`), which no name
    // may climb out of.
    if !caller.sees_all() {
        let sub = form.subfolder.as_deref().unwrap_or("");
        let name = form.image.as_ref().map_or("", |(name, _)| name.as_str());
        let climbs =
            |s: &str| s.contains('\\') || s.split('/').any(|seg| seg == ".." || seg == ".");
        if climbs(sub) || climbs(name) || name.contains('/') {
            let why = "an upload's subfolder and filename may not contain `..`, `.` or `\\` \
                       segments, nor the filename a `/`";
            return Err(GateError::BadRequest(why.into()));
        }
        form.subfolder = Some(caller.upload_subfolder(sub));
    }
    let kind = form.kind.as_deref().unwrap_or("input");
    let Some(kind) = Kind::parse(kind) else {
        return Err(GateError::BadRequest(format!(
            "unknown upload type `{kind}` (input, temp or output)"
        )));
    };
    let original = if mask {
        let r = match files::original_ref(form.original_ref.as_deref()) {
            Ok(r) => r,
            Err(code) if code.is_server_error() => {
                return Err(GateError::BadRequest(
                    "`original_ref` must be a JSON object naming a file".into(),
                ));
            }
            Err(code) => return Ok(Err(code)),
        };
        // Another user's file is one this caller cannot find.
        let bytes = match ctx.sched.may_read_file(caller, &r) {
            true => find_bytes(ctx, &r).await,
            false => None,
        };
        Some(Original::Bytes(bytes))
    } else {
        None
    };
    let taken = |sub: &str, name: &str| ctx.files.taken_by_backend(kind, sub, name);
    match files::upload_with(&ctx.files.dirs, form, original, &taken) {
        UploadOutcome::Saved(v) => {
            ctx.files.note_upload(&v);
            Ok(Ok(v))
        }
        UploadOutcome::Status(code) if code.is_server_error() => Err(GateError::BadRequest(
            "the upload could not be stored".into(),
        )),
        UploadOutcome::Status(code) => Ok(Err(code)),
    }
}

/// The bytes of `r` wherever it lives; `None` when no one has it.
async fn find_bytes(ctx: &Ctx, r: &FileRef) -> Option<Vec<u8>> {
    match ctx.files.locate(r) {
        Location::Unknown => {
            for i in asking_order(ctx) {
                if let Ok(Some(bytes)) = resolve::read_from(&ctx.fleet, i, r).await {
                    return Some(bytes);
                }
            }
            None
        }
        at => ctx.files.read(&ctx.fleet, &at).await.ok().flatten(),
    }
}

/// Backends that are up, the home backend first.
fn asking_order(ctx: &Ctx) -> Vec<usize> {
    let mut order: Vec<usize> = ctx.fleet.up();
    order.sort_by_key(|i| (*i != ctx.config.load().home, *i));
    order
}

/// `GET` and `HEAD /view`: the reference resolved (ComfyUI's path checks first: 404, 400,
/// 403); the gate's own files served here, a backend's fetched from it under its real name
/// with the client's range and validators; a file the gate does not know is asked of the
/// backends in order (home first).
pub async fn view(
    ctx: &Ctx,
    caller: &Caller,
    method: &Method,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Response<Body> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let r = match FileRef::from_view(get("filename"), get("subfolder"), get("type")) {
        Ok(r) => r,
        Err(code) => return status(code),
    };
    // With auth on, another user's file is one that does not exist (see `sched::access`).
    if !ctx.sched.may_read_file(caller, &r) {
        return status(StatusCode::NOT_FOUND);
    }
    match ctx.files.locate(&r) {
        Location::Gate(_) => files::view(&ctx.files.dirs, query, method, headers),
        Location::Backend { backend, real } => {
            let Some(i) = ctx.fleet.index_of(&backend) else {
                return status(StatusCode::NOT_FOUND);
            };
            let mut q = vec![
                ("filename".to_string(), real.name.clone()),
                ("subfolder".to_string(), real.subfolder.clone()),
                ("type".to_string(), real.kind.as_str().to_string()),
            ];
            q.extend(
                query
                    .iter()
                    .filter(|(k, _)| k == "preview" || k == "channel")
                    .cloned(),
            );
            let path = format!("/view?{}", encode_query(&q));
            match fetch_view(ctx, i, &path, method, headers).await {
                Ok(mut resp) => {
                    if resp.headers().contains_key(header::CONTENT_DISPOSITION)
                        && let Some(v) =
                            files::serve::disposition_value(&format!("filename=\"{}\"", r.name))
                    {
                        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
                    }
                    resp
                }
                Err(e) => {
                    ctx.fleet.record_health(i, false);
                    e.into_response()
                }
            }
        }
        Location::Unknown => {
            let path = format!("/view?{}", encode_query(query));
            let mut found = None;
            for i in asking_order(ctx) {
                if let Ok(resp) = fetch_view(ctx, i, &path, method, headers).await {
                    if resp.status() != StatusCode::NOT_FOUND {
                        return resp;
                    }
                    found = Some(resp.status());
                }
            }
            status(found.unwrap_or(StatusCode::NOT_FOUND))
        }
    }
}

/// `method path` on a backend with the client's file-serving headers; its answer streamed
/// through (files can be large) with the headers a client of `/view` needs.
async fn fetch_view(
    ctx: &Ctx,
    backend: usize,
    path: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response<Body>, GateError> {
    let mut req = http::Request::builder().method(method.clone()).uri(path);
    for name in FORWARDED {
        for v in headers.get_all(&name) {
            req = req.header(&name, v.clone());
        }
    }
    let req = req
        .body(crate::http::empty_body())
        .map_err(|e| GateError::BadRequest(e.to_string()))?;
    let upstream = ctx
        .fleet
        .upstream
        .send(&ctx.fleet.get(backend).config, req, None)
        .await?;
    let (parts, body) = upstream.into_parts();
    let mut resp = Response::new(http_body_util::BodyExt::boxed(
        http_body_util::BodyExt::map_err(body, Into::into),
    ));
    *resp.status_mut() = parts.status;
    for name in RETURNED {
        if let Some(v) = parts.headers.get(&name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
    Ok(resp)
}

/// A query string, form-encoded.
pub fn encode_query(q: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(q.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish()
}
