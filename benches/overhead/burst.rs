//! Issue 16: a burst of `POST /prompt`, accepted durably. 100 keep-alive connections send
//! 10,000 small prompts (EmptyImage → SaveImage, a color each) as fast as the gate answers; the
//! rate is acknowledged prompts per second, from the first request to the last `200`. Every
//! `200` means the prompt is in the gate's store (fsynced), so this is the store's group
//! commit under load, plus the admission path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{GateProcess, fmt_ms};

/// Connections of the burst.
pub const CONNECTIONS: usize = 100;
/// Prompts in the burst.
pub const PROMPTS: usize = 10_000;

/// The burst's result.
pub struct Burst {
    pub accepted: usize,
    pub refused: usize,
    pub elapsed: Duration,
    pub p99_ms: f64,
}

impl Burst {
    /// Acknowledged prompts per second.
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends the burst to `gate`.
pub async fn burst(gate: &GateProcess) -> Burst {
    let url = Arc::new(gate.url());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let url = url.clone();
        tasks.spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client");
            let (mut ok, mut refused, mut latencies) = (0, 0, Vec::new());
            for i in (c..PROMPTS).step_by(CONNECTIONS) {
                let body = json!({"prompt": {
                    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
                    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "burst"}}
                }});
                let sent = Instant::now();
                let answer = client.post(format!("{url}/prompt")).json(&body).send().await;
                let acknowledged = match answer {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if acknowledged {
                    ok += 1;
                } else {
                    refused += 1;
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            (ok, refused, latencies)
        });
    }
    let (mut accepted, mut refused, mut latencies) = (0, 0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (ok, no, l) = done.expect("a burst connection");
        accepted += ok;
        refused += no;
        latencies.extend(l);
    }
    let elapsed = started.elapsed();
    let p99_ms = crate::support::percentile(&latencies, 99.0);
    println!(
        "burst: {accepted} accepted, {refused} refused in {:.2} s: {:.0}/s, p99 {}",
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64(),
        fmt_ms(p99_ms)
    );
    Burst {
        accepted,
        refused,
        elapsed,
        p99_ms,
    }
}
