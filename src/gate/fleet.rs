//! The backends and what the gate knows of each: health (flipped only after N consecutive
//! results, separately for up and down), telemetry from `/system_stats`, slots in use, the
//! prompt now executing, and the upstream socket's state.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::config::{Backend, HealthConfig};

/// What the last good probe read.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    pub vram_total: u64,
    pub vram_free: u64,
    pub read_at: Option<Instant>,
}

impl Telemetry {
    pub fn from_system_stats(stats: &Value) -> Option<Self> {
        let dev = stats.get("devices")?.get(0)?;
        Some(Self {
            vram_total: dev.get("vram_total")?.as_u64()?,
            vram_free: dev.get("vram_free")?.as_u64().unwrap_or(0)
                + dev
                    .get("torch_vram_free")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            read_at: Some(Instant::now()),
        })
    }
}

/// Health as the gate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet: gets no work.
    Unknown,
    Up,
    Down,
}

#[derive(Debug)]
struct HealthCounter {
    state: Health,
    ok_streak: u32,
    fail_streak: u32,
}

/// One backend.
pub struct BackendState {
    pub id: usize,
    pub config: Backend,
    /// The clientId the gate uses on this backend's `/ws` and in every prompt it sends there.
    pub upstream_client_id: String,
    health: Mutex<HealthCounter>,
    pub telemetry: ArcSwap<Telemetry>,
    /// Prompts sent here and not finished (slots in use).
    pub inflight: AtomicUsize,
    /// The prompt between `execution_start` and `executing {node: null}` here.
    pub running: Mutex<Option<String>>,
    /// `queue_remaining` from this backend's last `status` message.
    pub queue_remaining: AtomicUsize,
    pub ws_connected: AtomicBool,
    /// Prompts this backend completed (any outcome), for tests and the admin API.
    pub completed: AtomicU64,
    /// Set by the admin API: no new prompts; running ones finish.
    pub draining: AtomicBool,
    /// A running prompt made no progress for `stall_timeout`: no work until it shows an event.
    pub stalled: AtomicBool,
    /// Successful probes so far (capabilities are re-read every 30th).
    pub probes: AtomicU64,
    /// What it can run (`None` until read from its `/object_info`).
    pub capabilities: arc_swap::ArcSwapOption<super::capabilities::Capabilities>,
}

impl BackendState {
    /// `upstream_client_id` must be stable across gate restarts (prompts still running on the
    /// backend keep sending their events to it).
    pub fn new(id: usize, config: Backend, upstream_client_id: String) -> Self {
        Self {
            id,
            config,
            upstream_client_id,
            health: Mutex::new(HealthCounter {
                state: Health::Unknown,
                ok_streak: 0,
                fail_streak: 0,
            }),
            telemetry: ArcSwap::from_pointee(Telemetry::default()),
            inflight: AtomicUsize::new(0),
            running: Mutex::new(None),
            queue_remaining: AtomicUsize::new(0),
            ws_connected: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            probes: AtomicU64::new(0),
            capabilities: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Marks the backend down now (a stall or a hang seen by the gate, not by probes); it comes
    /// back after `healthy_threshold` good probes.
    pub fn force_down(&self) -> bool {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let flipped = h.state != Health::Down;
        h.state = Health::Down;
        h.ok_streak = 0;
        flipped
    }

    /// Whether the dispatcher may give it new work.
    pub fn accepts_work(&self) -> bool {
        self.is_up()
            && !self.draining.load(Ordering::SeqCst)
            && !self.stalled.load(Ordering::SeqCst)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).state
    }

    pub fn is_up(&self) -> bool {
        self.health() == Health::Up
    }

    pub fn free_slots(&self) -> usize {
        self.config
            .max_inflight
            .saturating_sub(self.inflight.load(Ordering::SeqCst))
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

    /// Releases one slot (never below zero).
    pub fn release_slot(&self) {
        let _ = self
            .inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Free VRAM in bytes if the reading is younger than `stale_after`.
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
                name: "b".into(),
                base: "http://127.0.0.1:1".into(),
                authority: "127.0.0.1:1".into(),
                max_inflight: 2,
                gpu: None,
            },
            "gate-test-0".into(),
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
    fn slots_never_go_negative() {
        let b = backend();
        b.release_slot();
        assert_eq!(b.free_slots(), 2);
        b.inflight.fetch_add(2, Ordering::SeqCst);
        assert_eq!(b.free_slots(), 0);
    }
}
