//! WebSocket clients: event delivery latency, and the gate's RSS with many idle clients.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{GateProcess, PATIENCE, open_fds, open_files_limits, percentile, reqwest_client};

pub struct WsLatency {
    pub clients: usize,
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
}

impl WsLatency {
    pub fn p50_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 50.0)
    }
    pub fn p99_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 99.0)
    }
}

fn now_epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

type ClientWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Connects `n` WebSocket clients to `base`/ws with `?clientId={prefix}-{i}`, 100 at a time.
async fn connect_many(base: &str, prefix: &str, n: usize) -> Vec<(usize, ClientWs)> {
    let ws_base = base.replacen("http", "ws", 1);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let url = format!("{ws_base}/ws?clientId={prefix}-{i}");
            async move {
                for _ in 0..5 {
                    // A small read buffer keeps this process lean with 10,000 clients (the
                    // default is 128 KiB each); it changes nothing on the server side.
                    let config = WebSocketConfig::default().read_buffer_size(4096);
                    let connect =
                        tokio_tungstenite::connect_async_with_config(&url, Some(config), false);
                    if let Ok(Ok((ws, _))) = tokio::time::timeout(PATIENCE, connect).await {
                        return Some((i, ws));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None
            }
        })
        .buffer_unordered(100)
        .filter_map(|c| async move { c })
        .collect()
        .await
}

/// `clients` WebSocket clients on `base`; `prompts` tiny prompts, each for the next client in
/// turn and submitted once the previous one's `execution_start` arrived; per event, receive time
/// minus the event's `timestamp`.
pub async fn ws_latency(base: &str, label: &str, clients: usize, prompts: usize) -> WsLatency {
    let prefix = format!("overhead-{label}");
    let conns = connect_many(base, &prefix, clients).await;
    let connected = conns.len();
    assert!(connected > 0, "no WebSocket client connected to {base}");
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, f64)>();
    let mut readers = Vec::new();
    let mut ids = vec![String::new(); clients];
    for (i, ws) in conns {
        ids[i] = format!("{prefix}-{i}");
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg {
                    let recv = now_epoch_ms();
                    if !t.contains("\"execution_start\"") {
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    if v["type"] != "execution_start" {
                        continue;
                    }
                    if let (Some(id), Some(ts)) = (
                        v["data"]["prompt_id"].as_str(),
                        v["data"]["timestamp"].as_f64(),
                    ) {
                        let _ = tx.send((id.to_string(), recv - ts));
                    }
                }
            }
        }));
    }
    drop(tx);
    let ids: Vec<String> = ids.into_iter().filter(|s| !s.is_empty()).collect();
    let client = reqwest_client();
    let mut latencies = Vec::with_capacity(prompts);
    let mut missed = 0usize;
    let started = Instant::now();
    for k in 0..prompts {
        let cid = &ids[k % ids.len()];
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": k}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ws"}}
        });
        let resp: Value = match client
            .post(format!("{base}/prompt"))
            .json(&json!({"prompt": graph, "client_id": cid}))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let Some(id) = resp["prompt_id"].as_str().map(str::to_string) else {
            missed += 1;
            continue;
        };
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some((pid, lat)) = rx.recv().await {
                if pid == id {
                    return Some(lat);
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(lat)) => latencies.push(lat),
            _ => missed += 1,
        }
    }
    let elapsed = started.elapsed();
    for r in readers {
        r.abort();
    }
    if missed > 0 || connected < clients {
        println!(
            "overhead: ws via {label}: {connected}/{clients} clients connected, {missed} prompts \
             without an execution_start"
        );
    }
    WsLatency {
        clients: connected,
        latencies_ms: latencies,
        elapsed,
    }
}

// ---------------------------------------------------------------------------------------------
// RSS with idle WebSocket clients

pub struct RssResult {
    pub idle_kib: u64,
    pub loaded_kib: u64,
    pub clients: usize,
    pub wanted: usize,
    pub note: Option<String>,
}

impl RssResult {
    pub fn line(&self) -> String {
        let per = if self.clients > 0 {
            (self.loaded_kib as f64 - self.idle_kib as f64) / self.clients as f64
        } else {
            f64::NAN
        };
        let mut s = format!(
            "gate RSS: idle {:.1} MB → with {} idle ws clients {:.1} MB ({:.1} KB per client)",
            self.idle_kib as f64 / 1024.0,
            group_thousands(self.clients),
            self.loaded_kib as f64 / 1024.0,
            per
        );
        if self.clients < self.wanted {
            s.push_str(&format!(
                " — only {} of {} clients fit",
                self.clients, self.wanted
            ));
        }
        s
    }
}

pub fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A fresh gate process; VmRSS idle, then with up to `wanted` idle clients connected.
pub async fn ws_rss(bin: &Path, backend: &str, wanted: usize) -> RssResult {
    let (soft, _) = open_files_limits();
    // This process holds one socket per client; the gate (which inherits the same limit) one
    // per client too. Keep a margin for everything else.
    let room = soft.saturating_sub(open_fds() + 200) as usize;
    let target = wanted.min(room);
    let note = (target < wanted).then(|| {
        format!(
            "open-files limit {soft} leaves room for {target} of {wanted} clients (raise \
             `ulimit -n` / the hard limit to run all)"
        )
    });
    let gate = GateProcess::start(bin, backend).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = gate.rss_kib();
    let t = Instant::now();
    let conns = connect_many(&gate.url(), "overhead-rss", target).await;
    let clients = conns.len();
    // Let the gate settle (first `status` frames sent, buffers idle).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = gate.rss_kib();
    println!(
        "overhead: {clients} idle ws clients connected to the gate in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    drop(conns);
    drop(gate);
    RssResult {
        idle_kib: idle,
        loaded_kib: loaded,
        clients,
        wanted,
        note,
    }
}
