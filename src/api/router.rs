//! The route table of the ComfyUI routes the gate answers itself, with their `/api` twins:
//! admission, owned routes (to the prompt's backend), merged reads, files and the client
//! socket. [`owns`] says which requests those are; the edge proxies the rest.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::ClientBody;
use super::facts::AccessFacts;
use super::{Ctx, control, files, merged};
use crate::error::GateError;
use crate::http::{
    Body, full, json as json_resp, json_bytes, percent_decode, query_pairs, read_body, status,
};
use crate::protocol::jobs;
use crate::sched::admission;
use crate::sched::tenant::Caller;

/// ComfyUI's `/api` prefix (its frontend uses it) stripped, except `/api/jobs`, which is only
/// under `/api`.
pub fn api_path(raw: &str) -> &str {
    match raw.strip_prefix("/api") {
        Some(rest) if rest.starts_with('/') && rest != "/jobs" && !rest.starts_with("/jobs/") => {
            rest
        }
        _ => raw,
    }
}

/// Whether `(method, path)` (after [`api_path`]) is a route the gate answers itself.
pub fn owns(method: &Method, path: &str) -> bool {
    if method == Method::GET && path == "/ws" {
        return true;
    }
    // aiohttp answers HEAD on every GET route; on a file route it takes the same path.
    if method == Method::HEAD && path == "/view" {
        return true;
    }
    let exact = matches!(
        (method, path),
        (
            &Method::POST,
            "/prompt"
                | "/queue"
                | "/interrupt"
                | "/history"
                | "/upload/image"
                | "/upload/mask"
                | "/free"
        ) | (
            &Method::GET,
            "/prompt"
                | "/queue"
                | "/history"
                | "/view"
                | "/system_stats"
                | "/features"
                | "/object_info"
                | "/models"
                | "/embeddings"
                | "/extensions"
        )
    );
    exact
        || (method == Method::GET
            && (path == "/api/jobs"
                || path.starts_with("/api/jobs/")
                || path.starts_with("/history/")
                || path.starts_with("/object_info/")
                || path.starts_with("/models/")))
}

/// Answers one request [`owns`] accepts, from `caller`.
pub async fn route(
    ctx: Arc<Ctx>,
    req: Request<ClientBody>,
    caller: Caller,
) -> Result<Response<Body>, GateError> {
    let path = api_path(req.uri().path()).to_string();
    let method = req.method().clone();
    let auth = &ctx.config.load().auth;
    if method == Method::GET && path == "/ws" {
        let slot = ctx.limits.open_socket(auth, caller.client)?;
        return Ok(super::ws::handle(ctx.clone(), req, &caller, slot));
    }
    let query = query_pairs(req.uri());
    if (method == Method::GET || method == Method::HEAD) && path == "/view" {
        return Ok(files::view(&ctx, &caller, &method, req.headers(), &query).await);
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = read_body(
        req.into_body(),
        ctx.config.load().server.max_body_bytes as usize,
    )
    .await?;
    let ok = |v: Value| Ok(json_resp(StatusCode::OK, &v));
    let id = &caller;
    match (method, path.as_str()) {
        (Method::POST, "/prompt") => {
            ctx.limits.check_prompt(auth, &caller)?;
            let answer = admission::submit(&ctx.sched, &caller, &body).await?;
            Ok(with_prompt_id(answer).await)
        }
        (Method::GET, "/prompt") => ok(ctx.sched.queue_info()),
        (Method::GET, "/queue") => ok(merged::queue(&ctx, &caller).await),
        (Method::POST, "/queue") => control::post_queue(&ctx, id, &body).await,
        (Method::POST, "/interrupt") => control::interrupt(&ctx, id, &body).await,
        (Method::POST, "/history") => control::post_history(&ctx, id, &body).await,
        (Method::POST, "/free") => {
            // It unloads every backend's models, under every user's prompts.
            if !caller.sees_all() {
                let why = "only an admin may free the fleet's memory (POST /free)";
                return Err(GateError::Forbidden(why.into()));
            }
            let v = control::parse_json(&body)?;
            for i in ctx.fleet.up() {
                let b = ctx.fleet.get(i);
                let _ = ctx.fleet.upstream.post_json(&b.config, "/free", &v).await;
            }
            Ok(status(StatusCode::OK))
        }
        (Method::GET, "/history") => {
            let max_items = int_param(&query, "max_items")?;
            let offset = int_param(&query, "offset")?.unwrap_or(-1);
            ok(merged::history(&ctx, &caller, max_items, offset).await)
        }
        (Method::GET, p) if p.starts_with("/history/") => {
            let id = percent_decode(&p["/history/".len()..]);
            // A backend's answer passed on is a slice of its read buffer: copied once here.
            let answer = merged::history_one(&ctx, &caller, &id).await;
            Ok(json_bytes(StatusCode::OK, Vec::from(answer)))
        }
        (Method::GET, "/api/jobs") => match jobs::parse_query(&query) {
            Ok(q) => ok(merged::jobs(&ctx, &caller, Some(&q), None).await),
            Err(msg) => Ok(json_resp(StatusCode::BAD_REQUEST, &json!({ "error": msg }))),
        },
        (Method::GET, p) if p.starts_with("/api/jobs/") => {
            let id = percent_decode(&p["/api/jobs/".len()..]);
            Ok(one_job(merged::jobs(&ctx, &caller, None, Some(&id)).await))
        }
        (Method::POST, "/upload/image") | (Method::POST, "/upload/mask") => {
            let max_body = ctx.config.load().server.max_body_bytes;
            ctx.limits
                .check_upload(auth, &caller, body.len(), max_body)?;
            match files::upload(&ctx, &caller, &content_type, &body, path == "/upload/mask").await?
            {
                Ok(v) => ok(v),
                Err(code) => Ok(status(code)),
            }
        }
        (Method::GET, "/system_stats") => ok(merged::system_stats(&ctx).await),
        (Method::GET, "/features") => ok(ctx.features()),
        (Method::GET, "/object_info") => ok(merged::object_info(&ctx).await),
        (Method::GET, p) if p.starts_with("/object_info/") => {
            let class = percent_decode(&p["/object_info/".len()..]);
            let all = merged::object_info(&ctx).await;
            ok(match all.get(&class) {
                Some(def) => json!({ class: def }),
                None => json!({}),
            })
        }
        (Method::GET, p) => match merged::list(&ctx, p).await {
            Some(v) => ok(v),
            None => Ok(status(StatusCode::NOT_FOUND)),
        },
        _ => Ok(status(StatusCode::METHOD_NOT_ALLOWED)),
    }
}

/// A `POST /prompt` answer with its `prompt_id` (given or minted) in its [`AccessFacts`],
/// for the access log. The answer is a small JSON body already in memory; one without an id
/// (a 400 with `node_errors`) is returned as it was.
async fn with_prompt_id(answer: Response<Body>) -> Response<Body> {
    let (parts, body) = answer.into_parts();
    let Ok(bytes) = body.collect().await.map(|c| c.to_bytes()) else {
        return GateError::Internal.into_response();
    };
    let prompt_id = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("prompt_id")?.as_str().map(str::to_string));
    let mut resp = Response::from_parts(parts, full(bytes));
    if prompt_id.is_some() {
        let facts = AccessFacts {
            prompt_id,
            ..AccessFacts::take(&mut resp)
        };
        facts.attach(&mut resp);
    }
    resp
}

/// An integer query parameter (`/history?max_items=…`); a value that is not one is a 400.
fn int_param(query: &[(String, String)], key: &str) -> Result<Option<i64>, GateError> {
    match query.iter().find(|(n, _)| n == key) {
        Some((_, v)) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| GateError::BadRequest(format!("`{key}` must be an integer"))),
        None => Ok(None),
    }
}

/// `GET /api/jobs/{id}`'s answer: the job, or ComfyUI's 404 body.
fn one_job(job: Value) -> Response<Body> {
    if job.is_null() {
        json_resp(StatusCode::NOT_FOUND, &json!({ "error": "Job not found" }))
    } else {
        json_resp(StatusCode::OK, &job)
    }
}
