//! The fleet: every backend, what the gate knows of each (health, telemetry, capabilities, the
//! upstream socket), and the policy that ranks them ([`picker`]).
//!
//! The fleet knows nothing of prompts: the scheduler above it asks it questions (who may take
//! work, how much VRAM is free, can this backend run this graph) and hears from it through the
//! upstream events channel ([`socket::UpstreamEvent`]) and the [`Fleet::changed`] notification.
//! Backends are named by their configured name wherever a fact outlives the process (the
//! upstream clientId, a prompt's owner, the store); their position is a runtime index only.

pub mod backend;
pub mod capabilities;
pub mod nvml;
pub mod picker;
pub mod probe;
pub mod socket;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

use crate::config::{Backend, Config};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
pub use backend::{BackendState, Health, Telemetry};
use capabilities::Capabilities;
use tokio_util::sync::CancellationToken;
use upstream::Upstream;

/// NVML readings for backends whose GPU is local: the sampler and, per backend, its slot.
struct LocalGpus {
    sampler: nvml::NvmlSampler,
    slots: Vec<Option<usize>>,
}

/// A backend's GPU as the gate knows it ([`Fleet::gpu_of`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuId {
    pub name: String,
    /// NVML's UUID (`GPU-…`), for a GPU on this machine.
    pub uuid: Option<String>,
}

/// All backends and the client that talks to them.
///
/// The backend list only grows while the gate runs, and a name keeps its entry (and its URL)
/// for the life of the gate, so a runtime index and a name always mean the same backend: a
/// reload that removes a backend retires it ([`Fleet::retire`]: no new work, its running
/// prompts finish) and, once it holds nothing, ends its loops ([`Fleet::set_gone`]); one named
/// again comes back in the same entry ([`Fleet::reinstate`]); a new name is appended
/// ([`Fleet::add`]).
pub struct Fleet {
    config: Arc<crate::config::Live>,
    backends: ArcSwap<Vec<Arc<BackendState>>>,
    /// Names this gate's upstream clientIds (kept for backends added later).
    gate_id: String,
    /// The gate's stop; each backend's own token ([`BackendState::stop`]) is a child of it.
    stop: CancellationToken,
    /// Serializes changes to the backend list.
    membership: std::sync::Mutex<()>,
    pub upstream: Upstream,
    local_gpus: Option<LocalGpus>,
    /// Bumped when a backend's health flips (invalidates merged caches).
    generation: AtomicU64,
    /// Notified when a backend may take work it could not take before (up, unstalled,
    /// undrained). One waiter (the dispatcher); a notice sent while it is busy is kept for its
    /// next wait.
    pub changed: Notify,
    /// The gate's metrics: every layer above reaches them through the fleet it already holds
    /// ([`crate::metrics`]).
    pub metrics: Arc<Metrics>,
}

impl Fleet {
    /// The fleet of `config.backends`, in configuration order; `gate_id` names this gate's
    /// upstream clientIds. Starts NVML sampling for backends mapped to a local GPU.
    pub fn new(
        config: Arc<crate::config::Live>,
        gate_id: &str,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        let current = config.load();
        let backends = current
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Arc::new(BackendState::new(i, b.clone(), gate_id, stop.child_token())))
            .collect();
        Self {
            upstream: Upstream::new(config.clone()),
            local_gpus: start_nvml(&current),
            config,
            backends: ArcSwap::from_pointee(backends),
            gate_id: gate_id.to_string(),
            stop,
            membership: std::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            changed: Notify::new(),
            metrics,
        }
    }

    /// Every backend this run has known, by runtime index, retired and gone ones included
    /// (check [`BackendState::is_listed`] where that matters).
    pub fn backends(&self) -> Arc<Vec<Arc<BackendState>>> {
        self.backends.load_full()
    }

    /// The backend at runtime index `i` (an index from this fleet).
    pub fn get(&self, i: usize) -> Arc<BackendState> {
        self.backends.load()[i].clone()
    }

    /// The runtime index of the backend with this configured name (a name keeps its entry for
    /// the life of the gate, retired or not).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.backends.load().iter().position(|b| b.name() == name)
    }

    /// Indices of the configured backends whose health is up.
    pub fn up(&self) -> Vec<usize> {
        self.backends
            .load()
            .iter()
            .filter(|b| b.is_up() && b.is_listed())
            .map(|b| b.index)
            .collect()
    }

    /// Whether any configured backend can take work.
    pub fn ready(&self) -> bool {
        self.backends
            .load()
            .iter()
            .any(|b| b.is_up() && b.is_listed())
    }

    /// Appends a backend whose name is new to this run (a reload added it); its probe and
    /// socket loops are the caller's to start. Its GPU is read from `/system_stats` (NVML sampling covers the
    /// backends configured at start). Returns its runtime index.
    pub fn add(&self, config: Backend) -> usize {
        let _one_change = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Vec::clone(&self.backends.load());
        let index = next.len();
        if config.gpu.is_some() && self.local_gpus.is_some() {
            tracing::info!(backend = %config.name, "a backend added by a reload is read from /system_stats, not NVML, until a restart");
        }
        let state = BackendState::new(index, config, &self.gate_id, self.stop.child_token());
        next.push(Arc::new(state));
        self.backends.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::SeqCst);
        index
    }

    /// Takes backend `i` out of the configuration: it gets no new work and leaves every
    /// listing; what it runs finishes, and its loops go on until [`Fleet::set_gone`].
    pub fn retire(&self, i: usize) {
        let _one_change = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let b = self.get(i);
        b.retired.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            backend = b.name(),
            "backend retired: no new work; what it runs finishes"
        );
    }

    /// A retired backend named again by a reload: back in service. True when it was gone, so
    /// its loops must be started again (it is then of unknown health until probed).
    pub fn reinstate(&self, i: usize) -> bool {
        let _one_change = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let b = self.get(i);
        let gone = b.is_gone();
        if gone {
            b.revive(self.stop.child_token());
        }
        b.retired.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
        gone
    }

    /// A retired backend that holds nothing more: its probe and socket loops end. Nothing if a
    /// reload named it again meanwhile.
    pub fn set_gone(&self, i: usize) {
        let _one_change = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let b = self.get(i);
        let stop = b.stop_token();
        if b.retired.load(Ordering::SeqCst) && !stop.is_cancelled() {
            stop.cancel();
            tracing::info!(
                backend = b.name(),
                "retired backend holds no prompt; its loops end"
            );
        }
    }

    /// Bumped at every health flip.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The NVML reading of a backend's local GPU, if it has one.
    pub fn nvml_reading(&self, i: usize) -> Option<nvml::GpuReading> {
        let gpus = self.local_gpus.as_ref()?;
        let slot = (*gpus.slots.get(i)?)?;
        gpus.sampler.readings().get(slot).cloned().flatten()
    }

    /// Which GPU backend `i` runs on, as far as the gate knows: NVML's name and UUID for a
    /// local GPU, else the device name its last `/system_stats` gave; `None` before either.
    pub fn gpu_of(&self, i: usize) -> Option<GpuId> {
        if let Some(r) = self.nvml_reading(i) {
            return Some(GpuId {
                name: r.name,
                uuid: Some(r.uuid),
            });
        }
        let name = self.get(i).telemetry.load().device.clone()?;
        Some(GpuId { name, uuid: None })
    }

    /// `(total, free)` VRAM of a backend in bytes: NVML for a local GPU, else its last
    /// `/system_stats`. `free` is `None` when the reading is older than
    /// `placement.stale_after_ms` (no headroom).
    pub fn vram(&self, i: usize) -> (u64, Option<u64>) {
        let stale_after = Duration::from_millis(self.config.load().placement.stale_after_ms);
        let local = self
            .local_gpus
            .as_ref()
            .is_some_and(|g| g.slots.get(i).copied().flatten().is_some());
        if local {
            return match self.nvml_reading(i) {
                Some(r) => (r.total, (r.age() <= stale_after).then_some(r.free)),
                None => (0, None),
            };
        }
        let b = self.get(i);
        (
            b.telemetry.load().vram_total,
            b.fresh_vram_free(stale_after),
        )
    }

    /// Records one health result; on a flip, logs it, invalidates merged caches and, when it
    /// came up, re-reads what it can run and notifies [`Fleet::changed`].
    pub fn record_health(&self, i: usize, ok: bool) {
        let b = self.get(i);
        if let Some(state) = b.record(ok, &self.config.load().health) {
            tracing::info!(
                backend = b.name(),
                state = state.as_str(),
                "backend health changed"
            );
            if state == Health::Up {
                // It may have restarted with other nodes or models: read them again.
                b.capabilities.store(None);
            }
            self.generation.fetch_add(1, Ordering::SeqCst);
            if state == Health::Up {
                self.changed.notify_one();
            }
        }
    }

    /// Marks a backend stalled (no new work until it shows life); true if it was not.
    pub fn mark_stalled(&self, i: usize, reason: &str) -> bool {
        let b = self.get(i);
        let was = b.stalled.swap(true, Ordering::SeqCst);
        if !was {
            tracing::warn!(backend = b.name(), reason, "backend stalled");
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        !was
    }

    /// Clears a backend's stall on evidence of life (`why` says which).
    pub fn clear_stalled(&self, i: usize, why: &str) {
        let b = self.get(i);
        if b.stalled.swap(false, Ordering::SeqCst) {
            tracing::info!(backend = b.name(), why, "backend no longer stalled");
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_one();
        }
    }

    /// Sets or clears a drain; an undrained backend may take work at once.
    pub fn set_draining(&self, i: usize, on: bool) {
        self.get(i).draining.store(on, Ordering::SeqCst);
        if !on {
            self.changed.notify_one();
        }
    }

    /// Re-reads one backend's capabilities (on start, when it comes up, and now and then).
    pub async fn refresh_capabilities(&self, i: usize) {
        let b = self.get(i).clone();
        let Ok((code, info)) = self.upstream.get_json(&b.config, "/object_info").await else {
            return;
        };
        if !code.is_success() || !info.is_object() {
            return;
        }
        let mut caps = Capabilities::from_object_info(&info);
        for folder in ["checkpoints", "diffusion_models", "loras"] {
            if let Ok((code, listing)) = self
                .upstream
                .get_json(&b.config, &format!("/experiment/models/{folder}"))
                .await
                && code.is_success()
            {
                caps.add_model_sizes(&listing);
            }
        }
        b.capabilities.store(Some(Arc::new(caps)));
    }

    /// Whether backend `i` has every class and file `prompt` names (unknown capabilities: yes;
    /// `uploaded` says whether the gate holds an upload of that name).
    pub fn can_run(&self, i: usize, prompt: &Value, uploaded: &dyn Fn(&str) -> bool) -> bool {
        match self.get(i).capabilities.load().as_ref() {
            Some(caps) => caps.missing(prompt, uploaded).is_none(),
            None => true,
        }
    }

    /// ComfyUI's 400 body when no backend that is up can run `prompt`, else `None`
    /// (see [`capabilities::refusal`]).
    pub fn refusal(&self, prompt: &Value, uploaded: &dyn Fn(&str) -> bool) -> Option<Value> {
        let known: Vec<Arc<Capabilities>> = self
            .backends
            .load()
            .iter()
            .filter(|b| b.is_up() && b.is_listed())
            .filter_map(|b| b.capabilities.load_full())
            .collect();
        capabilities::refusal(&known, prompt, uploaded)
    }
}

/// Starts NVML sampling for the backends mapped to a local GPU. Without the library (or a GPU)
/// one line says so and `/system_stats` serves every backend.
fn start_nvml(config: &Config) -> Option<LocalGpus> {
    if !config.telemetry.nvml {
        return None;
    }
    let mut selectors = Vec::new();
    let mut slots = Vec::new();
    for b in &config.backends {
        match &b.gpu {
            Some(g) => {
                slots.push(Some(selectors.len()));
                selectors.push(g.clone());
            }
            None => slots.push(None),
        }
    }
    if selectors.is_empty() {
        return None;
    }
    let interval = Duration::from_millis(config.telemetry.interval_ms);
    match nvml::NvmlSampler::start(
        config.telemetry.nvml_library.as_deref(),
        selectors,
        interval,
    ) {
        Ok(sampler) => {
            tracing::info!(gpus = sampler.uuids().len(), "NVML telemetry on");
            Some(LocalGpus { sampler, slots })
        }
        Err(reason) => {
            tracing::warn!("NVML unavailable ({reason}); using /system_stats for every backend");
            None
        }
    }
}
