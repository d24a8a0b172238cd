//! The fleet at one moment, as operators look at it: each backend's health, slots, what it
//! runs and the node it is on, its GPU readings; the gate queue by band and by user; sockets;
//! the alerts that would fire now. One shape for both readers: the `/metrics` gauges
//! ([`super::gauges`]) and the dashboard's live frames and replay ring ([`super::dashboard`]).

use serde::Serialize;
use std::sync::atomic::Ordering;

use crate::http::ConnectionStats;
use crate::protocol::now_ms;
use crate::sched::Scheduler;
use crate::sched::activity::{Activity, Running};

/// Where a backend's VRAM figures come from.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VramSource {
    /// NVML on this host (the backend's GPU is mapped by UUID).
    Nvml,
    /// The backend's own `/system_stats` (`devices[0].vram_total`, `vram_free`).
    SystemStats,
}

impl VramSource {
    pub fn as_str(self) -> &'static str {
        match self {
            VramSource::Nvml => "nvml",
            VramSource::SystemStats => "system_stats",
        }
    }
}

/// One backend at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    pub name: String,
    /// `up`, `down`, `unknown` (the probe's verdict).
    pub health: &'static str,
    /// `/admin/backends`' state word (`serving`, `draining`, `stalled`, `retiring` …).
    pub state: &'static str,
    pub up: bool,
    pub draining: bool,
    /// Prompts holding a slot / `max_inflight`.
    pub slots_used: usize,
    pub slots: usize,
    /// Bytes; `None` when no reading is known.
    pub vram_total: Option<u64>,
    pub vram_free: Option<u64>,
    pub vram_source: Option<VramSource>,
    /// NVML only: utilisation 0..=1, memory controller utilisation 0..=1, °C, watts.
    pub gpu_util: Option<f64>,
    pub mem_util: Option<f64>,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
    /// Each source's own `(total, free)` bytes, for `/metrics` (which exports both where both
    /// read: NVML counts PyTorch's cache as used, `/system_stats` as free).
    #[serde(skip)]
    pub by_source: Vec<(VramSource, u64, u64)>,
    /// The prompt it runs now.
    pub running: Option<Running>,
    /// Prompts it finished since the gate started.
    pub completed: u64,
}

/// An alert whose condition holds now (the same names as `deploy/prometheus/` rules, which
/// add their `for:` durations).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Alert {
    pub name: &'static str,
    pub severity: &'static str,
    pub summary: String,
}

/// The fleet and the gate queue at `at` (ms since the epoch).
#[derive(Clone, Debug, Serialize)]
pub struct FleetView {
    pub at: i64,
    pub backends: Vec<BackendView>,
    #[serde(flatten)]
    pub activity: Activity,
    /// Prompts waiting in the gate queue.
    pub queue_depth: usize,
    pub websocket_clients: usize,
    pub connections_open: usize,
    pub connections_accepted: u64,
    pub alerts: Vec<Alert>,
}

/// Users shown with their waiting prompts: the ones with the most (a flood of anonymous
/// clients would otherwise fill every frame of the replay ring).
pub const USERS_SHOWN: usize = 50;

/// Keeps the `n` entries of `map` with the most prompts waiting.
fn keep_largest(
    map: &mut std::collections::BTreeMap<String, crate::sched::activity::Waiting>,
    n: usize,
) {
    if map.len() <= n {
        return;
    }
    let mut counts: Vec<usize> = map.values().map(|w| w.prompts).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let floor = counts[n - 1];
    let mut room = counts.iter().take(n).filter(|c| **c == floor).count();
    map.retain(|_, w| {
        if w.prompts > floor {
            true
        } else if w.prompts == floor && room > 0 {
            room -= 1;
            true
        } else {
            false
        }
    });
}

/// A queue longer than this many times the fleet's slots is a backlog (the
/// `ComfyGateQueueBacklog` rule's bound).
pub const BACKLOG_PER_SLOT: usize = 2;
/// Free VRAM below this share of the total is no headroom (`ComfyGateGpuVramLow`).
pub const VRAM_HEADROOM_MIN: f64 = 0.05;
/// Utilisation at or above this, while prompts wait, is saturation (`ComfyGateGpuSaturated`).
pub const GPU_SATURATED: f64 = 0.95;

impl FleetView {
    /// The fleet now. Retired backends that are gone are left out.
    pub fn now(sched: &Scheduler, connections: &ConnectionStats) -> Self {
        let fleet = &sched.fleet;
        let mut activity = sched.activity();
        let slots = sched.slots_used();
        let backends = fleet
            .backends()
            .iter()
            .filter(|b| !b.is_gone())
            .map(|b| {
                let nvml = fleet.nvml_reading(b.index);
                let (total, free) = fleet.vram(b.index);
                let known = total > 0;
                BackendView {
                    name: b.name().to_string(),
                    health: b.health().as_str(),
                    state: b.state_word(),
                    up: b.is_up(),
                    draining: b.draining.load(Ordering::SeqCst),
                    slots_used: slots.get(b.index).copied().unwrap_or(0),
                    slots: b.max_inflight(),
                    vram_total: known.then_some(total),
                    vram_free: free.filter(|_| known),
                    vram_source: match (&nvml, known) {
                        (Some(_), _) => Some(VramSource::Nvml),
                        (None, true) => Some(VramSource::SystemStats),
                        (None, false) => None,
                    },
                    gpu_util: nvml
                        .as_ref()
                        .and_then(|r| r.gpu_util)
                        .map(|u| f64::from(u) / 100.0),
                    mem_util: nvml
                        .as_ref()
                        .and_then(|r| r.mem_util)
                        .map(|u| f64::from(u) / 100.0),
                    temperature_c: nvml.as_ref().and_then(|r| r.temperature_c).map(f64::from),
                    power_w: nvml
                        .as_ref()
                        .and_then(|r| r.power_mw)
                        .map(|p| f64::from(p) / 1000.0),
                    by_source: {
                        let stats = b.telemetry.load();
                        let nvml = nvml.as_ref().map(|r| (VramSource::Nvml, r.total, r.free));
                        let stats = (stats.read_at.is_some() && stats.vram_total > 0).then_some((
                            VramSource::SystemStats,
                            stats.vram_total,
                            stats.vram_free,
                        ));
                        nvml.into_iter().chain(stats).collect()
                    },
                    running: activity.running.remove(b.name()),
                    completed: b.completed.load(Ordering::SeqCst),
                }
            })
            .collect();
        let queue_depth = activity.by_band.values().map(|w| w.prompts).sum();
        keep_largest(&mut activity.by_user, USERS_SHOWN);
        let mut view = Self {
            at: now_ms(),
            backends,
            activity,
            queue_depth,
            websocket_clients: sched.sessions.len(),
            connections_open: connections.open(),
            connections_accepted: connections.accepted(),
            alerts: Vec::new(),
        };
        view.alerts = alerts(&view);
        view
    }
}

/// The alerts whose conditions hold in `view` (pure: the dashboard's list, and the unit tests
/// of the conditions the Prometheus rules state with durations).
pub fn alerts(view: &FleetView) -> Vec<Alert> {
    let mut out = Vec::new();
    let listed: Vec<&BackendView> = view
        .backends
        .iter()
        .filter(|b| b.state != "retiring")
        .collect();
    let down: Vec<&str> = listed
        .iter()
        .filter(|b| !b.up)
        .map(|b| b.name.as_str())
        .collect();
    if !listed.is_empty() && down.len() == listed.len() {
        out.push(Alert {
            name: "ComfyGateAllBackendsDown",
            severity: "critical",
            summary: "every backend is down: prompts wait in the gate queue".into(),
        });
    } else {
        for name in down {
            out.push(Alert {
                name: "ComfyGateBackendDown",
                severity: "warning",
                summary: format!("backend {name} is down"),
            });
        }
    }
    let slots: usize = listed.iter().filter(|b| b.up).map(|b| b.slots).sum();
    if view.queue_depth > BACKLOG_PER_SLOT * slots.max(1) {
        out.push(Alert {
            name: "ComfyGateQueueBacklog",
            severity: "warning",
            summary: format!(
                "{} prompts wait for {slots} slots (more than {BACKLOG_PER_SLOT} per slot)",
                view.queue_depth
            ),
        });
    }
    for b in &listed {
        if let (Some(total), Some(free)) = (b.vram_total, b.vram_free)
            && total > 0
            && (free as f64) < VRAM_HEADROOM_MIN * total as f64
        {
            out.push(Alert {
                name: "ComfyGateGpuVramLow",
                severity: "warning",
                summary: format!(
                    "{}: {:.1} of {:.1} GB free",
                    b.name,
                    free as f64 / 1e9,
                    total as f64 / 1e9
                ),
            });
        }
        if b.gpu_util.is_some_and(|u| u >= GPU_SATURATED) && view.queue_depth > 0 {
            out.push(Alert {
                name: "ComfyGateGpuSaturated",
                severity: "warning",
                summary: format!("{}: GPU saturated while prompts wait", b.name),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, up: bool, slots: usize) -> BackendView {
        BackendView {
            name: name.into(),
            health: if up { "up" } else { "down" },
            state: if up { "up" } else { "down" },
            up,
            draining: false,
            slots_used: 0,
            slots,
            vram_total: Some(24_000_000_000),
            vram_free: Some(12_000_000_000),
            vram_source: Some(VramSource::SystemStats),
            gpu_util: None,
            mem_util: None,
            temperature_c: None,
            power_w: None,
            by_source: Vec::new(),
            running: None,
            completed: 0,
        }
    }

    fn view(backends: Vec<BackendView>, queue_depth: usize) -> FleetView {
        FleetView {
            at: 0,
            backends,
            activity: Activity::default(),
            queue_depth,
            websocket_clients: 0,
            connections_open: 0,
            connections_accepted: 0,
            alerts: Vec::new(),
        }
    }

    fn names(v: &FleetView) -> Vec<&'static str> {
        alerts(v).iter().map(|a| a.name).collect()
    }

    #[test]
    fn one_backend_down_is_that_backend_every_one_down_is_one_critical_alert() {
        let v = view(vec![backend("a", true, 2), backend("b", false, 2)], 0);
        assert_eq!(names(&v), ["ComfyGateBackendDown"]);
        assert!(alerts(&v)[0].summary.contains('b'));
        let v = view(vec![backend("a", false, 2), backend("b", false, 2)], 0);
        assert_eq!(names(&v), ["ComfyGateAllBackendsDown"]);
        assert_eq!(alerts(&v)[0].severity, "critical");
    }

    #[test]
    fn a_backlog_is_more_than_two_waiting_per_usable_slot() {
        let fleet = || vec![backend("a", true, 2), backend("b", false, 2)];
        assert!(
            names(&view(fleet(), 4))
                .iter()
                .all(|n| *n != "ComfyGateQueueBacklog")
        );
        assert!(names(&view(fleet(), 5)).contains(&"ComfyGateQueueBacklog"));
    }

    #[test]
    fn vram_headroom_and_saturation() {
        let mut low = backend("a", true, 2);
        low.vram_free = Some(1_000_000_000);
        assert_eq!(names(&view(vec![low], 0)), ["ComfyGateGpuVramLow"]);
        let mut busy = backend("a", true, 2);
        busy.gpu_util = Some(0.99);
        assert!(
            names(&view(vec![busy.clone()], 0)).is_empty(),
            "busy with nothing waiting"
        );
        assert_eq!(names(&view(vec![busy], 1)), ["ComfyGateGpuSaturated"]);
    }
}
