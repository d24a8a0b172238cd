//! Issue 12, failing input 2: every prompt reaches an end. A prompt no GPU of the fleet can ever
//! hold is refused at submit (ComfyUI's 400 shape) when the fleet cannot grow, ends with an
//! error after a bounded wait when a backend is down, and one just over the largest card is
//! tried there (as one ComfyUI would run it and report out of memory) instead of waiting.
mod common;

use std::time::Duration;

use comfy_sim::{Fault, SimConfig};
use common::*;
use serde_json::{Value, json};

/// A txt2img of `side`² × `batch` (the gate predicts 1.2 GB per megapixel sampled).
fn big(side: u64, batch: u64) -> Value {
    let mut g = txt2img(7, SD15);
    g["5"]["inputs"] = json!({"width": side, "height": side, "batch_size": batch});
    g["3"]["inputs"]["steps"] = json!(2);
    g
}

/// Two 24 GB sims, and the gate once it has read both cards' totals.
async fn fleet(
    tweak: impl FnOnce(&mut comfy_gate::config::FileConfig),
) -> (
    comfy_sim::SimHandle,
    comfy_sim::SimHandle,
    comfy_gate::GateHandle,
) {
    let card = || SimConfig {
        vram_total_gb: 24.0,
        ..SimConfig::default()
    };
    let (a, b) = (sim_with(card()).await, sim_with(card()).await);
    let gate = gate_with(&[&a, &b], tweak).await;
    let admin = format!("http://{}", gate.admin_addr);
    let t0 = std::time::Instant::now();
    loop {
        let (_, v) = get_json(&admin, "/admin/backends").await;
        let known = v["backends"]
            .as_array()
            .is_some_and(|bs| bs.iter().all(|b| b["vram_total"].as_u64() > Some(0)));
        if known {
            break;
        }
        assert!(t0.elapsed() < PATIENCE, "no VRAM readings: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (a, b, gate)
}

/// 4096² × 8 (about 161 GB predicted) on 24 GB cards, every backend up: 400 at submit.
#[tokio::test]
async fn a_prompt_no_card_can_hold_is_refused_at_submit() {
    let (_a, _b, gate) = fleet(|_| {}).await;
    let (code, body) = post_json(&gate.url(), "/prompt", &json!({"prompt": big(4096, 8)})).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["type"], "prompt_exceeds_vram", "{body}");
    assert!(body["error"]["message"].is_string() && body["error"]["details"].is_string());
    assert_eq!(body["node_errors"], json!({}));
    let (_, queue) = get_json(&gate.url(), "/queue").await;
    assert_eq!(queue["queue_pending"], json!([]), "nothing left waiting");
}

/// The same prompt while a backend is down (the fleet may still change): accepted, then ended
/// with an error its client sees once nothing that is up could take it for the configured wait.
#[tokio::test]
async fn a_prompt_no_card_can_hold_ends_after_a_bounded_wait_while_a_backend_is_down() {
    let (_a, b, gate) = fleet(|f| f.recovery.unplaceable_timeout_ms = 500).await;
    b.inject(Fault::Crash {
        restart_after_ms: None,
    });
    let admin = format!("http://{}", gate.admin_addr);
    let t0 = std::time::Instant::now();
    loop {
        let (_, v) = get_json(&admin, "/admin/backends").await;
        if v.to_string().contains("\"down\"") {
            break;
        }
        assert!(t0.elapsed() < PATIENCE, "b never marked down: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = Ws::connect(&gate.url(), Some("big")).await;
    ws.next().await;
    let body = json!({"prompt": big(4096, 8), "client_id": "big", "prompt_id": "huge"});
    let (code, answer) = post_json(&gate.url(), "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");
    let frames = ws.until_done("huge").await;
    assert!(
        frames.iter().any(|f| f.kind() == "execution_error"
            && f.data()["exception_type"] == "comfy_gate.NoBackend"),
        "{frames:?}"
    );
    let h = wait_history(&gate.url(), "huge").await;
    assert_eq!(h["status"]["status_str"], "error", "{h}");
}

/// 2048² × 6 (about 30 GB predicted) on 24 GB cards: over every card but within the margin, so
/// it is tried on one, and ends (here with the backend's out-of-memory error) instead of waiting.
#[tokio::test]
async fn a_prompt_just_over_the_largest_card_is_tried_there() {
    let (_a, _b, gate) = fleet(|_| {}).await;
    let body = json!({"prompt": big(2048, 6), "prompt_id": "stretch"});
    let (code, answer) = post_json(&gate.url(), "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");
    let h = wait_history(&gate.url(), "stretch").await;
    let ended = h["status"]["status_str"].as_str().unwrap_or("");
    assert!(ended == "success" || ended == "error", "{h}");
    let ran_somewhere = h["status"]["messages"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m[0] == "execution_start"));
    assert!(ran_somewhere, "it ran on a backend: {h}");
}
