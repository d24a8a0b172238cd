//! Helpers of the overhead bench: the backend and gate processes, nginx, the HTTP load
//! generator and the WebSocket clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use comfy_sim::{SimBackend, SimConfig, SimHandle};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

// Shared with the scheduling bench, which uses other parts of it.
#[allow(dead_code)]
pub mod nginx;
pub mod proc;

mod http_load;
mod ws;

pub use http_load::*;
pub use nginx::NginxProcess;
pub use ws::*;

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
pub fn sim_on_own_runtime(cfg: SimConfig) -> SimHandle {
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

    /// Stores a small JSON file (a saved workflow, ~1 KB) in the sim's user data; its path
    /// under `/userdata/`, percent-encoded as ComfyUI's frontend sends it.
    pub async fn prepare_userdata(&self) -> String {
        let graph = json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
        });
        let path = "workflows%2Foverhead_bench.json".to_string();
        let resp = reqwest_client()
            .post(format!("{}/userdata/{path}?overwrite=true", self.sim.url()))
            .body(graph.to_string())
            .send()
            .await
            .expect("POST /userdata");
        assert!(
            resp.status().is_success(),
            "POST /userdata: {}",
            resp.status()
        );
        path
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
pub fn gate_binary() -> PathBuf {
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

/// A `comfy-gate run` child process; killed (SIGKILL) on drop.
pub struct GateProcess {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _state: Option<tempfile::TempDir>,
}

impl GateProcess {
    /// The gate in front of one backend, on a temporary state dir.
    pub async fn start(bin: &Path, backend: &str) -> GateProcess {
        Self::start_with(bin, backend, "").await
    }

    /// [`GateProcess::start`] with `more` appended to its configuration file (TOML sections).
    pub async fn start_with(bin: &Path, backend: &str, more: &str) -> GateProcess {
        let state = tempfile::Builder::new()
            .prefix("comfy-gate-bench-")
            .tempdir()
            .expect("state dir");
        // The RSS case connects 10,000 sockets, the default `max_connections`: room for more.
        let config = state.path().join("bench.toml");
        let text = format!("[server]\nmax_connections = 1000000\n{more}");
        std::fs::write(&config, text).expect("bench config");
        let extra = ["--config", config.to_str().expect("a UTF-8 path")];
        let mut gate = Self::start_fleet(bin, &[backend.to_string()], state.path(), &extra).await;
        gate._state = Some(state);
        gate
    }

    /// The gate in front of `backends`, on `state` (kept: a gate started again on it resumes
    /// the work), with `extra` arguments to `comfy-gate run` (`--config FILE`).
    pub async fn start_fleet(
        bin: &Path,
        backends: &[String],
        state: &Path,
        extra: &[&str],
    ) -> GateProcess {
        let mut cmd = Command::new(bin);
        cmd.args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        for b in backends {
            cmd.args(["--backend", b]);
        }
        let mut child = cmd
            .args(extra)
            .arg("--state-dir")
            .arg(state)
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
            admin,
            _state: None,
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
        self.status_kib("VmRSS:")
    }

    /// VmHWM (the peak resident set so far) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// SIGKILL, and wait until the process is gone.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    fn status_kib(&self, field: &str) -> u64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(field))
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
