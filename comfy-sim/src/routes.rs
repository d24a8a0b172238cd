//! The HTTP router of comfy-sim: ComfyUI's middleware (origin check, `/api` aliases) and its
//! routes, plus `/sim/fault` and `/sim/stats` for tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Map, Number, Value, json};

use super::faults::Fault;
use super::instance::{Instance, lock};
use super::nodes::{find, object_info};
use super::queue::QueueItem;
use super::validate::{ValidationContext, validate_prompt};
use super::{ControlRequest, userdata};
use comfy_wire::files::{self, UploadOutcome};
use comfy_wire::http::{Body, BodyError, json as json_resp, query_pairs, read_body, status, text};
use comfy_wire::protocol::origin::{is_loopback, same_origin_allows};
use comfy_wire::protocol::{errors, jobs};

/// aiohttp's answer to an unhandled exception.
pub fn internal_error() -> Response<Body> {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error\n\nServer got itself in trouble",
    )
}

/// Handles one request against a live instance.
pub async fn handle(
    inst: Arc<Instance>,
    control: tokio::sync::mpsc::UnboundedSender<ControlRequest>,
    req: Request<Incoming>,
) -> Response<Body> {
    // A hung process accepts connections but answers nothing until it recovers.
    while inst.faults.hang.load(Ordering::SeqCst) {
        tokio::select! {
            _ = inst.stop.cancelled() => return status(StatusCode::SERVICE_UNAVAILABLE),
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
    }
    let header_str =
        |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    if !same_origin_allows(
        header_str(header::HOST),
        header_str(header::ORIGIN),
        is_loopback,
    ) {
        return status(StatusCode::FORBIDDEN);
    }
    if req.method() == Method::OPTIONS {
        return status(StatusCode::OK);
    }
    let raw_path = req.uri().path().to_string();
    let path = match raw_path.strip_prefix("/api") {
        Some(rest) if rest.starts_with('/') && !rest.starts_with("/jobs") => rest.to_string(),
        _ => raw_path.clone(),
    };
    let method = req.method().clone();
    if method == Method::GET && path == "/ws" {
        return super::ws::handle(inst, req);
    }
    let query = query_pairs(req.uri());
    // aiohttp answers HEAD on every GET route; `/view` is a file server (ranges, validators).
    if (method == Method::GET || method == Method::HEAD) && path == "/view" {
        return files::view(&inst.dirs, &query, &method, req.headers());
    }
    let content_type = header_str(header::CONTENT_TYPE).unwrap_or("").to_string();
    let limit = inst.config.max_upload_size as usize;
    let body = match read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge { limit }) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Maximum request body size {limit} exceeded"),
            );
        }
        Err(BodyError::Read(_)) => return status(StatusCode::BAD_REQUEST),
        Err(BodyError::TimedOut(_)) => return status(StatusCode::REQUEST_TIMEOUT),
    };
    if method == Method::POST
        && path == "/prompt"
        && let Some(restart_after_ms) = inst.faults.poisoned(&body)
    {
        // Dies before answering: the crash drops this connection with the others, so the
        // client never gets an answer.
        let _ = control.send(ControlRequest::Inject(Fault::Crash { restart_after_ms }));
        return std::future::pending().await;
    }
    if let Some(delay) = inst.faults.route_delay(&path) {
        tokio::select! {
            _ = inst.stop.cancelled() => return status(StatusCode::SERVICE_UNAVAILABLE),
            _ = tokio::time::sleep(delay) => {}
        }
    }
    route(
        &inst,
        &control,
        &method,
        &path,
        &query,
        &content_type,
        &body,
    )
    .await
}

async fn route(
    inst: &Arc<Instance>,
    control: &tokio::sync::mpsc::UnboundedSender<ControlRequest>,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let ok_json = |v: Value| json_resp(StatusCode::OK, &v);
    match (method.clone(), path) {
        (Method::GET, "/") => index(inst),
        (Method::GET, "/prompt") => ok_json(inst.queue_info()),
        (Method::POST, "/prompt") => post_prompt(inst, body),
        (Method::GET, "/queue") => ok_json(lock(&inst.queue).to_json()),
        (Method::POST, "/queue") => post_queue(inst, body),
        (Method::POST, "/interrupt") => post_interrupt(inst, body),
        (Method::POST, "/free") => {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return internal_error();
            };
            if v["unload_models"].as_bool().unwrap_or(false)
                || v["free_memory"].as_bool().unwrap_or(false)
            {
                lock(&inst.gpu).resident.clear();
            }
            if v["free_memory"].as_bool().unwrap_or(false) {
                inst.free_memory.store(true, Ordering::SeqCst);
            }
            status(StatusCode::OK)
        }
        (Method::GET, "/history") => {
            let get = |k: &str| {
                query
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.trim().parse::<i64>())
            };
            let max_items = match get("max_items") {
                Some(Ok(v)) => Some(v),
                Some(Err(_)) => return internal_error(),
                None => None,
            };
            let offset = match get("offset") {
                Some(Ok(v)) => v,
                Some(Err(_)) => return internal_error(),
                None => -1,
            };
            ok_json(Value::Object(
                lock(&inst.queue).history_page(max_items, offset),
            ))
        }
        (Method::GET, p) if p.starts_with("/history/") => {
            let id = comfy_wire::http::percent_decode(&p["/history/".len()..]);
            let q = lock(&inst.queue);
            ok_json(match q.history_entry(&id) {
                Some(entry) => json!({ id: entry }),
                None => json!({}),
            })
        }
        (Method::POST, "/history") => {
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return internal_error();
            };
            let mut q = lock(&inst.queue);
            if v["clear"].as_bool().unwrap_or(false) {
                q.clear_history();
            }
            for id in v["delete"].as_array().into_iter().flatten() {
                q.delete_history(&errors::python_str(id));
            }
            status(StatusCode::OK)
        }
        (Method::GET, "/api/jobs") => match jobs::parse_query(query) {
            Ok(q) => {
                let queue = lock(&inst.queue);
                let view = queue.to_json();
                let history = queue.history_page(None, -1);
                let items = |k: &str| view[k].as_array().cloned().unwrap_or_default();
                ok_json(jobs::list(
                    &items("queue_running"),
                    &items("queue_pending"),
                    &history,
                    &q,
                ))
            }
            Err(msg) => json_resp(StatusCode::BAD_REQUEST, &json!({ "error": msg })),
        },
        (Method::GET, p) if p.starts_with("/api/jobs/") => {
            let id = comfy_wire::http::percent_decode(&p["/api/jobs/".len()..]);
            let queue = lock(&inst.queue);
            let view = queue.to_json();
            let history = queue.history_page(None, -1);
            let items = |k: &str| view[k].as_array().cloned().unwrap_or_default();
            match jobs::one(
                &id,
                &items("queue_running"),
                &items("queue_pending"),
                &history,
            ) {
                Some(job) => ok_json(job),
                None => json_resp(StatusCode::NOT_FOUND, &json!({ "error": "Job not found" })),
            }
        }
        (Method::POST, "/upload/image") | (Method::POST, "/upload/mask") => {
            let Ok(form) = files::parse_upload_form(content_type, body).await else {
                return internal_error();
            };
            match files::upload(&inst.dirs, form, path == "/upload/mask") {
                UploadOutcome::Saved(v) => ok_json(v),
                UploadOutcome::Status(code) if code == StatusCode::INTERNAL_SERVER_ERROR => {
                    internal_error()
                }
                UploadOutcome::Status(code) => status(code),
            }
        }
        (Method::GET, "/system_stats") => {
            if !inst.fault_wait(false, |f| f.probe_delay()).await {
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
            if inst.faults.fail_probes.load(Ordering::SeqCst) {
                return internal_error();
            }
            ok_json(inst.system_stats())
        }
        (Method::GET, "/features") => ok_json(inst.features()),
        (Method::GET, "/object_info") => {
            let images = inst.dirs.input_images();
            let all: Map<String, Value> = inst
                .defs
                .iter()
                .map(|d| (d.class.to_string(), object_info(d, &inst.config, &images)))
                .collect();
            ok_json(Value::Object(all))
        }
        (Method::GET, p) if p.starts_with("/object_info/") => {
            let class = comfy_wire::http::percent_decode(&p["/object_info/".len()..]);
            let images = inst.dirs.input_images();
            ok_json(match find(&inst.defs, &class) {
                Some(d) => json!({ class: object_info(d, &inst.config, &images) }),
                None => json!({}),
            })
        }
        (Method::GET, "/embeddings") => ok_json(json!(
            inst.config
                .files("embeddings")
                .iter()
                .map(|f| f
                    .rsplit_once('.')
                    .map(|(s, _)| s.to_string())
                    .unwrap_or_else(|| f.clone()))
                .collect::<Vec<_>>()
        )),
        (Method::GET, "/models") => ok_json(json!(super::config::MODEL_FOLDERS)),
        (Method::GET, p) if p.starts_with("/models/") => {
            let folder = &p["/models/".len()..];
            if !super::config::MODEL_FOLDERS.contains(&folder) {
                return status(StatusCode::NOT_FOUND);
            }
            ok_json(json!(inst.config.files(folder)))
        }
        (Method::GET, "/experiment/models") => ok_json(json!(
            super::config::MODEL_FOLDERS
                .iter()
                .filter(|f| !["configs", "custom_nodes"].contains(f))
                .map(|f| json!({ "name": f, "folders": [inst.dirs.base.join("models").join(f)] }))
                .collect::<Vec<_>>()
        )),
        (Method::GET, p) if p.starts_with("/experiment/models/") => {
            let folder = &p["/experiment/models/".len()..];
            if !super::config::MODEL_FOLDERS.contains(&folder) {
                return status(StatusCode::NOT_FOUND);
            }
            let files: Vec<Value> = inst
                .config
                .models
                .get(folder)
                .into_iter()
                .flatten()
                .map(|m| {
                    json!({
                        "name": m.name, "pathIndex": 0, "modified": 1.7e9, "created": 1.7e9,
                        "size": (m.size_gb * 1024.0 * 1024.0 * 1024.0) as u64,
                    })
                })
                .collect();
            ok_json(Value::Array(files))
        }
        (Method::GET, "/extensions") => ok_json(json!(["/extensions/core/comfy-sim.js"])),
        (Method::POST, "/sim/fault") => {
            let Ok(fault) = serde_json::from_slice::<Fault>(body) else {
                return json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": "expected {\"kind\": \"crash|hang|stall|slow|fail_probes|oom_next|drop_websockets|silent|slow_probes|slow_route|poison_prompt|clear\"}" }),
                );
            };
            let _ = control.send(ControlRequest::Inject(fault));
            status(StatusCode::OK)
        }
        (Method::GET, "/sim/stats") => ok_json(super::stats_json(inst)),
        _ => match userdata::handle(inst, method, path, query, body).await {
            Some(resp) => resp,
            None => status(StatusCode::NOT_FOUND),
        },
    }
}

fn index(inst: &Instance) -> Response<Body> {
    let html = format!(
        "<!doctype html><html><head><title>ComfyUI</title></head><body><h1>comfy-sim {}</h1>\
         <p>A simulated ComfyUI backend. The API is served under <code>/api</code> and at the root.</p></body></html>",
        inst.config.name
    );
    let mut resp = Response::new(comfy_wire::http::full(html));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "text/html; charset=utf-8".parse().expect("static"),
    );
    h.insert(header::CACHE_CONTROL, "no-cache".parse().expect("static"));
    h.insert(header::PRAGMA, "no-cache".parse().expect("static"));
    h.insert(header::EXPIRES, "0".parse().expect("static"));
    resp
}

/// `POST /prompt` (reference §4.2).
fn post_prompt(inst: &Instance, body: &[u8]) -> Response<Body> {
    let Ok(Value::Object(mut data)) = serde_json::from_slice::<Value>(body) else {
        return internal_error();
    };
    let number = {
        let mut q = lock(&inst.queue);
        match data.get("number") {
            Some(v) => {
                let f = match v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
                    _ => None,
                };
                match f.and_then(Number::from_f64) {
                    Some(n) => n,
                    None => return internal_error(),
                }
            }
            None => {
                let mut n = q.counter;
                if data.get("front").is_some_and(truthy) {
                    n = -n;
                }
                q.counter += 1;
                Number::from(n)
            }
        }
    };
    let Some(prompt) = data.remove("prompt") else {
        return json_resp(StatusCode::BAD_REQUEST, &errors::no_prompt());
    };
    // Python iterates whatever `prompt` is: an empty list or string has no outputs, anything
    // else that is not a dict raises (500).
    let mut prompt = match prompt {
        Value::Object(m) => m,
        Value::Array(a) if a.is_empty() => Map::new(),
        Value::String(s) if s.is_empty() => Map::new(),
        _ => return internal_error(),
    };
    if let Some((id, _)) = prompt.iter().find(|(_, n)| n.is_string() || n.is_array()) {
        return json_resp(StatusCode::BAD_REQUEST, &errors::missing_class_type(id));
    }
    if prompt.values().any(|n| !n.is_object()) {
        return internal_error();
    }
    let prompt_id = match data.get("prompt_id") {
        Some(v) => errors::python_str(v),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let targets: Option<Vec<String>> = data
        .get("partial_execution_targets")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(errors::python_str).collect());
    let images = inst.dirs.input_images();
    let combo = |input: &super::nodes::InputDef| match input.ty {
        super::nodes::InputType::Combo(src) => {
            super::nodes::combo_options(src, &inst.config, &images)
        }
        _ => Vec::new(),
    };
    let exists = |name: &str| inst.dirs.annotated_path(name).exists();
    let ctx = ValidationContext {
        defs: &inst.defs,
        combo: &combo,
        input_file_exists: &exists,
    };
    let result = validate_prompt(&mut prompt, targets.as_deref(), &ctx);
    let mut extra_data = match data.remove("extra_data") {
        Some(Value::Object(m)) => m,
        Some(_) => return internal_error(),
        None => Map::new(),
    };
    if let Some(cid) = data.remove("client_id") {
        extra_data.insert("client_id".into(), cid);
    }
    match result {
        Ok(valid) => {
            let mut sensitive = Map::new();
            for key in ["auth_token_comfy_org", "api_key_comfy_org"] {
                if let Some(v) = extra_data.remove(key) {
                    sensitive.insert(key.into(), v);
                }
            }
            extra_data.insert("create_time".into(), json!(comfy_wire::protocol::now_ms()));
            lock(&inst.queue).push(QueueItem {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt: Value::Object(prompt),
                extra_data,
                outputs: valid.outputs,
                sensitive,
            });
            inst.stats.prompts_accepted.fetch_add(1, Ordering::SeqCst);
            inst.broadcast_status();
            inst.wake.notify_one();
            json_resp(
                StatusCode::OK,
                &json!({ "prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors }),
            )
        }
        Err(body) => json_resp(StatusCode::BAD_REQUEST, &body),
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn post_queue(inst: &Instance, body: &[u8]) -> Response<Body> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return internal_error();
    };
    if v.get("clear").is_some_and(truthy) {
        lock(&inst.queue).clear_pending();
        inst.broadcast_status();
    }
    for id in v["delete"].as_array().into_iter().flatten() {
        if lock(&inst.queue).delete_pending(&errors::python_str(id)) {
            inst.broadcast_status();
        }
    }
    status(StatusCode::OK)
}

fn post_interrupt(inst: &Instance, body: &[u8]) -> Response<Body> {
    let data = serde_json::from_slice::<Value>(body).unwrap_or(json!({}));
    let target = data
        .get("prompt_id")
        .filter(|v| truthy(v))
        .map(errors::python_str);
    let should = match target {
        Some(id) => lock(&inst.queue)
            .running()
            .is_some_and(|r| r.prompt_id == id),
        None => true,
    };
    if should {
        inst.interrupt.store(true, Ordering::SeqCst);
    }
    status(StatusCode::OK)
}
