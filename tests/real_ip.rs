//! The client's address behind trusted proxies (`[edge] trusted_proxies`, `real_ip_header`):
//! it keys the identity of a caller that sends no key or user, which scopes an id-less
//! `POST /queue {"clear": true}` to the caller's own waiting prompts. Two clients behind one
//! proxy (one peer address) are told apart by the header the proxy appends; a spoofed header
//! from a peer that is not trusted changes nothing.
mod common;

use common::*;
use serde_json::{Value, json};

async fn queued(base: &str) -> Vec<String> {
    let (_, q) = get_json(base, "/queue").await;
    let items = ["queue_running", "queue_pending"].map(|k| q[k].as_array().cloned());
    items
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|i| i[1].as_str().map(str::to_string))
        .collect()
}

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
