//! Faults a test (or `POST /sim/fault`) can inject into a running instance.
//!
//! Each models a failure the gate must survive: a process that dies, a process that hangs with
//! its sockets open, a GPU that stalls, a slow card, a health endpoint that fails, an
//! out-of-memory error, and a WebSocket that drops.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Removes hang, stall, slow, fail-probes and a pending out-of-memory.
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
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            hang: AtomicBool::new(false),
            stall: AtomicBool::new(false),
            fail_probes: AtomicBool::new(false),
            oom_next: AtomicBool::new(false),
            slow_factor: Mutex::new(1.0),
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
    }
}
