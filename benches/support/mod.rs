//! Helpers of the overhead bench: the backend and gate processes, nginx, the HTTP load
//! generator and the WebSocket clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use comfy_gate::sim::{SimBackend, SimConfig, SimHandle};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

// Shared with the scheduling bench, which uses other parts of it.
#[allow(dead_code)]
pub mod nginx;
pub mod proc;

pub use nginx::NginxProcess;

/// How long setup steps wait before giving up.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Open files

/// `(soft, hard)` "Max open files" of this process, from /proc/self/limits.
pub fn open_files_limits() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let mut it = rest.split_whitespace();
            let parse = |s: Option<&str>| match s {
                Some("unlimited") => u64::MAX,
                Some(s) => s.parse().unwrap_or(1024),
                None => 1024,
            };
            let soft = parse(it.next());
            let hard = parse(it.next());
            return (soft, hard);
        }
    }
    (1024, 1024)
}

/// Raises this process's soft open-files limit to the hard one (`prlimit`, util-linux).
pub fn raise_open_files() {
    let (soft, hard) = open_files_limits();
    if soft >= hard {
        return;
    }
    let limit = if hard == u64::MAX {
        "unlimited".to_string()
    } else {
        hard.to_string()
    };
    let ok = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        println!("overhead: could not raise the open-files limit (prlimit failed or absent)");
    }
}

/// File descriptors this process has open now.
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Setup

/// The sim, the gate binary and the prepared files.
pub struct Ctx {
    pub sim: SimHandle,
    pub gate_bin: PathBuf,
    pub view_bytes: usize,
}

/// comfy-sim on a runtime of its own (two worker threads, as the gate gets), so it does not
/// share threads with the load generator: direct, nginx and the gate then see the same
/// topology (load generator → [proxy] → sim), each process or runtime scheduled by the OS.
fn sim_on_own_runtime(cfg: SimConfig) -> SimHandle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("sim runtime");
        rt.block_on(async move {
            let sim = SimBackend::start(cfg).await.expect("comfy-sim starts");
            let _ = tx.send(sim);
            std::future::pending::<()>().await
        })
    });
    rx.recv().expect("comfy-sim started")
}

impl Ctx {
    pub async fn start() -> Ctx {
        let sim = sim_on_own_runtime(SimConfig {
            time_scale: 0.01,
            ..Default::default()
        });
        Ctx {
            sim,
            gate_bin: gate_binary(),
            view_bytes: 0,
        }
    }

    /// Runs one small prompt through the gate; its id (the gate forwards its own prompt_id, so
    /// the sim has the same entry).
    pub async fn prepare_history(&self, gate_url: &str) -> String {
        self.run_prompt(gate_url, &[gate_url.to_string(), self.sim.url()])
            .await
    }

    /// Runs one small prompt straight on the sim (the gate does not know it: it asks the
    /// backend for its history); its id.
    pub async fn prepare_history_direct(&self) -> String {
        let sim = self.sim.url();
        self.run_prompt(&sim, std::slice::from_ref(&sim)).await
    }

    /// Submits one small prompt to `submit_url` and waits until every one of `bases` lists it
    /// in `/history/{id}`.
    async fn run_prompt(&self, submit_url: &str, bases: &[String]) -> String {
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}
        });
        let client = reqwest_client();
        let resp: Value = client
            .post(format!("{submit_url}/prompt"))
            .json(&json!({"prompt": graph, "client_id": "overhead-bench"}))
            .send()
            .await
            .expect("POST /prompt")
            .json()
            .await
            .expect("prompt answer");
        let id = resp["prompt_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no prompt_id in {resp}"))
            .to_string();
        for base in bases {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let h: Value = client
                    .get(format!("{base}/history/{id}"))
                    .send()
                    .await
                    .expect("GET /history")
                    .json()
                    .await
                    .unwrap_or(Value::Null);
                if h.get(&id).is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "history of {id} never appeared at {base}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        id
    }

    /// Writes a ≥ 4 MiB noise PNG into the sim's output dir; its file name.
    pub async fn prepare_view(&mut self) -> String {
        let name = "overhead_noise_4mb.png".to_string();
        let png = noise_png(1200, 1200);
        self.view_bytes = png.len();
        let path = self.sim.base_dir().join("output").join(&name);
        std::fs::write(&path, &png).expect("write noise png");
        name
    }
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("reqwest client")
}

/// An RGB PNG of pseudo-random noise (incompressible: about 3 bytes a pixel).
fn noise_png(width: u32, height: u32) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = vec![0u8; (width * height * 3) as usize];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("png header");
        w.write_image_data(&data).expect("png data");
    }
    out
}

/// `target/release/comfy-gate`: cargo's path for benches, else next to this executable, else
/// built now.
fn gate_binary() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_comfy-gate").map(PathBuf::from)
        && p.exists()
    {
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let release = exe
        .parent()
        .and_then(Path::parent)
        .expect("bench executable lives in target/<profile>/deps");
    let bin = release.join("comfy-gate");
    if bin.exists() {
        return bin;
    }
    println!("overhead: building the gate binary (cargo build --release --bin comfy-gate)");
    let ok = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "comfy-gate"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok && bin.exists(), "could not build {}", bin.display());
    bin
}

// ---------------------------------------------------------------------------------------------
// The gate as a process

/// A `comfy-gate run` child process with a temporary state dir; killed on drop.
pub struct GateProcess {
    child: Child,
    pub addr: SocketAddr,
    _state: tempfile::TempDir,
}

impl GateProcess {
    pub async fn start(bin: &Path, backend: &str) -> GateProcess {
        let state = tempfile::Builder::new()
            .prefix("comfy-gate-bench-")
            .tempdir()
            .expect("state dir");
        let mut child = Command::new(bin)
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--backend",
                backend,
                "--state-dir",
            ])
            .arg(state.path())
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("comfy-gate starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("gate prints its address")
            .expect("read gate stdout")
            .expect("gate stdout open");
        // "comfy-gate listening on http://ADDR (admin http://ADMIN)"
        let parse = |after: &str| -> SocketAddr {
            let rest = &line[line.find(after).expect("address in the gate's line") + after.len()..];
            let end = rest.find([' ', ')']).unwrap_or(rest.len());
            rest[..end].parse().expect("socket address")
        };
        let addr = parse("listening on http://");
        let admin = parse("(admin http://");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // Ready once the backend is up (health probes every 2 s by default).
        let client = reqwest_client();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = client.get(format!("http://{admin}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "gate never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        GateProcess {
            child,
            addr,
            _state: state,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> u64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        // SIGKILL by pid (kill_on_drop would too): a graceful drain is not what we measure.
        let _ = self.child.start_kill();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP load generator

pub struct HttpCase {
    pub name: String,
    pub path: String,
    /// A response body shorter than this counts as an error.
    pub expect_min_bytes: usize,
}

/// Completed requests in the measurement window, and their latencies.
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    pub latencies_ms: Vec<f64>,
    pub window: Duration,
    pub errors: u64,
}

impl LoadStats {
    pub fn rps(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.window.as_secs_f64()
    }
    pub fn p50_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 50.0)
    }
    pub fn p99_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 99.0)
    }
}

/// Nearest-rank percentile of unsorted values (NaN when empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn fmt_ms(ms: f64) -> String {
    if ms.is_nan() {
        "–".to_string()
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// A closed loop of `conns` keep-alive HTTP/1.1 connections, each sending `GET path` as soon as
/// its previous answer is read in full; requests completed in the `measure` window after
/// `warmup` count.
pub async fn http_load(
    addr: SocketAddr,
    path: &str,
    expect_min_bytes: usize,
    conns: usize,
    warmup: Duration,
    measure: Duration,
) -> LoadStats {
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            connection_loop(addr, &path, expect_min_bytes, from, until).await
        }));
    }
    let mut stats = LoadStats {
        window: measure,
        ..Default::default()
    };
    for t in tasks {
        let (lat, errors) = t.await.expect("load task");
        stats.latencies_ms.extend(lat);
        stats.errors += errors;
    }
    stats
}

async fn connection_loop(
    addr: SocketAddr,
    path: &str,
    expect_min_bytes: usize,
    from: Instant,
    until: Instant,
) -> (Vec<f64>, u64) {
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let host = addr.to_string();
    'reconnect: while Instant::now() < until {
        let Ok(stream) = TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        loop {
            let sent = Instant::now();
            if sent >= until {
                break 'reconnect;
            }
            if sender.ready().await.is_err() {
                // The server closed the connection after a complete answer (`Connection:
                // close`, a keep-alive limit): reconnect, not an error.
                continue 'reconnect;
            }
            let req = hyper::Request::get(path)
                .header(hyper::header::HOST, &host)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let Ok(resp) = sender.send_request(req).await else {
                errors += 1;
                continue 'reconnect;
            };
            let ok_status = resp.status().is_success();
            let mut body = resp.into_body();
            let mut n = 0usize;
            let mut body_ok = true;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len();
                        }
                    }
                    Err(_) => {
                        body_ok = false;
                        break;
                    }
                }
            }
            let done = Instant::now();
            if !ok_status || !body_ok || n < expect_min_bytes {
                errors += 1;
                if !body_ok {
                    continue 'reconnect;
                }
                continue;
            }
            if sent >= from && done <= until {
                latencies.push(done.duration_since(sent).as_secs_f64() * 1e3);
            }
        }
    }
    (latencies, errors)
}

// ---------------------------------------------------------------------------------------------
// WebSocket delivery latency

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
