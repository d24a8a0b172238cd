//! `[limits]`: prompts per minute with a burst, prompts waiting at once, WebSocket connections
//! per client address and the gate queue's global cap, for users and for anonymous clients
//! (keyed by their address, the real one behind a trusted proxy). Over a limit: 429 (or 503
//! for the global cap) with `Retry-After`, in ComfyUI's error shape, and nothing refused is
//! ever queued or run.
mod common;

use common::*;
use serde_json::{Value, json};

/// Submits `graph` as `prompt_id` `id` with `client`; the status, `Retry-After` and body.
async fn submit(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    graph: Value,
    headers: &[(&str, &str)],
) -> (u16, Option<u64>, Value) {
    let mut req = client
        .post(format!("{base}/prompt"))
        .json(&json!({"prompt": graph, "prompt_id": id}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("submit answers");
    let code = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().expect("Retry-After is seconds"));
    (code, retry, resp.json().await.unwrap_or(Value::Null))
}

/// Every prompt id the gate knows of: queued, running or in history.
async fn known(base: &str) -> Vec<String> {
    let mut ids = queued(base).await;
    let (_, h) = get_json(base, "/history").await;
    ids.extend(h.as_object().unwrap().keys().cloned());
    ids
}

#[tokio::test]
async fn the_third_immediate_prompt_waits_as_long_as_retry_after_says() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| {
        f.limits.prompts_per_minute = 10;
        f.limits.prompt_burst = 2;
    })
    .await;
    let base = gate.url();
    let c = http();
    assert_eq!(submit(&c, &base, "p1", blur_graph(1), &[]).await.0, 200);
    assert_eq!(submit(&c, &base, "p2", blur_graph(2), &[]).await.0, 200);
    let (code, retry, body) = submit(&c, &base, "p3", blur_graph(3), &[]).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limited");
    assert_eq!(body["error"]["extra_info"]["limit"], "prompts_per_minute");
    // One prompt every 6 s: the wait is at most that, rounded up to whole seconds.
    let retry = retry.expect("a Retry-After");
    assert!((1..=6).contains(&retry), "{retry}");
    assert!(
        !known(&base).await.contains(&"p3".to_string()),
        "refused, never queued"
    );
    // Another client address has its own bucket (anonymous clients are limited per address).
    let other = http_from([127, 0, 0, 2]);
    assert_eq!(submit(&other, &base, "o1", blur_graph(4), &[]).await.0, 200);
    // Honouring Retry-After is enough.
    tokio::time::sleep(std::time::Duration::from_secs(retry)).await;
    let (code, _, body) = submit(&c, &base, "p3", blur_graph(3), &[]).await;
    assert_eq!(code, 200, "{body}");
    wait_history(&base, "p3").await;
    gate.shutdown().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_real_client_is_limited() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| {
        f.limits.prompts_per_minute = 1;
        f.edge.trusted_proxies = vec![toml::Spanned::new(0..0, "127.0.0.1".to_string())];
    })
    .await;
    let base = gate.url();
    let c = http();
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    // Two clients behind the proxy: one prompt each.
    assert_eq!(
        submit(&c, &base, "a1", blur_graph(1), &xff("203.0.113.1"))
            .await
            .0,
        200
    );
    assert_eq!(
        submit(&c, &base, "b1", blur_graph(2), &xff("203.0.113.2"))
            .await
            .0,
        200
    );
    assert_eq!(
        submit(&c, &base, "a2", blur_graph(3), &xff("203.0.113.1"))
            .await
            .0,
        429
    );
    // From a peer that is not trusted, the header changes nothing: one bucket for the peer.
    let untrusted = http_from([127, 0, 0, 3]);
    assert_eq!(
        submit(&untrusted, &base, "u1", blur_graph(4), &xff("198.51.100.1"))
            .await
            .0,
        200
    );
    assert_eq!(
        submit(&untrusted, &base, "u2", blur_graph(5), &xff("198.51.100.2"))
            .await
            .0,
        429
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn waiting_prompts_are_capped_per_user_and_the_queue_globally() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| {
        f.backends[0].max_inflight = Some(1);
        f.scheduler.max_queued = 4;
        with_users(
            f,
            &[("alice", "limits = { max_waiting = 2 }"), ("bob", "")],
            "",
        );
    })
    .await;
    let base = gate.url();
    let as_user = |who: &str| {
        let (c, base) = (http(), base.clone());
        let token = format!("tok-{who}");
        move |id: &'static str, graph: Value| {
            let (c, base, token) = (c.clone(), base.clone(), token.clone());
            async move {
                let auth = format!("Bearer {token}");
                submit(&c, &base, id, graph, &[("authorization", auth.as_str())]).await
            }
        }
    };
    let (alice, bob) = (as_user("alice"), as_user("bob"));
    // Bob's long prompt holds the only slot; Alice's wait.
    assert_eq!(bob("b-run", steps(1, 10_000)).await.0, 200);
    assert_eq!(alice("a1", blur_graph(1)).await.0, 200);
    assert_eq!(alice("a2", blur_graph(2)).await.0, 200);
    let (code, retry, body) = alice("a3", blur_graph(3)).await;
    assert_eq!(
        (code, body["error"]["extra_info"]["limit"].clone()),
        (429, json!("max_waiting"))
    );
    assert!(retry.is_some());
    // Bob has no such cap, but the gate queue holds 4 at most.
    assert_eq!(bob("b1", blur_graph(4)).await.0, 200);
    assert_eq!(bob("b2", blur_graph(5)).await.0, 200);
    let (code, retry, body) = bob("b3", blur_graph(6)).await;
    assert_eq!(
        (code, body["error"]["type"].clone()),
        (503, json!("queue_full"))
    );
    assert!(retry.is_some());
    let all = queue_ids(&get_as("bob", &base, "/queue").await.1);
    assert_eq!(all, ["b-run", "b1", "b2"]);
    let alices = queue_ids(&get_as("alice", &base, "/queue").await.1);
    assert_eq!(alices, ["a1", "a2"], "a3 was never queued");
    gate.shutdown().await;
}

#[tokio::test]
async fn websockets_are_capped_per_address() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.limits.ws_per_ip = 2).await;
    let base = gate.url();
    let url = |cid: &str| format!("{}/ws?clientId={cid}", base.replacen("http", "ws", 1));
    let mut one = Ws::connect(&base, Some("one")).await;
    let _two = Ws::connect(&base, Some("two")).await;
    assert_eq!(one.next().await.unwrap().kind(), "status");
    match tokio_tungstenite::connect_async(url("three")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected a 429, got {:?}", other.map(|_| ())),
    }
    // A closed socket frees its place.
    drop(one);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio_tungstenite::connect_async(url("three")).await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the freed place was not given back: {e}"),
        }
    }
    gate.shutdown().await;
}

#[tokio::test]
async fn gpu_seconds_per_day_refuse_until_midnight_utc() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.limits.gpu_seconds_per_day = 1).await;
    let base = gate.url();
    let c = http();
    // About 1.2 s of run time at test speed: the day's second is used up when it ends.
    assert_eq!(submit(&c, &base, "long", steps(1, 3000), &[]).await.0, 200);
    wait_history(&base, "long").await;
    let admin = format!("http://{}", gate.admin_addr);
    let (_, usage) = get_json(&admin, "/admin/usage").await;
    assert!(
        usage["total"]["gpu_seconds"].as_f64().unwrap() >= 1.0,
        "{usage}"
    );
    let (code, retry, body) = submit(&c, &base, "more", blur_graph(1), &[]).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["extra_info"]["limit"], "gpu_seconds_per_day");
    let retry = retry.unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    assert!(!known(&base).await.contains(&"more".to_string()));
    // Another client address has its own day.
    let other = http_from([127, 0, 0, 2]);
    assert_eq!(
        submit(&other, &base, "theirs", blur_graph(2), &[]).await.0,
        200
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn requests_per_second_per_route_class() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.limits.requests_per_second = 1).await;
    let base = gate.url();
    let get = |path: &'static str| {
        let base = base.clone();
        async move { http().get(format!("{base}{path}")).send().await.unwrap() }
    };
    assert_eq!(get("/queue").await.status(), 200);
    // One read a second: a burst of reads meets the limit (however slow the machine, twenty
    // reads back to back do not take twenty seconds).
    let mut refused = None;
    for _ in 0..20 {
        let r = get("/history").await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("a 429 within twenty immediate reads");
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["extra_info"]["limit"],
        "requests_per_second (read)"
    );
    // Files and submits have buckets of their own.
    let view = get("/view?filename=none.png&type=output").await;
    assert_eq!(view.status(), 404, "a files request still goes");
    assert_eq!(submit(&http(), &base, "p", blur_graph(1), &[]).await.0, 200);
    // Issue 15: the refusal is counted by its limit, and as a 429 of its route class.
    let metrics = format!("http://{}/metrics", gate.admin_addr);
    let text = http()
        .get(metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let limit = "comfy_gate_rate_limited_total{limit=\"requests_per_second (read)\"} 1\n";
    assert!(text.contains(limit), "{text}");
    assert!(text.contains("comfy_gate_http_requests_total{route=\"history\",code=\"429\"} 1\n"));
    assert!(text.contains("comfy_gate_rate_limited_total{limit=\"max_waiting\"} 0\n"));
    gate.shutdown().await;
}
