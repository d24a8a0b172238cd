//! The routes the gate does not answer itself (the web frontend, custom nodes' routes, user
//! data) are proxied like nginx's `proxy_pass`: the request streams to one backend (the home
//! backend for user data, else the home backend if up, else any up backend) with its raw path
//! and query (`%2F` stays encoded) and hop-by-hop headers removed, and the answer streams back,
//! with the backend's name and response time for the access log ([`AccessFacts`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use http::{Request, Response, header};
use http_body_util::BodyExt;

use super::headers::{strip_for_downstream, strip_for_upstream};
use crate::api::ClientBody;
use crate::api::facts::AccessFacts;
use crate::error::GateError;
use crate::fleet::Fleet;
use crate::http::Body;

/// Passthrough body states: fine, over the size limit, ended early by the client, stalled past
/// `server.body_read_timeout_ms`.
const CLIENT_OK: u8 = 0;
const CLIENT_TOO_LARGE: u8 = 1;
const CLIENT_ABORTED: u8 = 2;
const CLIENT_TIMED_OUT: u8 = 3;

/// Where a proxied request goes.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// This backend only (user data lives on the home backend).
    Only(usize),
    /// The home backend if up, else the first that is.
    Any { home: usize },
}

/// Streams `req` to a backend of `fleet` and its answer back; a body over `limit` bytes is
/// refused with 413.
pub async fn passthrough(
    fleet: &Fleet,
    target: Target,
    limit: u64,
    req: Request<ClientBody>,
) -> Result<Response<Body>, GateError> {
    let backend = match target {
        Target::Only(t) => Some(t).filter(|t| fleet.get(*t).is_up()),
        Target::Any { home } => std::iter::once(home)
            .chain(0..fleet.backends().len())
            .find(|i| fleet.get(*i).is_up() && fleet.get(*i).is_listed()),
    }
    .ok_or(GateError::NoBackend)?;
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
            } else if crate::http::is_timeout(e.as_ref()) {
                CLIENT_TIMED_OUT
            } else {
                CLIENT_ABORTED
            };
            seen.store(kind, Ordering::SeqCst);
            e
        })
        .boxed();
    let upstream_req = Request::from_parts(parts, body);
    let b = fleet.get(backend).clone();
    let sent = Instant::now();
    match fleet.upstream.send(&b.config, upstream_req, None).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_for_downstream(&mut parts.headers);
            let mut resp = Response::from_parts(parts, body.map_err(Into::into).boxed());
            AccessFacts {
                backend: Some(b.config.name.clone()),
                upstream_time: Some(sent.elapsed()),
                ..Default::default()
            }
            .attach(&mut resp);
            Ok(resp)
        }
        Err(e) => match client_fault.load(Ordering::SeqCst) {
            CLIENT_TOO_LARGE => Err(GateError::TooLarge(limit as usize)),
            CLIENT_ABORTED => Err(GateError::BadRequest("the request body ended early".into())),
            CLIENT_TIMED_OUT => Err(GateError::BodyTimedOut(
                "no part of the request body arrived within server.body_read_timeout_ms".into(),
            )),
            _ => {
                fleet.record_health(backend, false);
                Err(e)
            }
        },
    }
}
