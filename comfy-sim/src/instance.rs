//! One incarnation of a simulated ComfyUI process: everything ComfyUI keeps in memory (queue,
//! history, sockets, execution cache, resident models), lost when the process crashes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::SimConfig;
use super::faults::Faults;
use super::hub::Hub;
use super::nodes::NodeDef;
use super::queue::PromptQueue;
use comfy_wire::files::Dirs;

/// VRAM the CUDA context and allocator keep, in GB.
pub const BASELINE_VRAM_GB: f64 = 0.4;

/// Counters that survive restarts, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Checkpoints loaded from disk (a cached or resident checkpoint is not counted).
    pub checkpoint_loads: AtomicU64,
    /// Prompts that finished, whatever the outcome.
    pub prompts_finished: AtomicU64,
    /// Prompts that ended with `execution_success`.
    pub prompts_succeeded: AtomicU64,
    /// Prompts accepted by `POST /prompt`.
    pub prompts_accepted: AtomicU64,
}

/// Models held on the simulated GPU, least recently used first.
#[derive(Debug, Default)]
pub struct GpuState {
    pub resident: Vec<(String, f64)>,
    /// Working memory of the node now running, in GB.
    pub working_gb: f64,
}

impl GpuState {
    pub fn used_gb(&self) -> f64 {
        BASELINE_VRAM_GB + self.resident.iter().map(|(_, gb)| gb).sum::<f64>() + self.working_gb
    }
}

/// `server.client_id` and `server.last_node_id` of ComfyUI's PromptServer.
#[derive(Debug, Default)]
pub struct ExecContext {
    pub client_id: Option<String>,
    pub last_node_id: Option<String>,
}

/// In-memory state of one running instance.
pub struct Instance {
    pub config: Arc<SimConfig>,
    pub defs: Vec<NodeDef>,
    pub dirs: Dirs,
    pub faults: Arc<Faults>,
    pub stats: Arc<SimStats>,
    pub queue: Mutex<PromptQueue>,
    pub wake: Notify,
    pub hub: Hub,
    pub gpu: Mutex<GpuState>,
    pub interrupt: AtomicBool,
    /// `POST /free {"free_memory": true}`: drop the execution cache before the next prompt.
    pub free_memory: AtomicBool,
    pub exec: Mutex<ExecContext>,
    /// Cancelled when this incarnation dies (crash or stop).
    pub stop: CancellationToken,
    /// Users of `/users` in this process.
    pub userdata_lock: tokio::sync::Mutex<()>,
    /// Simulated time owed but not yet slept (timers cannot sleep for microseconds).
    sleep_debt: Mutex<f64>,
}

/// Locks a std mutex, ignoring poisoning (state stays usable after a panicking test thread).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Instance {
    pub fn new(
        config: Arc<SimConfig>,
        dirs: Dirs,
        faults: Arc<Faults>,
        stats: Arc<SimStats>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            config,
            defs: super::node_catalogue(),
            dirs,
            faults,
            stats,
            queue: Mutex::new(PromptQueue::default()),
            wake: Notify::new(),
            hub: Hub::default(),
            gpu: Mutex::new(GpuState::default()),
            interrupt: AtomicBool::new(false),
            free_memory: AtomicBool::new(false),
            exec: Mutex::new(ExecContext::default()),
            stop,
            userdata_lock: tokio::sync::Mutex::new(()),
            sleep_debt: Mutex::new(0.0),
        }
    }

    /// `{"exec_info": {"queue_remaining": N}}`.
    pub fn queue_info(&self) -> Value {
        json!({ "exec_info": { "queue_remaining": lock(&self.queue).remaining() } })
    }

    /// ComfyUI's `queue_updated()`: a `status` broadcast.
    pub fn broadcast_status(&self) {
        self.hub
            .send_json("status", json!({ "status": self.queue_info() }), None);
    }

    /// Sleeps `seconds` of simulated time (scaled by the time scale and the slow fault), not
    /// advancing while the instance is hung or stalled. Returns false if the instance died.
    pub async fn sim_sleep(&self, seconds: f64) -> bool {
        let mut left = seconds * self.config.time_scale * self.faults.slow_factor();
        {
            // Many tiny sleeps (one per sampler step at test speed) would each cost a timer
            // tick; owe them until they add up.
            let mut debt = lock(&self.sleep_debt);
            *debt += left;
            if *debt < 0.005 && !self.faults.frozen() {
                return !self.stop.is_cancelled();
            }
            left = std::mem::take(&mut *debt);
        }
        let slice = 0.02;
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            if self.faults.frozen() {
                tokio::select! {
                    _ = self.stop.cancelled() => return false,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }
            if left <= 0.0 {
                return true;
            }
            let step = left.min(slice);
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_secs_f64(step)) => {}
            }
            left -= step;
        }
    }

    /// Holds on while a wall-time fault lasts: until `delay` (read afresh from the faults, so
    /// `Clear` ends the wait) has passed since the call, or the instance stops (returns false).
    /// With `worker`, time spent hung or stalled does not count, as for simulated durations.
    pub async fn fault_wait(
        &self,
        worker: bool,
        delay: impl Fn(&Faults) -> Option<Duration>,
    ) -> bool {
        let slice = Duration::from_millis(20);
        let mut waited = Duration::ZERO;
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            match delay(&self.faults) {
                Some(d) if waited < d => {}
                _ => return true,
            }
            let step = slice.min(
                delay(&self.faults)
                    .unwrap_or_default()
                    .saturating_sub(waited),
            );
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(step.max(Duration::from_millis(1))) => {}
            }
            if !(worker && self.faults.frozen()) {
                waited += step;
            }
        }
    }

    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// The `/system_stats` document.
    pub fn system_stats(&self) -> Value {
        const GB: f64 = 1024.0 * 1024.0 * 1024.0;
        let gpu = lock(&self.gpu);
        let total = (self.config.vram_total_gb * GB) as u64;
        let used = (gpu.used_gb().min(self.config.vram_total_gb) * GB) as u64;
        let torch_total = ((gpu.used_gb() - BASELINE_VRAM_GB).max(0.0) * GB) as u64;
        json!({
            "system": {
                "os": "linux",
                "ram_total": 64u64 << 30,
                "ram_free": 48u64 << 30,
                "comfyui_version": "0.8.0",
                "required_frontend_version": "1.35.9",
                "installed_templates_version": "0.7.67",
                "required_templates_version": "0.7.67",
                "python_version": "3.12.3 (comfy-sim)",
                "pytorch_version": "2.9.1+cu128",
                "embedded_python": false,
                "argv": ["main.py", "--comfy-sim", self.config.name],
            },
            "devices": [{
                "name": format!("cuda:0 NVIDIA {} (simulated) : cudaMallocAsync", self.config.name),
                "type": "cuda",
                "index": 0,
                "vram_total": total,
                "vram_free": total.saturating_sub(used),
                "torch_vram_total": torch_total,
                "torch_vram_free": 0,
            }]
        })
    }

    /// The server feature flags (`/features` and the `feature_flags` reply).
    pub fn features(&self) -> Value {
        json!({
            "supports_preview_metadata": true,
            "max_upload_size": self.config.max_upload_size,
            "extension": { "manager": { "supports_v4": true } },
        })
    }
}
