//! Issue 13, fair share and running caps between anonymous clients (auth off: each client
//! address is a tenant). A client with a backlog does not make a client with one prompt wait
//! behind it, and `[limits] max_running` holds per client while other clients' prompts run.
//! The same with users, and priority bands, is `tests/priority.rs`.
mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Posts `body` from `client`; the status.
async fn post(client: &reqwest::Client, base: &str, body: Value) -> u16 {
    let resp = client
        .post(format!("{base}/prompt"))
        .json(&body)
        .send()
        .await;
    resp.expect("request").status().as_u16()
}

/// H has a prompt running and ten waiting; L posts one. When H's running prompt ends, L's is
/// the next to go, not H's next (the gate's order before fair share: by number).
#[tokio::test]
async fn a_light_client_goes_before_a_heavy_clients_backlog() {
    let s = sim().await;
    let gate = gate_with(&[&s], |f| f.scheduler.max_inflight = 1).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let heavy = http_from([127, 0, 0, 2]);
    let light = http_from([127, 0, 0, 3]);

    // About 4 s at test speed: it runs until it is interrupted.
    let body = json!({"prompt": steps(0, 10_000), "prompt_id": "h-run"});
    assert_eq!(post(&heavy, &base, body).await, 200);
    until_running(&base, "h-run").await;
    for i in 0..10 {
        let body = json!({"prompt": steps(i + 1, 20), "prompt_id": format!("h-{i}")});
        assert_eq!(post(&heavy, &base, body).await, 200);
    }
    let body = json!({"prompt": steps(99, 20), "prompt_id": "l"});
    assert_eq!(post(&light, &base, body).await, 200);

    post_json(&base, "/interrupt", &json!({"prompt_id": "h-run"})).await;
    assert_eq!(
        wait_history(&base, "l").await["status"]["status_str"],
        "success"
    );
    let order = decided(&admin).await;
    assert_eq!(order[..2], ["h-run", "l"], "{order:?}");
    // H's own prompts keep their order.
    wait_history(&base, "h-9").await;
    let order = decided(&admin).await;
    let h: Vec<&String> = order.iter().filter(|id| id.starts_with("h-")).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("h-{i}")).collect();
    assert_eq!(h[1..], expected.iter().collect::<Vec<_>>()[..]);
}

/// `[limits] max_running = 1`: each client has at most one prompt on the backend at any
/// moment; its others wait in the gate while another client's prompt is sent there; all end.
#[tokio::test]
async fn max_running_holds_per_client_while_another_clients_prompts_run() {
    let s = sim().await;
    let gate = gate_with(&[&s], |f| {
        f.scheduler.max_inflight = 3;
        f.limits.max_running = 1;
    })
    .await;
    let base = gate.url();
    let a = http_from([127, 0, 0, 2]);
    let b = http_from([127, 0, 0, 3]);
    let a_ids: Vec<String> = (0..3).map(|i| format!("a-{i}")).collect();
    let b_ids: Vec<String> = (0..2).map(|i| format!("b-{i}")).collect();
    for (i, id) in a_ids.iter().enumerate() {
        let body = json!({"prompt": steps(i as u64, 1_500), "prompt_id": id});
        assert_eq!(post(&a, &base, body).await, 200);
    }
    for (i, id) in b_ids.iter().enumerate() {
        let body = json!({"prompt": steps(10 + i as u64, 1_500), "prompt_id": id});
        assert_eq!(post(&b, &base, body).await, 200);
    }
    // What the backend holds (running and queued there), sampled until everything ended.
    let mut saw_both = false;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, q) = get_json(&s.url(), "/queue").await;
        let held = queue_ids(&q);
        let of = |ids: &[String]| held.iter().filter(|h| ids.contains(h)).count();
        assert!(of(&a_ids) <= 1 && of(&b_ids) <= 1, "backend holds {held:?}");
        saw_both |= of(&a_ids) == 1 && of(&b_ids) == 1;
        let (_, h) = get_json(&base, "/history").await;
        if a_ids.iter().chain(&b_ids).all(|id| h.get(id).is_some()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all ended: {h}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_both, "b's prompt was sent while a's ran");
    let (_, h) = get_json(&base, "/history").await;
    for id in a_ids.iter().chain(&b_ids) {
        assert_eq!(h[id]["status"]["status_str"], "success", "{id}: {h}");
    }
}
