//! Requests to backends: one pooled HTTP/1.1 client and JSON helpers. Idle pooled connections
//! are closed after [`POOL_IDLE_TIMEOUT`] (hyper-util arms that timer only when the pool is given
//! one, hence `pool_timer`).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

use crate::config::Backend;
use crate::error::GateError;
use crate::http::{Body, full};

/// Percent-encodes one path segment (a prompt id in `/history/{id}`).
pub fn encode_segment(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A TCP connect to a backend that takes longer fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A pooled connection idle this long is closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The gate's client for backends.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    /// Where `server.upstream_timeout_ms` is read, per request (a reload changes it).
    config: std::sync::Arc<crate::config::Live>,
}

impl Upstream {
    /// A client whose requests time out after `server.upstream_timeout_ms` of the
    /// configuration in force, unless a call says otherwise.
    pub fn new(config: std::sync::Arc<crate::config::Live>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { client, config }
    }

    fn err(backend: &Backend, message: impl ToString) -> GateError {
        GateError::Backend {
            backend: backend.name.clone(),
            message: message.to_string(),
        }
    }

    /// Sends a request (its URI is a path and query; the backend's base is prefixed).
    pub async fn send(
        &self,
        backend: &Backend,
        mut req: Request<Body>,
        timeout: Option<Duration>,
    ) -> Result<Response<hyper::body::Incoming>, GateError> {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = format!("{}{}", backend.base, pq)
            .parse()
            .map_err(|e| Self::err(backend, e))?;
        if let Ok(v) = HeaderValue::from_str(&backend.authority) {
            req.headers_mut().insert(header::HOST, v);
        }
        let fut = self.client.request(req);
        let deadline = timeout.unwrap_or_else(|| self.config.load().upstream_timeout());
        match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(GateError::Unreachable {
                backend: backend.name.clone(),
                message: e.to_string(),
            }),
            Ok(Err(e)) => Err(Self::err(backend, e)),
            Err(_) => Err(Self::err(backend, "timed out")),
        }
    }

    /// Sends and reads the whole response body.
    pub async fn call(
        &self,
        backend: &Backend,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), GateError> {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(full(body.unwrap_or_default()))
            .map_err(|e| Self::err(backend, e))?;
        let resp = self.send(backend, req, timeout).await?;
        let (parts, body) = resp.into_parts();
        let deadline = timeout.unwrap_or_else(|| self.config.load().upstream_timeout());
        let bytes = tokio::time::timeout(deadline, body.collect())
            .await
            .map_err(|_| Self::err(backend, "timed out reading the body"))?
            .map_err(|e| Self::err(backend, e))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// GET returning JSON (non-JSON answers become `Value::Null`).
    pub async fn get_json(
        &self,
        backend: &Backend,
        path: &str,
    ) -> Result<(StatusCode, Value), GateError> {
        let (status, _, bytes) = self
            .call(backend, Method::GET, path, None, None, None)
            .await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// POST a JSON body, returning status and raw body.
    pub async fn post_json(
        &self,
        backend: &Backend,
        path: &str,
        body: &Value,
    ) -> Result<(StatusCode, Bytes), GateError> {
        let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let (status, _, body) = self
            .call(
                backend,
                Method::POST,
                path,
                Some(bytes),
                Some("application/json"),
                None,
            )
            .await?;
        Ok((status, body))
    }
}
