//! Faults a test (or `POST /sim/fault`) can inject into a running instance.
//!
//! Each models a failure the gate must survive: a process that dies, a process that hangs with
//! its sockets open, a GPU that stalls, a slow card, a health endpoint that fails or answers
//! late, an out-of-memory error, a WebSocket that drops, and nodes that run long without a word.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

/// One fault to inject.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// The process dies: the listener closes and every connection is dropped; in-memory state
    /// (queue, history, sockets) is lost. `restart_after_ms` brings it back on the same port.
    Crash {
        #[serde(default)]
        restart_after_ms: Option<u64>,
    },
    /// The process hangs: TCP connections are still accepted, but no request is answered,
    /// the worker makes no progress and WebSockets go silent.
    Hang,
    /// Only the GPU stalls: HTTP answers, but the running prompt makes no progress.
    Stall,
    /// Every simulated duration is multiplied by `factor`.
    Slow { factor: f64 },
    /// `GET /system_stats` (the health probe) answers 500.
    FailProbes,
    /// The next prompt that samples fails with ComfyUI's out-of-memory `execution_error`.
    OomNext,
    /// Every WebSocket connection is closed by the server.
    DropWebsockets,
    /// Every node without a progress bar (anything but the sampler) runs `ms` wall milliseconds
    /// longer, unscaled by `time_scale` and `Slow`, and sends no event meanwhile: ComfyUI's video
    /// encoders, large VAE decodes and checkpoint loads look like this. HTTP keeps answering and
    /// `/queue` lists the prompt as running. `Clear` ends a node's silence early.
    Silent { ms: u64 },
    /// `GET /system_stats` (the health probe) answers only after `ms` wall milliseconds, as when
    /// a heavy prompt keeps ComfyUI from answering promptly; every other route, the worker and
    /// the WebSockets carry on as usual. `Clear` answers the probes already waiting.
    SlowProbes { ms: u64 },
    /// Requests to `path` (as routed, without the `/api` prefix; `/history` covers
    /// `/history/{id}` too) are handled only after `ms` wall milliseconds, as when a real
    /// ComfyUI validates a large prompt before queueing it or is busy answering `/history`.
    /// Other routes, the worker and the sockets carry on. Several paths can be slow at once.
    SlowRoute { path: String, ms: u64 },
    /// The process dies (as `Crash`, with its restart) on receiving a `POST /prompt` whose body
    /// contains `marker`, before answering it: a prompt that kills ComfyUI while it validates
    /// (a graph that overflows its stack, a custom node that segfaults). Stays set across the
    /// restart, so the same prompt kills it again.
    PoisonPrompt {
        marker: String,
        #[serde(default)]
        restart_after_ms: Option<u64>,
    },
    /// Removes hang, stall, slow, fail-probes, silent, slow-probes, slow routes, the poison
    /// marker and a pending out-of-memory.
    Clear,
}

/// Current fault state, shared by the listener, the routes and the worker.
#[derive(Debug)]
pub struct Faults {
    pub hang: AtomicBool,
    pub stall: AtomicBool,
    pub fail_probes: AtomicBool,
    pub oom_next: AtomicBool,
    slow_factor: Mutex<f64>,
    /// `Silent`: extra wall milliseconds per node without a progress bar (0 = off).
    silent_ms: AtomicU64,
    /// `SlowProbes`: wall milliseconds before `/system_stats` answers (0 = off).
    slow_probes_ms: AtomicU64,
    /// `SlowRoute`: path → wall milliseconds before it is handled.
    slow_routes: Mutex<HashMap<String, u64>>,
    /// `PoisonPrompt`: the marker and the restart delay.
    poison: Mutex<Option<(String, Option<u64>)>>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            hang: AtomicBool::new(false),
            stall: AtomicBool::new(false),
            fail_probes: AtomicBool::new(false),
            oom_next: AtomicBool::new(false),
            slow_factor: Mutex::new(1.0),
            silent_ms: AtomicU64::new(0),
            slow_probes_ms: AtomicU64::new(0),
            slow_routes: Mutex::new(HashMap::new()),
            poison: Mutex::new(None),
        }
    }
}

impl Faults {
    pub fn slow_factor(&self) -> f64 {
        *self.slow_factor.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_slow_factor(&self, factor: f64) {
        let factor = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        *self.slow_factor.lock().unwrap_or_else(|e| e.into_inner()) = factor;
    }

    pub fn set_silent(&self, ms: u64) {
        self.silent_ms.store(ms, Ordering::SeqCst);
    }

    /// How much longer a node without a progress bar runs, in wall time (`None` = not silent).
    pub fn silent(&self) -> Option<Duration> {
        let ms = self.silent_ms.load(Ordering::SeqCst);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    pub fn set_slow_probes(&self, ms: u64) {
        self.slow_probes_ms.store(ms, Ordering::SeqCst);
    }

    /// How long `/system_stats` waits before answering, in wall time (`None` = no delay).
    pub fn probe_delay(&self) -> Option<Duration> {
        let ms = self.slow_probes_ms.load(Ordering::SeqCst);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    pub fn set_slow_route(&self, path: &str, ms: u64) {
        let mut routes = self.slow_routes.lock().unwrap_or_else(|e| e.into_inner());
        if ms == 0 {
            routes.remove(path);
        } else {
            routes.insert(path.to_string(), ms);
        }
    }

    /// How long a request to `path` waits before it is handled (`None` = no delay).
    pub fn route_delay(&self, path: &str) -> Option<Duration> {
        let routes = self.slow_routes.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .iter()
            .filter(|(p, _)| {
                path == p.as_str()
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(_, ms)| Duration::from_millis(*ms))
            .max()
    }

    pub fn set_poison(&self, marker: String, restart_after_ms: Option<u64>) {
        *self.poison.lock().unwrap_or_else(|e| e.into_inner()) = Some((marker, restart_after_ms));
    }

    /// The poison marker and its restart delay, if set.
    pub fn poison(&self) -> Option<(String, Option<u64>)> {
        self.poison
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The restart delay of the crash `body` (a `POST /prompt` body) triggers, if it carries the
    /// poison marker: `Some(None)` dies for good.
    pub fn poisoned(&self, body: &[u8]) -> Option<Option<u64>> {
        let poison = self.poison.lock().unwrap_or_else(|e| e.into_inner());
        let (marker, restart) = poison.as_ref()?;
        let hit = !marker.is_empty() && body.windows(marker.len()).any(|w| w == marker.as_bytes());
        hit.then_some(*restart)
    }

    /// True while the worker must not make progress.
    pub fn frozen(&self) -> bool {
        self.hang.load(Ordering::SeqCst) || self.stall.load(Ordering::SeqCst)
    }

    pub fn clear(&self) {
        self.hang.store(false, Ordering::SeqCst);
        self.stall.store(false, Ordering::SeqCst);
        self.fail_probes.store(false, Ordering::SeqCst);
        self.oom_next.store(false, Ordering::SeqCst);
        self.set_slow_factor(1.0);
        self.set_silent(0);
        self.set_slow_probes(0);
        self.slow_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        *self.poison.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
