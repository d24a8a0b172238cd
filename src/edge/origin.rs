//! The origin policy (design §2 "Origin"): ComfyUI's same-origin rule, applied against the
//! gate's own Host (the backends never see the browser's `Origin`), plus the operator's
//! `server.allowed_origins`.
//!
//! ComfyUI resolves a `Host` that is a name to learn whether it is loopback, on every request
//! that carries an `Origin`. Done inline that is a blocking resolver call per request on the
//! gate's few runtime threads, with the name chosen by the client: one client sending random
//! names would stall everyone. So names are resolved on the blocking pool, at most
//! [`LOOKUPS_AT_ONCE`] at a time (a slot is held until its resolver call returns), each waited
//! for [`LOOKUP_TIMEOUT`], and the answers remembered for [`REMEMBER_FOR`] in a bounded cache. A
//! resolution error is not loopback, as in ComfyUI; a name that cannot be asked now (all slots
//! busy) or answered in time counts as loopback, not remembered: the request's Origin must then
//! match its Host (failing closed, so a slow resolver cannot open the cross-site door).

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{Method, Request, header};
use tokio::sync::Semaphore;

use crate::protocol::origin::{host_name, resolved_loopback, same_origin_allows};

/// Resolver lookups in flight at once.
pub const LOOKUPS_AT_ONCE: usize = 4;
/// Time one lookup is given.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an answer is kept.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);
/// Names remembered at most (the cache is emptied when full).
const REMEMBERED_NAMES: usize = 1024;

/// With auth on and an HTTP Basic credential (which a browser sends by itself, on any site's
/// requests), whether a request that changes something (any method but `GET`, `HEAD`,
/// `OPTIONS`) or opens the socket (`/ws`, whose events are the user's) comes from the gate's
/// own pages or an allowed origin: its `Origin` names the gate's `Host` (whatever the host,
/// loopback or not), or, without `Origin`, `Sec-Fetch-Site` does not say `cross-site`. Refuses
/// cross-site request forgery and cross-site WebSocket hijacking; `path` is after `/api`.
pub fn credential_is_own<B>(allowed: &[String], req: &Request<B>, path: &str) -> bool {
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !changes && path != "/ws" {
        return true;
    }
    match h("origin") {
        Some(o) if allowed.iter().any(|a| a == o) => true,
        Some("null") => false,
        Some(o) => same_origin_allows(h("host"), Some(o), |_| true),
        None => h("sec-fetch-site") != Some("cross-site"),
    }
}

/// Whether a request may proceed: its `Origin` is listed in `allowed`, or ComfyUI's rule
/// (`server.py` `create_origin_only_middleware`: a loopback Host must match its Origin) lets it.
pub async fn origin_allowed<B>(allowed: &[String], req: &Request<B>) -> bool {
    let h = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok());
    let (host, origin) = (h(header::HOST), h(header::ORIGIN));
    let Some(origin) = origin else {
        return true;
    };
    if allowed.iter().any(|o| o == origin) {
        return true;
    }
    let loopback = match host.and_then(host_name) {
        Some(name) => is_loopback(&name).await,
        None => false,
    };
    same_origin_allows(host, Some(origin), |_| loopback)
}

/// ComfyUI's `is_loopback`: a literal address is checked directly; `localhost` and names under
/// it are loopback (RFC 6761 §6.3); other names are resolved (IPv4 results first) and count as
/// loopback when every address seen before the first non-loopback one is.
pub async fn is_loopback(name: &str) -> bool {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    let cache = remembered();
    if let Some(&(answer, at)) = lock(cache).get(name)
        && at.elapsed() < REMEMBER_FOR
    {
        return answer;
    }
    // Busy or slow: loopback, so the Origin must match the Host (fail closed; not remembered).
    let Ok(permit) = lookups().clone().try_acquire_owned() else {
        return true;
    };
    let asked = name.to_string();
    let lookup = tokio::task::spawn_blocking(move || {
        // The slot is held until the resolver call returns, however long the wait for it.
        let _permit = permit;
        (asked.as_str(), 0)
            .to_socket_addrs()
            .map(|a| a.map(|a| a.ip()).collect::<Vec<_>>())
    });
    let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(Ok(ips))) => resolved_loopback(ips),
        // A resolution error is not loopback, as in ComfyUI.
        Ok(Ok(Err(_))) => false,
        Ok(Err(_)) | Err(_) => return true,
    };
    let mut names = lock(cache);
    if names.len() >= REMEMBERED_NAMES {
        names.clear();
    }
    names.insert(name.to_string(), (answer, Instant::now()));
    answer
}

fn remembered() -> &'static Mutex<HashMap<String, (bool, Instant)>> {
    static CACHE: OnceLock<Mutex<HashMap<String, (bool, Instant)>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lookups() -> &'static Arc<Semaphore> {
    static LOOKUPS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    LOOKUPS.get_or_init(|| Arc::new(Semaphore::new(LOOKUPS_AT_ONCE)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, origin: Option<&str>) -> Request<()> {
        let mut b = Request::builder().header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[tokio::test]
    async fn a_listed_origin_passes_and_a_foreign_one_to_loopback_does_not() {
        let allowed = vec!["https://studio.example".to_string()];
        let foreign = req("127.0.0.1:8188", Some("https://evil.example"));
        assert!(!origin_allowed(&allowed, &foreign).await);
        let listed = req("127.0.0.1:8188", Some("https://studio.example"));
        assert!(origin_allowed(&allowed, &listed).await);
        assert!(
            origin_allowed(&[], &req("127.0.0.1:8188", None)).await,
            "no Origin: not a browser"
        );
        let same = req("127.0.0.1:8188", Some("http://127.0.0.1:8188"));
        assert!(origin_allowed(&[], &same).await);
        let named = req("localhost:8188", Some("https://evil.example"));
        assert!(!origin_allowed(&[], &named).await, "localhost is loopback");
    }

    #[tokio::test]
    async fn names_are_resolved_once_and_remembered() {
        assert!(is_loopback("::1").await && is_loopback("app.localhost").await);
        assert!(!is_loopback("192.0.2.1").await);
        // A name that does not resolve (.invalid, RFC 6761 §6.4): not loopback, and the answer
        // is remembered.
        assert!(!is_loopback("gate-test.invalid").await);
        assert!(lock(remembered()).contains_key("gate-test.invalid"));
    }
}
