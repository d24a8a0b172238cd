//! Files as one ComfyUI would serve them (design §2 "Files follow prompts"): `GET /view` of an
//! input from the gate's own store, of an output from the backend that produced it (by the
//! alias index, else asking backends home first), streamed through; uploads stored by the gate
//! under ComfyUI's collision rules.

use http::{Method, Response, StatusCode};
use serde_json::Value;

use super::Ctx;
use crate::error::GateError;
use crate::http::{Body, status};
use comfy_wire::files::{self, UploadOutcome};

/// `POST /upload/image` and `/upload/mask` (`mask`): stored by the gate, type `input` only.
pub async fn upload(
    ctx: &Ctx,
    content_type: &str,
    body: &[u8],
    mask: bool,
) -> Result<Result<Value, StatusCode>, GateError> {
    let form = files::parse_upload_form(content_type, body)
        .await
        .map_err(|e| GateError::BadRequest(format!("malformed multipart body: {e}")))?;
    if form.kind.as_deref().is_some_and(|k| k != "input") {
        return Err(GateError::BadRequest(
            "the gate stores uploads of type `input` only".into(),
        ));
    }
    match files::upload(&ctx.files.dirs, form, mask) {
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

/// `GET /view`: inputs from the gate's store; outputs from the backend that produced them.
pub async fn view(ctx: &Ctx, query: &[(String, String)]) -> Response<Body> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
    let Some(raw_name) = get("filename") else {
        return status(StatusCode::NOT_FOUND);
    };
    let (name, annotated) = match raw_name.rsplit_once(" [") {
        Some((n, t)) if t.ends_with(']') => {
            (n.to_string(), Some(t.trim_end_matches(']').to_string()))
        }
        _ => (raw_name.clone(), None),
    };
    let kind = annotated
        .or_else(|| get("type"))
        .unwrap_or_else(|| "output".into());
    if kind == "input" {
        return files::view(&ctx.files.dirs, query);
    }
    let subfolder = get("subfolder").unwrap_or_default();
    let (backend, real) = match ctx.files.resolve(&kind, &subfolder, &name) {
        Some((owner, real)) => match ctx.fleet.index_of(&owner) {
            Some(i) => (i, real),
            None => return status(StatusCode::NOT_FOUND),
        },
        None => {
            // Not produced through the gate: ask backends in order (home first).
            let mut order: Vec<usize> = ctx.fleet.up();
            order.sort_by_key(|i| (*i != ctx.config.home, *i));
            let mut found = None;
            for i in order {
                let path = format!("/view?{}", encode_query(query));
                if let Ok(resp) = fetch_view(ctx, i, &path).await {
                    if resp.status() != StatusCode::NOT_FOUND {
                        return resp;
                    }
                    found = Some(resp.status());
                }
            }
            return status(found.unwrap_or(StatusCode::NOT_FOUND));
        }
    };
    let mut q: Vec<(String, String)> = query.to_vec();
    for (k, v) in q.iter_mut() {
        if k == "filename" {
            *v = real.clone();
        }
        if k == "type" {
            *v = kind.clone();
        }
    }
    if !q.iter().any(|(k, _)| k == "type") {
        q.push(("type".into(), kind));
    }
    let path = format!("/view?{}", encode_query(&q));
    match fetch_view(ctx, backend, &path).await {
        Ok(mut resp) => {
            if let Ok(v) = format!("filename=\"{name}\"").parse() {
                resp.headers_mut()
                    .insert(http::header::CONTENT_DISPOSITION, v);
            }
            resp
        }
        Err(e) => {
            ctx.fleet.record_health(backend, false);
            e.into_response()
        }
    }
}

/// `GET path` on a backend, its body streamed through (files can be large), with the
/// headers a client of `/view` needs.
async fn fetch_view(ctx: &Ctx, backend: usize, path: &str) -> Result<Response<Body>, GateError> {
    let req = http::Request::builder()
        .method(Method::GET)
        .uri(path)
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
    for name in [
        http::header::CONTENT_TYPE,
        http::header::CONTENT_LENGTH,
        http::header::CONTENT_DISPOSITION,
        http::header::CACHE_CONTROL,
    ] {
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
