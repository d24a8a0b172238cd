//! The load generator's HTTP side: one pooled hyper client against one base URL (`http://` only,
//! an optional path prefix kept), whole-body reads, and errors flattened to one line.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::LoadTestError;

/// How long one HTTP exchange may take before it counts as a connection failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A TCP connect that takes longer fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled connection idle this long is closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A ComfyUI-compatible server to send load to.
#[derive(Clone)]
pub(crate) struct Target {
    /// `http://host:port[/prefix]`, without a trailing slash.
    pub base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Target {
    /// Parses and checks the base URL (nothing is sent yet).
    pub fn parse(url: &str) -> Result<Self, LoadTestError> {
        let bad = |why: &str| LoadTestError::InvalidUrl {
            url: url.to_string(),
            reason: why.to_string(),
        };
        let uri: http::Uri = url.trim().parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https is not supported; use http://")),
            Some(_) => return Err(bad("the scheme must be http://")),
            None => return Err(bad("expected http://HOST:PORT")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.host().is_empty() {
            return Err(bad("no host"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        let prefix = uri.path().trim_end_matches('/');
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(Self {
            base: format!("http://{authority}{prefix}"),
            client,
        })
    }

    /// The WebSocket URL of `/ws?clientId=…`.
    pub fn ws_url(&self, client_id: &str) -> String {
        format!(
            "ws{}/ws?clientId={client_id}",
            self.base.strip_prefix("http").unwrap_or(&self.base)
        )
    }

    /// `GET path` → status and body; `Err` is a transport failure (one line).
    pub async fn get(&self, path: &str) -> Result<(u16, Bytes), String> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, Bytes), String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        self.send(Method::POST, path, Some(Bytes::from(bytes)))
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| one_line(&e))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| one_line(&e))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()))
    }
}

/// An error and its sources on one line ("client error (Connect): tcp connect error: …").
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ").replace(['\n', '\r'], " ")
}
