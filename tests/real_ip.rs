//! The client's address behind trusted proxies (`[edge] trusted_proxies`, `real_ip_header`):
//! it keys the identity of a caller that sends no key or user, which scopes an id-less
//! `POST /queue {"clear": true}` to the caller's own waiting prompts. Two clients behind one
//! proxy (one peer address) are told apart by the header the proxy appends, or by the PROXY
//! protocol header a TCP load balancer opens each connection with; a spoofed header from a peer
//! that is not trusted changes nothing.
mod common;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Posts `body` to `path` as if relayed by a proxy that appended `client` to `header`.
async fn post_via(base: &str, path: &str, header: &str, client: &str, body: &Value) -> u16 {
    http()
        .post(format!("{base}{path}"))
        .header(header, client)
        .json(body)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

/// One running prompt holds the only slot; `a` and `b` each queue one behind it, then `b`
/// clears the queue. Returns what is still listed.
async fn clear_from_behind_a_proxy(
    trusted: &[&str],
    header: &str,
    a: &str,
    b: &str,
) -> Vec<String> {
    let sim = sim().await;
    let trusted: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
    let gate = gate_with(&[&sim], move |f| {
        f.backends[0].max_inflight = Some(1);
        f.edge.trusted_proxies = trusted
            .into_iter()
            .map(|t| toml::Spanned::new(0..0, t))
            .collect();
        if header == "forwarded" {
            f.edge.real_ip_header = comfy_gate::edge::forwarded::RealIpHeader::Forwarded;
        }
    })
    .await;
    let base = gate.url();
    let submit = |id: &str, g: Value| json!({"prompt": g, "prompt_id": id});
    assert_eq!(
        post_json(&base, "/prompt", &submit("busy", steps(1, 10_000)))
            .await
            .0,
        200
    );
    assert_eq!(
        post_via(
            &base,
            "/prompt",
            header,
            a,
            &submit("a-waits", blur_graph(1))
        )
        .await,
        200
    );
    assert_eq!(
        post_via(
            &base,
            "/prompt",
            header,
            b,
            &submit("b-waits", blur_graph(2))
        )
        .await,
        200
    );
    assert_eq!(queued(&base).await, ["busy", "a-waits", "b-waits"]);
    assert_eq!(
        post_via(&base, "/queue", header, b, &json!({"clear": true})).await,
        200
    );
    let left = queued(&base).await;
    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    left
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_told_apart_by_x_forwarded_for() {
    let left = clear_from_behind_a_proxy(
        &["127.0.0.0/8"],
        "x-forwarded-for",
        "198.51.100.1",
        "6.6.6.6, 198.51.100.2",
    )
    .await;
    assert_eq!(left, ["busy", "a-waits"], "b cleared only its own");
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_told_apart_by_forwarded() {
    let left = clear_from_behind_a_proxy(
        &["127.0.0.1"],
        "forwarded",
        "for=198.51.100.1;proto=https",
        r#"for="[2001:db8::2]:4711""#,
    )
    .await;
    assert_eq!(left, ["busy", "a-waits"], "b cleared only its own");
}

#[tokio::test]
async fn a_spoofed_x_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    // No proxy is trusted: both callers are the peer 127.0.0.1, whatever they claim.
    let left =
        clear_from_behind_a_proxy(&[], "x-forwarded-for", "198.51.100.1", "198.51.100.2").await;
    assert_eq!(
        left,
        ["busy"],
        "one identity: the clear took both waiting prompts"
    );
    // A trusted network that does not hold the peer: the same.
    let left = clear_from_behind_a_proxy(
        &["10.0.0.0/8"],
        "x-forwarded-for",
        "198.51.100.1",
        "198.51.100.2",
    )
    .await;
    assert_eq!(left, ["busy"]);
}

/// One HTTP/1.1 request on a connection of its own that starts with `proxy_header`: the
/// response's status, or `None` when the gate closed the connection without answering.
async fn post_after_proxy_header(
    addr: std::net::SocketAddr,
    proxy_header: &[u8],
    path: &str,
    body: &Value,
) -> Option<u16> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(&[proxy_header, head.as_bytes(), body.as_bytes()].concat())
        .await
        .ok()?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ').nth(1)?.parse().ok()
}

/// As [`clear_from_behind_a_proxy`], through a listener that takes the PROXY protocol: `a` and
/// `b` are the client addresses their connections' headers name.
async fn clear_behind_proxy_protocol(trusted: &str, a: &[u8], b: &[u8]) -> Vec<String> {
    let sim = sim().await;
    let trusted = trusted.to_string();
    let gate = gate_with(&[&sim], move |f| {
        f.backends[0].max_inflight = Some(1);
        f.edge.proxy_protocol = true;
        f.edge.trusted_proxies = vec![toml::Spanned::new(0..0, trusted)];
    })
    .await;
    let addr = gate.addr;
    let submit = |id: &str, g: Value| json!({"prompt": g, "prompt_id": id});
    let own = b"PROXY UNKNOWN\r\n";
    let post = |header: &[u8], path: &'static str, body: Value| {
        let header = header.to_vec();
        async move { post_after_proxy_header(addr, &header, path, &body).await }
    };
    assert_eq!(
        post(own, "/prompt", submit("busy", steps(1, 10_000))).await,
        Some(200)
    );
    assert_eq!(
        post(a, "/prompt", submit("a-waits", blur_graph(1))).await,
        Some(200)
    );
    assert_eq!(
        post(b, "/prompt", submit("b-waits", blur_graph(2))).await,
        Some(200)
    );
    assert_eq!(post(b, "/queue", json!({"clear": true})).await, Some(200));
    // The admin listener and a request without the header.
    let (code, _) = get_json(&format!("http://{}", gate.admin_addr), "/admin/records").await;
    assert_eq!(code, 200, "the admin listener takes no PROXY header");
    assert_eq!(
        post_after_proxy_header(addr, b"", "/prompt", &submit("x", blur_graph(3))).await,
        None,
        "a connection without the header is closed unanswered"
    );
    let left = queued_via_proxy(addr).await;
    post(own, "/interrupt", json!({"prompt_id": "busy"})).await;
    left
}

/// `/queue`'s prompt ids, asked over a connection that starts with `PROXY UNKNOWN`.
async fn queued_via_proxy(addr: std::net::SocketAddr) -> Vec<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PROXY UNKNOWN\r\nGET /queue HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer).to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    queue_ids(&serde_json::from_str(body.trim()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_protocol_balancer_are_told_apart() {
    let left = clear_behind_proxy_protocol(
        "127.0.0.0/8",
        b"PROXY TCP4 198.51.100.1 127.0.0.1 40001 8188\r\n",
        b"PROXY TCP6 2001:db8::2 ::1 40002 8188\r\n",
    )
    .await;
    assert_eq!(left, ["busy", "a-waits"], "b cleared only its own");
}

#[tokio::test]
async fn a_proxy_protocol_header_from_an_untrusted_peer_is_ignored() {
    let left = clear_behind_proxy_protocol(
        "10.0.0.0/8",
        b"PROXY TCP4 198.51.100.1 127.0.0.1 40001 8188\r\n",
        b"PROXY TCP4 198.51.100.2 127.0.0.1 40002 8188\r\n",
    )
    .await;
    assert_eq!(
        left,
        ["busy"],
        "one identity, the peer's: the clear took both"
    );
}
