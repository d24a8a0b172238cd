//! `[edge]`: who the client is when the gate sits behind other proxies.

use serde::Deserialize;

/// `[edge]`: who the client is when the gate sits behind other proxies
/// ([`crate::edge::forwarded`], nginx's `set_real_ip_from` / `real_ip_header`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Peers whose forwarding header is believed: CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or
    /// single addresses. Default none (every client is its peer address; headers ignored).
    pub trusted_proxies: Vec<toml::Spanned<String>>,
    /// The header those peers name the client in: `"X-Forwarded-For"` (default) or
    /// `"Forwarded"` (RFC 7239). Only this one is read.
    pub real_ip_header: RealIpHeader,
    /// Every connection to the client listener starts with a PROXY protocol header (v1 or v2,
    /// HAProxy's `send-proxy`, AWS NLB), whose client address is the peer when the connection
    /// comes from a trusted proxy. A connection without one is closed. Default false.
    pub proxy_protocol: bool,
}

/// Which header names the client (`[edge] real_ip_header`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum RealIpHeader {
    /// `X-Forwarded-For` (nginx's usual `real_ip_header X-Forwarded-For`). The default.
    #[default]
    #[serde(rename = "X-Forwarded-For", alias = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded`, its `for=` parameters.
    #[serde(rename = "Forwarded", alias = "forwarded")]
    Forwarded,
}

/// `[edge]`, validated.
#[derive(Clone, Debug, Default)]
pub struct Edge {
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub real_ip_header: RealIpHeader,
    pub proxy_protocol: bool,
}
