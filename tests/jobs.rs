//! `/api/jobs` on comfy-sim and through the gate (derived from the merged queue and history).

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn jobs_on_one_sim_and_through_the_gate() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| f.scheduler.max_inflight = 1).await;
    a.inject(comfy_sim::Fault::Stall);
    for i in 0..4 {
        let (code, _) = post_json(
            &gate.url(),
            "/prompt",
            &json!({"prompt": blur_graph(i), "prompt_id": format!("j{i}")}),
        )
        .await;
        assert_eq!(code, 200);
    }
    // j0 waits in the stalled backend's queue; the rest run on the other.
    for i in 1..4 {
        wait_history(&gate.url(), &format!("j{i}")).await;
    }
    let (code, page) = get_json(&gate.url(), "/api/jobs?sort_order=asc").await;
    assert_eq!(code, 200);
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["j0", "j1", "j2", "j3"],
        "created_at order over both backends"
    );
    assert_eq!(
        page["jobs"][0]["status"], "pending",
        "held in the stalled backend's queue"
    );
    assert_eq!(page["jobs"][0]["priority"], 0, "the gate's number");
    assert_eq!(page["jobs"][1]["status"], "completed");
    assert_eq!(
        page["pagination"],
        json!({"offset": 0, "limit": null, "total": 4, "has_more": false})
    );
    let (_, page) = get_json(&gate.url(), "/api/jobs?status=completed&limit=2&offset=1").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(page["pagination"]["total"], 3);
    let (code, job) = get_json(&gate.url(), "/api/jobs/j2").await;
    assert_eq!(code, 200);
    assert_eq!(job["outputs_count"], 1);
    assert!(job["workflow"]["prompt"]["3"].is_object());
    assert!(job["workflow"]["extra_data"].get("client_id").is_none());
    let (code, err) = get_json(&gate.url(), "/api/jobs/nope").await;
    assert_eq!((code, err), (404, json!({"error": "Job not found"})));
    let (code, err) = get_json(&gate.url(), "/api/jobs?status=done").await;
    assert_eq!(code, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .starts_with("Invalid status value(s): done.")
    );

    // The sim answers the same routes for its own queue (also as /api/api/jobs, ComfyUI's quirk).
    let (code, page) = get_json(&b.url(), "/api/api/jobs").await;
    assert_eq!(code, 200);
    assert_eq!(page["pagination"]["total"], 3);
    let (code, job) = get_json(&a.url(), "/api/jobs/j0").await;
    assert_eq!(code, 200);
    assert_eq!(job["status"], "pending");
    a.inject(comfy_sim::Fault::Clear);
    wait_history(&gate.url(), "j0").await;
}
