//! The edge: the first thing a client request meets. It applies the origin policy, names the
//! caller ([`identity`]), and sends the request either to the ComfyUI routes the gate answers
//! itself ([`crate::api`]) or, like nginx's `proxy_pass`, to a backend ([`proxy`]). Auth, rate
//! limits and the access log will live here too.

pub mod headers;
pub mod identity;
pub mod origin;
pub mod proxy;

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::api::{Ctx, router};
use crate::error::GateError;
use crate::http::{Body, ConnInfo, status};
use proxy::Target;

/// Serves one client request.
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
    match route(ctx, req, info).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// User data lives on the home backend (ComfyUI's `/userdata`, `/v2/userdata`, `/settings`,
/// `/users`).
fn is_user_data(path: &str) -> bool {
    path.starts_with("/userdata")
        || path.starts_with("/v2/userdata")
        || path == "/settings"
        || path.starts_with("/settings/")
        || path == "/users"
}

async fn route(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    info: ConnInfo,
) -> Result<Response<Body>, GateError> {
    if !origin::origin_allowed(&ctx.config.server.allowed_origins, &req) {
        return Err(GateError::ForbiddenOrigin);
    }
    if req.method() == Method::OPTIONS {
        return Ok(status(StatusCode::OK));
    }
    let path = router::api_path(req.uri().path()).to_string();
    let limit = ctx.config.server.max_body_bytes;
    let home = ctx.config.home;
    if is_user_data(&path) {
        return proxy::passthrough(&ctx.fleet, Target::Only(home), limit, req).await;
    }
    if !router::owns(req.method(), &path) {
        return proxy::passthrough(&ctx.fleet, Target::Any { home }, limit, req).await;
    }
    let who = identity::identity(&req, &info);
    router::route(ctx, req, who).await
}
