//! One backend and what the gate knows of it: health, telemetry from `/system_stats`, what it
//! can run, and the upstream socket's state.
//!
//! Every state a backend can be in is left by the signal that proves it wrong, never only by
//! work the gate would have to send it first (a state that only dispatched work can clear, on a
//! backend that gets no work, is a deadlock):
//!
//! | state | entered on | left on |
//! |---|---|---|
//! | unknown | start | its first probe result |
//! | up | `health.healthy_threshold` good probes | `health.unhealthy_threshold` failed probes or refused connections |
//! | down | failed probes, refused connections | good probes |
//! | busy (up) | a probe that timed out while its upstream socket was open and alive (a frame within `health.socket_silence_ms`, or a prompt running there) | a probe that answers in time |
//! | stalled | a prompt reporting progress fell silent past `stall_timeout`, its `/queue` could not vouch for a silent prompt, or a `max_run_time` interrupt did not stop one | any event of a prompt's progress from it, or a probe that finds its `/queue` idle |
//! | draining | `POST /admin/backends/{name}/drain` | `…/undrain` |
//! | retiring | a reload whose file no longer names it | a reload naming it again, or `gone` |
//! | gone | retiring and holding no prompt (its loops end) | never (a reload naming it again adds it anew) |
//!
//! Busy is not dead: ComfyUI sends no event while a node without a progress bar runs, and a heavy
//! prompt can make it slow to answer `/system_stats`. A slow probe over an open socket says the
//! process is alive and working; only an answer that never comes over a closed socket, or a
//! refused connection, says it is gone.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::capabilities::Capabilities;
use crate::config::{Backend, HealthConfig};

/// What the last good probe read.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    /// Bytes.
    pub vram_total: u64,
    /// Bytes, ComfyUI's `vram_free + torch_vram_free`.
    pub vram_free: u64,
    /// The device's name as ComfyUI reports it (`devices[0].name`, e.g.
    /// `cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync`), for the audit log.
    pub device: Option<String>,
    pub read_at: Option<Instant>,
}

impl Telemetry {
    /// From a ComfyUI `/system_stats` answer (`devices[0]`); `None` without a device.
    pub fn from_system_stats(stats: &Value) -> Option<Self> {
        let dev = stats.get("devices")?.get(0)?;
        Some(Self {
            vram_total: dev.get("vram_total")?.as_u64()?,
            vram_free: dev.get("vram_free")?.as_u64().unwrap_or(0)
                + dev
                    .get("torch_vram_free")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            device: dev.get("name").and_then(Value::as_str).map(str::to_string),
            read_at: Some(Instant::now()),
        })
    }
}

/// Health as the probes see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet: gets no work.
    Unknown,
    Up,
    Down,
}

impl Health {
    /// `unknown`, `up`, `down`: the admin API's words.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

#[derive(Debug)]
struct HealthCounter {
    state: Health,
    ok_streak: u32,
    fail_streak: u32,
}

/// One backend.
pub struct BackendState {
    /// Its position in the fleet (runtime only: names key everything that outlives a process).
    pub index: usize,
    pub config: Backend,
    /// The clientId the gate uses on this backend's `/ws` and in every prompt it sends there.
    pub upstream_client_id: String,
    health: Mutex<HealthCounter>,
    pub telemetry: ArcSwap<Telemetry>,
    pub ws_connected: AtomicBool,
    /// When the upstream socket last delivered a frame.
    last_frame: Mutex<Option<Instant>>,
    /// Prompts this backend completed (any outcome), for tests and the admin API.
    pub completed: AtomicU64,
    /// Set by the admin API: no new prompts; running ones finish.
    pub draining: AtomicBool,
    /// Stuck (see the module table): no new work until it shows life.
    pub stalled: AtomicBool,
    /// The last probe timed out while the upstream socket was open.
    pub busy: AtomicBool,
    /// A prompt of the gate's has started here and not ended (kept by the scheduler): while it
    /// runs, silence is the stall check's to judge, not the probe's or the socket's.
    pub runs_prompt: AtomicBool,
    /// Successful probes so far (capabilities are re-read every
    /// [`super::probe::CAPABILITIES_EVERY`]th).
    pub probes: AtomicU64,
    /// What it can run (`None` until read from its `/object_info`).
    pub capabilities: ArcSwapOption<Capabilities>,
    /// Removed from the configuration by a reload: no new work, in no listing; what it runs
    /// finishes (see [`super::Fleet::retire`]).
    pub retired: AtomicBool,
    /// Ends this backend's probe and socket loops: the gate's stop, or the end of a retirement
    /// (a backend named again after that gets a fresh one, [`super::Fleet::reinstate`]).
    stop: Mutex<CancellationToken>,
    /// Prompts it holds at once (`max_inflight`; a reload may change it).
    max_inflight: AtomicUsize,
}

impl BackendState {
    /// `upstream_client_id` must be stable across gate restarts (prompts still running on the
    /// backend keep sending their events to it): it is made from the gate's id and the
    /// backend's configured name, never its position.
    pub fn new(index: usize, config: Backend, gate_id: &str, stop: CancellationToken) -> Self {
        let upstream_client_id = format!("comfy-gate-{gate_id}-{}", config.name);
        Self {
            max_inflight: AtomicUsize::new(config.max_inflight),
            retired: AtomicBool::new(false),
            stop: Mutex::new(stop),
            index,
            config,
            upstream_client_id,
            health: Mutex::new(HealthCounter {
                state: Health::Unknown,
                ok_streak: 0,
                fail_streak: 0,
            }),
            telemetry: ArcSwap::from_pointee(Telemetry::default()),
            ws_connected: AtomicBool::new(false),
            last_frame: Mutex::new(None),
            completed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            runs_prompt: AtomicBool::new(false),
            probes: AtomicU64::new(0),
            capabilities: ArcSwapOption::empty(),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the dispatcher may give it new work.
    pub fn accepts_work(&self) -> bool {
        self.is_up()
            && self.is_listed()
            && !self.draining.load(Ordering::SeqCst)
            && !self.is_stalled()
    }

    /// In the configuration in force (not retired by a reload).
    pub fn is_listed(&self) -> bool {
        !self.retired.load(Ordering::SeqCst)
    }

    /// Retired and holding nothing: its loops have ended.
    pub fn is_gone(&self) -> bool {
        self.retired.load(Ordering::SeqCst) && self.stop_token().is_cancelled()
    }

    /// The token that ends its probe and socket loops (see [`BackendState::stop`]).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A gone backend named again: new loops under `stop`, health unknown until probed, its
    /// capabilities read again.
    pub(super) fn revive(&self, stop: CancellationToken) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = stop;
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = HealthCounter {
            state: Health::Unknown,
            ok_streak: 0,
            fail_streak: 0,
        };
        self.ws_connected.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        self.busy.store(false, Ordering::SeqCst);
        self.capabilities.store(None);
    }

    /// Prompts it may hold at once.
    pub fn max_inflight(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }

    /// A reload's new `max_inflight`.
    pub fn set_max_inflight(&self, n: usize) {
        self.max_inflight.store(n, Ordering::SeqCst);
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).state
    }

    pub fn is_up(&self) -> bool {
        self.health() == Health::Up
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// One word for the admin API: `stalled`, `draining`, `busy`, else the health.
    pub fn state_word(&self) -> &'static str {
        if self.is_gone() {
            "gone"
        } else if !self.is_listed() {
            "retiring"
        } else if self.is_stalled() {
            "stalled"
        } else if self.draining.load(Ordering::SeqCst) {
            "draining"
        } else if self.health() == Health::Up && self.busy.load(Ordering::SeqCst) {
            "busy"
        } else {
            self.health().as_str()
        }
    }

    /// Records a probe or request result; returns the new state if it flipped. A backend of
    /// unknown health flips on its first result.
    pub fn record(&self, ok: bool, cfg: &HealthConfig) -> Option<Health> {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            h.ok_streak += 1;
            h.fail_streak = 0;
        } else {
            h.fail_streak += 1;
            h.ok_streak = 0;
        }
        let next = match h.state {
            Health::Unknown => Some(if ok { Health::Up } else { Health::Down }),
            Health::Up if h.fail_streak >= cfg.unhealthy_threshold => Some(Health::Down),
            Health::Down if h.ok_streak >= cfg.healthy_threshold => Some(Health::Up),
            _ => None,
        };
        if let Some(n) = next {
            h.state = n;
        }
        next
    }

    /// The upstream socket delivered a frame now.
    pub fn saw_frame(&self) {
        *self.last_frame.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Whether a slow answer may be excused as busy: the upstream socket is open and either it
    /// delivered a frame within `silence` (pongs to the gate's pings count) or a prompt runs
    /// here (then the stall check, which asks the backend's own `/queue`, judges).
    pub fn alive_but_slow(&self, silence: Duration) -> bool {
        self.ws_connected.load(Ordering::SeqCst)
            && (self.since_last_frame().is_some_and(|s| s <= silence)
                || self.runs_prompt.load(Ordering::SeqCst))
    }

    /// Time since the upstream socket last delivered a frame (`None`: never).
    pub fn since_last_frame(&self) -> Option<Duration> {
        self.last_frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed())
    }

    /// Free VRAM in bytes from `/system_stats` if the reading is younger than `stale_after`.
    pub fn fresh_vram_free(&self, stale_after: Duration) -> Option<u64> {
        let t = self.telemetry.load();
        match t.read_at {
            Some(at) if at.elapsed() <= stale_after => Some(t.vram_free),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> BackendState {
        BackendState::new(
            0,
            Backend {
                line: 0,
                name: "b".into(),
                base: "http://127.0.0.1:1".into(),
                authority: "127.0.0.1:1".into(),
                max_inflight: 2,
                gpu: None,
            },
            "test",
            CancellationToken::new(),
        )
    }

    #[test]
    fn health_flips_after_consecutive_results() {
        let cfg = HealthConfig {
            unhealthy_threshold: 2,
            healthy_threshold: 3,
            ..Default::default()
        };
        let b = backend();
        assert_eq!(b.record(true, &cfg), Some(Health::Up));
        assert_eq!(b.record(false, &cfg), None);
        assert_eq!(b.record(true, &cfg), None);
        assert_eq!(b.record(false, &cfg), None);
        assert_eq!(b.record(false, &cfg), Some(Health::Down));
        assert_eq!(b.record(true, &cfg), None);
        assert_eq!(b.record(true, &cfg), None);
        assert_eq!(b.record(true, &cfg), Some(Health::Up));
    }

    #[test]
    fn the_upstream_client_id_follows_the_name() {
        let b = backend();
        assert_eq!(b.upstream_client_id, "comfy-gate-test-b");
        assert_eq!(b.state_word(), "unknown");
        b.stalled.store(true, Ordering::SeqCst);
        assert_eq!(b.state_word(), "stalled");
        assert!(!b.accepts_work());
    }
}
