//! Requests to backends: one pooled HTTP/1.1 client, JSON helpers, and header hygiene for
//! proxied requests (hop-by-hop headers and the browser's `Origin` never go upstream).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::Backend;
use crate::error::GateError;
use crate::http::{Body, full};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the ones the
/// gate replaces itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, those named in `Connection`, and `Origin`.
pub fn strip_for_upstream(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    headers.remove(header::ORIGIN);
}

/// Removes hop-by-hop headers from a backend's response before it goes to the client.
pub fn strip_for_downstream(headers: &mut HeaderMap) {
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// The gate's client for backends.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    timeout: Duration,
}

impl Upstream {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, timeout }
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
        match tokio::time::timeout(timeout.unwrap_or(self.timeout), fut).await {
            Ok(Ok(resp)) => Ok(resp),
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
        let deadline = timeout.unwrap_or(self.timeout);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_origin_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("comfy-user", HeaderValue::from_static("alice"));
        strip_for_upstream(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["comfy-user"], "alice");
    }
}
