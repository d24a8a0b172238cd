//! The client listener's service: the edge ([`super::handle`]) inside a stack of tower
//! layers, each one concern, built here and nowhere else. From the outside in:
//!
//! 1. **fresh request id** ([`fresh_request_id`]): a client's own `x-request-id` is dropped.
//!    nginx's `$request_id` is always minted by nginx; taking the client's would let anyone
//!    choose the id their requests carry in the gate's and the backends' logs.
//! 2. **set request id** (tower-http `SetRequestIdLayer`, `x-request-id`, a UUID v4): every
//!    layer below, the access log and the backend (the header is forwarded) see the same id.
//! 3. **propagate request id** (`PropagateRequestIdLayer`): the client gets it back on the
//!    response, to quote in a bug report.
//! 4. **trace** (`TraceLayer`): a `request` span per request with its method, path and id,
//!    and its events, all at debug level, so the default log (`info`) stays quiet.
//! 5. **access log** ([`super::access_log`]): outside compression, so `body_bytes_sent` is the
//!    bytes sent, as nginx counts them.
//! 6. **compression** (`CompressionLayer`, gzip only, when the client's `Accept-Encoding`
//!    asks): JSON answers of [`COMPRESS_MIN_BYTES`] or more only ([`is_json`]). Never images
//!    (already compressed), never a WebSocket's 101 (no body), never an answer that already
//!    has a `Content-Encoding` (a backend's, passed through; tower-http leaves those alone), nor
//!    a range. gzip alone: every client that asks takes it, and brotli's encoder would add
//!    a large build for a small gain on short JSON.
//!
//! The connection's [`ConnInfo`] travels as a request extension, set by [`client_handler`],
//! as hyper's `OnUpgrade` does: no layer drops extensions, so WebSocket upgrades go through.
//!
//! Auth and the rate limits stay in `edge::route`, not layers of this stack: they need the
//! normalized path, and they are one ordered chain with the origin check, the `OPTIONS` answer
//! and the client address (path normal form → origin → OPTIONS → client address → auth →
//! limits), whose results (the client address, the `Caller`) feed the next step and the
//! route. As layers, each would re-derive or pass those through extensions and the order
//! would live in two places; a move is not a clean, behavior-preserving one, so it is not made.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Extensions, HeaderMap, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{Predicate, SizeAbove};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnRequest, DefaultOnResponse, TraceLayer};
use tracing::Level;

use super::access_log::{AccessLog, AccessLogLayer};
use crate::api::{ClientBody, Ctx};
use crate::error::GateError;
use crate::http::{Body, BoxError, ConnInfo};

/// The header of the request id (the de facto standard name; nginx users set it from
/// `$request_id`).
pub const REQUEST_ID: &str = "x-request-id";

/// JSON answers smaller than this many bytes are sent as they are: compressing them saves
/// too little to be worth it (nginx's `gzip_min_length` is the same idea).
pub const COMPRESS_MIN_BYTES: u16 = 1024;

/// A service of the client listener: the layers around an inner service, its body boxed.
pub type ClientService<B> = BoxCloneSyncService<Request<B>, Response<Body>, Infallible>;

/// What [`client_handler`] gives `comfy_wire::http::serve`.
pub type ClientFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The client listener's handler: the stack around the edge, with the connection's
/// [`ConnInfo`] put into each request's extensions.
pub fn client_handler(
    ctx: Arc<Ctx>,
    log: AccessLog,
) -> impl Fn(Request<Incoming>, ConnInfo) -> ClientFuture + Send + Sync + 'static {
    let stack = around(EdgeService { ctx: ctx.clone() }, log);
    move |req: Request<Incoming>, info| {
        // `server.body_read_timeout_ms` of the configuration in force for this request.
        let within = ctx.config.load().body_read_timeout();
        let mut req = req.map(|body| ClientBody::new(within, body));
        req.extensions_mut().insert(info);
        let service = stack.clone();
        Box::pin(async move {
            let Ok(resp) = service.oneshot(req).await;
            resp
        })
    }
}

/// The layers (module docs, in that order) around `inner`.
pub fn around<S, B>(inner: S, log: AccessLog) -> ClientService<B>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
{
    let stack = ServiceBuilder::new()
        .map_response(boxed)
        .map_request(fresh_request_id::<B>)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span::<B> as fn(&Request<B>) -> tracing::Span)
                .on_request(DefaultOnRequest::new().level(Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(AccessLogLayer::new(log))
        .layer(
            CompressionLayer::new()
                .gzip(true)
                .compress_when(SizeAbove::new(COMPRESS_MIN_BYTES).and(is_json)),
        )
        .service(inner);
    BoxCloneSyncService::new(stack)
}

/// The edge as a tower service: [`super::handle`] with the request's [`ConnInfo`].
#[derive(Clone)]
pub struct EdgeService {
    ctx: Arc<Ctx>,
}

impl Service<Request<ClientBody>> for EdgeService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let ctx = self.ctx.clone();
        let info = req.extensions().get::<ConnInfo>().copied();
        Box::pin(async move {
            Ok(match info {
                Some(info) => super::handle(ctx, req, info).await,
                // Only a caller that bypassed `client_handler` gets here.
                None => GateError::Internal.into_response(),
            })
        })
    }
}

/// Drops the client's `x-request-id` (see the module docs).
pub fn fresh_request_id<B>(mut req: Request<B>) -> Request<B> {
    req.headers_mut().remove(REQUEST_ID);
    req
}

/// The debug span of one request: method, path (no query: it may hold a token) and id.
fn request_span<B>(req: &Request<B>) -> tracing::Span {
    let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok());
    tracing::debug_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = id.unwrap_or("-"),
    )
}

/// Whether an answer is JSON (`application/json`, any parameters): the only kind compressed.
pub fn is_json(_: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// The stack's answer with the gate's body type.
fn boxed<B>(resp: Response<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    resp.map(|body| body.map_err(Into::into).boxed())
}

#[cfg(test)]
mod tests;
