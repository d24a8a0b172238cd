//! comfy-sim's fault injection, one test per fault kind, through the in-process handle and the
//! `POST /sim/fault` route: crash (with and without restart), hang, stall, slow, failing probes,
//! slow probes, silent nodes, out-of-memory (injected and real), dropped WebSockets, and the
//! checkpoint-load counter.

mod common;

use std::time::{Duration, Instant};

use comfy_sim::{Fault, SimConfig};
use common::*;
use serde_json::{Value, json};

/// Wall-clock milliseconds since the epoch (the clock of the sim's message timestamps).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// Posts a prompt for `client_id`, expects acceptance, returns the prompt id.
async fn queue(base: &str, prompt: Value, client_id: Option<&str>) -> String {
    let mut body = json!({ "prompt": prompt });
    if let Some(c) = client_id {
        body["client_id"] = json!(c);
    }
    let (status, resp) = post_json(base, "/prompt", &body).await;
    assert_eq!(status, 200, "prompt refused: {resp}");
    resp["prompt_id"].as_str().expect("prompt_id").to_string()
}

/// Runs a prompt to its end and returns its history entry.
async fn run(base: &str, prompt: Value) -> Value {
    let id = queue(base, prompt, None).await;
    wait_history(base, &id).await
}

async fn run_ok(base: &str, prompt: Value) -> Value {
    let h = run(base, prompt).await;
    assert_eq!(h["status"]["status_str"], "success", "history: {h}");
    h
}

/// txt2img with a given step count and size.
fn txt2img_with(seed: u64, ckpt: &str, steps: u64, size: u64, batch: u64) -> Value {
    let mut p = txt2img(seed, ckpt);
    p["3"]["inputs"]["steps"] = json!(steps);
    p["5"]["inputs"]["width"] = json!(size);
    p["5"]["inputs"]["height"] = json!(size);
    p["5"]["inputs"]["batch_size"] = json!(batch);
    p
}

/// A txt2img that runs for a while at test speed (200 sampling steps).
fn long_prompt(seed: u64) -> Value {
    txt2img_with(seed, SDXL, 200, 512, 1)
}

/// Connects a client socket and consumes its initial `status` frame.
async fn client(base: &str, id: &str) -> Ws {
    let mut ws = Ws::connect(base, Some(id)).await;
    let first = ws.next().await.expect("initial frame");
    assert_eq!(first.kind(), "status");
    ws
}

/// Reads frames until the socket is closed by the server; panics if it stays open.
async fn until_closed(ws: &mut Ws) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        match ws.next_within(PATIENCE).await {
            Ok(None) => return frames,
            Ok(Some(f)) => {
                frames.push(f);
                assert!(
                    frames.len() < 10_000,
                    "socket keeps streaming, never closed"
                );
            }
            Err(()) => panic!("socket still open after {PATIENCE:?}"),
        }
    }
}

/// Reads the frames already on their way, until none arrives for `quiet`. Panics if the
/// stream never falls quiet within PATIENCE or closes.
async fn until_quiet(ws: &mut Ws, quiet: Duration) -> Vec<Frame> {
    let deadline = Instant::now() + PATIENCE;
    let mut frames = Vec::new();
    loop {
        match ws.next_within(quiet).await {
            Err(()) => return frames,
            Ok(Some(f)) => frames.push(f),
            Ok(None) => panic!("socket closed"),
        }
        assert!(
            Instant::now() < deadline,
            "events kept coming: {} frames",
            frames.len()
        );
    }
}

fn finished(frames: &[Frame], prompt_id: &str) -> bool {
    frames.iter().any(|f| {
        matches!(
            f.kind().as_str(),
            "execution_success" | "execution_error" | "execution_interrupted"
        ) || (f.kind() == "executing"
            && f.data()["node"].is_null()
            && f.data()["prompt_id"] == prompt_id)
    })
}

fn frame_of<'a>(frames: &'a [Frame], kind: &str) -> &'a Frame {
    frames
        .iter()
        .find(|f| f.kind() == kind)
        .unwrap_or_else(|| panic!("no {kind} frame in {:?}", kinds(frames)))
}

/// The kinds of the last frames (enough to see how a sequence ended).
fn kinds(frames: &[Frame]) -> Vec<String> {
    let skip = frames.len().saturating_sub(12);
    frames[skip..].iter().map(Frame::kind).collect()
}

/// Polls until `check` holds, failing after PATIENCE.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn crash_loses_memory_but_keeps_files_and_restart_serves_again() {
    let sim = sim().await;
    let base = sim.url();
    let h = run_ok(&base, blur_graph(0x445566)).await;
    assert_eq!(
        h["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );
    let saved = sim.base_dir().join("output/ComfyUI_00001_.png");
    let saved_bytes = std::fs::read(&saved).expect("output written");

    let mut ws = client(&base, "crash-client").await;
    let id = queue(&base, long_prompt(7), Some("crash-client")).await;
    ws.until_kind("progress").await;
    sim.crash();
    assert!(!sim.is_running());

    // The socket is closed by the dying process, before the prompt could finish.
    let rest = until_closed(&mut ws).await;
    assert!(
        !finished(&rest, &id),
        "prompt finished despite the crash: {:?}",
        kinds(&rest)
    );

    // New connections are refused.
    let err = http()
        .get(format!("{base}/system_stats"))
        .send()
        .await
        .expect_err("a crashed instance does not answer");
    assert!(err.is_connect(), "expected a connect error, got {err:?}");
    let counters = sim.counters();
    assert_eq!(
        counters.prompts_finished, 1,
        "only the blur prompt finished"
    );

    sim.restart().await.expect("restart");
    assert!(sim.is_running());
    let (s, stats) = get_json(&base, "/system_stats").await;
    assert_eq!(s, 200, "{stats}");
    let (s, history) = get_json(&base, "/history").await;
    assert_eq!((s, history), (200, json!({})), "history is lost");
    let (_, q) = get_json(&base, "/queue").await;
    assert_eq!(
        q,
        json!({"queue_running": [], "queue_pending": []}),
        "queue is lost"
    );
    let (_, one) = get_json(&base, &format!("/history/{id}")).await;
    assert_eq!(one, json!({}));
    assert_eq!(sim.counters(), counters, "counters survive the restart");

    // Files on disk survive, and the save counter continues from them.
    assert_eq!(std::fs::read(&saved).expect("output survives"), saved_bytes);
    let (s, bytes) = get_bytes(&base, "/view?filename=ComfyUI_00001_.png").await;
    assert_eq!((s, bytes), (200, saved_bytes));
    let h = run_ok(&base, blur_graph(0x778899)).await;
    assert_eq!(
        h["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00002_.png"
    );
}

#[tokio::test]
async fn crash_over_http_restarts_after_delay() {
    let sim = sim().await;
    let base = sim.url();
    run_ok(&base, blur_graph(1)).await;
    let (s, _) = post_json(
        &base,
        "/sim/fault",
        &json!({"kind": "crash", "restart_after_ms": 300}),
    )
    .await;
    assert_eq!(s, 200);
    eventually("the instance goes down", || async { !sim.is_running() }).await;
    eventually("/system_stats answers 200 again", || async {
        match http().get(format!("{base}/system_stats")).send().await {
            Ok(r) => r.status().as_u16() == 200,
            Err(_) => false,
        }
    })
    .await;
    assert!(sim.is_running());
    let (_, history) = get_json(&base, "/history").await;
    assert_eq!(history, json!({}), "a fresh process");

    // A malformed fault is refused.
    let (s, body) = post_json(&base, "/sim/fault", &json!({"kind": "meteor"})).await;
    assert_eq!(s, 400, "{body}");
    assert!(sim.is_running());
}

#[tokio::test]
async fn hang_accepts_connections_but_answers_nothing_until_cleared() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = client(&base, "hang-client").await;
    let id = queue(&base, long_prompt(3), Some("hang-client")).await;
    ws.until_kind("progress").await;
    sim.inject(Fault::Hang);

    // Whatever was already on the wire arrives; then 500 ms of silence.
    let on_wire = until_quiet(&mut ws, Duration::from_millis(500)).await;
    assert!(
        !finished(&on_wire, &id),
        "prompt ran on while hung: {:?}",
        kinds(&on_wire)
    );

    // TCP connections are accepted, requests are not answered.
    let _tcp = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("a hung process still accepts connections");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = impatient
        .get(format!("{base}/system_stats"))
        .send()
        .await
        .expect_err("a hung process does not answer");
    assert!(err.is_timeout(), "expected a timeout, got {err:?}");

    // A request made while hung is answered once the hang clears.
    let pending = tokio::spawn({
        let base = base.clone();
        async move { get_json(&base, "/queue").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "answered while hung");
    let cleared_at = now_ms();
    sim.inject(Fault::Clear);
    let (s, q) = pending.await.expect("task");
    assert_eq!(s, 200);
    assert_eq!(
        q["queue_running"][0][1],
        id.as_str(),
        "the prompt is still running: {q}"
    );

    let frames = ws.until_done(&id).await;
    let success = frame_of(&frames, "execution_success");
    let finished_at = success.data()["timestamp"].as_i64().expect("timestamp");
    assert!(
        finished_at >= cleared_at,
        "the worker made progress while hung (finished {finished_at}, cleared {cleared_at})"
    );
    let h = wait_history(&base, &id).await;
    assert_eq!(h["status"]["status_str"], "success");
}

#[tokio::test]
async fn stall_freezes_the_worker_but_http_answers() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = client(&base, "stall-client").await;
    let id = queue(&base, long_prompt(4), Some("stall-client")).await;
    ws.until_kind("progress").await;
    let (s, _) = post_json(&base, "/sim/fault", &json!({"kind": "stall"})).await;
    assert_eq!(s, 200);

    let on_wire = until_quiet(&mut ws, Duration::from_millis(500)).await;
    assert!(
        !finished(&on_wire, &id),
        "prompt ran on while stalled: {:?}",
        kinds(&on_wire)
    );

    let (s, stats) = get_json(&base, "/system_stats").await;
    assert_eq!(s, 200, "{stats}");
    let (s, q) = get_json(&base, "/queue").await;
    assert_eq!(s, 200);
    assert_eq!(q["queue_running"][0][1], id.as_str(), "still running: {q}");
    // New sockets are served while stalled.
    let mut other = Ws::connect(&base, None).await;
    let first = other.next().await.expect("status");
    assert_eq!(first.kind(), "status");
    assert_eq!(first.data()["status"]["exec_info"]["queue_remaining"], 1);

    let cleared_at = now_ms();
    sim.inject(Fault::Clear);
    let frames = ws.until_done(&id).await;
    assert!(
        frames.iter().any(|f| f.kind() == "progress"),
        "sampling resumed: {:?}",
        kinds(&frames)
    );
    let finished_at = frame_of(&frames, "execution_success").data()["timestamp"]
        .as_i64()
        .expect("timestamp");
    assert!(
        finished_at >= cleared_at,
        "the worker made progress while stalled (finished {finished_at}, cleared {cleared_at})"
    );
}

/// Time from the KSampler's `executing` to the next node's, as seen by a client. The image is
/// large enough (about 2 megapixels) that a step's simulated time, not the scheduler's wake-up
/// latency, dominates even on a loaded machine.
async fn sampling_time(base: &str, ws: &mut Ws, client_id: &str, seed: u64) -> Duration {
    let id = queue(base, txt2img_with(seed, SDXL, 20, 1440, 1), Some(client_id)).await;
    let mut start = None;
    let mut end = None;
    loop {
        let f = ws.next().await.expect("socket open");
        let now = Instant::now();
        if f.kind() == "executing" {
            match f.data()["node"].as_str() {
                Some("3") => start = Some(now),
                Some(_) if start.is_some() && end.is_none() => end = Some(now),
                None if f.data()["prompt_id"] == id.as_str() => break,
                _ => {}
            }
        }
        assert_ne!(f.kind(), "execution_error", "{:?}", f.data());
    }
    let h = wait_history(base, &id).await;
    assert_eq!(h["status"]["status_str"], "success");
    end.expect("a node after the sampler") - start.expect("the sampler ran")
}

#[tokio::test]
async fn slow_multiplies_simulated_durations() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = client(&base, "slow-client").await;
    // Warm up: the checkpoint is loaded and cached, so the next runs differ only in sampling.
    sampling_time(&base, &mut ws, "slow-client", 1).await;
    let before = sampling_time(&base, &mut ws, "slow-client", 2).await;
    sim.inject(Fault::Slow { factor: 50.0 });
    let slow = sampling_time(&base, &mut ws, "slow-client", 3).await;
    sim.inject(Fault::Clear);
    let after = sampling_time(&base, &mut ws, "slow-client", 4).await;
    // The quicker of the runs around the slow one: a busy machine inflates a short span most.
    let normal = before.min(after);
    let ratio = slow.as_secs_f64() / normal.as_secs_f64().max(1e-6);
    assert!(
        ratio > 5.0,
        "slow x50 should take far longer: normal {before:?} / {after:?}, slow {slow:?}, ratio {ratio:.1}"
    );
}

#[tokio::test]
async fn fail_probes_fails_only_system_stats() {
    let sim = sim().await;
    let base = sim.url();
    assert_eq!(get_json(&base, "/system_stats").await.0, 200);
    let (s, _) = post_json(&base, "/sim/fault", &json!({"kind": "fail_probes"})).await;
    assert_eq!(s, 200);
    eventually("/system_stats fails", || async {
        get_json(&base, "/system_stats").await.0 == 500
    })
    .await;
    assert_eq!(get_json(&base, "/api/system_stats").await.0, 500);
    assert_eq!(get_json(&base, "/queue").await.0, 200);
    assert_eq!(get_json(&base, "/prompt").await.0, 200);
    assert_eq!(get_json(&base, "/object_info/KSampler").await.0, 200);
    run_ok(&base, blur_graph(9)).await;
    sim.inject(Fault::Clear);
    let (s, stats) = get_json(&base, "/system_stats").await;
    assert_eq!(s, 200);
    assert!(stats["devices"][0]["vram_total"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn slow_probes_delays_only_system_stats() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = client(&base, "probe-client").await;
    let (s, _) = post_json(
        &base,
        "/sim/fault",
        &json!({"kind": "slow_probes", "ms": 60_000}),
    )
    .await;
    assert_eq!(s, 200);

    // The probe is not answered while the fault lasts, under either path.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for path in ["/system_stats", "/api/system_stats"] {
        let err = impatient
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect_err("a slow probe does not answer at once");
        assert!(err.is_timeout(), "{path}: expected a timeout, got {err:?}");
    }
    let pending = tokio::spawn({
        let base = base.clone();
        async move { get_json(&base, "/system_stats").await }
    });

    // Everything else answers, and the worker and the socket carry on.
    assert_eq!(get_json(&base, "/queue").await.0, 200);
    assert_eq!(get_json(&base, "/object_info/KSampler").await.0, 200);
    let id = queue(&base, blur_graph(6), Some("probe-client")).await;
    let frames = ws.until_done(&id).await;
    frame_of(&frames, "execution_success");
    assert!(
        !pending.is_finished(),
        "the probe answered during the fault"
    );

    // Clear answers the waiting probe.
    sim.inject(Fault::Clear);
    let (s, stats) = pending.await.expect("task");
    assert_eq!(s, 200, "{stats}");
    assert!(stats["devices"][0]["vram_total"].as_u64().unwrap() > 0);
    assert_eq!(get_json(&base, "/system_stats").await.0, 200);
}

#[tokio::test]
async fn silent_nodes_send_nothing_while_the_sampler_reports_progress() {
    let sim = sim().await;
    let base = sim.url();
    // Warm the cache, so the next prompt runs only the sampler, the decode and the save.
    run_ok(&base, txt2img(1, SDXL)).await;
    let mut ws = client(&base, "silent-client").await;
    let (s, _) = post_json(
        &base,
        "/sim/fault",
        &json!({"kind": "silent", "ms": 60_000}),
    )
    .await;
    assert_eq!(s, 200);
    let id = queue(&base, txt2img(2, SDXL), Some("silent-client")).await;

    // The sampler has a progress bar, so it is not silent; the decode after it is.
    let mut before = Vec::new();
    loop {
        let f = ws.next().await.expect("socket open");
        let decode = f.kind() == "executing" && f.data()["node"] == "8";
        before.push(f);
        if decode {
            break;
        }
    }
    assert!(
        before
            .iter()
            .any(|f| f.kind() == "progress" && f.data()["node"] == "3"),
        "the sampler reported progress: {:?}",
        kinds(&before)
    );

    // While the decode runs: no event, HTTP answers, and the prompt is listed as running.
    let (s, q) = get_json(&base, "/queue").await;
    assert_eq!(s, 200);
    assert_eq!(q["queue_running"][0][1], id.as_str(), "still running: {q}");
    assert_eq!(get_json(&base, "/system_stats").await.0, 200);
    let (_, h) = get_json(&base, &format!("/history/{id}")).await;
    assert_eq!(h, json!({}), "not finished");
    assert!(
        ws.next_within(Duration::from_millis(500)).await.is_err(),
        "a silent node sent an event"
    );

    // Clear ends the silence; the prompt completes as usual.
    sim.inject(Fault::Clear);
    let rest = ws.until_done(&id).await;
    frame_of(&rest, "execution_success");
    assert!(
        rest.iter()
            .any(|f| f.kind() == "executing" && f.data()["node"] == "9"),
        "the save ran: {:?}",
        kinds(&rest)
    );
    let h = wait_history(&base, &id).await;
    assert_eq!(h["status"]["status_str"], "success");
}

#[tokio::test]
async fn oom_next_fails_the_next_sampling_prompt_once() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = client(&base, "oom-client").await;
    sim.inject(Fault::OomNext);

    // A prompt without a KSampler is not affected, and does not use up the fault.
    run_ok(&base, blur_graph(2)).await;

    let id = queue(&base, txt2img(1, SDXL), Some("oom-client")).await;
    let frames = ws.until_done(&id).await;
    let err = frame_of(&frames, "execution_error").data();
    assert_eq!(err["prompt_id"], id.as_str());
    assert_eq!(err["exception_type"], "torch.OutOfMemoryError", "{err}");
    assert_eq!(err["node_type"], "KSampler");
    assert_eq!(err["node_id"], "3");
    let message = err["exception_message"].as_str().unwrap();
    assert!(message.contains("out of memory"), "{message}");
    assert!(!frames.iter().any(|f| f.kind() == "execution_success"));
    let h = wait_history(&base, &id).await;
    assert_eq!(h["status"]["status_str"], "error");
    assert_eq!(h["status"]["completed"], false);
    let messages = h["status"]["messages"].as_array().unwrap();
    assert!(
        messages.iter().any(|m| m[0] == "execution_error"),
        "{messages:?}"
    );

    let id = queue(&base, txt2img(2, SDXL), Some("oom-client")).await;
    let frames = ws.until_done(&id).await;
    frame_of(&frames, "execution_success");
    let h = wait_history(&base, &id).await;
    assert_eq!(h["status"]["status_str"], "success");
    assert_eq!(h["status"]["completed"], true);
}

#[tokio::test]
async fn real_oom_when_the_batch_does_not_fit() {
    let sim = sim_with(SimConfig {
        vram_total_gb: 8.0,
        ..Default::default()
    })
    .await;
    let base = sim.url();
    let mut ws = client(&base, "vram-client").await;
    let id = queue(
        &base,
        txt2img_with(1, SDXL, 20, 2048, 4),
        Some("vram-client"),
    )
    .await;
    let frames = ws.until_done(&id).await;
    let err = frame_of(&frames, "execution_error").data();
    assert_eq!(err["exception_type"], "torch.OutOfMemoryError", "{err}");
    assert_eq!(err["node_type"], "KSampler");
    assert!(
        err["exception_message"]
            .as_str()
            .unwrap()
            .contains("out of memory"),
        "{err}"
    );
    let h = wait_history(&base, &id).await;
    assert_eq!(h["status"]["status_str"], "error");

    let h = run_ok(&base, txt2img(2, SDXL)).await;
    assert_eq!(h["status"]["completed"], true);
    assert_eq!(sim.counters().prompts_succeeded, 1);
}

#[tokio::test]
async fn drop_websockets_closes_sockets_and_new_ones_work() {
    let sim = sim().await;
    let base = sim.url();
    let mut a = client(&base, "drop-a").await;
    let mut b = client(&base, "drop-b").await;
    let (s, _) = post_json(&base, "/sim/fault", &json!({"kind": "drop_websockets"})).await;
    assert_eq!(s, 200);
    until_closed(&mut a).await;
    until_closed(&mut b).await;

    // The instance itself is fine, and a new socket gets the next prompt's events.
    assert!(sim.is_running());
    let mut c = client(&base, "drop-a").await;
    let id = queue(&base, blur_graph(5), Some("drop-a")).await;
    let frames = c.until_done(&id).await;
    frame_of(&frames, "execution_success");
    let (_, stats) = get_json(&base, "/sim/stats").await;
    assert_eq!(stats["websockets"], 1, "{stats}");
    // Dropping is a one-off: the new socket stays open.
    assert!(c.next_within(Duration::from_millis(200)).await.is_err());
}

#[tokio::test]
async fn checkpoint_loads_follow_the_classic_cache() {
    let first_sim = sim().await;
    let base = first_sim.url();
    let first = queue(&base, txt2img(1, SDXL), None).await;
    let second = queue(&base, txt2img(2, SDXL), None).await;
    for id in [&first, &second] {
        let h = wait_history(&base, id).await;
        assert_eq!(h["status"]["status_str"], "success");
    }
    let c = first_sim.counters();
    assert_eq!(
        c.checkpoint_loads, 1,
        "the second prompt reuses the cached loader"
    );
    assert_eq!(
        (c.prompts_accepted, c.prompts_finished, c.prompts_succeeded),
        (2, 2, 2)
    );

    let other = sim().await;
    let base = other.url();
    run_ok(&base, txt2img(1, SDXL)).await;
    assert_eq!(other.counters().checkpoint_loads, 1);
    run_ok(&base, txt2img(1, SD15)).await;
    assert_eq!(other.counters().checkpoint_loads, 2);
    run_ok(&base, txt2img(1, SDXL)).await;
    assert_eq!(
        other.counters().checkpoint_loads,
        3,
        "the SD15 prompt dropped the SDXL loader output from the cache"
    );
    assert_eq!(
        first_sim.counters().checkpoint_loads,
        1,
        "counters are per instance"
    );
}
