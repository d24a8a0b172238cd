//! Placement on NVML readings: the gate binary, with its backends mapped to the fake NVML
//! library's GPUs, sends prompts to the GPU with the most free VRAM; changed readings change the
//! choice; a stale reading counts as no headroom; without the library the gate logs once and
//! routes on `/system_stats`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");
const UUID_A: &str = "GPU-aaaaaaaa-0000-4000-8000-00000000000a";
const UUID_B: &str = "GPU-bbbbbbbb-0000-4000-8000-00000000000b";
const GIB: u64 = 1 << 30;

/// Writes the fake's state atomically (it re-reads the file on every call).
fn set_gpus(path: &Path, free_a: Option<u64>, free_b: u64, a_lost: bool) {
    let gpu = |uuid: &str, free: u64, lost: bool| {
        json!({"uuid": uuid, "name": "NVIDIA H100 80GB HBM3 (fake)", "total": 80 * GIB, "free": free * GIB,
               "gpu_util": 10, "mem_util": 5, "temperature": 40, "power_mw": 90000, "lost": lost})
    };
    let state =
        json!({"devices": [gpu(UUID_A, free_a.unwrap_or(0), a_lost), gpu(UUID_B, free_b, false)]});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, state.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Gate {
    _child: tokio::process::Child,
    url: String,
    admin: String,
    stderr: tokio::task::JoinHandle<String>,
}

async fn start_gate(
    dir: &Path,
    sims: [&comfy_sim::SimHandle; 2],
    library: &Path,
    state: &Path,
) -> Gate {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n\
         [health]\ninterval_ms = 100\n\n[placement]\nstale_after_ms = 400\n\n\
         [telemetry]\nnvml_library = \"{}\"\ninterval_ms = 50\n\n\
         [[backend]]\nurl = \"{}\"\nname = \"gpu-a\"\ngpu = \"{UUID_A}\"\n\n\
         [[backend]]\nurl = \"{}\"\nname = \"gpu-b\"\ngpu = \"{UUID_B}\"\n",
        dir.join("state").display(),
        library.display(),
        sims[0].url(),
        sims[1].url()
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("FAKE_NVML_STATE", state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let urls = listening_urls(&mut child).await;
    let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let stderr = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(l)) = err_lines.next_line().await {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    Gate {
        _child: child,
        url: urls[0].clone(),
        admin: urls[1].clone(),
        stderr,
    }
}

async fn placed_on(gate: &Gate, id: &str) -> String {
    let (code, _) = post_json(
        &gate.url,
        "/prompt",
        &json!({"prompt": blur_graph(id.len() as u32), "prompt_id": id}),
    )
    .await;
    assert_eq!(code, 200);
    wait_history(&gate.url, id).await;
    let (_, d) = get_json(&gate.admin, "/admin/decisions").await;
    let dec: Value = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["prompt_id"] == id)
        .unwrap()
        .clone();
    dec["chosen"].as_str().unwrap().to_string()
}

/// Item 1: the GPU with the most free VRAM (as NVML reads it) gets the prompt; changing the
/// readings changes the choice; a stale reading removes the headroom.
#[tokio::test]
async fn nvml_free_memory_decides() {
    let (a, b) = (sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gpus.json");
    set_gpus(&state, Some(10), 40, false);
    let gate = start_gate(
        dir.path(),
        [&a, &b],
        common::fake_nvml::fake_nvml_lib(),
        &state,
    )
    .await;
    let (_, backends) = get_json(&gate.admin, "/admin/backends").await;
    assert_eq!(backends["backends"][0]["gpu"]["uuid"], UUID_A, "{backends}");
    assert_eq!(backends["backends"][1]["gpu"]["free"], 40 * GIB);

    assert_eq!(
        placed_on(&gate, "first").await,
        "gpu-b",
        "40 GB free beats 10 GB"
    );
    set_gpus(&state, Some(60), 40, false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        placed_on(&gate, "second").await,
        "gpu-a",
        "the new readings change the choice"
    );

    // GPU A stops answering: its last reading (60 GB free) ages past stale_after.
    set_gpus(&state, Some(60), 40, true);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        placed_on(&gate, "third").await,
        "gpu-b",
        "a stale reading has no headroom"
    );
    let (_, backends) = get_json(&gate.admin, "/admin/backends").await;
    assert!(backends["backends"][0]["vram_free"].is_null(), "{backends}");
}

/// Item 2: with the library missing, the gate starts, logs once, and routes on `/system_stats`.
#[tokio::test]
async fn without_nvml_the_gate_uses_system_stats() {
    let (a, b) = (sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gpus.json");
    set_gpus(&state, Some(10), 40, false);
    let missing = dir.path().join("libnvidia-ml-missing.so");
    let gate = start_gate(dir.path(), [&a, &b], &missing, &state).await;
    for i in 0..3 {
        placed_on(&gate, &format!("p{i}")).await;
    }
    let (_, backends) = get_json(&gate.admin, "/admin/backends").await;
    for backend in backends["backends"].as_array().unwrap() {
        assert!(backend["gpu"].is_null());
        assert_eq!(
            backend["vram_total"],
            24 * GIB,
            "from /system_stats: {backend}"
        );
    }
    let Gate {
        _child: mut child,
        stderr,
        ..
    } = gate;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let log = tokio::time::timeout(PATIENCE, stderr)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        log.matches("NVML unavailable").count(),
        1,
        "one clear line: {log}"
    );
}
