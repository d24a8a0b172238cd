//! Shared helpers for integration tests: start comfy-sim instances on port 0 and drive them with
//! real HTTP (reqwest) and WebSocket (tokio-tungstenite) clients.
#![allow(dead_code)]

pub mod browser;
pub mod fake_nvml;
pub mod files;
pub mod metric_names;
pub mod tools;

use std::time::Duration;

use comfy_sim::{SimBackend, SimConfig, SimHandle};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one event before failing (never a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A sim at test speed (1/100 of real durations).
pub async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

pub async fn sim_with(config: SimConfig) -> SimHandle {
    SimBackend::start(SimConfig {
        time_scale: 0.01,
        ..config
    })
    .await
    .expect("sim starts")
}

/// The URLs a `comfy-gate run` child prints on its first stdout line (the gate's, then the
/// admin listener's), read within `PATIENCE`.
pub async fn listening_urls(child: &mut tokio::process::Child) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let stdout = child.stdout.take().expect("stdout piped");
    let line = tokio::time::timeout(PATIENCE, BufReader::new(stdout).lines().next_line())
        .await
        .expect("the gate starts")
        .expect("stdout readable")
        .expect("a first line");
    let urls: Vec<String> = line
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|w| w.starts_with("http://"))
        .map(str::to_string)
        .collect();
    assert!(!urls.is_empty(), "no listening address in {line:?}");
    urls
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// Sends `req`; the status and the body (JSON when it parses, else the text as a string).
pub async fn send_for_json(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn post_json(base: &str, path: &str, body: &Value) -> (u16, Value) {
    send_for_json(http().post(format!("{base}{path}")).json(body)).await
}

pub async fn get_json(base: &str, path: &str) -> (u16, Value) {
    send_for_json(http().get(format!("{base}{path}"))).await
}

pub async fn get_bytes(base: &str, path: &str) -> (u16, Vec<u8>) {
    let resp = http()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap_or_default().to_vec())
}

/// ComfyUI's default txt2img workflow (script_examples), with a seed and checkpoint.
pub fn txt2img(seed: u64, ckpt: &str) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": seed, "steps": 20}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 512, "width": 512}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    })
}

pub const SDXL: &str = "sd_xl_base_1.0.safetensors";
pub const SD15: &str = "v1-5-pruned-emaonly-fp16.safetensors";

/// A model-free graph: EmptyImage → ImageBlur → SaveImage.
pub fn blur_graph(color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ComfyUI"}}
    })
}

/// A txt2img that samples `n` steps (about `n` × 0.4 ms at test speed for 512²).
pub fn steps(seed: u64, n: u64) -> Value {
    let mut g = txt2img(seed, SD15);
    g["3"]["inputs"]["steps"] = json!(n);
    g
}

/// Which sim holds `id` (running or pending) right now.
pub async fn holder<'a>(sims: &[&'a SimHandle], id: &str) -> Option<&'a SimHandle> {
    for s in sims {
        if let Ok(r) = http()
            .get(format!("{}/queue", s.url()))
            .timeout(Duration::from_millis(300))
            .send()
            .await
            && let Ok(q) = r.json::<Value>().await
            && q.to_string().contains(&format!("\"{id}\""))
        {
            return Some(s);
        }
    }
    None
}

/// One frame received on a WebSocket.
#[derive(Clone, Debug)]
pub enum Frame {
    Json(Value),
    Binary(Vec<u8>),
}

impl Frame {
    pub fn kind(&self) -> String {
        match self {
            Frame::Json(v) => v["type"].as_str().unwrap_or("?").to_string(),
            Frame::Binary(b) => format!("binary:{}", b.get(3).copied().unwrap_or(0)),
        }
    }
    pub fn data(&self) -> &Value {
        match self {
            Frame::Json(v) => &v["data"],
            Frame::Binary(_) => &Value::Null,
        }
    }
}

pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// Connects to `base` (http://…) `/ws`, optionally with `?clientId=`.
    pub async fn connect(base: &str, client_id: Option<&str>) -> Ws {
        let url = format!(
            "{}/ws{}",
            base.replacen("http", "ws", 1),
            client_id
                .map(|c| format!("?clientId={c}"))
                .unwrap_or_default()
        );
        // ComfyUI's clients (browsers, Python's websocket-client) take messages of any size;
        // tungstenite's defaults would refuse frames over 16 MiB.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (stream, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
            .await
            .expect("ws connects");
        Ws { stream }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.stream
            .send(Message::text(v.to_string()))
            .await
            .expect("ws send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        let _ = self.stream.send(m).await;
    }

    /// The next frame, or `None` when the socket closes (panics after PATIENCE).
    pub async fn next(&mut self) -> Option<Frame> {
        self.next_within(PATIENCE)
            .await
            .expect("a frame within patience")
    }

    /// `Err(())` on timeout, `Ok(None)` when closed.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<Frame>, ()> {
        loop {
            let msg = tokio::time::timeout(wait, self.stream.next())
                .await
                .map_err(|_| ())?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Ok(Some(Frame::Json(
                        serde_json::from_str(&t).expect("json frame"),
                    )));
                }
                Some(Ok(Message::Binary(b))) => return Ok(Some(Frame::Binary(b.to_vec()))),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Frames until (and including) `executing {node: null, prompt_id}`.
    pub async fn until_done(&mut self, prompt_id: &str) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let f = self
                .next()
                .await
                .expect("socket open until the prompt is done");
            let done = f.kind() == "executing"
                && f.data()["node"].is_null()
                && f.data()["prompt_id"] == prompt_id;
            frames.push(f);
            if done {
                return frames;
            }
        }
    }

    /// Frames until one of type `kind` arrives (returned last).
    pub async fn until_kind(&mut self, kind: &str) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let f = self.next().await.expect("socket open");
            let hit = f.kind() == kind;
            frames.push(f);
            if hit {
                return frames;
            }
        }
    }
}

/// Polls `/history/{id}` until it is non-empty.
pub async fn wait_history(base: &str, prompt_id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, h) = get_json(base, &format!("/history/{prompt_id}")).await;
        if h.get(prompt_id).is_some() {
            return h[prompt_id].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history for {prompt_id} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small PNG for uploads.
pub fn png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    comfy_wire::files::images::Image::synthesize(width, height, seed).to_png(&[], true)
}

/// Starts a gate in front of `sims` on port 0 (admin on port 0), probing every 100 ms, with a
/// fresh state directory; `tweak` adjusts the configuration first.
pub async fn gate_with(
    sims: &[&SimHandle],
    tweak: impl FnOnce(&mut comfy_gate::config::FileConfig),
) -> comfy_gate::GateHandle {
    use comfy_gate::config;
    let mut file = config::FileConfig::default();
    file.server.listen = "127.0.0.1:0".parse().unwrap();
    file.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    file.server.state_dir = Some(fresh_state_dir());
    file.health.interval_ms = 100;
    file.health.timeout_ms = 500;
    file.backends = sims
        .iter()
        .map(|s| config::backend_from_url(&s.url()))
        .collect();
    tweak(&mut file);
    let cfg = config::validate(file, "", "(test)").expect("valid test config");
    comfy_gate::run(cfg).await.expect("gate starts")
}

/// A fresh state directory for one gate, under this test process's own folder
/// (`$TMPDIR/comfy-gate-tests/PID/`). Gates in tests are dropped more often than shut down, so
/// nothing removes one directory at a time: instead the first call in a process removes the
/// folders of test processes that have ended (on Linux, where `/proc` says which are alive).
pub fn fresh_state_dir() -> std::path::PathBuf {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let parent = std::env::temp_dir().join("comfy-gate-tests");
        #[cfg(target_os = "linux")]
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.flatten() {
                let alive = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
                if !alive {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        parent.join(std::process::id().to_string())
    });
    root.join(uuid::Uuid::new_v4().simple().to_string())
}

/// `BIN run --config CONFIG` (`BIN`: the test's `env!("CARGO_BIN_EXE_comfy-gate")`) as the
/// tests start the real binary: warnings only on stderr, stdout piped (for
/// [`listening_urls`]), killed when dropped. Add any `.env(…)`, then `.spawn()`.
pub fn gate_binary(bin: &str, config: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Sends signal `name` (`HUP`, `TERM`, `USR1` …) to a running child, as `kill -NAME PID`.
pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

/// A gate started in-process from the file at `path`, which its reloads read again (as the
/// binary's `--config`).
pub async fn gate_from_file(path: &std::path::Path) -> comfy_gate::GateHandle {
    let source = comfy_gate::config::Source::file(path);
    let gate = comfy_gate::run(source.read().expect("valid config"))
        .await
        .expect("gate starts");
    gate.reloader().set_source(source);
    gate
}

pub async fn gate(sims: &[&SimHandle]) -> comfy_gate::GateHandle {
    gate_with(sims, |_| {}).await
}

/// A reqwest client whose connections come from another loopback address (another "user").
pub fn http_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .local_address(std::net::IpAddr::from(ip))
        .build()
        .expect("client")
}

/// Whether the PNG's embedded prompt has this KSampler seed (tells prompts' images apart).
pub fn png_seed(png: &[u8]) -> Option<u64> {
    let chunks = comfy_wire::files::images::png_text_chunks(png);
    let prompt = &chunks.iter().find(|(k, _)| k == "prompt")?.1;
    let v: Value = serde_json::from_str(prompt).ok()?;
    v.as_object()?
        .values()
        .find(|n| n["class_type"] == "KSampler")
        .and_then(|n| n["inputs"]["seed"].as_u64())
}

/// The prompt ids a `GET /queue` answer lists, running first, then pending.
pub fn queue_ids(q: &Value) -> Vec<String> {
    ["queue_running", "queue_pending"]
        .iter()
        .filter_map(|k| q[*k].as_array())
        .flatten()
        .filter_map(|i| i[1].as_str().map(str::to_string))
        .collect()
}

/// The prompt ids `base`'s `/queue` lists, running first, then pending.
pub async fn queued(base: &str) -> Vec<String> {
    queue_ids(&get_json(base, "/queue").await.1)
}

/// The hex SHA-256 of `token`, as `[[users]] token_sha256` takes it.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `[auth] mode = "token"` with one user per `(name, extra lines)`, each with the token
/// `tok-NAME`, then `more` (e.g. a `[limits]` section), applied to `f`.
pub fn with_users(f: &mut comfy_gate::config::FileConfig, users: &[(&str, &str)], more: &str) {
    let mut text = String::from("[auth]\nmode = \"token\"\n");
    for (name, extra) in users {
        let digest = token_sha256(&format!("tok-{name}"));
        text += &format!("[[users]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\n{extra}\n");
    }
    text += more;
    let parsed: comfy_gate::config::FileConfig = toml::from_str(&text).expect("test toml");
    f.auth = parsed.auth;
    f.users = parsed.users;
    f.limits = parsed.limits;
    if !parsed.scheduler.bands.is_empty() {
        f.scheduler.bands = parsed.scheduler.bands;
    }
}

/// `GET base path` with user `name`'s bearer token; the status and body.
pub async fn get_as(name: &str, base: &str, path: &str) -> (u16, Value) {
    send_for_json(
        http()
            .get(format!("{base}{path}"))
            .bearer_auth(format!("tok-{name}")),
    )
    .await
}

/// `POST base path` of `body` with user `name`'s bearer token; the status and body.
pub async fn post_as(name: &str, base: &str, path: &str, body: &Value) -> (u16, Value) {
    send_for_json(
        http()
            .post(format!("{base}{path}"))
            .bearer_auth(format!("tok-{name}"))
            .json(body),
    )
    .await
}

/// User `name`'s history entry for `id`, once there (polls `/history/{id}` with its token).
pub async fn history_as(name: &str, base: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(entry) = get_as(name, base, &format!("/history/{id}"))
            .await
            .1
            .get(id)
        {
            return entry.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history for {id} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `base`'s `/queue` (a gate's or a backend's) lists `id` as running.
pub async fn until_running(base: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, q) = get_json(base, "/queue").await;
        let running = q["queue_running"].as_array().cloned().unwrap_or_default();
        if running.iter().any(|i| i[1] == id) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The prompt ids of an admin listener's `/admin/decisions`, oldest first.
pub async fn decided(admin: &str) -> Vec<String> {
    let (_, d) = get_json(admin, "/admin/decisions").await;
    d["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter_map(|d| d["prompt_id"].as_str().map(str::to_string))
        .collect()
}
