//! Queue order (`number`, `front`), `/queue`, delete, interrupt and `/history` paging.

mod common;

use common::*;
use serde_json::{Value, json};

/// A prompt that keeps the worker busy for seconds (10,000 steps at 1/100 time) until interrupted.
fn long(seed: u64) -> Value {
    let mut g = txt2img(seed, SD15);
    g["3"]["inputs"]["steps"] = json!(10000);
    g
}

fn short(seed: u64) -> Value {
    let mut g = txt2img(seed, SD15);
    g["3"]["inputs"]["steps"] = json!(1);
    g
}

#[tokio::test]
async fn queue_order_follows_number_and_front() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = Ws::connect(&base, Some("q")).await;
    ws.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": long(1), "client_id": "q", "prompt_id": "blocker"}),
    )
    .await;
    ws.until_kind("progress").await;
    let (_, a) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(2), "client_id": "q", "prompt_id": "a"}),
    )
    .await;
    let (_, b) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(3), "client_id": "q", "prompt_id": "b"}),
    )
    .await;
    let (_, f) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(4), "client_id": "q", "prompt_id": "f", "front": true}),
    )
    .await;
    let (_, n) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(5), "client_id": "q", "prompt_id": "n", "number": 1.5}),
    )
    .await;
    assert_eq!(
        (a["number"].clone(), b["number"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(f["number"], json!(-3));
    assert_eq!(
        n["number"],
        json!(1.5),
        "client numbers come back as floats"
    );

    let (_, queue) = get_json(&base, "/queue").await;
    let running = queue["queue_running"].as_array().unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0][1], "blocker");
    let mut pending: Vec<Value> = queue["queue_pending"].as_array().unwrap().clone();
    assert!(pending.iter().all(|i| i.as_array().unwrap().len() == 5));
    pending.sort_by(|x, y| x[0].as_f64().partial_cmp(&y[0].as_f64()).unwrap());
    let ids: Vec<&str> = pending.iter().map(|i| i[1].as_str().unwrap()).collect();
    assert_eq!(ids, ["f", "a", "n", "b"]);
    assert_eq!(pending[0][3]["client_id"], "q");
    let (_, p) = get_json(&base, "/prompt").await;
    assert_eq!(p, json!({"exec_info": {"queue_remaining": 5}}));

    post_json(&base, "/interrupt", &json!({"prompt_id": "blocker"})).await;
    let mut order = Vec::new();
    while order.len() < 5 {
        let f = ws.next().await.unwrap();
        if f.kind() == "execution_start" {
            order.push(f.data()["prompt_id"].as_str().unwrap().to_string());
        }
        if f.kind() == "execution_interrupted" {
            order.push("blocker-interrupted".into());
        }
    }
    assert_eq!(order, ["blocker-interrupted", "f", "a", "n", "b"]);
}

#[tokio::test]
async fn delete_and_clear_remove_pending_items_only() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = Ws::connect(&base, Some("d")).await;
    ws.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": long(1), "client_id": "d", "prompt_id": "run"}),
    )
    .await;
    ws.until_kind("progress").await;
    for id in ["x", "y", "z"] {
        post_json(
            &base,
            "/prompt",
            &json!({"prompt": short(7), "client_id": "d", "prompt_id": id}),
        )
        .await;
    }
    let (code, body) =
        post_json(&base, "/queue", &json!({"delete": ["y", "unknown", "run"]})).await;
    assert_eq!(code, 200);
    assert_eq!(body, json!(""));
    let (_, queue) = get_json(&base, "/queue").await;
    let ids: Vec<&str> = queue["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[1].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["x", "z"]);
    assert_eq!(
        queue["queue_running"][0][1], "run",
        "running prompts are not deleted"
    );
    post_json(&base, "/queue", &json!({"clear": true})).await;
    let (_, queue) = get_json(&base, "/queue").await;
    assert_eq!(queue["queue_pending"], json!([]));
    post_json(&base, "/interrupt", &json!({})).await;
    ws.until_done("run").await;
    let (_, h) = get_json(&base, "/history").await;
    assert!(
        h.get("y").is_none() && h.get("x").is_none(),
        "deleted prompts never run"
    );
}

#[tokio::test]
async fn interrupt_by_id_and_global() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = Ws::connect(&base, Some("i")).await;
    ws.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": long(1), "client_id": "i", "prompt_id": "p1"}),
    )
    .await;
    ws.until_kind("progress").await;
    // An id that is not running changes nothing.
    post_json(&base, "/interrupt", &json!({"prompt_id": "other"})).await;
    post_json(&base, "/interrupt", &json!({"prompt_id": "p1"})).await;
    let frames = ws.until_done("p1").await;
    let int = frames
        .iter()
        .find(|f| f.kind() == "execution_interrupted")
        .expect("interrupted");
    assert_eq!(int.data()["prompt_id"], "p1");
    assert_eq!(int.data()["node_id"], "3");
    assert_eq!(int.data()["node_type"], "KSampler");
    assert_eq!(int.data()["executed"], json!(["4", "6", "7", "5"]));
    assert!(int.data()["timestamp"].is_i64());
    let h = wait_history(&base, "p1").await;
    assert_eq!(h["status"]["status_str"], "error");
    assert_eq!(h["status"]["completed"], false);

    // Global interrupt (no body) stops whatever runs.
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": long(2), "client_id": "i", "prompt_id": "p2"}),
    )
    .await;
    ws.until_kind("progress").await;
    let resp = http()
        .post(format!("{base}/interrupt"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let frames = ws.until_done("p2").await;
    assert!(frames.iter().any(|f| f.kind() == "execution_interrupted"));
    // An interrupt while idle has no effect on the next prompt.
    post_json(&base, "/interrupt", &json!({})).await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(3), "client_id": "i", "prompt_id": "p3"}),
    )
    .await;
    let frames = ws.until_done("p3").await;
    assert!(frames.iter().any(|f| f.kind() == "execution_success"));
}

#[tokio::test]
async fn history_paging_delete_and_clear() {
    let sim = sim().await;
    let base = sim.url();
    for i in 0..5 {
        let (code, _) = post_json(
            &base,
            "/prompt",
            &json!({"prompt": blur_graph(i), "prompt_id": format!("h{i}")}),
        )
        .await;
        assert_eq!(code, 200);
    }
    wait_history(&base, "h4").await;
    let ids = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    let (_, all) = get_json(&base, "/history").await;
    assert_eq!(ids(&all), ["h0", "h1", "h2", "h3", "h4"]);
    let (_, last2) = get_json(&base, "/history?max_items=2").await;
    assert_eq!(ids(&last2), ["h3", "h4"]);
    let (_, page) = get_json(&base, "/history?max_items=2&offset=1").await;
    assert_eq!(ids(&page), ["h1", "h2"]);
    let (_, tail) = get_json(&base, "/history?offset=3").await;
    assert_eq!(ids(&tail), ["h3", "h4"]);
    let (code, _) = get_json(&base, "/history?max_items=abc").await;
    assert_eq!(code, 500, "ComfyUI crashes on a non-integer max_items");
    let (_, unknown) = get_json(&base, "/history/nope").await;
    assert_eq!(unknown, json!({}));

    post_json(&base, "/history", &json!({"delete": ["h1"]})).await;
    let (_, all) = get_json(&base, "/history").await;
    assert_eq!(ids(&all), ["h0", "h2", "h3", "h4"]);
    post_json(&base, "/history", &json!({"clear": true})).await;
    let (_, all) = get_json(&base, "/history").await;
    assert_eq!(all, json!({}));
}
