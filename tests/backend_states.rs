//! Backend states are judged on evidence, and every state has an exit that does not need work
//! first: a heavy prompt that delays its backend's probe answers runs once and succeeds; a node
//! without a progress bar that runs silently past `stall_timeout` is busy, not stalled; a
//! backend marked stalled is cleared by an event or a probe, so with every backend once stalled
//! a new prompt still runs. Real gate, comfy-sim backends with fault injection, real clients.

mod common;

use std::collections::HashMap;

use comfy_sim::{Fault, SimHandle};
use common::*;
use serde_json::{Value, json};

/// Counts, per kind, the events a client saw for `id`.
fn kinds(frames: &[Frame], id: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for f in frames.iter().filter(|f| f.data()["prompt_id"] == id) {
        *m.entry(f.kind()).or_default() += 1;
    }
    m
}

/// `/admin/backends`, by backend name (`host:port`).
async fn backends(gate: &comfy_gate::GateHandle) -> HashMap<String, Value> {
    let (_, v) = get_json(&format!("http://{}", gate.admin_addr), "/admin/backends").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_string(), b.clone()))
        .collect()
}

fn name(sim: &SimHandle) -> String {
    sim.addr().to_string()
}

/// Submits `graph` as `id` for client `cid`.
async fn submit(base: &str, cid: &str, id: &str, graph: Value) {
    let (code, body) = post_json(
        base,
        "/prompt",
        &json!({"prompt": graph, "client_id": cid, "prompt_id": id}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn a_heavy_prompt_that_delays_probe_answers_runs_once_and_succeeds() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| {
        f.health.timeout_ms = 300;
        f.health.unhealthy_threshold = 2;
    })
    .await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("heavy")).await;
    ws.next().await;
    // While it runs, neither backend answers its probe within the probe timeout.
    a.inject(Fault::SlowProbes { ms: 1500 });
    b.inject(Fault::SlowProbes { ms: 1500 });
    submit(&base, "heavy", "p", steps(7, 4000)).await;
    let frames = ws.until_done("p").await;
    let seen = kinds(&frames, "p");
    assert_eq!(
        seen.get("execution_start"),
        Some(&1),
        "started once: {seen:?}"
    );
    assert_eq!(seen.get("execution_success"), Some(&1), "{seen:?}");
    let states = backends(&gate).await;
    for s in [&a, &b] {
        let entry = &states[&name(s)];
        assert_eq!(
            entry["health"], "up",
            "slow probes over an open socket: {entry}"
        );
        assert_eq!(entry["stalled"], false, "{entry}");
    }
    a.inject(Fault::Clear);
    b.inject(Fault::Clear);
    assert_eq!(
        wait_history(&base, "p").await["status"]["status_str"],
        "success"
    );
}

#[tokio::test]
async fn a_node_without_a_progress_bar_that_runs_silently_is_busy_not_stalled() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| f.recovery.stall_timeout_ms = 500).await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("quiet")).await;
    ws.next().await;
    // Each of the graph's three nodes (no sampler) runs 1.5 s with no event: three times the
    // stall timeout, while the backend answers probes and lists the prompt as running.
    a.inject(Fault::Silent { ms: 1500 });
    b.inject(Fault::Silent { ms: 1500 });
    submit(&base, "quiet", "q", blur_graph(0x336699)).await;
    let frames = ws.until_done("q").await;
    let seen = kinds(&frames, "q");
    assert_eq!(seen.get("execution_start"), Some(&1), "not moved: {seen:?}");
    assert_eq!(seen.get("execution_success"), Some(&1), "{seen:?}");
    for (_, entry) in backends(&gate).await {
        assert_eq!(entry["stalled"], false, "{entry}");
    }
    let done: u64 = backends(&gate)
        .await
        .values()
        .map(|e| e["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(done, 1, "it ran on one backend, once");
}

#[tokio::test]
async fn with_every_backend_once_stalled_a_new_prompt_still_runs() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| {
        f.recovery.stall_timeout_ms = 800;
        f.backends.iter_mut().for_each(|b| b.max_inflight = Some(1));
    })
    .await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("s")).await;
    ws.next().await;
    submit(&base, "s", "s1", steps(1, 6000)).await;
    submit(&base, "s", "s2", steps(2, 6000)).await;
    let mut sampling = std::collections::HashSet::new();
    while sampling.len() < 2 {
        let f = ws.until_kind("progress").await.pop().unwrap();
        sampling.insert(f.data()["prompt_id"].as_str().unwrap_or("").to_string());
    }
    // Both GPUs freeze mid-sampling: each backend's running prompt falls silent.
    a.inject(Fault::Stall);
    b.inject(Fault::Stall);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let states = backends(&gate).await;
        if states.values().all(|e| e["stalled"] == true) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never both stalled: {states:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The GPUs recover; no work is sent to a stalled backend, so only evidence (the frozen
    // prompts' own events, an idle queue seen by a probe) can clear them.
    a.inject(Fault::Clear);
    b.inject(Fault::Clear);
    submit(&base, "s", "fresh", blur_graph(0x00ff00)).await;
    let frames = ws.until_done("fresh").await;
    assert_eq!(kinds(&frames, "fresh").get("execution_success"), Some(&1));
    for id in ["s1", "s2"] {
        let h = wait_history(&base, id).await;
        assert_eq!(
            h["status"]["status_str"], "success",
            "{id} ran again elsewhere: {h}"
        );
    }
    for (_, entry) in backends(&gate).await {
        assert_eq!(entry["stalled"], false, "cleared: {entry}");
    }
}

#[tokio::test]
async fn an_idle_backend_that_hangs_is_marked_down_not_busy() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| {
        f.health.timeout_ms = 300;
        f.health.socket_silence_ms = 900;
    })
    .await;
    let base = gate.url();
    // Nothing runs on it, so no stall check can catch it: its socket stays open but silent (it
    // answers no ping), and its probes time out.
    a.inject(Fault::Hang);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let entry = backends(&gate).await[&name(&a)].clone();
        if entry["health"] == "down" {
            assert_eq!(entry["ws_connected"], false, "{entry}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never down: {entry}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // New work goes to the live backend.
    let mut ws = Ws::connect(&base, Some("after")).await;
    ws.next().await;
    submit(&base, "after", "n", blur_graph(0x123456)).await;
    let frames = ws.until_done("n").await;
    assert_eq!(kinds(&frames, "n").get("execution_success"), Some(&1));
    a.inject(Fault::Clear);
}
