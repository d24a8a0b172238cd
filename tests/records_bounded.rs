//! Issue 12, failing input 3: records are freed with what they belong to. Prompts submitted,
//! finished and then deleted from the history (one by one, or all at once with the web UI's
//! Clear), or aged out of it by `recovery.history_max_entries`, leave no prompt record, no
//! history entry and no name shown for their outputs behind, in memory or in the store, as
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

/// No prompt, history entry or output name is held, in memory or in the store.
fn assert_nothing_left(left: &Value) {
    for field in ["prompts", "history"] {
        assert_eq!(left[field], 0, "{field}: {left}");
        assert_eq!(left["store"][field], 0, "stored {field}: {left}");
    }
    assert_eq!(left["files"]["backend_aliases"], 0, "{left}");
    assert_eq!(left["files"]["copies"], 0, "{left}");
    assert_eq!(left["store"]["aliases"], 0, "{left}");
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
    assert_eq!(
        held["files"]["backend_aliases"], 60,
        "one saved image each: {held}"
    );
    assert_eq!(held["store"]["aliases"], 60, "{held}");
    for id in &ids {
        let (code, _) = post_json(&base, "/history", &json!({"delete": [id]})).await;
        assert_eq!(code, 200);
    }
    assert_nothing_left(&records(&gate).await);

    run_many(&base, "cleared", 60).await;
    let (code, _) = post_json(&base, "/history", &json!({"clear": true})).await;
    assert_eq!(code, 200);
    assert_nothing_left(&records(&gate).await);
    let (_, h) = get_json(&base, "/history").await;
    assert_eq!(h, json!({}), "nothing shows either");
}

#[tokio::test]
async fn entries_aged_out_of_the_history_take_their_records_and_names_with_them() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |c| c.recovery.history_max_entries = 5).await;
    let base = gate.url();
    // Rounds no larger than the history, so every id is read while the gate still holds it
    // (an id it no longer holds is looked up on the backends, which keep their own entries).
    for i in 0..8 {
        run_many(&base, &format!("round{i}"), 5).await;
    }
    let held = records(&gate).await;
    assert_eq!(held["prompts"], 5, "{held}");
    assert_eq!(held["history"], 5, "{held}");
    assert_eq!(held["files"]["backend_aliases"], 5, "{held}");
    assert_eq!(held["store"]["prompts"], 5, "{held}");
    assert_eq!(held["store"]["history"], 5, "{held}");
    assert_eq!(held["store"]["aliases"], 5, "{held}");
    let (code, _) = post_json(&base, "/history", &json!({"clear": true})).await;
    assert_eq!(code, 200);
    assert_nothing_left(&records(&gate).await);
}

#[tokio::test]
async fn a_name_two_entries_list_stays_until_the_last_goes() {
    // ComfyUI lists a cached output again in the entry of every prompt that reuses it.
    let a = sim().await;
    let gate = gate(&[&a]).await;
    let base = gate.url();
    let graph = blur_graph(0x123456);
    for id in ["first", "again"] {
        let body = json!({"prompt": graph, "prompt_id": id});
        assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
        wait_history(&base, id).await;
    }
    let name = |h: &Value| h["outputs"]["3"]["images"][0]["filename"].clone();
    let (first, again) = (
        wait_history(&base, "first").await,
        wait_history(&base, "again").await,
    );
    assert_eq!(
        name(&first),
        name(&again),
        "the cached output is listed twice"
    );
    let view = format!(
        "/view?filename={}&type=output",
        name(&first).as_str().unwrap()
    );
    assert_eq!(records(&gate).await["files"]["backend_aliases"], 1);

    post_json(&base, "/history", &json!({"delete": ["first"]})).await;
    assert_eq!(
        records(&gate).await["files"]["backend_aliases"],
        1,
        "\"again\" still lists it"
    );
    let shown = http().get(format!("{base}{view}")).send().await.unwrap();
    assert_eq!(shown.status(), 200);

    post_json(&base, "/history", &json!({"delete": ["again"]})).await;
    assert_nothing_left(&records(&gate).await);
}
