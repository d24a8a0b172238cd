//! HTTP plumbing shared by the gate and comfy-sim: one body type, response builders, query
//! parsing, bounded body reads, the WebSocket upgrade handshake, and (re-exported from
//! [`crate::serve`] and [`crate::conn`]) the accept loop and its connection limits.
//!
//! Both servers are plain hyper 1 services; keeping this layer small and shared means the sim
//! and the gate make the same choices on the wire (HTTP/1.1 and h2, upgrades, header limits).

use std::convert::Infallible;
use std::future::Future;

pub use crate::body_timeout::{BodyReadTimeout, TimeoutBody};
pub use crate::conn::{ConnLimits, ConnSlot, ConnectionStats, CountedIo, SharedLimits};
pub use crate::serve::{ConnInfo, ServeOptions, TrustedPeer, serve};
pub use crate::tls::{TlsAcceptor, TlsError};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper_util::rt::TokioIo;

/// Errors a body may carry while streaming.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one response body type used everywhere.
pub type Body = BoxBody<Bytes, BoxError>;

/// A whole body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body.
pub fn empty_body() -> Body {
    full(Bytes::new())
}

/// A response with an empty body, as aiohttp's bare `web.Response(status=…)`.
pub fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = code;
    resp
}

/// A JSON response, serialised like aiohttp's `json_response` (content type and charset).
pub fn json(code: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_bytes(
        code,
        serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec()),
    )
}

/// A JSON response from an already serialized body.
pub fn json_bytes(code: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A plain-text response.
pub fn text(code: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(full(body.into()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Decoded query parameters, in order; a repeated key keeps every value.
pub fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The first value of one query parameter (aiohttp's `rel_url.query.get`).
pub fn query_param(uri: &http::Uri, key: &str) -> Option<String> {
    query_pairs(uri)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Decodes `%XX` escapes in a path segment (invalid escapes are kept as they are).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request body could not be read: {0}")]
    Read(String),
    /// The client stopped sending the body: no bytes for the server's body read timeout
    /// (nginx's `client_body_timeout`, answered 408).
    #[error("request body timed out: {0}")]
    TimedOut(String),
}

/// Reads a whole body, refusing more than `limit` bytes (aiohttp's `client_max_size`).
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // A declared length past the limit is refused at once, not after waiting for the bytes.
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => {
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(BodyError::TooLarge { limit })
            } else if is_timeout(err.as_ref()) {
                Err(BodyError::TimedOut(err.to_string()))
            } else {
                Err(BodyError::Read(err.to_string()))
            }
        }
    }
}

/// Whether a body error is a read timeout ([`TimeoutBody`], which the gate wraps client
/// bodies in), anywhere in its chain of sources.
pub fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(err);
    while let Some(e) = at {
        if e.is::<BodyReadTimeout>() {
            return true;
        }
        at = e.source();
    }
    false
}

/// True when the request asks for a WebSocket upgrade.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// The 101 answer to a WebSocket upgrade request, or a 400 when the handshake headers are bad
/// (check the status before upgrading).
pub fn websocket_accept<B>(req: &Request<B>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v == "13")
        .unwrap_or(false);
    if !version_ok {
        return text(StatusCode::BAD_REQUEST, "unsupported WebSocket version");
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = status(StatusCode::SWITCHING_PROTOCOLS);
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// Answers `GET /ws` the ComfyUI way and hands the upgraded socket to `serve` with its session
/// id (`?clientId=` when present and non-empty, else a fresh uuid4 without dashes, as ComfyUI
/// mints it). A bad handshake gets its 400 and `serve` never runs.
pub fn serve_comfy_websocket<B, F, Fut>(req: &mut Request<B>, serve: F) -> Response<Body>
where
    F: FnOnce(String, tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) -> Fut
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send,
{
    let response = websocket_accept(req);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let sid = query_param(req.uri(), "clientId")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        serve(sid, server_websocket(upgraded).await).await;
    });
    response
}

/// The largest message (and frame) a server here, the gate or comfy-sim, takes from one of its
/// clients: 4 MiB, aiohttp's default `max_msg_size` for `web.WebSocketResponse()`, which
/// ComfyUI's `server.py` keeps. A client's only message that matters is `feature_flags`.
/// It bounds what a server receives, never what it sends: tungstenite checks these limits on
/// reads only, and its write buffer is unbounded by default (`max_write_buffer_size`).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 4 << 20;

/// The configuration of a server's socket to a client: what it receives is bounded by
/// [`MAX_CLIENT_MESSAGE_BYTES`]; what it sends is not (a backend's `executed` message or a
/// `SaveImageWebsocket` frame can be hundreds of MB). Buffers are small because most sockets
/// are idle clients: tungstenite's 128 KiB default read buffer would cost that much per
/// connection (1.3 GB for 10,000 idle clients, measured by `benches/overhead.rs`).
pub fn server_websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let mut cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    cfg.max_message_size = Some(MAX_CLIENT_MESSAGE_BYTES);
    cfg.max_frame_size = Some(MAX_CLIENT_MESSAGE_BYTES);
    cfg.read_buffer_size = 4 << 10;
    cfg.write_buffer_size = 0;
    cfg
}

/// Turns an upgraded hyper connection into a server-side WebSocket stream.
pub async fn server_websocket(
    upgraded: hyper::upgrade::Upgraded,
) -> tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(server_websocket_config()),
    )
    .await
}

/// The message of a caught panic (`panic!("…")` carries a `&str` or a `String`; anything else
/// is named as such).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}
