//! A client's request head as the gate's edge reads it: parsed by httparse (hyper's parser),
//! then the client's address behind trusted proxies (`X-Forwarded-For` and RFC 7239
//! `Forwarded`, walked right to left), who is asking (`Authorization` digest, `Comfy-User`,
//! address), the origin rule (ComfyUI's same-origin check) against `Host` and `Origin`, and the
//! hop-by-hop stripping driven by `Connection`, and token auth (`Bearer`, Basic's password,
//! `?token=` on `/ws`) with the headers forwarded for a user. None may panic; the client address
//! is the peer or an address some hop named; an identity never contains the key it was derived
//! from; after stripping no header a `Connection` named is left; a forwarded request carries no
//! credential and exactly one `comfy-user`, the user's name.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;

use comfy_gate::edge::forwarded::{self, RealIpHeader};
use comfy_gate::config::{Limits, User};
use comfy_gate::edge::{auth, headers, identity};
use comfy_wire::protocol::origin::same_origin_allows;
use http::{HeaderName, Request};
use libfuzzer_sys::fuzz_target;

/// The proxies the walk trusts: a private network, one IPv6 network, one address.
static TRUSTED: LazyLock<Vec<ipnet::IpNet>> = LazyLock::new(|| {
    ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect()
});

/// The users tokens are checked against.
static USERS: LazyLock<Vec<std::sync::Arc<User>>> = LazyLock::new(|| {
    use sha2::Digest;
    ["alice", "bob"]
        .iter()
        .map(|name| {
            std::sync::Arc::new(User {
                name: name.to_string(),
                token_sha256: sha2::Sha256::digest(format!("tok-{name}")).into(),
                band: 0,
                weight: 1.0,
                admin: false,
                limits: Limits::default(),
            })
        })
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut parsed);
    if head.parse(data).is_err() {
        return;
    }
    let mut builder = Request::builder()
        .method(head.method.unwrap_or("GET"))
        .uri(head.path.unwrap_or("/"));
    for h in head.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(mut req) = builder.body(()) else {
        return;
    };
    let peer: IpAddr = "10.0.0.9".parse().unwrap();
    let mut client = peer;
    for header in [RealIpHeader::XForwardedFor, RealIpHeader::Forwarded] {
        let hops = forwarded::hops(req.headers(), header);
        client = forwarded::client_addr(peer, req.headers(), &TRUSTED, header);
        assert!(
            client == peer || hops.contains(&Some(client)),
            "{client} from nowhere"
        );
        let untrusted: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            forwarded::client_addr(untrusted, req.headers(), &TRUSTED, header),
            untrusted
        );
    }
    let who = identity::identity(&req, client);
    if let Some(auth) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        && auth.len() > 4
    {
        assert!(!who.contains(auth));
    }
    let ws = req.uri().path() == "/ws";
    if let Some(token) = auth::presented_token(req.headers(), req.uri(), ws) {
        assert!(!token.is_empty());
        if let Some(user) = auth::user_of(&USERS, &token) {
            assert_eq!(format!("tok-{}", user.name), token);
        }
    }
    let mut upstream = req.headers().clone();
    auth::for_upstream(&mut upstream, &USERS[0]);
    assert!(!upstream.contains_key(http::header::AUTHORIZATION));
    let users: Vec<_> = upstream.get_all(auth::COMFY_USER).iter().collect();
    assert_eq!(users, ["alice"]);
    // The origin rule with literal addresses only: `is_loopback` resolves host names as
    // ComfyUI does, and a resolver call per input would fuzz the resolver, not the rule.
    let h = |n| {
        req.headers()
            .get(n)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
    };
    let literal = |host: &str| {
        host.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    };
    let _ = same_origin_allows(h(http::header::HOST), h(http::header::ORIGIN), literal);
    let named: Vec<HeaderName> = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    headers::strip_for_upstream(req.headers_mut());
    for n in named {
        assert!(!req.headers().contains_key(&n), "{n} survived");
    }
    assert!(!req.headers().contains_key(http::header::ORIGIN));
});
