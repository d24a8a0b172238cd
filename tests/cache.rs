//! The result cache (issue 16, acceptance 3): with `[cache] enabled`, an identical prompt from
//! another client is answered from the earlier outputs without a GPU, with the events one
//! ComfyUI sends for a fully cached run (comfy-sim, run twice directly, is the referee), its own
//! history entry and the same bytes from `/view`; a different seed, a changed input file or the
//! per-request opt-out runs on a GPU; with auth on, one user never gets another's outputs
//! unless `share_between_users`.

mod common;

use common::files::*;
use common::*;
use serde_json::{Value, json};

/// Ran prompts of `sim` so far (its own counter: what used a GPU).
fn ran(sim: &comfy_sim::SimHandle) -> u64 {
    sim.counters().prompts_finished
}

/// The frames of `prompt_id` (those naming it, and binary previews), without `status`.
fn of_prompt(frames: &[Frame], prompt_id: &str) -> Vec<Frame> {
    frames
        .iter()
        .filter(|f| f.kind() != "status" && f.data()["prompt_id"] == prompt_id)
        .cloned()
        .collect()
}

fn kinds(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(Frame::kind).collect()
}

/// `data` without the fields that differ between two runs of one prompt.
fn comparable(kind: &str, data: &Value) -> Value {
    let mut d = data.clone();
    if let Some(m) = d.as_object_mut() {
        m.remove("prompt_id");
        m.remove("timestamp");
        if kind == "progress_state"
            && let Some(nodes) = m.get_mut("nodes").and_then(Value::as_object_mut)
        {
            for n in nodes.values_mut() {
                n.as_object_mut().map(|n| n.remove("prompt_id"));
            }
        }
        if kind == "executed" {
            m.remove("output");
        }
    }
    d
}

/// Posts `graph` as `client`, listening on its own socket; its id and the frames until its end.
async fn run_as(base: &str, client: &str, body: Value) -> (String, Vec<Frame>) {
    let mut ws = Ws::connect(base, Some(client)).await;
    ws.until_kind("status").await;
    let mut body = body;
    body["client_id"] = json!(client);
    let (code, answer) = post_json(base, "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");
    let id = answer["prompt_id"].as_str().unwrap().to_string();
    assert!(answer["number"].is_number(), "{answer}");
    assert_eq!(answer["node_errors"], json!({}), "{answer}");
    let frames = ws.until_done(&id).await;
    (id, frames)
}

fn image_query(item: &Value) -> [(&str, &str); 3] {
    [
        ("filename", item["filename"].as_str().unwrap()),
        ("subfolder", item["subfolder"].as_str().unwrap()),
        ("type", item["type"].as_str().unwrap()),
    ]
}

#[tokio::test]
async fn an_identical_prompt_from_another_client_is_answered_from_the_cache() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.cache.enabled = true).await;
    let base = gate.url();
    let graph = blur_graph(0x336699);

    let (first, frames) = run_as(&base, "client-a", json!({"prompt": graph})).await;
    assert_eq!(ran(&sim), 1, "the first one ran on the GPU");
    assert!(
        kinds(&frames).contains(&"executing".to_string()),
        "{:?}",
        kinds(&frames)
    );
    let earlier = wait_history(&base, &first).await;
    let item = earlier["outputs"]["3"]["images"][0].clone();
    let (code, earlier_bytes) = view_bytes(&base, &image_query(&item)).await;
    assert_eq!(code, 200);

    // Another client, the same graph written otherwise: a UI title, other key order, a workflow.
    let same = json!({
        "3": {"inputs": {"filename_prefix": "ComfyUI", "images": ["2", 0]}, "class_type": "SaveImage",
              "_meta": {"title": "Save"}},
        "2": graph["2"].clone(),
        "1": graph["1"].clone(),
    });
    let body =
        json!({"prompt": same, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}});
    let (second, frames) = run_as(&base, "client-b", body).await;
    assert_ne!(first, second);
    assert_eq!(ran(&sim), 1, "no GPU ran the second one");

    let mine = of_prompt(&frames, &second);
    assert_eq!(
        kinds(&mine),
        [
            "execution_start",
            "execution_cached",
            "executed",
            "progress_state",
            "execution_success",
            "executing"
        ],
        "{mine:#?}"
    );
    assert_eq!(mine[1].data()["nodes"], json!(["3", "2", "1"]));
    assert_eq!(mine[2].data()["node"], "3");
    assert_eq!(mine[2].data()["output"], earlier["outputs"]["3"]);
    assert!(mine[5].data()["node"].is_null());
    assert!(
        frames.iter().any(|f| f.kind() == "status"),
        "the queue's status too"
    );

    // Its own history entry, the earlier outputs, the same bytes.
    let entry = wait_history(&base, &second).await;
    assert_eq!(entry["prompt"][1], second);
    assert_eq!(entry["prompt"][2], same);
    assert_eq!(entry["outputs"], earlier["outputs"]);
    assert_eq!(entry["status"]["status_str"], "success");
    let messages: Vec<&str> = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        ["execution_start", "execution_cached", "execution_success"]
    );
    let (code, bytes) = view_bytes(&base, &image_query(&entry["outputs"]["3"]["images"][0])).await;
    assert_eq!(code, 200);
    assert_eq!(bytes, earlier_bytes, "the same output bytes");

    // Both entries deleted, the cache still holds the files' names: a third client gets them.
    let (code, _) = post_json(&base, "/history", &json!({"delete": [first, second]})).await;
    assert_eq!(code, 200);
    let (third, _) = run_as(&base, "client-c", json!({"prompt": graph})).await;
    assert_eq!(ran(&sim), 1);
    let entry = wait_history(&base, &third).await;
    let (code, bytes) = view_bytes(&base, &image_query(&entry["outputs"]["3"]["images"][0])).await;
    assert_eq!((code, bytes == earlier_bytes), (200, true));

    let admin = format!("http://{}", gate.admin_addr);
    let (_, metrics) = get_bytes(&admin, "/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("comfy_gate_result_cache_hits_total 2"),
        "{metrics}"
    );

    // The referee: comfy-sim itself (ComfyUI's executor rules) running the same graph again,
    // every node in its cache.
    let (direct, sim_frames) = run_as(&sim.url(), "client-r", json!({"prompt": same})).await;
    let theirs = of_prompt(&sim_frames, &direct);
    assert_eq!(
        kinds(&theirs),
        kinds(&mine),
        "as ComfyUI sends a cached run"
    );
    for (a, b) in mine.iter().zip(&theirs) {
        assert_eq!(
            comparable(&a.kind(), a.data()),
            comparable(&b.kind(), b.data()),
            "{}",
            a.kind()
        );
    }
}

#[tokio::test]
async fn a_different_seed_a_changed_input_or_the_opt_out_runs_on_a_gpu() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.cache.enabled = true).await;
    let base = gate.url();
    let submit = async |body: Value| {
        let (code, answer) = post_json(&base, "/prompt", &body).await;
        assert_eq!(code, 200, "{answer}");
        let id = answer["prompt_id"].as_str().unwrap().to_string();
        wait_history(&base, &id).await
    };

    submit(json!({"prompt": steps(1, 2)})).await;
    assert_eq!(ran(&sim), 1);
    submit(json!({"prompt": steps(1, 2)})).await;
    assert_eq!(ran(&sim), 1, "the same seed: cached");
    submit(json!({"prompt": steps(2, 2)})).await;
    assert_eq!(ran(&sim), 2, "another seed runs");
    let opted_out = json!({"prompt": steps(1, 2), "extra_data": {"comfy_gate": {"cache": false}}});
    submit(opted_out).await;
    assert_eq!(ran(&sim), 3, "the opt-out runs");

    let cat = png(8, 8, 1);
    let (code, up) = upload(&base, "/upload/image", "cat.png", cat.clone(), &[]).await;
    assert_eq!(code, 200, "{up}");
    let load = json!({"prompt": load_and_save("cat.png", "cat")});
    let h = submit(load.clone()).await;
    assert_eq!(ran(&sim), 4);
    assert_eq!(output_pixels(&base, &h, "2").await, pixels(&cat));
    submit(load.clone()).await;
    assert_eq!(ran(&sim), 4, "the same file: cached");
    let other = png(8, 8, 2);
    let fields = [("overwrite", "true")];
    let (code, up) = upload(&base, "/upload/image", "cat.png", other.clone(), &fields).await;
    assert_eq!((code, &up["name"]), (200, &json!("cat.png")), "{up}");
    let h = submit(load).await;
    assert_eq!(ran(&sim), 5, "the file changed under its name: runs");
    assert_eq!(output_pixels(&base, &h, "2").await, pixels(&other));
}

#[tokio::test]
async fn with_auth_on_the_cache_never_crosses_users_unless_shared() {
    for share in [false, true] {
        let sim = sim().await;
        let gate = gate_with(&[&sim], |f| {
            with_users(f, &[("alice", ""), ("bob", "")], "");
            f.cache.enabled = true;
            f.cache.share_between_users = share;
        })
        .await;
        let base = gate.url();
        let submit = async |user: &str| {
            let (code, answer) =
                post_as(user, &base, "/prompt", &json!({"prompt": steps(7, 2)})).await;
            assert_eq!(code, 200, "{answer}");
            let id = answer["prompt_id"].as_str().unwrap().to_string();
            history_as(user, &base, &id).await
        };
        let alices = submit("alice").await;
        assert_eq!(ran(&sim), 1);
        submit("alice").await;
        assert_eq!(ran(&sim), 1, "alice's own repeat: cached");
        let bobs = submit("bob").await;
        if share {
            assert_eq!(ran(&sim), 1, "shared: bob gets alice's result");
            assert_eq!(bobs["outputs"], alices["outputs"]);
        } else {
            assert_eq!(
                ran(&sim),
                2,
                "bob's prompt went to a backend, not to alice's outputs"
            );
            assert_eq!(bobs["status"]["status_str"], "success");
        }
    }
}
