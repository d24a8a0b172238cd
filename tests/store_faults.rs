//! A state store that fails its commits (issue 16, group commit): `POST /prompt` answers `200`
//! only once the prompt is durable. A failed commit is written again once; if that fails too,
//! the prompt is refused with a 503 in the gate's error shape and leaves no trace: not queued,
//! not in history, never sent to a backend. The failures are injected with
//! `server.test_faults` (`x-comfy-gate-test-fault: fail-store-commits=N`).

mod common;

use common::*;
use serde_json::{Value, json};

const FAULT: &str = "x-comfy-gate-test-fault";

/// `POST /prompt` of `body` with the store's next `failures` commits failing.
async fn submit_failing(base: &str, failures: usize, body: &Value) -> (u16, Value) {
    let req = http()
        .post(format!("{base}/prompt"))
        .header(FAULT, format!("fail-store-commits={failures}"))
        .json(body);
    send_for_json(req).await
}

#[tokio::test]
async fn a_prompt_the_store_cannot_take_is_refused_with_503_and_leaves_no_trace() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| {
        f.server.test_faults = true;
        f.backends[0].max_inflight = Some(1);
    })
    .await;
    let base = gate.url();

    // A free slot: the prompt would be sent at once (the direct path).
    let (status, body) = submit_failing(
        &base,
        2,
        &json!({"prompt": blur_graph(1), "prompt_id": "direct"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("injected commit failure")),
        "the store's error is named: {body}"
    );

    // The slot busy with a long prompt: the next one waits in the gate queue (the queued path).
    let (status, body) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": steps(3, 1500), "prompt_id": "long"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = submit_failing(
        &base,
        2,
        &json!({"prompt": blur_graph(2), "prompt_id": "queued"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");

    wait_history(&base, "long").await;
    let (_, queue) = get_json(&base, "/queue").await;
    assert!(queue_ids(&queue).is_empty(), "nothing left queued: {queue}");
    for id in ["direct", "queued"] {
        let (_, entry) = get_json(&base, &format!("/history/{id}")).await;
        assert_eq!(entry, json!({}), "{id} has no history entry");
    }
    assert_eq!(
        sim.counters().prompts_accepted,
        1,
        "only the long prompt reached the backend"
    );
    // Its ids are free again, as for a prompt never submitted.
    let (status, body) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(1), "prompt_id": "direct"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_history(&base, "direct").await;
}

#[tokio::test]
async fn one_failed_commit_is_written_again_and_the_prompt_runs_once() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.server.test_faults = true).await;
    let base = gate.url();
    let (status, body) = submit_failing(
        &base,
        1,
        &json!({"prompt": blur_graph(3), "prompt_id": "retried"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let entry = wait_history(&base, "retried").await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert_eq!(sim.counters().prompts_finished, 1);
}
