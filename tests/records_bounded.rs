//! Issue 12, failing input 3: records are freed with what they belong to. Prompts submitted,
//! finished and then deleted from the history (one by one, or all at once with the web UI's
//! Clear) leave no prompt record and no history entry behind, in memory or in the store, as
//! counted by `/admin/records`.
mod common;

use common::*;
use serde_json::{Value, json};

/// `/admin/records` of `gate`.
async fn records(gate: &comfy_gate::GateHandle) -> Value {
    let (code, v) = get_json(&format!("http://{}", gate.admin_addr), "/admin/records").await;
    assert_eq!(code, 200);
    v
}

/// Submits `n` small prompts named `{tag}-{i}` and waits for every history entry.
async fn run_many(base: &str, tag: &str, n: u64) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let body = json!({"prompt": steps(i as u64, 5), "prompt_id": id});
        assert_eq!(post_json(base, "/prompt", &body).await.0, 200);
    }
    for id in &ids {
        wait_history(base, id).await;
    }
    ids
}

#[tokio::test]
async fn deleted_and_cleared_history_leaves_no_records_behind() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();

    let ids = run_many(&base, "one-by-one", 60).await;
    let held = records(&gate).await;
    assert_eq!(held["prompts"], 60, "{held}");
    assert_eq!(held["history"], 60, "{held}");
    for id in &ids {
        let (code, _) = post_json(&base, "/history", &json!({"delete": [id]})).await;
        assert_eq!(code, 200);
    }
    let left = records(&gate).await;
    assert_eq!(left["prompts"], 0, "{left}");
    assert_eq!(left["history"], 0, "{left}");
    assert_eq!(left["store"]["prompts"], 0, "{left}");
    assert_eq!(left["store"]["history"], 0, "{left}");

    run_many(&base, "cleared", 60).await;
    let (code, _) = post_json(&base, "/history", &json!({"clear": true})).await;
    assert_eq!(code, 200);
    let left = records(&gate).await;
    assert_eq!(left["prompts"], 0, "{left}");
    assert_eq!(left["history"], 0, "{left}");
    assert_eq!(left["store"]["prompts"], 0, "{left}");
    assert_eq!(left["store"]["history"], 0, "{left}");
    let (_, h) = get_json(&base, "/history").await;
    assert_eq!(h, json!({}), "nothing shows either");
}
