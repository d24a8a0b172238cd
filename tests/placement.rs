//! GPU-aware placement, end to end: capability routing and refusal at submit, VRAM fit,
//! checkpoint affinity against round robin, and speed-proportional work. Real gate, comfy-sim
//! backends of different capabilities, real clients.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use comfy_sim::{Fault, SimConfig, SimHandle};
use common::*;
use serde_json::{Value, json};

fn with_steps(mut g: Value, steps: u64) -> Value {
    g["3"]["inputs"]["steps"] = json!(steps);
    g
}

async fn wait_all(base: &str, ids: &[String]) {
    for id in ids {
        let h = wait_history(base, id).await;
        assert_eq!(h["status"]["status_str"], "success", "{id}: {h}");
    }
}

async fn submit_all(base: &str, prompts: Vec<(String, Value)>) -> Vec<String> {
    let mut ids = Vec::new();
    for (id, g) in prompts {
        let (code, r) = post_json(base, "/prompt", &json!({"prompt": g, "prompt_id": id})).await;
        assert_eq!(code, 200, "{r}");
        ids.push(id);
    }
    ids
}

/// Item 3: a checkpoint present on one backend only: its prompts run there. A checkpoint on no
/// backend, or an unknown node class: 400 at submit with ComfyUI's shape, naming the node.
#[tokio::test]
async fn capability_routing_and_refusal() {
    let a =
        sim_with(SimConfig::default().with_model("checkpoints", "only_a.safetensors", 2.0)).await;
    let b = sim().await;
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let prompts = (0..6)
        .map(|i| {
            (
                format!("a{i}"),
                with_steps(txt2img(i, "only_a.safetensors"), 5),
            )
        })
        .collect();
    let ids = submit_all(&base, prompts).await;
    wait_all(&base, &ids).await;
    assert_eq!(a.counters().prompts_succeeded, 6);
    assert_eq!(
        b.counters().prompts_accepted,
        0,
        "never sent where it cannot run"
    );

    let (code, body) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": txt2img(1, "nowhere.safetensors")}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    let e = &body["node_errors"]["4"];
    assert_eq!(e["class_type"], "CheckpointLoaderSimple");
    assert_eq!(e["errors"][0]["type"], "value_not_in_list");
    assert_eq!(e["dependent_outputs"], json!(["9"]));
    assert!(
        e["errors"][0]["details"]
            .as_str()
            .unwrap()
            .contains("only_a.safetensors"),
        "the fleet's files: {e}"
    );
    // Only an output node's own errors go in the top-level details (ComfyUI 0.8.0 transcript).
    assert_eq!(body["error"]["details"], "", "{body}");

    // A loader's file is judged by its own VALIDATE_INPUTS, not the list.
    let load = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    });
    let (code, body) = post_json(&base, "/prompt", &json!({"prompt": load})).await;
    assert_eq!(code, 400);
    assert_eq!(
        body["node_errors"]["1"]["errors"][0],
        json!({"type": "custom_validation_failed", "message": "Custom validation failed for node",
               "details": "image - Invalid image file: missing.png", "extra_info": {"input_name": "image"}})
    );

    let mut g = txt2img(1, SD15);
    g["1"] = json!({"inputs": {}});
    let (code, body) = post_json(&base, "/prompt", &json!({"prompt": g})).await;
    assert_eq!(code, 400);
    assert_eq!(
        body["error"]["message"],
        "Cannot execute because a node is missing the class_type property.",
        "{body}"
    );

    let mut g = txt2img(1, SD15);
    g["10"] = json!({"class_type": "SuperResolutionNode", "inputs": {}});
    let (code, body) = post_json(&base, "/prompt", &json!({"prompt": g})).await;
    assert_eq!(code, 400);
    assert_eq!(
        body,
        json!({"error": {"type": "invalid_prompt", "message": "Cannot execute because node SuperResolutionNode does not exist.",
                          "details": "Node ID '#10'", "extra_info": {}}, "node_errors": {}})
    );
}

/// Item 4: a prompt needing more VRAM than a backend has is never placed there, even when the
/// larger backend is busy and the small one idle.
#[tokio::test]
async fn prompts_never_go_where_they_cannot_fit() {
    let small = sim_with(SimConfig {
        name: "small".into(),
        vram_total_gb: 8.0,
        ..Default::default()
    })
    .await;
    let big = sim_with(SimConfig {
        name: "big".into(),
        vram_total_gb: 80.0,
        ..Default::default()
    })
    .await;
    let gate = gate_with(&[&small, &big], |f| f.scheduler.max_inflight = 1).await;
    let base = gate.url();
    let mut prompts = Vec::new();
    for i in 0..4 {
        // SDXL at 2048² × 2: about 17 GB.
        let mut g = with_steps(txt2img(i, SDXL), 5);
        g["5"]["inputs"] = json!({"width": 2048, "height": 2048, "batch_size": 2});
        prompts.push((format!("huge{i}"), g));
        prompts.push((format!("small{i}"), with_steps(txt2img(i, SD15), 5)));
    }
    let ids = submit_all(&base, prompts).await;
    wait_all(&base, &ids).await;
    assert_eq!(
        small.counters().checkpoint_loads,
        1,
        "only SD1.5 ever ran on the small card"
    );
    assert!(
        small.counters().prompts_succeeded >= 1,
        "the small card still did work"
    );
    assert_eq!(
        small.counters().prompts_finished,
        small.counters().prompts_succeeded,
        "no OOM anywhere"
    );
    let (_, d) = get_json(&format!("http://{}", gate.admin_addr), "/admin/decisions").await;
    for dec in d["decisions"].as_array().unwrap() {
        if dec["prompt_id"].as_str().unwrap().starts_with("huge") {
            assert_eq!(dec["chosen"], big.addr().to_string(), "{dec}");
            assert!(dec["need_vram_bytes"].as_u64().unwrap() > 8 << 30);
        }
    }
}

/// Two large checkpoints: loading one (40 GB, about 20 s on a real card) costs several times a
/// small image's sampling, as with big models in practice (and more than the per-prompt overhead
/// of a test machine at 1/100 speed).
const BIG_A: &str = "big_a.safetensors";
const BIG_B: &str = "big_b.safetensors";

fn two_big_models() -> SimConfig {
    SimConfig {
        vram_total_gb: 96.0,
        ..SimConfig::default()
            .with_model("checkpoints", BIG_A, 40.0)
            .with_model("checkpoints", BIG_B, 40.0)
    }
}

/// A deterministic mix of the two checkpoints.
fn mixed(n: usize, seed: u64) -> Vec<&'static str> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (x >> 33).is_multiple_of(2) {
                BIG_A
            } else {
                BIG_B
            }
        })
        .collect()
}

async fn run_mix(policy: &str, checkpoints: &[&'static str]) -> (u64, Vec<Value>) {
    // At 3/100 speed a load (0.6 s) clearly outweighs a test machine's per-prompt overhead.
    let start = || {
        comfy_sim::SimBackend::start(SimConfig {
            time_scale: 0.03,
            ..two_big_models()
        })
    };
    let sims = [start().await.unwrap(), start().await.unwrap()];
    let refs: Vec<&SimHandle> = sims.iter().collect();
    let gate = gate_with(&refs, |f| {
        f.scheduler.max_inflight = 1;
        f.placement.policy = policy.parse().expect("a policy");
        f.placement.max_skips = 4;
    })
    .await;
    let prompts = checkpoints
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                format!("{policy}-{i}"),
                with_steps(txt2img(i as u64, c), 20),
            )
        })
        .collect();
    // The whole batch is queued before the GPUs start, as in a burst of traffic.
    for s in &sims {
        s.inject(Fault::Stall);
    }
    let ids = submit_all(&gate.url(), prompts).await;
    for s in &sims {
        s.inject(Fault::Clear);
    }
    wait_all(&gate.url(), &ids).await;
    let loads = sims.iter().map(|s| s.counters().checkpoint_loads).sum();
    let (_, d) = get_json(&format!("http://{}", gate.admin_addr), "/admin/decisions").await;
    (loads, d["decisions"].as_array().unwrap().clone())
}

/// Item 5: two checkpoints over two backends: the default policy loads checkpoints far fewer
/// times than round robin, and no prompt is passed over more than the aging bound allows.
#[tokio::test]
async fn checkpoint_affinity_beats_round_robin() {
    let mix = mixed(32, 7);
    let (rr_loads, _) = run_mix("round_robin", &mix).await;
    let (gpu_loads, decisions) = run_mix("gpu_aware", &mix).await;
    eprintln!("checkpoint loads for 32 prompts: round_robin {rr_loads}, gpu_aware {gpu_loads}");
    assert!(
        gpu_loads * 2 <= rr_loads,
        "far fewer loads: gpu_aware {gpu_loads} vs round_robin {rr_loads}"
    );
    let max_skips = decisions
        .iter()
        .map(|d| d["skips"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        max_skips <= 4,
        "aging bound: a prompt was passed over {max_skips} times"
    );
    assert_eq!(decisions.len(), 32);
}

/// Item 6: backends of speed 1 and 3: the faster one completes about three times as many.
#[tokio::test]
async fn a_faster_gpu_draws_more_work() {
    let slow = sim_with(SimConfig {
        name: "slow".into(),
        speed: 1.0,
        ..Default::default()
    })
    .await;
    let fast = sim_with(SimConfig {
        name: "fast".into(),
        speed: 3.0,
        ..Default::default()
    })
    .await;
    let gate = gate_with(&[&slow, &fast], |f| f.scheduler.max_inflight = 1).await;
    let prompts = (0..40)
        .map(|i| (format!("s{i}"), with_steps(txt2img(i, SD15), 400)))
        .collect();
    let ids = submit_all(&gate.url(), prompts).await;
    wait_all(&gate.url(), &ids).await;
    let (s, f) = (
        slow.counters().prompts_succeeded,
        fast.counters().prompts_succeeded,
    );
    let ratio = f as f64 / s.max(1) as f64;
    eprintln!("speed 3 vs 1: {f} vs {s} prompts (ratio {ratio:.2})");
    assert_eq!(s + f, 40);
    assert!(
        (2.0..=4.5).contains(&ratio),
        "about three times as many: {f} vs {s}"
    );
}

/// Every decision is explained in the admin API: chosen, runner-up, scores, reason.
#[tokio::test]
async fn decisions_are_explained() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    post_json(
        &gate.url(),
        "/prompt",
        &json!({"prompt": blur_graph(1), "prompt_id": "why"}),
    )
    .await;
    wait_history(&gate.url(), "why").await;
    let (_, d) = get_json(&format!("http://{}", gate.admin_addr), "/admin/decisions").await;
    let dec = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["prompt_id"] == "why")
        .unwrap()
        .clone();
    assert_eq!(dec["policy"], "gpu_aware");
    assert!(dec["runner_up"].is_string(), "{dec}");
    assert_eq!(dec["scores"].as_array().unwrap().len(), 2);
    assert!(
        dec["reason"].as_str().unwrap().contains("expected done in"),
        "{dec}"
    );
    let names: HashMap<String, u64> =
        HashMap::from([(a.addr().to_string(), 0), (b.addr().to_string(), 1)]);
    assert!(names.contains_key(dec["chosen"].as_str().unwrap()));
    tokio::time::sleep(Duration::from_millis(10)).await;
}
