//! The edge: the first thing a client request meets. It applies the origin policy, names the
//! caller ([`identity`]), and sends the request either to the ComfyUI routes the gate answers
//! itself ([`crate::api`]) or, like nginx's `proxy_pass`, to a backend ([`proxy`]). With
//! `[auth] mode = "token"` every request names its user ([`auth`]) or is answered 401; the
//! caller's `[limits]` are applied here ([`crate::api::limits`]) before anything is queued or forwarded.
//! The client listener serves it inside the tower stack of [`stack`] (request id, trace span,
//! access log, compression); its answers carry the caller's facts for the [`access_log`].

pub mod access_log;
pub mod auth;
pub mod forwarded;
pub mod headers;
pub mod https_redirect;
pub mod identity;
pub mod origin;
pub mod path;
pub mod proxy;
pub mod stack;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use http::{Method, Request, Response, StatusCode};

use crate::api::facts::AccessFacts;
use crate::api::limits::Class;
use crate::api::{ClientBody, Ctx, router};
use crate::config::Config;
use crate::error::GateError;
use crate::http::{Body, ConnInfo, status};
use crate::sched::tenant::Caller;
use proxy::Target;

/// The header that injects a fault when `server.test_faults` is on (tests only): `panic` (the
/// request's handling panics), `fail-store-commits=N` (the store's next N batches fail, as a
/// failing disk's would, before this request is handled).
pub const TEST_FAULT_HEADER: &str = "x-comfy-gate-test-fault";

/// Serves one client request. A panic anywhere in its handling (up to the response head) is
/// the seat belt's to catch: logged with the request and answered 500 in the gate's error
/// shape, so the connection, its other requests and every other client go on. The shared
/// state survives it: the gate's locks shrug off poisoning. A panic while a body streams out
/// (after the head) ends that one connection only: hyper's connection task is a task of its own.
///
/// The answer carries the caller's [`AccessFacts`] (client address, user) for the access log,
/// added to what the handler put there.
pub async fn handle(ctx: Arc<Ctx>, req: Request<ClientBody>, info: ConnInfo) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut caller = AccessFacts::default();
    let metrics = ctx.fleet.metrics.clone();
    let answer = AssertUnwindSafe(route(ctx, req, info, &mut caller))
        .catch_unwind()
        .await;
    let mut resp = match answer {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            let limit = match &e {
                GateError::RateLimited { limit, .. } => Some(*limit),
                GateError::QueueFull(_) => Some("max_queued"),
                _ => None,
            };
            if let (Some(limit), Some(metrics)) = (limit, metrics.on()) {
                let label = crate::metrics::LimitLabel { limit };
                metrics.rate_limited.get_or_create(&label).inc();
            }
            e.into_response()
        }
        Err(payload) => {
            let message = crate::http::panic_message(payload.as_ref());
            tracing::error!(%method, %path, panic = %message, "request handling panicked; answered 500");
            GateError::Internal.into_response()
        }
    };
    let facts = AccessFacts {
        client: caller.client,
        user: caller.user,
        ..AccessFacts::take(&mut resp)
    };
    facts.attach(&mut resp);
    metrics.request(route_class(&path), resp.status().as_u16());
    resp
}

/// The class of a client request's path, for the `route` label of
/// `comfy_gate_http_requests_total`: one of a fixed set (ComfyUI's route groups, `/api/…` the
/// same as without), so a client cannot grow the label set with paths of its own.
pub fn route_class(path: &str) -> &'static str {
    let path = match path.strip_prefix("/api") {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    };
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match first {
        "prompt" => "prompt",
        "queue" => "queue",
        "history" => "history",
        "view" | "view_metadata" => "view",
        "upload" => "upload",
        "ws" => "ws",
        "object_info" => "object_info",
        "system_stats" => "system_stats",
        "interrupt" | "free" => "control",
        "jobs" => "jobs",
        "userdata" | "v2" | "settings" | "users" => "userdata",
        "models" | "embeddings" | "extensions" | "experiment" => "models",
        "features" | "internal" | "i18n" | "workflow_templates" => "frontend",
        "" | "assets" | "templates" | "scripts" | "fonts" => "frontend",
        f if f.ends_with(".js") || f.ends_with(".css") || f.ends_with(".html") => "frontend",
        _ => "other",
    }
}

/// User data lives on the home backend (ComfyUI's `/userdata`, `/v2/userdata`, `/settings`,
/// `/users`).
fn is_user_data(path: &str) -> bool {
    let at = |route: &str| {
        path.strip_prefix(route)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    at("/userdata") || at("/v2/userdata") || at("/settings") || path == "/users"
}

/// `caller` is filled in as the edge learns who is asking (for the access log).
async fn route(
    ctx: Arc<Ctx>,
    mut req: Request<ClientBody>,
    info: ConnInfo,
    caller_facts: &mut AccessFacts,
) -> Result<Response<Body>, GateError> {
    // One snapshot for the whole request: a reload meanwhile does not mix two configurations.
    let config = ctx.config.load();
    if config.server.test_faults
        && let Some(fault) = req.headers().get(TEST_FAULT_HEADER)
    {
        let fault = fault.to_str().unwrap_or_default();
        if fault == "panic" {
            panic!("test fault: {} {}", req.method(), req.uri().path());
        }
        if let Some(n) = fault.strip_prefix("fail-store-commits=") {
            let n = n
                .parse()
                .map_err(|_| GateError::BadRequest(format!("{TEST_FAULT_HEADER}: {fault}")))?;
            ctx.sched.store().fail_next_commits(n);
        }
    }
    // Every decision below, and the backend, see the same path (see `path`).
    match path::normalized_uri(req.uri()) {
        Ok(Some(uri)) => *req.uri_mut() = uri,
        Ok(None) => {}
        Err(path::DotSegment) => {
            let why = "the path has a `.` or `..` segment";
            return Err(GateError::BadRequest(why.into()));
        }
    }
    if !origin::origin_allowed(&config.server.allowed_origins, &req).await {
        return Err(GateError::ForbiddenOrigin);
    }
    if req.method() == Method::OPTIONS {
        return Ok(status(StatusCode::OK));
    }
    let path = router::api_path(req.uri().path()).to_string();
    let edge = &config.edge;
    let client = forwarded::client_addr(
        info.peer.ip(),
        req.headers(),
        &edge.trusted_proxies,
        edge.real_ip_header,
    );
    caller_facts.client = Some(client);
    let caller = authenticate(&config, &req, &path, client)?;
    caller_facts.user = caller.user_name().map(str::to_string);
    let allowed = &config.server.allowed_origins;
    if caller.user.is_some()
        && auth::is_basic(req.headers())
        && !origin::credential_is_own(allowed, &req, &path)
    {
        return Err(GateError::ForbiddenOrigin);
    }
    let class = Class::of(req.method(), &path);
    ctx.limits.check_request(&config.auth, &caller, class)?;
    // aiohttp answers HEAD on every GET route; the gate's own GET routes answer it here (hyper
    // sends the head only), never a backend's unfiltered answer.
    if req.method() == Method::HEAD && path != "/view" && router::owns(&Method::GET, &path) {
        *req.method_mut() = Method::GET;
    }
    let user_data = is_user_data(&path);
    if let Some(user) = &caller.user {
        auth::for_upstream(req.headers_mut(), user);
        if let Some(uri) = auth::without_token(req.uri()) {
            *req.uri_mut() = uri;
        }
        let proxied = user_data || !router::owns(req.method(), &path);
        let admin_paths = &config.auth.admin_paths;
        if proxied
            && !user.admin
            && !auth::user_may_proxy(req.method(), &path, user_data, admin_paths)
        {
            let why = format!("only an admin may use {} {path} on this gate", req.method());
            return Err(GateError::Forbidden(why));
        }
    }
    let limit = config.server.max_body_bytes;
    let home = config.home;
    if user_data {
        return proxy::passthrough(&ctx.fleet, Target::Only(home), limit, req).await;
    }
    if !router::owns(req.method(), &path) {
        return proxy::passthrough(&ctx.fleet, Target::Any { home }, limit, req).await;
    }
    router::route(ctx, req, caller).await
}

/// Who the request speaks for: with auth off, an anonymous caller with the open model's
/// identity; with auth on, the user whose token it presents, or 401.
fn authenticate<B>(
    config: &Config,
    req: &Request<B>,
    path: &str,
    client: std::net::IpAddr,
) -> Result<Caller, GateError> {
    let auth = &config.auth;
    if !auth.required() {
        return Ok(Caller::anonymous(identity::identity(req, client), client));
    }
    let ws = req.method() == Method::GET && path == "/ws";
    auth::presented_token(req.headers(), req.uri(), ws)
        .and_then(|token| auth::user_of(&auth.users, &token))
        .map(|user| Caller::user(user, client))
        .ok_or_else(|| GateError::Unauthorized {
            realm: auth.realm.clone(),
        })
}
