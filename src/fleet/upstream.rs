//! Requests to backends: one pooled HTTP/1.1 client and JSON helpers. Idle pooled connections
//! are closed after [`POOL_IDLE_TIMEOUT`] (hyper-util arms that timer only when the pool is given
//! one, hence `pool_timer`).
//!
//! The one client serves `http://` and `https://` backends alike (issue 14: backends on another
//! network, behind their own TLS terminator). TLS is rustls with the `ring` provider, TLS 1.2 and
//! 1.3 only (RFC 8996), the certificate verified for the URL's host against `[tls] backend_ca`
//! or, without it, Mozilla's roots: CI machines and slim containers often have no platform store,
//! and a gate that trusted whatever a host happens to hold would trust differently on each.
//! The trust is fixed at start (the upstream WebSocket uses the same, [`Upstream::tls_config`]);
//! a changed bundle needs a restart, so every connection of a run is verified alike.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

use crate::config::{Backend, BackendCa};
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
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// The TLS client configuration of `https://` backends, for the upstream WebSocket too.
    tls: Arc<rustls::ClientConfig>,
    /// Where `server.upstream_timeout_ms` is read, per request (a reload changes it).
    config: Arc<crate::config::Live>,
}

impl Upstream {
    /// A client whose requests time out after `server.upstream_timeout_ms` of the
    /// configuration in force, unless a call says otherwise; `https://` backends are verified
    /// against that configuration's `[tls] backend_ca` (read now, for the life of the client).
    pub fn new(config: Arc<crate::config::Live>) -> Self {
        let tls = backend_tls_config(config.load().backend_ca.as_ref());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // hyper-rustls dispatches on the URI's scheme; the inner connector must accept both.
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(rustls::ClientConfig::clone(&tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            client,
            tls,
            config,
        }
    }

    /// The TLS client configuration for `https://` backends (no ALPN: HTTP/1.1 and WebSocket).
    pub fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
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

/// The TLS client configuration for backends: `ring`, TLS 1.3 and 1.2, no client certificate,
/// trusting `ca`'s certificates only when given (nginx's `proxy_ssl_trusted_certificate`), else
/// Mozilla's roots as `webpki-roots` ships them.
pub fn backend_tls_config(ca: Option<&BackendCa>) -> Arc<rustls::ClientConfig> {
    let roots = match ca {
        Some(ca) => {
            let mut store = rustls::RootCertStore::empty();
            // Each was checked when the configuration was loaded.
            store.add_parsable_certificates(ca.roots.iter().cloned());
            store
        }
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // Not input: ring has suites for both versions, a fact of the build.
        .expect("the ring provider speaks TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}
