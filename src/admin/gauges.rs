//! The state half of `/metrics`: gauges read from a fresh [`FleetView`] at every scrape (see
//! [`crate::metrics`] for why state is not copied into gauges as it changes).

use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Unit;

use super::view::FleetView;
use crate::http::ConnectionStats;
use crate::metrics::{BackendLabel, BandLabel, encode_gauges};
use crate::sched::Scheduler;

/// `{backend, source}` for VRAM gauges (`source`: `nvml` or `system_stats`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VramLabels {
    backend: String,
    source: &'static str,
}

/// No labels (a single series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLabels {}

/// Reads the fleet and the gate queue at scrape time. It holds the scheduler weakly: the
/// registry it sits in belongs to the fleet, which the scheduler holds (a strong reference
/// would keep a stopped gate's store open forever).
pub struct FleetGauges {
    pub sched: Weak<Scheduler>,
    pub connections: ConnectionStats,
}

impl std::fmt::Debug for FleetGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetGauges")
    }
}

fn backend(name: &str) -> BackendLabel {
    BackendLabel {
        backend: name.to_string(),
    }
}

impl Collector for FleetGauges {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sched) = self.sched.upgrade() else {
            return Ok(());
        };
        let v = FleetView::now(&sched, &self.connections);
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let per_backend = |f: &dyn Fn(&super::view::BackendView) -> Option<f64>| {
            v.backends
                .iter()
                .filter_map(|b| f(b).map(|x| (backend(&b.name), x)))
                .collect::<Vec<_>>()
        };
        let queue = v
            .activity
            .by_band
            .iter()
            .map(|(band, w)| (BandLabel { band: band.clone() }, w.prompts as f64));
        encode_gauges(
            &mut e,
            "queue_depth",
            "Prompts waiting in the gate queue, by band",
            None,
            queue,
        )?;
        let oldest = v.activity.by_band.iter().map(|(band, w)| {
            (
                BandLabel { band: band.clone() },
                w.oldest_ms as f64 / 1000.0,
            )
        });
        encode_gauges(
            &mut e,
            "queue_oldest_wait",
            "How long the longest-waiting prompt of each band has waited",
            Some(Unit::Seconds),
            oldest,
        )?;
        encode_gauges(
            &mut e,
            "backend_up",
            "1 when the backend is healthy, else 0",
            None,
            per_backend(&|b| Some(flag(b.up))),
        )?;
        encode_gauges(
            &mut e,
            "backend_draining",
            "1 while the backend is draining",
            None,
            per_backend(&|b| Some(flag(b.draining))),
        )?;
        encode_gauges(
            &mut e,
            "backend_slots_in_use",
            "Prompts holding a slot on the backend",
            None,
            per_backend(&|b| Some(b.slots_used as f64)),
        )?;
        encode_gauges(
            &mut e,
            "backend_slots",
            "The backend's slots (max_inflight)",
            None,
            per_backend(&|b| Some(b.slots as f64)),
        )?;
        let vram = |free: bool| {
            v.backends
                .iter()
                .flat_map(|b| {
                    b.by_source.iter().map(move |(source, total, left)| {
                        let labels = VramLabels {
                            backend: b.name.clone(),
                            source: source.as_str(),
                        };
                        (labels, if free { *left } else { *total } as f64)
                    })
                })
                .collect::<Vec<_>>()
        };
        encode_gauges(
            &mut e,
            "gpu_memory_total",
            "The backend GPU's memory, by source of the reading",
            Some(Unit::Bytes),
            vram(false),
        )?;
        encode_gauges(
            &mut e,
            "gpu_memory_free",
            "The backend GPU's free memory, by source of the reading",
            Some(Unit::Bytes),
            vram(true),
        )?;
        encode_gauges(
            &mut e,
            "gpu_utilization",
            "GPU utilisation 0..1 (NVML)",
            Some(Unit::Other("ratio".into())),
            per_backend(&|b| b.gpu_util),
        )?;
        encode_gauges(
            &mut e,
            "gpu_memory_utilization",
            "GPU memory controller utilisation 0..1 (NVML)",
            Some(Unit::Other("ratio".into())),
            per_backend(&|b| b.mem_util),
        )?;
        encode_gauges(
            &mut e,
            "gpu_temperature",
            "GPU temperature (NVML)",
            Some(Unit::Celsius),
            per_backend(&|b| b.temperature_c),
        )?;
        encode_gauges(
            &mut e,
            "gpu_power",
            "GPU power draw (NVML)",
            Some(Unit::Other("watts".into())),
            per_backend(&|b| b.power_w),
        )?;
        let one = |x: f64| [(NoLabels {}, x)];
        encode_gauges(
            &mut e,
            "websocket_clients",
            "Client WebSockets open",
            None,
            one(v.websocket_clients as f64),
        )?;
        encode_gauges(
            &mut e,
            "connections_open",
            "Client connections open",
            None,
            one(v.connections_open as f64),
        )?;
        // A count kept by the listener (nginx's `accepts`): a counter read at scrape time.
        let accepted = ConstCounter::new(v.connections_accepted);
        let metric = e.encode_descriptor(
            "connections_accepted",
            "Client connections accepted since the gate started",
            None,
            accepted.metric_type(),
        )?;
        accepted.encode(metric)?;
        Ok(())
    }
}
