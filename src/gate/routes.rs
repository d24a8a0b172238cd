//! The gate's router: the edge checks (origin, body size), ComfyUI's routes with their `/api`
//! twins, and where each goes: admission, owned routes (to the prompt's backend), merged reads,
//! the user-data home, or any healthy backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Gate;
use super::prompts::Stage;
use super::upstream::{strip_for_downstream, strip_for_upstream};
use crate::error::GateError;
use crate::files::{self, UploadOutcome};
use crate::http::{
    Body, ConnInfo, json as json_resp, json_bytes, percent_decode, query_pairs, read_body, status,
};
use crate::protocol::errors::python_str;
use crate::protocol::jobs;
use crate::protocol::origin::{is_loopback, same_origin_allows};

/// Passthrough body states: fine, over the size limit, ended early by the client.
const CLIENT_OK: u8 = 0;
const CLIENT_TOO_LARGE: u8 = 1;
const CLIENT_ABORTED: u8 = 2;

/// Percent-encodes one path segment.
pub fn encode_segment(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Who is asking: an API key (hashed), a `Comfy-User`, or the peer address. Scopes interrupt
/// without id, queue clear and history clear to the caller's own prompts.
pub fn identity<B>(req: &Request<B>, info: &ConnInfo) -> String {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    if let Some(auth) = h("authorization") {
        let digest = Sha256::digest(auth.as_bytes());
        return format!("key:{:x}", digest)[..20].to_string();
    }
    if let Some(user) = h("comfy-user") {
        return format!("user:{user}");
    }
    format!("ip:{}", info.peer.ip())
}

fn origin_allowed<B>(gate: &Gate, req: &Request<B>) -> bool {
    let h = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(origin) = h(header::ORIGIN)
        && gate
            .config
            .server
            .allowed_origins
            .iter()
            .any(|o| o == origin)
    {
        return true;
    }
    same_origin_allows(h(header::HOST), h(header::ORIGIN), is_loopback)
}

pub async fn handle(gate: Arc<Gate>, req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
    match route(gate, req, info).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

fn api_path(raw: &str) -> &str {
    match raw.strip_prefix("/api") {
        Some(rest) if rest.starts_with('/') && !rest.starts_with("/jobs") => rest,
        _ => raw,
    }
}

async fn route(
    gate: Arc<Gate>,
    req: Request<Incoming>,
    info: ConnInfo,
) -> Result<Response<Body>, GateError> {
    if !origin_allowed(&gate, &req) {
        return Err(GateError::ForbiddenOrigin);
    }
    if req.method() == Method::OPTIONS {
        return Ok(status(StatusCode::OK));
    }
    let raw_path = req.uri().path().to_string();
    let path = api_path(&raw_path).to_string();
    let method = req.method().clone();
    if method == Method::GET && path == "/ws" {
        return Ok(super::sessions::handle(gate, req));
    }
    let is_user_data = path.starts_with("/userdata")
        || path.starts_with("/v2/userdata")
        || path == "/settings"
        || path.starts_with("/settings/")
        || path == "/users";
    if is_user_data {
        return gate.passthrough(Some(gate.config.home), req).await;
    }
    let owned = matches!(
        (&method, path.as_str()),
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
    ) || (method == Method::GET
        && (path == "/api/jobs"
            || path.starts_with("/api/jobs/")
            || path.starts_with("/history/")
            || path.starts_with("/object_info/")
            || path.starts_with("/models/")));
    if !owned {
        return gate.passthrough(None, req).await;
    }
    let id = identity(&req, &info);
    let query = query_pairs(req.uri());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = read_body(req.into_body(), gate.config.server.max_body_bytes as usize).await?;
    let ok = |v: Value| Ok(json_resp(StatusCode::OK, &v));
    match (method, path.as_str()) {
        (Method::POST, "/prompt") => gate.submit(id, &body).await,
        (Method::GET, "/prompt") => ok(gate.prompt_info()),
        (Method::GET, "/queue") => ok(gate.merged_queue().await),
        (Method::POST, "/queue") => gate.post_queue(&id, &body).await,
        (Method::POST, "/interrupt") => gate.interrupt(&id, &body).await,
        (Method::POST, "/history") => gate.post_history(&id, &body).await,
        (Method::POST, "/free") => {
            let v = parse_json(&body)?;
            for b in gate.backends.iter().filter(|b| b.is_up()) {
                let _ = gate.upstream.post_json(&b.config, "/free", &v).await;
            }
            Ok(status(StatusCode::OK))
        }
        (Method::GET, "/history") => {
            let int =
                |k: &str| -> Result<Option<i64>, GateError> {
                    match query.iter().find(|(n, _)| n == k) {
                        Some((_, v)) => v.trim().parse().map(Some).map_err(|_| {
                            GateError::BadRequest(format!("`{k}` must be an integer"))
                        }),
                        None => Ok(None),
                    }
                };
            ok(gate
                .merged_history(int("max_items")?, int("offset")?.unwrap_or(-1))
                .await)
        }
        (Method::GET, p) if p.starts_with("/history/") => {
            let id = percent_decode(&p["/history/".len()..]);
            Ok(json_bytes(StatusCode::OK, gate.history_one(&id).await))
        }
        (Method::GET, "/api/jobs") => match jobs::parse_query(&query) {
            Ok(q) => ok(gate.jobs(Some(&q), None).await),
            Err(msg) => Ok(json_resp(StatusCode::BAD_REQUEST, &json!({ "error": msg }))),
        },
        (Method::GET, p) if p.starts_with("/api/jobs/") => {
            let id = percent_decode(&p["/api/jobs/".len()..]);
            let job = gate.jobs(None, Some(&id)).await;
            if job.is_null() {
                Ok(json_resp(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": "Job not found" }),
                ))
            } else {
                ok(job)
            }
        }
        (Method::GET, "/view") => Ok(gate.view(&query).await),
        (Method::POST, "/upload/image") | (Method::POST, "/upload/mask") => {
            let form = files::parse_upload_form(&content_type, &body)
                .await
                .map_err(|e| GateError::BadRequest(format!("malformed multipart body: {e}")))?;
            if form.kind.as_deref().is_some_and(|k| k != "input") {
                return Err(GateError::BadRequest(
                    "the gate stores uploads of type `input` only".into(),
                ));
            }
            match files::upload(&gate.files.dirs, form, path == "/upload/mask") {
                UploadOutcome::Saved(v) => ok(v),
                UploadOutcome::Status(code) if code.is_server_error() => Err(
                    GateError::BadRequest("the upload could not be stored".into()),
                ),
                UploadOutcome::Status(code) => Ok(status(code)),
            }
        }
        (Method::GET, "/system_stats") => ok(gate.merged_system_stats().await),
        (Method::GET, "/features") => ok(gate.features()),
        (Method::GET, "/object_info") => ok(gate.merged_object_info().await),
        (Method::GET, p) if p.starts_with("/object_info/") => {
            let class = percent_decode(&p["/object_info/".len()..]);
            let all = gate.merged_object_info().await;
            ok(match all.get(&class) {
                Some(def) => json!({ class: def }),
                None => json!({}),
            })
        }
        (Method::GET, p) => match gate.merged_list(p).await {
            Some(v) => ok(v),
            None => Ok(status(StatusCode::NOT_FOUND)),
        },
        _ => Ok(status(StatusCode::METHOD_NOT_ALLOWED)),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, GateError> {
    serde_json::from_slice(body).map_err(|e| GateError::BadJson(e.to_string()))
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

impl Gate {
    /// Streams a request to a backend (`target`, or the home backend if healthy, or any healthy
    /// one) and its answer back, raw path and query kept (`%2F` stays encoded).
    async fn passthrough(
        &self,
        target: Option<usize>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, GateError> {
        let backend = match target {
            Some(t) => Some(t).filter(|t| self.backend(*t).is_up()),
            None => std::iter::once(self.config.home)
                .chain(0..self.backends.len())
                .find(|i| self.backend(*i).is_up()),
        }
        .ok_or(GateError::NoBackend)?;
        let limit = self.config.server.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(GateError::TooLarge(limit as usize));
        }
        let (mut parts, body) = req.into_parts();
        strip_for_upstream(&mut parts.headers);
        // Errors of the client's own body (over the limit, or the client going away) are the
        // client's, not the backend's: remember them so they are not held against its health.
        let client_fault = Arc::new(AtomicU8::new(CLIENT_OK));
        let seen = client_fault.clone();
        let body = http_body_util::Limited::new(body, limit as usize)
            .map_err(move |e| {
                let kind = if e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    CLIENT_TOO_LARGE
                } else {
                    CLIENT_ABORTED
                };
                seen.store(kind, AtomicOrdering::SeqCst);
                e
            })
            .boxed();
        let upstream_req = Request::from_parts(parts, body);
        let b = self.backend(backend).clone();
        match self.upstream.send(&b.config, upstream_req, None).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_for_downstream(&mut parts.headers);
                Ok(Response::from_parts(
                    parts,
                    body.map_err(Into::into).boxed(),
                ))
            }
            Err(e) => match client_fault.load(AtomicOrdering::SeqCst) {
                CLIENT_TOO_LARGE => Err(GateError::TooLarge(limit as usize)),
                CLIENT_ABORTED => Err(GateError::BadRequest("the request body ended early".into())),
                _ => {
                    self.record_health(backend, false);
                    Err(e)
                }
            },
        }
    }

    /// `POST /interrupt`: by id (gate queue, else the owner), or the caller's running prompts.
    async fn interrupt(&self, identity: &str, body: &[u8]) -> Result<Response<Body>, GateError> {
        let data: Value = serde_json::from_slice(body).unwrap_or(json!({}));
        let targets: Vec<(String, usize)> = {
            let mut t = self.lock_prompts();
            match data
                .get("prompt_id")
                .filter(|v| truthy(Some(v)))
                .map(python_str)
            {
                Some(id) => {
                    if t.unqueue(&id) {
                        if let Some(r) = t.get_mut(&id) {
                            r.stage = Stage::Done;
                        }
                        drop(t);
                        self.persist(&[&id]);
                        self.broadcast_status();
                        return Ok(status(StatusCode::OK));
                    }
                    t.get(&id)
                        .and_then(|r| {
                            r.owner
                                .filter(|_| r.stage == Stage::OnBackend)
                                .map(|o| (id.clone(), o))
                        })
                        .into_iter()
                        .collect()
                }
                None => t
                    .records()
                    .filter(|r| r.identity == identity && r.stage == Stage::OnBackend && r.started)
                    .filter_map(|r| r.owner.map(|o| (r.id.clone(), o)))
                    .collect(),
            }
        };
        for (id, owner) in targets {
            let b = self.backend(owner).clone();
            if let Err(e) = self
                .upstream
                .post_json(&b.config, "/interrupt", &json!({ "prompt_id": id }))
                .await
            {
                self.record_health(owner, false);
                return Err(e);
            }
        }
        Ok(status(StatusCode::OK))
    }

    /// The ids a `{"delete": [...], "clear": bool}` body names: the listed ids, plus (with
    /// `clear`) the caller's own prompts that `clearable` accepts.
    fn targets(
        &self,
        data: &Value,
        identity: &str,
        clearable: impl Fn(&super::prompts::PromptRecord) -> bool,
    ) -> Vec<String> {
        let mut ids: Vec<String> = data["delete"]
            .as_array()
            .into_iter()
            .flatten()
            .map(python_str)
            .collect();
        if truthy(data.get("clear")) {
            let t = self.lock_prompts();
            ids.extend(
                t.records()
                    .filter(|r| r.identity == identity && clearable(r))
                    .map(|r| r.id.clone()),
            );
        }
        ids
    }

    /// `POST /queue`: delete by id (gate queue or owner's pending) and clear (the caller's).
    async fn post_queue(&self, identity: &str, body: &[u8]) -> Result<Response<Body>, GateError> {
        let data = parse_json(body)?;
        let ids = self.targets(&data, identity, |r| {
            !r.started && matches!(r.stage, Stage::Queued | Stage::OnBackend)
        });
        let mut on_backends: Vec<(String, usize)> = Vec::new();
        {
            let mut t = self.lock_prompts();
            for id in &ids {
                if t.unqueue(id) {
                    if let Some(r) = t.get_mut(id) {
                        r.stage = Stage::Done;
                    }
                } else if let Some(r) = t
                    .get(id)
                    .filter(|r| r.stage == Stage::OnBackend && !r.started)
                    && let Some(o) = r.owner
                {
                    on_backends.push((id.clone(), o));
                }
            }
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.persist(&refs);
        for (id, owner) in on_backends {
            let b = self.backend(owner).clone();
            self.upstream
                .post_json(&b.config, "/queue", &json!({ "delete": [id] }))
                .await?;
            // If it is gone from the owner's queue without having started, it will never run:
            // its slot is free again.
            if let Ok((_, q)) = self.upstream.get_json(&b.config, "/queue").await {
                let listed = super::prompts::queue_lists(&q, &id);
                let started = self.lock_prompts().get(&id).is_some_and(|r| r.started);
                if !listed && !started {
                    self.finish(owner, &id);
                }
            }
        }
        self.broadcast_status();
        Ok(status(StatusCode::OK))
    }

    /// `POST /history`: delete by id on the owner (or everywhere), clear the caller's entries.
    async fn post_history(&self, identity: &str, body: &[u8]) -> Result<Response<Body>, GateError> {
        let data = parse_json(body)?;
        let ids = self.targets(&data, identity, |r| r.stage == Stage::Done);
        for id in ids {
            let owner = self.lock_prompts().get(&id).and_then(|r| r.owner);
            self.forget_history(&id);
            let targets: Vec<usize> = match owner {
                Some(o) => vec![o],
                None => self
                    .backends
                    .iter()
                    .filter(|b| b.is_up())
                    .map(|b| b.id)
                    .collect(),
            };
            for t in targets {
                let b = self.backend(t).clone();
                let _ = self
                    .upstream
                    .post_json(&b.config, "/history", &json!({ "delete": [id] }))
                    .await;
            }
        }
        Ok(status(StatusCode::OK))
    }
}
