//! ComfyUI's same-origin rule (reference §2.3), as a pure function.
//!
//! ComfyUI refuses a request with 403 when it carries both `Host` and `Origin`, the Host names a
//! loopback address, and the two differ once ports are reconciled. comfy-sim applies it so that a
//! proxy forwarding a browser's Origin to a loopback backend fails exactly as it would against
//! ComfyUI; the gate applies the same rule against its own Host.

use std::net::{IpAddr, ToSocketAddrs};

/// Splits `host[:port]` (with `[v6]` brackets) into hostname and port.
fn split_host_port(netloc: &str) -> (Option<String>, Option<u16>) {
    let netloc = netloc.rsplit('@').next().unwrap_or(netloc);
    if let Some(rest) = netloc.strip_prefix('[') {
        let (host, after) = match rest.split_once(']') {
            Some(pair) => pair,
            None => return (None, None),
        };
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (Some(host.to_ascii_lowercase()), port);
    }
    match netloc.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let host = if h.is_empty() {
                None
            } else {
                Some(h.to_ascii_lowercase())
            };
            (host, p.parse().ok())
        }
        _ if netloc.is_empty() => (None, None),
        _ => (Some(netloc.to_ascii_lowercase()), None),
    }
}

/// The netloc of an Origin URL (`scheme://netloc`); `null` and non-URLs give an empty netloc.
fn origin_netloc(origin: &str) -> String {
    match origin.split_once("://") {
        Some((_, rest)) => rest
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase(),
        None => String::new(),
    }
}

/// ComfyUI's `is_loopback`: literal IPs are checked directly, names are resolved (IPv4 results
/// first) and count as loopback when every address seen before the first non-loopback one is.
pub fn is_loopback(host: &str) -> bool {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    match (host, 0u16).to_socket_addrs() {
        Ok(it) => resolved_loopback(it.map(|a| a.ip()).collect()),
        Err(_) => false,
    }
}

/// ComfyUI's verdict on a name's resolved addresses: IPv4 first, loopback when the addresses
/// before the first non-loopback one are all loopback and there is at least one.
pub fn resolved_loopback(mut ips: Vec<IpAddr>) -> bool {
    ips.sort_by_key(IpAddr::is_ipv6);
    let mut loopback = false;
    for ip in ips {
        if !ip.is_loopback() {
            return loopback;
        }
        loopback = true;
    }
    loopback
}

/// The host name a `Host` header names (lowercase, brackets and port dropped), which is what
/// [`same_origin_allows`] asks `loopback` about; `None` when there is none.
pub fn host_name(host: &str) -> Option<String> {
    split_host_port(&host.to_ascii_lowercase()).0
}

/// Whether ComfyUI would let a request with these `Host` and `Origin` headers through.
/// `loopback` decides whether a hostname is loopback (normally [`is_loopback`]).
pub fn same_origin_allows(
    host: Option<&str>,
    origin: Option<&str>,
    loopback: impl Fn(&str) -> bool,
) -> bool {
    let (Some(host), Some(origin)) = (host, origin) else {
        return true;
    };
    let host_lower = host.to_ascii_lowercase();
    let (host_name, host_port) = split_host_port(&host_lower);
    let origin_net = origin_netloc(origin);
    let (origin_name, origin_port) = split_host_port(&origin_net);
    let is_loop = host_name.as_deref().map(&loopback).unwrap_or(false);
    if !is_loop {
        return true;
    }
    // Python keeps the bracket-less hostname when it drops a port.
    let host_domain = if origin_port.is_none() {
        host_name.clone().unwrap_or_default()
    } else {
        host_lower.clone()
    };
    let origin_domain = if host_port.is_none() {
        origin_name.unwrap_or_default()
    } else {
        origin_net.clone()
    };
    if host_domain.is_empty() || origin_domain.is_empty() {
        return true;
    }
    host_domain == origin_domain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(host: &str, origin: Option<&str>) -> bool {
        same_origin_allows(Some(host), origin, is_loopback)
    }

    /// The table of reference §2.3, row by row.
    #[test]
    fn reference_table() {
        assert!(allows("127.0.0.1:8188", Some("http://127.0.0.1:8188")));
        assert!(!allows("127.0.0.1:8188", Some("http://localhost:8188")));
        assert!(!allows("127.0.0.1:8188", Some("https://proxy.example.com")));
        assert!(!allows("127.0.0.1:8188", Some("http://127.0.0.1:9000")));
        assert!(allows("127.0.0.1:8188", Some("http://127.0.0.1")));
        assert!(allows("127.0.0.1", Some("http://127.0.0.1:9000")));
        assert!(allows("localhost:8188", Some("http://localhost:8188")));
        assert!(allows("[::1]:8188", Some("http://[::1]:8188")));
        assert!(allows("10.1.2.3:8188", Some("https://evil.example")));
        assert!(allows("127.0.0.1:8188", None));
        assert!(allows("127.0.0.1:8188", Some("null")));
    }

    #[test]
    fn non_loopback_names_are_not_checked() {
        let never = |_: &str| false;
        assert!(same_origin_allows(
            Some("proxy.example.com"),
            Some("https://evil.example"),
            never
        ));
    }

    #[test]
    fn comfyui_counts_the_loopback_addresses_before_the_first_other_one() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(resolved_loopback(vec![ip("127.0.0.1"), ip("::1")]));
        assert!(resolved_loopback(vec![ip("127.0.0.1"), ip("10.0.0.1")]));
        assert!(!resolved_loopback(vec![ip("10.0.0.1"), ip("127.0.0.1")]));
        assert!(
            resolved_loopback(vec![ip("::1"), ip("127.0.0.1")]),
            "IPv4 first"
        );
        assert!(!resolved_loopback(vec![]));
    }

    #[test]
    fn host_is_case_insensitive() {
        assert!(allows("LOCALHOST:8188", Some("http://localhost:8188")));
    }
}
