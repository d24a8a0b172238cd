//! Active health probes: `GET /system_stats` on every backend at `health.interval_ms`. A probe
//! also refreshes the backend's VRAM telemetry. Passive failures (connection errors while
//! proxying) are recorded through [`Gate::record_health`].

use std::sync::Arc;
use std::time::Duration;

use super::Gate;
use super::fleet::{Health, Telemetry};

impl Gate {
    /// The NVML reading of a backend's local GPU, if it has one.
    pub fn nvml_reading(&self, backend: usize) -> Option<crate::telemetry::GpuReading> {
        let (sampler, slots) = self.nvml.as_ref()?;
        let slot = (*slots.get(backend)?)?;
        sampler.readings().get(slot).cloned().flatten()
    }

    /// `(total, free)` VRAM of a backend: NVML for a local GPU, else its last `/system_stats`.
    /// `free` is `None` when the reading is older than `placement.stale_after_ms` (no headroom).
    pub fn vram(&self, backend: usize) -> (u64, Option<u64>) {
        let stale_after = Duration::from_millis(self.config.placement.stale_after_ms);
        if self
            .nvml
            .as_ref()
            .is_some_and(|(_, slots)| slots.get(backend).copied().flatten().is_some())
        {
            return match self.nvml_reading(backend) {
                Some(r) => (r.total, (r.age() <= stale_after).then_some(r.free)),
                None => (0, None),
            };
        }
        let b = self.backend(backend);
        (
            b.telemetry.load().vram_total,
            b.fresh_vram_free(stale_after),
        )
    }

    /// Records one health result; on a flip, logs it, invalidates merged caches and wakes the
    /// dispatcher.
    pub fn record_health(&self, backend: usize, ok: bool) {
        let b = self.backend(backend);
        if let Some(state) = b.record(ok, &self.config.health) {
            tracing::info!(backend = b.name(), ?state, "backend health changed");
            if state == Health::Up {
                // It may have restarted with other nodes or models: read them again.
                b.capabilities.store(None);
            }
            self.fleet_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if state == Health::Up {
                self.wake.notify_one();
            }
        }
    }

    /// VRAM in use while a prompt runs alone on a backend is a peak for its shape.
    fn observe_peak(&self, backend: usize, t: &Telemetry) {
        let running = self
            .backend(backend)
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(id) = running else { return };
        let Some(prompt) = self
            .lock_prompts()
            .get(&id)
            .map(|r| r.body["prompt"].clone())
        else {
            return;
        };
        let shape = super::placement::profile::profile(&prompt).shape;
        let used = t.vram_total.saturating_sub(t.vram_free);
        self.learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe_peak(shape, used);
    }

    async fn probe(&self, backend: usize) {
        let b = self.backend(backend).clone();
        let timeout = Duration::from_millis(self.config.health.timeout_ms);
        let result =
            tokio::time::timeout(timeout, self.upstream.get_json(&b.config, "/system_stats")).await;
        match result {
            Ok(Ok((status, body))) if status.is_success() => {
                if let Some(t) = Telemetry::from_system_stats(&body) {
                    self.observe_peak(backend, &t);
                    b.telemetry.store(Arc::new(t));
                }
                self.record_health(backend, true);
                let tick = b.probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if b.capabilities.load().is_none() || tick.is_multiple_of(30) {
                    self.refresh_capabilities(backend).await;
                }
            }
            _ => self.record_health(backend, false),
        }
    }
}

/// One probe of every backend, concurrently.
pub async fn probe_all(gate: &Arc<Gate>) {
    let probes: Vec<_> = gate.backends.iter().map(|b| gate.probe(b.id)).collect();
    futures_util::future::join_all(probes).await;
}

pub async fn probe_loop(gate: Arc<Gate>, backend: usize) {
    let interval = Duration::from_millis(gate.config.health.interval_ms);
    loop {
        tokio::select! {
            _ = gate.stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        gate.probe(backend).await;
    }
}
