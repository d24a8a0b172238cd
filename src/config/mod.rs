//! `proxy.toml`: the gate's configuration, its defaults and its validation.
//!
//! Every field documents its default and unit. A config error names the file, the line and the
//! field, so an operator never has to guess which of forty lines is wrong. Parsing and
//! validation happen before anything starts; a config that fails them starts nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod gpu;
mod policy;

pub use gpu::GpuSelector;
pub use policy::PlacementPolicy;

/// The whole file.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub recovery: RecoveryConfig,
    #[serde(default)]
    pub placement: PlacementConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// `[server]`: the client-facing listener and its limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client-facing address. Default `127.0.0.1:8188` (ComfyUI's own default).
    pub listen: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`). Default `127.0.0.1:8189`.
    pub admin_listen: SocketAddr,
    /// Largest request body in bytes; more gets 413. Default 104857600 (100 MiB, as ComfyUI).
    pub max_body_bytes: u64,
    /// Time a client has to send a complete request head, in ms. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Origins allowed besides the gate's own (e.g. `https://studio.example.com`). Default none.
    pub allowed_origins: Vec<String>,
    /// Timeout of one request to a backend, in ms (file transfers and long reads). Default 60000.
    pub upstream_timeout_ms: u64,
    /// Where the durable state (queue, owners, history, uploads) lives; `--state-dir` overrides
    /// it. Default: `$STATE_DIRECTORY` (set by systemd) if set, else `./comfy-gate-state`.
    pub state_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8188)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8189)),
            max_body_bytes: 100 << 20,
            header_read_timeout_ms: 10_000,
            allowed_origins: Vec::new(),
            upstream_timeout_ms: 60_000,
            state_dir: None,
        }
    }
}

/// `[scheduler]`: the gate queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Prompts a backend holds at once (one running, one ready). Default 2.
    pub max_inflight: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_inflight: 2 }
    }
}

/// `[health]`: active probes of every backend's `/system_stats`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between probes of one backend, in ms. Default 2000.
    pub interval_ms: u64,
    /// A probe slower than this has timed out, in ms: a failure if the backend's upstream
    /// socket is closed, "busy" (no failure) while it is open. Default 1000.
    pub timeout_ms: u64,
    /// Consecutive failures (probes or connection errors) that mark a backend down. Default 2.
    pub unhealthy_threshold: u32,
    /// Consecutive successful probes that mark a down backend up. Default 2.
    pub healthy_threshold: u32,
    /// An upstream WebSocket that delivers nothing, not even a pong to the gate's pings (sent
    /// every third of this), for this long is dropped, and the backend's probe timeouts count
    /// as failures again, in ms. Default 15000.
    pub socket_silence_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 2000,
            timeout_ms: 1000,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            socket_silence_ms: 15_000,
        }
    }
}

/// `[telemetry]`: NVML readings for backends whose GPU is on the gate's own machine.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Read local GPUs through NVML (for backends with `gpu` set). Default true; without the
    /// library or a GPU the gate logs one line and uses `/system_stats` for every backend.
    pub nvml: bool,
    /// Path of the NVML library. Default: `libnvidia-ml.so.1` from the system's search path.
    pub nvml_library: Option<PathBuf>,
    /// Time between NVML samples, in ms. Default 500.
    pub interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            nvml: true,
            nvml_library: None,
            interval_ms: 500,
        }
    }
}

/// `[placement]`: which backend gets each prompt (design §3).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// `gpu_aware` (expected completion time, VRAM headroom, resident checkpoint),
    /// `least_inflight` or `round_robin` (baselines, as nginx does them). Default `gpu_aware`.
    pub policy: PlacementPolicy,
    /// How far past the head of the gate queue the dispatcher may look for a prompt whose
    /// checkpoint is already resident on the free backend. Default 8; 1 disables reordering.
    pub affinity_window: usize,
    /// A prompt passed over this many times for others' affinity (holds, or prompts that find
    /// their checkpoint resident) is taken next (aging). Default 8.
    pub max_skips: u32,
    /// A prompt that has waited this long (ms) is never passed over. Default 60000.
    pub max_wait_ms: u64,
    /// A VRAM reading older than this (ms) counts as no headroom. Default 10000.
    pub stale_after_ms: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            policy: PlacementPolicy::GpuAware,
            affinity_window: 8,
            max_skips: 8,
            max_wait_ms: 60_000,
            stale_after_ms: 10_000,
        }
    }
}

/// `[recovery]`: what happens to accepted prompts when things fail.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Times a prompt is re-run after its backend failed, before it is reported failed.
    /// Default 2.
    pub max_retries: u32,
    /// A running prompt with no event for this long marks its backend stalled (its prompts
    /// move elsewhere), in ms. Default 120000.
    pub stall_timeout_ms: u64,
    /// A prompt running longer than this is interrupted on its backend, in seconds. Default 1800.
    pub max_run_time_s: u64,
    /// What a prompt past `max_run_time_s` becomes: `fail` (reported failed) or `retry`
    /// (run again elsewhere, counted against `max_retries`). Default `fail`.
    pub max_run_time_action: RunTimeAction,
    /// On SIGTERM/SIGINT, time given to in-flight requests before the gate exits, in ms.
    /// Default 10000.
    pub drain_timeout_ms: u64,
    /// A waiting prompt that no backend that is up can run (every backend with its node classes
    /// and model files is down) ends with `execution_error` once that has lasted this long, in
    /// ms. Default 300000.
    pub unplaceable_timeout_ms: u64,
    /// Finished history entries kept (oldest dropped first). Default 10000.
    pub history_max_entries: usize,
    /// Finished history entries older than this are dropped, in hours. Default 168 (7 days).
    pub history_max_age_hours: u64,
}

/// See [`RecoveryConfig::max_run_time_action`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunTimeAction {
    Fail,
    Retry,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            stall_timeout_ms: 120_000,
            max_run_time_s: 1800,
            max_run_time_action: RunTimeAction::Fail,
            drain_timeout_ms: 10_000,
            unplaceable_timeout_ms: 300_000,
            history_max_entries: 10_000,
            history_max_age_hours: 168,
        }
    }
}

/// One `[[backend]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL of the ComfyUI instance, `http://host:port`. Required.
    pub url: Spanned<String>,
    /// Name in logs and the admin API. Default: `host:port` of the URL.
    #[serde(default)]
    pub name: Option<String>,
    /// Overrides `scheduler.max_inflight` for this backend. Default: the scheduler's value.
    #[serde(default)]
    pub max_inflight: Option<usize>,
    /// Holds user data (`/userdata`, `/settings`, `/users`). Default: the first backend.
    #[serde(default)]
    pub home: bool,
    /// The backend's GPU when it is on this machine: an NVML UUID (`GPU-…`, preferred: stable)
    /// or an NVML index. Default: none (telemetry from `/system_stats`).
    #[serde(default)]
    pub gpu: Option<String>,
}

/// A validated configuration, ready to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub scheduler: SchedulerConfig,
    pub health: HealthConfig,
    pub recovery: RecoveryConfig,
    pub placement: PlacementConfig,
    pub telemetry: TelemetryConfig,
    pub backends: Vec<Backend>,
    /// Index into `backends` of the user-data home.
    pub home: usize,
}

/// One validated backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub name: String,
    /// `http://host:port`, no trailing slash.
    pub base: String,
    /// `host:port`, for connecting and the `Host` header.
    pub authority: String,
    pub max_inflight: usize,
    /// Its local GPU, for NVML.
    pub gpu: Option<GpuSelector>,
}

impl Config {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_read_timeout_ms)
    }
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.server.upstream_timeout_ms)
    }
    /// The state directory, defaulted (see [`ServerConfig::state_dir`]).
    pub fn state_dir(&self) -> PathBuf {
        self.server.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("comfy-gate-state"))
        })
    }
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.recovery.stall_timeout_ms)
    }
    pub fn max_run_time(&self) -> Duration {
        Duration::from_secs(self.recovery.max_run_time_s)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.recovery.drain_timeout_ms)
    }
}

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// Parses a backend URL into `(base, authority)`.
pub fn parse_backend_url(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(format!("scheme `{other}` is not supported (use http://)")),
        None => return Err(format!("`{url}` has no scheme (expected http://host:port)")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .to_string();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "`{url}` has a path; backends are addressed at their root"
        ));
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority
    } else {
        format!("{authority}:80")
    };
    Ok((format!("http://{authority}"), authority))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses and validates `text` read from `file`.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw: FileConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let message = e.message().to_string();
        // A bad value (an unknown enum name, a wrong type) is reported at its key's line.
        let key_on_line = e.span().and_then(|s| {
            let start = text[..s.start.min(text.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1);
            text[start..]
                .split('=')
                .next()
                .map(|k| k.trim().to_string())
        });
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .map(str::to_string)
            .or(key_on_line.filter(|k| !k.is_empty() && !k.starts_with('[')))
            .unwrap_or_else(|| "(syntax)".to_string());
        ConfigError {
            file: file.to_string(),
            line,
            field,
            message,
        }
    })?;
    validate(raw, text, file)
}

/// Validates a parsed file (or one built from the command line, with an empty `text`).
pub fn validate(raw: FileConfig, text: &str, file: &str) -> Result<Config, ConfigError> {
    let err = |span: Option<std::ops::Range<usize>>, field: &str, message: String| ConfigError {
        file: file.to_string(),
        line: span.map(|s| line_of(text, s.start)).unwrap_or(0),
        field: field.to_string(),
        message,
    };
    if raw.scheduler.max_inflight == 0 {
        return Err(err(
            None,
            "scheduler.max_inflight",
            "must be at least 1".into(),
        ));
    }
    if raw.health.unhealthy_threshold == 0 || raw.health.healthy_threshold == 0 {
        return Err(err(None, "health", "thresholds must be at least 1".into()));
    }
    if raw.health.interval_ms == 0 || raw.health.timeout_ms == 0 {
        return Err(err(
            None,
            "health",
            "interval_ms and timeout_ms must be positive".into(),
        ));
    }
    if raw.health.socket_silence_ms < 3 {
        return Err(err(
            None,
            "health.socket_silence_ms",
            "must be at least 3 (the gate pings three times in it)".into(),
        ));
    }
    if raw.recovery.stall_timeout_ms == 0 || raw.recovery.max_run_time_s == 0 {
        return Err(err(
            None,
            "recovery",
            "stall_timeout_ms and max_run_time_s must be positive".into(),
        ));
    }
    if raw.placement.affinity_window == 0 {
        return Err(err(
            None,
            "placement.affinity_window",
            "must be at least 1".into(),
        ));
    }
    if raw.server.max_body_bytes == 0 {
        return Err(err(
            None,
            "server.max_body_bytes",
            "must be positive".into(),
        ));
    }
    let mut backends: Vec<Backend> = Vec::new();
    let mut home = None;
    for (i, b) in raw.backends.iter().enumerate() {
        let field = format!("backend[{i}].url");
        let (base, authority) = parse_backend_url(b.url.get_ref().trim())
            .map_err(|m| err(Some(b.url.span()), &field, m))?;
        if backends.iter().any(|x| x.base == base) {
            return Err(err(
                Some(b.url.span()),
                &field,
                format!("`{base}` is listed twice"),
            ));
        }
        if b.max_inflight == Some(0) {
            return Err(err(
                Some(b.url.span()),
                &format!("backend[{i}].max_inflight"),
                "must be at least 1".into(),
            ));
        }
        if b.home {
            if home.is_some() {
                return Err(err(
                    Some(b.url.span()),
                    &format!("backend[{i}].home"),
                    "only one backend can be home".into(),
                ));
            }
            home = Some(i);
        }
        let gpu = match &b.gpu {
            Some(g) => Some(
                GpuSelector::parse(g)
                    .map_err(|m| err(Some(b.url.span()), &format!("backend[{i}].gpu"), m))?,
            ),
            None => None,
        };
        backends.push(Backend {
            name: b.name.clone().unwrap_or_else(|| authority.clone()),
            base,
            authority,
            max_inflight: b.max_inflight.unwrap_or(raw.scheduler.max_inflight),
            gpu,
        });
    }
    if backends.is_empty() {
        return Err(err(
            None,
            "backend",
            "at least one [[backend]] (or --backend URL) is required".into(),
        ));
    }
    Ok(Config {
        server: raw.server,
        scheduler: raw.scheduler,
        health: raw.health,
        recovery: raw.recovery,
        placement: raw.placement,
        telemetry: raw.telemetry,
        backends,
        home: home.unwrap_or(0),
    })
}

/// Reads and validates a file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        field: "(file)".into(),
        message: e.to_string(),
    })?;
    parse(&text, &file)
}

/// Builds a backend entry from a command-line `--backend URL`.
pub fn backend_from_url(url: &str) -> BackendConfig {
    BackendConfig {
        url: Spanned::new(0..0, url.to_string()),
        name: None,
        max_inflight: None,
        home: false,
        gpu: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_minimal_file() {
        let c = parse("[[backend]]\nurl = \"http://127.0.0.1:8191\"\n", "p.toml").unwrap();
        assert_eq!(c.server.listen.port(), 8188);
        assert_eq!(c.scheduler.max_inflight, 2);
        assert_eq!(c.backends[0].base, "http://127.0.0.1:8191");
        assert_eq!(c.backends[0].max_inflight, 2);
        assert_eq!(c.home, 0);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[backend]]\nurl = \"ftp://x:1\"\n";
        let e = parse(text, "proxy.toml").unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.field.as_str()),
            ("proxy.toml", 5, "backend[0].url")
        );
        assert!(e.to_string().starts_with("proxy.toml:5: backend[0].url: "));

        let e = parse("[server]\nlisten = 5\n", "p.toml").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse("[server]\nlistne = \"x\"\n", "p.toml").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("listne"), "{e}");
        let e = parse("", "p.toml").unwrap_err();
        assert_eq!(e.field, "backend");
    }

    #[test]
    fn duplicate_backends_are_refused() {
        let text = "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"http://a:1/\"\n";
        let e = parse(text, "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (4, "backend[1].url"));
    }
}
