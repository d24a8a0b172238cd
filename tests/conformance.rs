//! Conformance with a real ComfyUI: each flow recorded from ComfyUI (see
//! `tests/fixtures/README.md`) is replayed against comfy-sim alone and against the gate over two
//! comfy-sims, and what they answer must have the transcript's shapes: HTTP status, the headers
//! that matter, key sets and value types, and the order of WebSocket messages.

mod common;
#[path = "common/replay.rs"]
mod replay;
#[path = "common/shape.rs"]
mod shape;

use comfy_sim::{SimBackend, SimConfig, SimHandle};
use common::*;

/// A comfy-sim at real speed (the transcripts interrupt and delete prompts while they run, as a
/// client does within the seconds a large blur takes).
async fn real_speed_sim() -> SimHandle {
    SimBackend::start(SimConfig::default())
        .await
        .expect("sim starts")
}

/// Replays `flow` against a lone comfy-sim; fails listing every difference.
async fn sim_answers_like_comfyui(flow: &str) {
    let sim = real_speed_sim().await;
    let diffs = replay::replay(flow, &sim.url()).await;
    assert!(
        diffs.is_empty(),
        "comfy-sim differs from ComfyUI {} in {flow}:\n{}",
        replay::COMFYUI_VERSION,
        diffs.join("\n")
    );
}

/// Where the gate answers otherwise on purpose: `(flow, the difference as the replay words
/// it, why)`. Each must still occur word for word (so a change shows), and nothing else may.
const GATE_DIFFERENCES: &[(&str, &str, &str)] = &[(
    "validation_errors",
    "step 12 (POST /prompt): status 400, ComfyUI answered 500; body {\"error\":{\"type\":\"invalid_json\"",
    "a body that is not JSON is the client's error: 400 in ComfyUI's error shape, where ComfyUI \
     lets the exception become a 500",
)];

/// Replays `flow` through the gate over two comfy-sims; fails listing every difference other
/// than those in [`GATE_DIFFERENCES`], and if one of those no longer occurs.
async fn gate_answers_like_comfyui(flow: &str) {
    let (a, b) = (real_speed_sim().await, real_speed_sim().await);
    let gate = gate(&[&a, &b]).await;
    let mut diffs = replay::replay(flow, &gate.url()).await;
    for (f, expected, why) in GATE_DIFFERENCES.iter().filter(|(f, _, _)| *f == flow) {
        let before = diffs.len();
        diffs.retain(|d| !d.starts_with(expected));
        assert!(
            diffs.len() < before,
            "{f}: the deliberate difference ({why}) no longer occurs: {expected}"
        );
    }
    assert!(
        diffs.is_empty(),
        "the gate differs from ComfyUI {} in {flow}:\n{}",
        replay::COMFYUI_VERSION,
        diffs.join("\n")
    );
}

/// One module per recorded flow, with a test against comfy-sim and one through the gate, so a
/// failure reads `<flow>::<target>_answers_like_comfyui`.
macro_rules! flows {
    ($($(#[$doc:meta])* $flow:ident;)*) => {$(
        $(#[$doc])*
        mod $flow {
            #[tokio::test]
            async fn sim_answers_like_comfyui() {
                super::sim_answers_like_comfyui(stringify!($flow)).await;
            }
            #[tokio::test]
            async fn gate_answers_like_comfyui() {
                super::gate_answers_like_comfyui(stringify!($flow)).await;
            }
        }
    )*
        /// The flows with a test here.
        const COVERED: &[&str] = &[$(stringify!($flow)),*];
    };
}

/// Every transcript under `tests/fixtures/comfyui-<version>/` has its pair of tests, and every
/// test its transcript.
#[test]
fn every_recorded_flow_is_replayed() {
    let mut covered: Vec<String> = COVERED.iter().map(|s| s.to_string()).collect();
    covered.sort();
    assert_eq!(replay::flows(), covered);
}

flows! {
    /// script_examples/basic_api_example.py: POST /prompt, /ws until done, /history/{id}.
    basic_api_example;
    /// script_examples/websockets_api_example.py: own prompt_id, /history, /view of outputs.
    websockets_api_example;
    /// script_examples/websockets_api_example_ws_images.py: SaveImageWebsocket binary frames.
    websockets_api_example_ws_images;
    /// Binary previews and `progress`, without and with supports_preview_metadata.
    legacy_preview_order;
    /// A 1 MiB string shown by PreviewAny: one large `executed` message.
    large_executed;
    /// The first `status` with queue_remaining 0 comes after the history entry exists.
    history_at_final_status;
    /// A client connecting while a prompt runs is told queue_remaining 1.
    status_on_connect_while_running;
    /// Every kind of invalid prompt: 400 with `error` and `node_errors`.
    validation_errors;
    /// A cycle an output needs: 400 naming no node; a cycle no output reaches: the prompt runs.
    graph_cycles;
    /// /queue, GET /prompt, /history paging with max_items and offset, /history/{id}.
    queue_and_history;
    /// /api/jobs with filters and paging, /api/jobs/{id}.
    jobs;
    /// /object_info/{class} for the nodes the flows use.
    object_info;
    /// Uploads of type input, temp and output, subfolders, collisions, overwrite.
    uploads;
    /// /upload/mask with an original of each type, and a missing one.
    upload_mask;
    /// /view of each type, Range, HEAD, conditional requests, errors.
    view;
    /// LoadImage of subfolder and annotated references.
    loaders;
    /// Interrupt (by prompt_id and global), queue delete and clear, history delete and clear.
    interrupt_and_delete;
    /// User data v1 and v2 with `%2F` names, move, delete; /users; /settings.
    userdata;
    /// /features, /system_stats, /embeddings, /models.
    server_info;
}
