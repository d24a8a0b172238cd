//! Replays the recorded ComfyUI flows (`tests/fixtures/comfyui-<version>/`) against any running
//! server and prints each difference, for checks by hand against a real ComfyUI or a gate in
//! front of real ComfyUIs (CI replays them against comfy-sim in `tests/conformance.rs`):
//!
//! ```sh
//! cargo run --example replay_comfyui -- http://127.0.0.1:8190            # every flow
//! cargo run --example replay_comfyui -- http://127.0.0.1:8190 view jobs  # some flows
//! ```
//!
//! Before each flow it clears the server's history (`POST /history {"clear": true}`), as the
//! recorder did; start servers with empty input/output/temp/user directories. Exits 1 when any
//! flow differs.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/replay.rs"]
mod replay;
#[path = "../tests/common/shape.rs"]
mod shape;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let Some(base) = args.next() else {
        eprintln!("usage: replay_comfyui BASE_URL [FLOW ...]");
        std::process::exit(2);
    };
    let mut flows: Vec<String> = args.collect();
    if flows.is_empty() {
        flows = replay::flows();
    }
    let mut differing = 0;
    for flow in &flows {
        let _ = common::http()
            .post(format!("{base}/history"))
            .body(r#"{"clear": true}"#)
            .send()
            .await;
        let diffs = replay::replay(flow, &base).await;
        println!("{flow}: {} difference(s)", diffs.len());
        for d in &diffs {
            println!("  {d}");
        }
        differing += usize::from(!diffs.is_empty());
    }
    println!("{differing} of {} flows differ", flows.len());
    std::process::exit(i32::from(differing > 0));
}
