//! Active health probes: `GET /system_stats` on every backend every `health.interval_ms`; a
//! probe also refreshes the backend's VRAM telemetry and, now and then, what it can run.
//!
//! A probe judges on evidence (see the state table in [`super::backend`]):
//! - an answer in time: a success (and not busy);
//! - a refused connection, an error status, or a timeout while the upstream socket is closed: a
//!   failure, counted towards `health.unhealthy_threshold`;
//! - a timeout while the upstream socket is open and alive (it delivered a frame, a pong to the
//!   gate's pings at least, within `health.socket_silence_ms`, or a prompt runs there): busy,
//!   not down. The process holds its socket and is working; ComfyUI is slow to answer while a
//!   heavy prompt runs (thousands of preview outputs, a node that holds the interpreter).
//!   Whether the prompt itself is stuck is the stall check's question, which asks the backend's
//!   own `/queue`. A socket silent even to pings with nothing running there is a dead host.
//!
//! A stalled backend's probe also reads its `/queue`: nothing running there means the stuck
//! prompt is gone and the GPU is free, which clears the stall without any work being sent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Fleet, Telemetry};

/// Capabilities are re-read on every this-many-th good probe (nodes and models can be
/// installed while a backend runs).
pub const CAPABILITIES_EVERY: u64 = 30;

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// Answered in time.
    Ok,
    /// Timed out over an open upstream socket: alive and working.
    Busy,
    /// Refused, failed, or silent with its socket closed.
    Failed,
}

/// One probe of backend `i`; records its result.
pub async fn probe(fleet: &Fleet, i: usize) -> ProbeResult {
    let b = fleet.get(i).clone();
    let timeout = Duration::from_millis(fleet.config.load().health.timeout_ms);
    let silence = Duration::from_millis(fleet.config.load().health.socket_silence_ms);
    let answer =
        tokio::time::timeout(timeout, fleet.upstream.get_json(&b.config, "/system_stats")).await;
    let result = match answer {
        Ok(Ok((status, body))) if status.is_success() => {
            if let Some(t) = Telemetry::from_system_stats(&body) {
                b.telemetry.store(Arc::new(t));
            }
            ProbeResult::Ok
        }
        Err(_) if b.alive_but_slow(silence) => ProbeResult::Busy,
        _ => ProbeResult::Failed,
    };
    b.busy.store(result == ProbeResult::Busy, Ordering::SeqCst);
    match result {
        ProbeResult::Ok => {
            fleet.record_health(i, true);
            let tick = b.probes.fetch_add(1, Ordering::SeqCst);
            if b.capabilities.load().is_none() || tick.is_multiple_of(CAPABILITIES_EVERY) {
                fleet.refresh_capabilities(i).await;
            }
            if b.is_stalled() && queue_is_idle(fleet, i).await {
                fleet.clear_stalled(i, "its queue has nothing running");
            }
        }
        ProbeResult::Busy => {
            tracing::debug!(
                backend = b.name(),
                "probe timed out over an open socket: busy"
            );
        }
        ProbeResult::Failed => fleet.record_health(i, false),
    }
    result
}

/// Whether the backend's own `/queue` shows nothing running.
async fn queue_is_idle(fleet: &Fleet, i: usize) -> bool {
    let b = fleet.get(i);
    match fleet.upstream.get_json(&b.config, "/queue").await {
        Ok((status, q)) if status.is_success() => {
            q["queue_running"].as_array().is_some_and(Vec::is_empty)
        }
        _ => false,
    }
}

/// One probe of every backend, concurrently (before the gate serves, so the first prompt sees
/// a known fleet).
pub async fn probe_all(fleet: &Fleet) {
    let probes: Vec<_> = (0..fleet.backends().len())
        .map(|i| probe(fleet, i))
        .collect();
    futures_util::future::join_all(probes).await;
}

/// Probes backend `i` at once, then every `health.interval_ms` (read each time, so a reload
/// applies at the next probe) until `stop`.
pub async fn probe_loop(fleet: Arc<Fleet>, i: usize, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = probe(&fleet, i) => {}
        }
        let interval = Duration::from_millis(fleet.config.load().health.interval_ms);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Whether a backend's `/queue` answer lists `id` as running or pending.
pub fn queue_lists(queue: &Value, id: &str) -> bool {
    ["queue_running", "queue_pending"].iter().any(|k| {
        queue[*k]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i[1] == id))
    })
}

/// Whether a backend's `/queue` answer lists `id` as running.
pub fn queue_runs(queue: &Value, id: &str) -> bool {
    queue["queue_running"]
        .as_array()
        .is_some_and(|items| items.iter().any(|i| i[1] == id))
}
