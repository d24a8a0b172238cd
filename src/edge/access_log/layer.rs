//! The access log as a tower layer: it notes the request as it arrives, takes the handlers'
//! [`AccessFacts`] off the response, and writes the line when the response body is done
//! (dropped by the connection after its last byte, or early when the client went away).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Buf;
use http::{Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::{AccessLog, Entry};
use crate::api::facts::AccessFacts;
use crate::edge::auth::without_token;
use crate::http::ConnInfo;

/// nginx's status for a request whose client closed the connection before the answer.
pub const CLIENT_CLOSED: u16 = 499;

/// The header the request id travels in (set by the stack's request-id layer).
const REQUEST_ID: &str = "x-request-id";

/// Adds the access log to a service ([`AccessLogService`]).
#[derive(Clone)]
pub struct AccessLogLayer {
    log: AccessLog,
}

impl AccessLogLayer {
    /// Lines go to `log` (and nowhere while it is off).
    pub fn new(log: AccessLog) -> Self {
        Self { log }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            log: self.log.clone(),
        }
    }
}

/// `inner`, with one access log line per request.
#[derive(Clone)]
pub struct AccessLogService<S> {
    inner: S,
    log: AccessLog,
}

/// What the line will say, known when the request arrives.
struct Arrived {
    log: AccessLog,
    start: Instant,
    entry: Entry,
}

impl Arrived {
    fn of<B>(log: AccessLog, req: &Request<B>) -> Self {
        let header = |name: &str| req.headers().get(name).cloned();
        let uri = without_token(req.uri()).unwrap_or_else(|| req.uri().clone());
        // `$request_uri`: the path and query, as an HTTP/1.1 request line has them; HTTP/2's
        // `:scheme` and `:authority` (which hyper puts in the URI) are not part of it, as in
        // nginx. An asterisk or authority form (`OPTIONS *`, `CONNECT`) is logged whole.
        let uri = match uri.path_and_query() {
            Some(pq) if req.method() != http::Method::CONNECT => pq.to_string(),
            _ => uri.to_string(),
        };
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.peer.ip());
        Self {
            log,
            start: Instant::now(),
            entry: Entry {
                at_ms: 0,
                remote_addr: peer.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
                user: None,
                method: req.method().to_string(),
                uri,
                protocol: protocol(req.version()),
                status: CLIENT_CLOSED,
                body_bytes_sent: 0,
                request_time: Default::default(),
                referer: header(header::REFERER.as_str()),
                user_agent: header(header::USER_AGENT.as_str()),
                request_id: header(REQUEST_ID),
                backend: None,
                prompt_id: None,
                upstream_time: None,
            },
        }
    }

    /// The answer's status and facts.
    fn answered(&mut self, status: StatusCode, facts: AccessFacts) {
        let e = &mut self.entry;
        e.status = status.as_u16();
        e.remote_addr = facts.client.unwrap_or(e.remote_addr);
        e.user = facts.user;
        e.backend = facts.backend;
        e.prompt_id = facts.prompt_id;
        e.upstream_time = facts.upstream_time;
    }

    fn write(mut self, body_bytes_sent: u64) {
        self.entry.at_ms = crate::protocol::now_ms();
        self.entry.request_time = self.start.elapsed();
        self.entry.body_bytes_sent = body_bytes_sent;
        self.log.write(&self.entry);
    }
}

/// `$server_protocol` of a request.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Writes a 499 line if the answer never came (the future was dropped: the client left).
struct Unanswered(Option<Arrived>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(arrived) = self.0.take() {
            arrived.write(0);
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AccessLogService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = Response<Logged<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let arrived = self
            .log
            .is_on()
            .then(|| Arrived::of(self.log.clone(), &req));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let mut waiting = Unanswered(arrived);
            let mut resp = answer.await?;
            // Taken off whether the log is on or not: the facts are the log's alone.
            let facts = AccessFacts::take(&mut resp);
            let mut line = waiting.0.take();
            if let Some(arrived) = &mut line {
                arrived.answered(resp.status(), facts);
            }
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                // A WebSocket: its line is written as it upgrades; what it sends later is not
                // this response's body.
                if let Some(arrived) = line.take() {
                    arrived.write(0);
                }
            }
            Ok(resp.map(|inner| Logged {
                inner,
                counted: Counted { line, bytes: 0 },
            }))
        })
    }
}

/// Writes the line once the body is done (on drop), with the bytes that went out.
struct Counted {
    line: Option<Arrived>,
    bytes: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(arrived) = self.line.take() {
            arrived.write(self.bytes);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body whose data bytes are counted for the access log line, written when it
    /// is dropped.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        counted: Counted,
    }
}

impl<B: Body> Body for Logged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.counted.bytes += data.remaining() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::config::{self, AccessLogFormat};
    use crate::http::{Body as GateBody, full, status};

    /// A log in `dir` (JSON) and a function reading its lines once there are `n`.
    fn json_log(dir: &std::path::Path) -> (AccessLog, impl Fn(usize) -> Vec<serde_json::Value>) {
        let path = dir.join("access.log");
        let log = AccessLog::open(&config::AccessLog {
            path: Some(path.display().to_string()),
            format: AccessLogFormat::Json,
        })
        .unwrap();
        let read = move |n: usize| {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<serde_json::Value> = text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                if lines.len() >= n || Instant::now() > deadline {
                    assert_eq!(lines.len(), n, "{text}");
                    return lines;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        (log, read)
    }

    fn request(uri: &str) -> Request<GateBody> {
        let mut req = Request::get(uri)
            .header("x-request-id", "rid-1")
            .header("user-agent", "ua")
            .body(full(""))
            .unwrap();
        req.extensions_mut().insert(ConnInfo {
            peer: "192.0.2.1:5000".parse().unwrap(),
            local: "127.0.0.1:8188".parse().unwrap(),
            tls: false,
        });
        req
    }

    #[tokio::test]
    async fn the_line_counts_the_body_sent_and_carries_the_handlers_facts() {
        let dir = tempfile::tempdir().unwrap();
        let (log, read) = json_log(dir.path());
        let inner = tower::service_fn(|_req: Request<GateBody>| async {
            let mut resp = Response::new(full("hello world"));
            AccessFacts {
                client: Some([203, 0, 113, 9].into()),
                user: Some("alice".into()),
                backend: Some("gpu0".into()),
                ..Default::default()
            }
            .attach(&mut resp);
            Ok::<_, Infallible>(resp)
        });
        let svc = AccessLogLayer::new(log).layer(inner);
        let resp = svc.oneshot(request("/x?token=secret&a=1")).await.unwrap();
        assert!(
            resp.extensions().get::<AccessFacts>().is_none(),
            "taken off"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 11);
        let line = &read(1)[0];
        assert_eq!(line["status"], 200);
        assert_eq!(line["body_bytes_sent"], 11);
        assert_eq!(line["request_uri"], "/x?a=1", "the token is never logged");
        assert_eq!(line["remote_addr"], "203.0.113.9");
        assert_eq!(
            (&line["user"], &line["backend"]),
            (&"alice".into(), &"gpu0".into())
        );
        assert_eq!(line["request_id"], "rid-1");
    }

    /// HTTP/2 requests carry `:scheme` and `:authority` in hyper's URI; `$request_uri` is still
    /// the path and query, so HTTP/1.1 and HTTP/2 hits read the same.
    #[tokio::test]
    async fn an_http2_request_is_logged_by_its_path_and_query() {
        let dir = tempfile::tempdir().unwrap();
        let (log, read) = json_log(dir.path());
        let inner = tower::service_fn(|_req: Request<GateBody>| async {
            Ok::<_, Infallible>(status(StatusCode::OK))
        });
        let svc = AccessLogLayer::new(log).layer(inner);
        let mut req = request("https://gate.example:8443/queue?a=1");
        *req.version_mut() = Version::HTTP_2;
        svc.oneshot(req).await.unwrap();
        let line = &read(1)[0];
        assert_eq!(line["request_uri"], "/queue?a=1");
        assert_eq!(line["server_protocol"], "HTTP/2.0");
    }

    #[tokio::test]
    async fn an_upgrade_is_logged_at_once_and_an_abandoned_request_as_499() {
        let dir = tempfile::tempdir().unwrap();
        let (log, read) = json_log(dir.path());
        let upgrade = tower::service_fn(|_req: Request<GateBody>| async {
            Ok::<_, Infallible>(status(StatusCode::SWITCHING_PROTOCOLS))
        });
        let svc = AccessLogLayer::new(log.clone()).layer(upgrade);
        let resp = svc.oneshot(request("/ws")).await.unwrap();
        let line = &read(1)[0];
        assert_eq!(
            (&line["status"], &line["remote_addr"]),
            (&101.into(), &"192.0.2.1".into())
        );
        drop(resp);
        let never = tower::service_fn(|_req: Request<GateBody>| {
            std::future::pending::<Result<Response<GateBody>, Infallible>>()
        });
        let svc = AccessLogLayer::new(log).layer(never);
        let answer = svc.oneshot(request("/slow"));
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), answer).await;
        assert!(gave_up.is_err());
        let lines = read(2);
        assert_eq!(lines.len(), 2, "the upgrade's line is not written twice");
        assert_eq!(
            (&lines[1]["status"], &lines[1]["body_bytes_sent"]),
            (&499.into(), &0.into())
        );
    }
}
