//! Issue 16: a repeated prompt with the result cache on (`[cache] enabled = true`) uses no GPU
//! and is answered within 20 ms. One client runs a prompt once on the sim (time scale 0.01),
//! then posts it again `ROUNDS × PER_ROUND` times; each repeat is timed from the request sent
//! to `executing {node: null}` on the client's socket (the whole answer a client waits for),
//! and the sim's prompt counter must not move. For scale, the same prompt with the per-request
//! opt-out (`extra_data.comfy_gate.cache = false`) runs on the sim, in turn with the repeats.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{GateProcess, fmt_ms, percentile};

/// Rounds, and repeats per round (cached and opted out, in turn).
const ROUNDS: usize = 5;
const PER_ROUND: usize = 40;
/// The target: a cached repeat answered within this.
pub const TARGET_MS: f64 = 20.0;

/// Per-round p50s and the overall percentiles of both kinds.
pub struct CacheRepeat {
    pub cached_ms: Vec<f64>,
    pub gpu_ms: Vec<f64>,
    pub round_p50s: Vec<f64>,
    /// Prompts the sim ran during the cached repeats (0: no GPU time).
    pub ran_on_sim: u64,
}

impl CacheRepeat {
    /// The line the bench prints.
    pub fn line(&self) -> String {
        let mut p50s = self.round_p50s.clone();
        p50s.sort_by(f64::total_cmp);
        let p99 = percentile(&self.cached_ms, 99.0);
        format!(
            "repeated prompt, cache on: p50 {} (rounds' p50 {}–{}), p99 {} over {} repeats, \
             prompts run on the sim meanwhile {}; the same prompt run on the sim (opt-out): p50 {} \
             (cached/run ×{:.3}); target ≤ {TARGET_MS:.0} ms: p99 {:.2}× of it",
            fmt_ms(percentile(&self.cached_ms, 50.0)),
            fmt_ms(p50s[0]),
            fmt_ms(p50s[p50s.len() - 1]),
            fmt_ms(p99),
            self.cached_ms.len(),
            self.ran_on_sim,
            fmt_ms(percentile(&self.gpu_ms, 50.0)),
            percentile(&self.cached_ms, 50.0) / percentile(&self.gpu_ms, 50.0),
            p99 / TARGET_MS
        )
    }
}

/// Posts `body` as `client` and waits for its `executing {node: null}` on `ws`; the time.
async fn timed(
    http: &reqwest::Client,
    url: &str,
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    body: &Value,
) -> f64 {
    let sent = Instant::now();
    let answer: Value = http
        .post(format!("{url}/prompt"))
        .json(body)
        .send()
        .await
        .expect("POST /prompt")
        .json()
        .await
        .expect("its answer");
    let id = answer["prompt_id"]
        .as_str()
        .expect("a prompt id")
        .to_string();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("the prompt ends within 30 s")
            .expect("the socket stays open")
            .expect("a frame");
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
        if v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == id {
            return sent.elapsed().as_secs_f64() * 1000.0;
        }
    }
}

/// Runs the case on a fresh gate with the cache on, over `sim`.
pub async fn cache_repeat(bin: &std::path::Path, sim: &comfy_sim::SimHandle) -> CacheRepeat {
    let gate = GateProcess::start_with(bin, &sim.url(), "[cache]\nenabled = true\n").await;
    let url = gate.url();
    let client_id = "cache-bench";
    let ws_url = format!("{}/ws?clientId={client_id}", url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("ws connects");
    let http = reqwest::Client::new();
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 4242}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cached"}}
    });
    let cached = json!({"prompt": graph, "client_id": client_id});
    let opted_out = json!({"prompt": graph, "client_id": client_id,
        "extra_data": {"comfy_gate": {"cache": false}}});
    timed(&http, &url, &mut ws, &cached).await;
    let (mut cached_ms, mut gpu_ms, mut round_p50s, mut ran_on_sim) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..ROUNDS {
        let mut round = Vec::new();
        for _ in 0..PER_ROUND {
            let before = sim.counters().prompts_finished;
            round.push(timed(&http, &url, &mut ws, &cached).await);
            ran_on_sim += sim.counters().prompts_finished - before;
        }
        for _ in 0..PER_ROUND / 4 {
            gpu_ms.push(timed(&http, &url, &mut ws, &opted_out).await);
        }
        round_p50s.push(percentile(&round, 50.0));
        cached_ms.extend(round);
    }
    let r = CacheRepeat {
        cached_ms,
        gpu_ms,
        round_p50s,
        ran_on_sim,
    };
    println!("overhead: {}", r.line());
    gate.kill().await;
    r
}
