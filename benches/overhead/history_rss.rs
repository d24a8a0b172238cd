//! Issue 16: the gate's memory with 10,000 finished prompts in its history, each carrying an
//! 80 KB UI workflow in `extra_data.extra_pnginfo` (what ComfyUI's frontend sends with every
//! prompt). Target: at most 300 MB RSS. The entries' bodies belong in the store; memory keeps
//! what listing them needs (`sched::history`).
//!
//! 32 closed-loop workers submit small prompts (EmptyImage → SaveImage, a color each) and wait
//! for each history entry, so the gate queue stays short and what is measured is the history,
//! not a backlog. RSS is the gate process's VmRSS (VmHWM for the peak) from `/proc`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::GateProcess;

/// Finished prompts kept.
pub const PROMPTS: usize = 10_000;
/// Size of each prompt's UI workflow (bytes of JSON).
pub const WORKFLOW_BYTES: usize = 80 * 1024;
/// Concurrent submitters.
const WORKERS: usize = 32;

/// What the run measured.
pub struct HistoryRss {
    pub idle_kib: u64,
    pub rss_kib: u64,
    pub peak_kib: u64,
    pub kept: usize,
    pub elapsed: Duration,
    /// Bytes of one `GET /history/{id}` answer at the end (the whole entry, from the store).
    pub entry_bytes: usize,
}

impl HistoryRss {
    /// RSS in MB (10^6 bytes, as the target).
    pub fn rss_mb(&self) -> f64 {
        self.rss_kib as f64 * 1024.0 / 1e6
    }

    /// One markdown-ish line with the figures and the ratio to the 300 MB target.
    pub fn line(&self) -> String {
        let per_entry =
            (self.rss_kib.saturating_sub(self.idle_kib)) as f64 * 1024.0 / self.kept.max(1) as f64;
        format!(
            "history of {} finished prompts, each with an {} KB UI workflow: RSS {:.1} MB \
             (idle {:.1} MB, peak {:.1} MB, {:.1} KB per entry; target ≤ 300 MB: {:.2}× of it), \
             one GET /history/{{id}} {} bytes, filled in {:.0} s",
            self.kept,
            WORKFLOW_BYTES / 1024,
            self.rss_mb(),
            self.idle_kib as f64 * 1024.0 / 1e6,
            self.peak_kib as f64 * 1024.0 / 1e6,
            per_entry / 1000.0,
            self.rss_mb() / 300.0,
            self.entry_bytes,
            self.elapsed.as_secs_f64()
        )
    }
}

/// A frontend-like workflow of about `WORKFLOW_BYTES` of JSON, unique to `seed`.
fn workflow(seed: usize) -> Value {
    let mut nodes = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < WORKFLOW_BYTES {
        let node = json!({
            "id": i, "type": "KSampler", "pos": [100 + i * 37, 200 + (seed % 97)],
            "size": [315, 262], "flags": {}, "order": i, "mode": 0,
            "inputs": [{"name": "model", "type": "MODEL", "link": i * 2}],
            "outputs": [{"name": "LATENT", "type": "LATENT", "links": [i * 2 + 1], "slot_index": 0}],
            "properties": {"Node name for S&R": "KSampler", "cnr_id": "comfy-core", "ver": "0.3.40"},
            "widgets_values": [seed * 1000 + i, "randomize", 20, 8, "euler", "normal", 1],
        });
        size += node.to_string().len();
        nodes.push(node);
        i += 1;
    }
    json!({"id": format!("wf-{seed}"), "revision": 0, "last_node_id": i, "nodes": nodes, "links": [], "version": 0.4})
}

/// Fills a fresh gate's history over a sim of its own (cheap images: its CPU is not what is
/// measured) and measures it.
pub async fn history_rss(bin: &std::path::Path) -> HistoryRss {
    let sim = crate::support::sim_on_own_runtime(comfy_sim::SimConfig {
        time_scale: 0.01,
        fast_images: true,
        ..Default::default()
    });
    let gate = GateProcess::start(bin, &sim.url()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_kib = gate.rss_kib();
    let url = Arc::new(gate.url());
    let next = Arc::new(AtomicUsize::new(0));
    // `HISTORY_PROMPTS=N` runs a shorter case (a quick look; the target is for 10,000).
    let prompts: usize = std::env::var("HISTORY_PROMPTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(PROMPTS);
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (url, next) = (url.clone(), next.clone());
        let done = done.clone();
        workers.spawn(async move {
            let client = reqwest::Client::new();
            let mut last = String::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= prompts {
                    return last;
                }
                let body = json!({
                    "prompt": {
                        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
                        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "history"}}
                    },
                    "extra_data": {"extra_pnginfo": {"workflow": workflow(i)}}
                });
                let answer: Value = client
                    .post(format!("{url}/prompt"))
                    .json(&body)
                    .send()
                    .await
                    .expect("POST /prompt")
                    .json()
                    .await
                    .expect("its answer");
                let id = answer["prompt_id"].as_str().expect("a prompt id").to_string();
                loop {
                    let r = client
                        .get(format!("{url}/history/{id}"))
                        .send()
                        .await
                        .expect("GET /history/{id}");
                    let text = r.bytes().await.expect("its body");
                    if text.len() > 2 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                last = id;
                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                if n.is_multiple_of(1000) {
                    println!("overhead: history: {n} prompts finished");
                }
            }
        });
    }
    let mut last = String::new();
    while let Some(done) = workers.join_next().await {
        last = done.expect("a worker");
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_kib = gate.rss_kib();
    let peak_kib = gate.peak_rss_kib();
    let client = reqwest::Client::new();
    let records: Value = client
        .get(format!("http://{}/admin/records", gate.admin))
        .send()
        .await
        .expect("/admin/records")
        .json()
        .await
        .expect("its JSON");
    let kept = records["history"].as_u64().unwrap_or(0) as usize;
    let entry = client
        .get(format!("{url}/history/{last}"))
        .send()
        .await
        .expect("GET /history/{id}")
        .bytes()
        .await
        .expect("its body");
    assert!(
        entry.len() > WORKFLOW_BYTES,
        "the whole entry, workflow included, is served from the store"
    );
    let r = HistoryRss {
        idle_kib,
        rss_kib,
        peak_kib,
        kept,
        elapsed,
        entry_bytes: entry.len(),
    };
    println!("overhead: {}", r.line());
    gate.kill().await;
    r
}
