//! `proxy.toml`: the gate's configuration, its defaults and its validation.
//!
//! Every field documents its default and unit. A config error names the file, the line and the
//! field, so an operator never has to guess which of forty lines is wrong. Parsing and
//! validation happen before anything starts; a config that fails them starts nothing.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod access_log;
mod cache;
mod edge;
mod gpu;
mod live;
mod load;
mod policy;
mod server;
mod source;
mod tenancy;
mod tls;

pub use access_log::{AccessLog, AccessLogFormat};
pub use cache::CacheConfig;
pub use edge::{Edge, EdgeConfig, RealIpHeader};
pub use gpu::GpuSelector;
pub use live::Live;
pub use load::{
    ConfigError, backend_from_url, load, parse, parse_backend_url, parse_file, validate,
};
pub use policy::PlacementPolicy;
pub use server::ServerConfig;
pub use source::Source;
pub use tenancy::{
    AuditConfig, Auth, AuthConfig, AuthMode, DEFAULT_ADMIN_PATHS, LimitOverrides, Limits,
    LimitsConfig, User, UserConfig, parse_sha256, valid_name,
};
pub use tls::{BackendCa, Tls, TlsConfig};

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
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub edge: EdgeConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// `[scheduler]`: the gate queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Prompts a backend holds at once (one running, one ready). Default 2.
    pub max_inflight: usize,
    /// Prompts the gate queue holds at once, all users together; beyond it `POST /prompt` is
    /// answered 503 with `Retry-After`. Default 100000; 0 = no cap.
    pub max_queued: usize,
    /// Priority bands, highest first: a waiting prompt of a higher band goes before any of a
    /// lower one, unless that one has waited `placement.max_wait_ms` (then it competes one band
    /// up, and so on). Users name theirs in `[[users]] priority`. Default
    /// `["interactive", "batch"]`.
    pub bands: Vec<Spanned<String>>,
    /// The band of anonymous clients and of users without `priority`. Default: the first.
    pub default_band: Option<Spanned<String>>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_inflight: 2,
            max_queued: 100_000,
            bands: Vec::new(),
            default_band: None,
        }
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
#[derive(Clone, Debug, Deserialize, PartialEq)]
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

/// `[metrics]`: what the gate records for operators (docs/monitoring.md). Both are read at
/// start (a reload that changes them says `restart_needed`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Count requests, prompts, node times, placements … for `GET /metrics` on the admin
    /// listener. Default true; false answers `/metrics` with 404 and records nothing.
    pub enabled: bool,
    /// Keep each prompt's timeline (`GET /admin/prompts/{id}/timeline`, the dashboard's
    /// waterfall), persisted with its history entry. Default true; at most 2,048 marks (about
    /// 100 bytes each) per prompt.
    pub timelines: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timelines: true,
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
    /// A prompt that has waited this long (ms) is never passed over, and competes one priority
    /// band higher for each such wait (`scheduler.bands`; 0: every prompt in the highest).
    /// Default 60000.
    pub max_wait_ms: u64,
    /// A VRAM reading older than this (ms) counts as no headroom. Default 10000.
    pub stale_after_ms: u64,
    /// How far a prompt's predicted VRAM need may exceed the largest GPU and still be tried
    /// there (the prediction is a heuristic; ComfyUI reports out of memory if it does not fit),
    /// as a factor of that GPU's total. Beyond it the prompt can never run: refused at submit
    /// when every backend is up, else ended after `recovery.unplaceable_timeout_ms`. Default 1.5
    /// (at least 1).
    pub vram_margin: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            policy: PlacementPolicy::GpuAware,
            affinity_window: 8,
            max_skips: 8,
            max_wait_ms: 60_000,
            stale_after_ms: 10_000,
            vram_margin: 1.5,
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
    /// A prompt whose dispatch or run coincided with this many backend failures, on different
    /// backends, is quarantined: ended with `execution_error` (`comfy_gate.Quarantined`), never
    /// sent again. Default 2; 0 never quarantines.
    pub quarantine_after: u32,
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
    /// Names shown for backends' output and temp files kept at most (each is freed with the
    /// history entry that lists it; this bounds those made for entries the gate only relays
    /// from a backend). Beyond it the oldest are forgotten. Default 200000 (about 40 MB).
    pub max_output_names: usize,
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
            quarantine_after: 2,
            stall_timeout_ms: 120_000,
            max_run_time_s: 1800,
            max_run_time_action: RunTimeAction::Fail,
            drain_timeout_ms: 10_000,
            unplaceable_timeout_ms: 300_000,
            history_max_entries: 10_000,
            history_max_age_hours: 168,
            max_output_names: 200_000,
        }
    }
}

/// One `[[backend]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL of the ComfyUI instance, `http://host:port` or `https://host:port` (the port
    /// defaults to 80 and 443). Over `https://` every request and the upstream WebSocket (`wss`)
    /// use TLS 1.2 or 1.3, verified against `[tls] backend_ca` for the URL's host. Required.
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
    pub metrics: MetricsConfig,
    pub cache: CacheConfig,
    pub edge: Edge,
    /// `[auth]`, `[[users]]`, `[limits]` and `scheduler.bands`, validated.
    pub auth: Auth,
    pub audit: AuditConfig,
    pub access_log: AccessLog,
    /// `[tls]`, validated: `None` is cleartext HTTP.
    pub tls: Option<Tls>,
    /// `[tls] backend_ca`, read: `None` trusts Mozilla's roots for `https://` backends.
    pub backend_ca: Option<BackendCa>,
    pub backends: Vec<Backend>,
    /// Runtime index of the user-data home: its position in `backends` at start; after a
    /// reload, its index in the fleet (see `reload`).
    pub home: usize,
}

/// One validated backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    /// The line of its `url` in the file (0 from the command line), for errors.
    pub line: usize,
    pub name: String,
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub base: String,
    /// `host:port`, for connecting and the `Host` header.
    pub authority: String,
    pub max_inflight: usize,
    /// Its local GPU, for NVML.
    pub gpu: Option<GpuSelector>,
}

impl Backend {
    /// Whether it is reached over TLS (an `https://` URL).
    pub fn uses_tls(&self) -> bool {
        self.base.starts_with("https://")
    }

    /// The host of its URL, without the port or an IPv6 address's brackets: the name its TLS
    /// certificate is verified for (and sent as SNI unless it is an address).
    pub fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(host, _port)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl Config {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_read_timeout_ms)
    }
    /// `server.body_read_timeout_ms`: the longest wait between two reads of a request body.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.body_read_timeout_ms)
    }
    /// The client listener's connection timeouts and caps (`[server]`), as the accept loop
    /// takes them.
    pub fn conn_limits(&self) -> comfy_wire::http::ConnLimits {
        let s = &self.server;
        comfy_wire::http::ConnLimits {
            header_read_timeout: self.header_read_timeout(),
            keepalive_timeout: Duration::from_millis(s.keepalive_timeout_ms),
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            max_header_bytes: s.max_header_bytes,
            max_uri_bytes: s.max_uri_bytes,
            send_timeout: Duration::from_millis(s.send_timeout_ms),
        }
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
        let text = "[[backend]]\nurl = \"http://a:1\"\nname = \"gpu\"\n[[backend]]\nurl = \"http://b:1\"\nname = \"gpu\"\n";
        let e = parse(text, "p.toml").unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (5, "backend[1].name"),
            "names key backends"
        );
    }

    #[test]
    fn a_bad_policy_names_its_line_and_key() {
        let text = "[placement]\npolicy = \"fastest\"\n[[backend]]\nurl = \"http://a:1\"\n";
        let e = parse(text, "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "policy"), "{e}");
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let text = "[edge]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\nreal_ip_header = \"Forwarded\"\n[[backend]]\nurl = \"http://a:1\"\n";
        let c = parse(text, "p.toml").unwrap();
        let shown: Vec<String> = c
            .edge
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(c.edge.real_ip_header, RealIpHeader::Forwarded);
        let default = parse("[[backend]]\nurl = \"http://a:1\"\n", "p.toml").unwrap();
        assert!(default.edge.trusted_proxies.is_empty());
        let text = "[edge]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]\n[[backend]]\nurl = \"http://a:1\"\n";
        let e = parse(text, "p.toml").unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (4, "edge.trusted_proxies[1]"),
            "{e}"
        );
    }
}
