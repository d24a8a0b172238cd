//! The gate's one error type. Each error knows whose fault it is (client, backend, gate) and is
//! mapped to an HTTP status in exactly one place, [`GateError::into_response`]. Client errors
//! use ComfyUI's error shape so existing clients can show them.

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::http::{Body, json as json_resp};

/// `Retry-After` of a full gate queue, in seconds: about one prompt's run.
pub const QUEUE_FULL_RETRY_S: u64 = 5;

/// A wait in whole seconds, rounded up, at least 1 (`Retry-After` takes integers).
pub fn retry_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The request body is not valid JSON.
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// The request is well-formed JSON but not what the route takes.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `server.max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The client sent no byte of its body for `server.body_read_timeout_ms` (nginx's
    /// `client_body_timeout`): 408, and the connection closes.
    #[error("the request body stopped arriving: {0}")]
    BodyTimedOut(String),
    /// A client-chosen prompt_id the gate already knows.
    #[error("prompt_id {0} is already in use")]
    DuplicatePromptId(String),
    /// The browser's Origin does not match the gate's Host (ComfyUI's rule).
    #[error("cross-origin request refused")]
    ForbiddenOrigin,
    /// No healthy backend can take the request.
    #[error("no healthy backend")]
    NoBackend,
    /// The gate cannot keep its promise right now (its state store failed).
    #[error("comfy-gate cannot accept work right now: {0}")]
    Unavailable(String),
    /// A backend failed after a connection was made (reset, closed, timeout, a bad answer):
    /// the request may have been applied.
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },
    /// No connection to the backend could be made (refused, unreachable): nothing was sent.
    #[error("backend {backend} unreachable: {message}")]
    Unreachable { backend: String, message: String },
    /// No token, or one no `[[users]]` entry has (`[auth] mode = "token"`): 401 with
    /// `WWW-Authenticate` challenges for Bearer and Basic in `realm` (RFC 6750, RFC 7617).
    #[error(
        "authentication required: send a token as `Authorization: Bearer TOKEN`, as the password of HTTP Basic, or as `?token=` on /ws"
    )]
    Unauthorized { realm: String },
    /// The caller may not touch this (another user's file, prompt or socket).
    #[error("{0}")]
    Forbidden(String),
    /// Over one of the caller's `[limits]` (named by `limit`): 429 with `Retry-After`, in
    /// whole seconds rounded up (RFC 9110 §10.2.3). Nothing of the request was applied.
    #[error("rate limit `{limit}` reached; retry after {} s", retry_secs(*.retry_after))]
    RateLimited {
        limit: &'static str,
        retry_after: std::time::Duration,
    },
    /// The gate queue holds `scheduler.max_queued` prompts: 503 with `Retry-After`.
    #[error("the gate queue is full ({0} prompts waiting); retry later")]
    QueueFull(usize),
    /// The gate's own handling of the request failed (a panic caught at the edge, logged there
    /// with its message; the client is not told the gate's internals). Not retry-safe: the gate
    /// cannot tell how far the request got.
    #[error("internal error in comfy-gate")]
    Internal,
}

impl GateError {
    /// Whether the client may retry the same request (nothing was applied).
    pub fn retry_safe(&self) -> bool {
        matches!(
            self,
            GateError::NoBackend
                | GateError::Unavailable(_)
                | GateError::Backend { .. }
                | GateError::Unreachable { .. }
                | GateError::RateLimited { .. }
                | GateError::QueueFull(_)
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GateError::BadJson(_) | GateError::BadRequest(_) | GateError::DuplicatePromptId(_) => {
                StatusCode::BAD_REQUEST
            }
            GateError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GateError::BodyTimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            GateError::ForbiddenOrigin | GateError::Forbidden(_) => StatusCode::FORBIDDEN,
            GateError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            GateError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GateError::QueueFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            GateError::NoBackend | GateError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GateError::Backend { .. } | GateError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            GateError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            GateError::BadJson(_) => "invalid_json",
            GateError::BadRequest(_) => "bad_request",
            GateError::TooLarge(_) => "request_too_large",
            GateError::BodyTimedOut(_) => "request_timeout",
            GateError::DuplicatePromptId(_) => "duplicate_prompt_id",
            GateError::ForbiddenOrigin => "forbidden_origin",
            GateError::Unauthorized { .. } => "unauthorized",
            GateError::Forbidden(_) => "forbidden",
            GateError::RateLimited { .. } => "rate_limited",
            GateError::QueueFull(_) => "queue_full",
            GateError::NoBackend => "no_backend",
            GateError::Unavailable(_) => "unavailable",
            GateError::Backend { .. } => "backend_error",
            GateError::Unreachable { .. } => "backend_unreachable",
            GateError::Internal => "internal_error",
        }
    }

    /// The response: ComfyUI's `{"error": {type, message, details, extra_info}, "node_errors": {}}`
    /// shape, except the origin refusal, which is ComfyUI's bare 403. A 401 carries
    /// `WWW-Authenticate` (Bearer and Basic), a 429 or a full queue `Retry-After`.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        if matches!(self, GateError::ForbiddenOrigin) {
            return crate::http::status(status);
        }
        let (details, extra_info) = match &self {
            GateError::DuplicatePromptId(id) => (id.clone(), json!({})),
            GateError::RateLimited { limit, retry_after } => (
                String::new(),
                json!({ "limit": limit, "retry_after_s": retry_secs(*retry_after) }),
            ),
            _ => (String::new(), json!({})),
        };
        let mut resp = json_resp(
            status,
            &json!({
                "error": { "type": self.kind(), "message": self.to_string(), "details": details, "extra_info": extra_info },
                "node_errors": {},
            }),
        );
        let headers = resp.headers_mut();
        match &self {
            GateError::Unauthorized { realm } => {
                for scheme in ["Bearer", "Basic"] {
                    let challenge = format!("{scheme} realm=\"{realm}\"");
                    if let Ok(v) = HeaderValue::from_str(&challenge) {
                        headers.append(header::WWW_AUTHENTICATE, v);
                    }
                }
            }
            GateError::RateLimited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_secs(*retry_after).into());
            }
            GateError::QueueFull(_) => {
                headers.insert(header::RETRY_AFTER, QUEUE_FULL_RETRY_S.into());
            }
            _ => {}
        }
        resp
    }
}

impl From<crate::http::BodyError> for GateError {
    fn from(e: crate::http::BodyError) -> Self {
        match e {
            crate::http::BodyError::TooLarge { limit } => GateError::TooLarge(limit),
            crate::http::BodyError::Read(m) => GateError::BadRequest(m),
            crate::http::BodyError::TimedOut(m) => GateError::BodyTimedOut(m),
        }
    }
}
