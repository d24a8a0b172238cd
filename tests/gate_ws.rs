//! The gate's client sockets: previews converted per negotiated flags, reconnection with the
//! same clientId, and the web frontend passed through.

mod common;

use comfy_sim::SimConfig;
use comfy_wire::protocol::frames;
use common::*;
use serde_json::json;

fn with_previews() -> SimConfig {
    SimConfig {
        previews: true,
        ..Default::default()
    }
}

fn binaries(frames: &[Frame]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Binary(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

/// Type 4 previews (the gate always negotiates metadata upstream) reach a client that
/// negotiated it as type 4 with its prompt_id, and a client that did not as type 1.
#[tokio::test]
async fn previews_follow_each_clients_flags() {
    let (a, b) = (
        sim_with(with_previews()).await,
        sim_with(with_previews()).await,
    );
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut modern = Ws::connect(&base, Some("modern")).await;
    modern.next().await;
    modern
        .send_json(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    let reply = modern.until_kind("feature_flags").await.pop().unwrap();
    assert_eq!(reply.data()["supports_preview_metadata"], true);
    let mut legacy = Ws::connect(&base, Some("legacy")).await;
    legacy.next().await;

    let mut g = txt2img(1, SD15);
    g["3"]["inputs"]["steps"] = json!(3);
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": g, "client_id": "modern", "prompt_id": "m"}),
    )
    .await;
    let mut g = txt2img(2, SD15);
    g["3"]["inputs"]["steps"] = json!(3);
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": g, "client_id": "legacy", "prompt_id": "l"}),
    )
    .await;

    let m = binaries(&modern.until_done("m").await);
    assert_eq!(m.len(), 3, "one preview per step");
    for frame in &m {
        let (meta, image) = frames::decode_preview_with_metadata(frame).expect("type 4");
        assert_eq!(meta["prompt_id"], "m");
        assert_eq!(&image[..2], &[0xFF, 0xD8]);
    }
    let l = binaries(&legacy.until_done("l").await);
    assert_eq!(l.len(), 3);
    for frame in &l {
        assert_eq!(frames::frame_type(frame), Some(frames::PREVIEW_IMAGE));
        assert_eq!(&frame[4..8], &frames::FORMAT_JPEG.to_be_bytes());
        assert_eq!(&frame[8..10], &[0xFF, 0xD8]);
    }
}

/// A client that drops its socket mid-prompt and reconnects with the same clientId gets the
/// current node replayed and the rest of its prompt's events.
#[tokio::test]
async fn reconnecting_client_keeps_its_events() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("phoenix")).await;
    ws.next().await;
    let mut g = txt2img(5, SD15);
    g["3"]["inputs"]["steps"] = json!(300);
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": g, "client_id": "phoenix", "prompt_id": "r"}),
    )
    .await;
    ws.until_kind("progress").await;
    drop(ws);
    let mut again = Ws::connect(&base, Some("phoenix")).await;
    let status = again.next().await.unwrap();
    assert_eq!(status.kind(), "status");
    assert_eq!(status.data()["sid"], "phoenix");
    let replay = again.next().await.unwrap();
    assert_eq!(replay.kind(), "executing");
    assert_eq!(replay.data(), &json!({"node": "3"}));
    let rest = again.until_done("r").await;
    assert!(rest.iter().any(|f| f.kind() == "progress"));
    assert!(rest.iter().any(|f| f.kind() == "execution_success"));

    // A second socket with the same clientId takes over; the first is closed, not orphaned.
    let mut third = Ws::connect(&base, Some("phoenix")).await;
    third.next().await;
    assert!(
        matches!(again.next_within(PATIENCE).await, Ok(None)),
        "the replaced socket is closed"
    );
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(1), "client_id": "phoenix", "prompt_id": "r2"}),
    )
    .await;
    let frames = third.until_done("r2").await;
    assert!(frames.iter().any(|f| f.kind() == "executed"));
}

/// Routes the gate does not own (the web frontend, custom-node routes) go to a healthy backend.
#[tokio::test]
async fn frontend_and_unknown_routes_pass_through() {
    let a = sim().await;
    let gate = gate(&[&a]).await;
    let resp = http().get(format!("{}/", gate.url())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert!(resp.text().await.unwrap().contains("comfy-sim"));
    let (code, _) = get_json(&gate.url(), "/some_custom_node/route").await;
    assert_eq!(code, 404, "the backend's own answer");
}

/// The progress kinds and binary frames of a prompt's events, in the order they came.
fn step_order(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(Frame::kind)
        .filter(|k| k == "progress" || k.starts_with("binary:"))
        .collect()
}

/// ComfyUI's progress hook (`main.py::hijack_progress`) sends a client without preview
/// metadata `progress` and then the step's type 1 preview; a client with metadata gets the
/// type 4 preview first (`comfy_execution/progress.py`, from `update_progress`), then
/// `progress`. The gate's upstream socket always negotiates metadata, so it must put each
/// client's preview on the side ComfyUI would (issue 11, input 4).
#[tokio::test]
async fn each_client_gets_previews_in_comfyuis_order_for_its_flags() {
    let (a, b) = (
        sim_with(with_previews()).await,
        sim_with(with_previews()).await,
    );
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut modern = Ws::connect(&base, Some("modern")).await;
    modern.next().await;
    modern
        .send_json(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    modern.until_kind("feature_flags").await;
    let mut legacy = Ws::connect(&base, Some("legacy")).await;
    legacy.next().await;
    for (sid, seed) in [("modern", 3), ("legacy", 4)] {
        let body = json!({"prompt": steps(seed, 3), "client_id": sid, "prompt_id": sid});
        assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
    }

    let step = |first: &str, second: &str| {
        [first, second]
            .repeat(3)
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let legacy_order = step_order(&legacy.until_done("legacy").await);
    assert_eq!(legacy_order, step("progress", "binary:1"));
    let modern_order = step_order(&modern.until_done("modern").await);
    assert_eq!(modern_order, step("binary:4", "progress"));
}
