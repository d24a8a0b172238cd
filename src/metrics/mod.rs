//! The gate's Prometheus metrics (issue 15): what `/metrics` on the admin listener serves, as
//! OpenMetrics text from Prometheus' own Rust client (`prometheus-client`).
//!
//! Two kinds, kept apart on purpose:
//! - **Counts of things that happen** (requests, prompts submitted and ended, retries, per-node
//!   times, placements, reconnects, refusals) are counters and histograms held here. Components
//!   record into them where the thing happens; each record is an atomic add behind a
//!   read-locked label lookup, cheap enough for every request.
//! - **State** (queue depth, backend health and slots, VRAM, GPU readings, sockets) is read
//!   from the components' own snapshots when Prometheus scrapes, by a [`Collector`] the wiring
//!   registers ([`Metrics::register_collector`]). Nothing copies state into gauges on the hot
//!   path, and a retired backend's series disappear with it instead of going stale.
//!
//! Names and units follow Prometheus' conventions (`_seconds`, `_bytes`, `_total`, base
//! units), all under the `comfy_gate_` prefix. Label sets are bounded: routes are classes,
//! backends are configured names, node classes are capped at [`MAX_NODE_CLASSES`] (the rest
//! count as `other`), and no label ever holds a prompt id, a user-supplied path or a client
//! address. `deploy/prometheus/` has the scrape config and alert rules over these names.

mod labels;

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub use labels::{
    BackendLabel, BandLabel, ClassLabel, LimitLabel, OutcomeLabel, PlacementLabels, ReasonLabel,
    RequestLabels,
};

/// The `outcome` label's values (`comfy_gate_prompts_finished_total`).
pub const OUTCOMES: [&str; 6] = [
    "success",
    "error",
    "interrupted",
    "failed",
    "timeout",
    "deleted",
];

/// The `reason` label's values of `comfy_gate_prompts_retried_total` and `_evacuated_total`
/// (the reasons `Scheduler::requeue` is given).
pub const REQUEUE_REASONS: [&str; 6] = [
    "backend_failed",
    "backend_lost",
    "stalled",
    "taken_back",
    "out_of_memory",
    "max_run_time",
];

/// The `limit` label's values of `comfy_gate_rate_limited_total`: the `[limits]` and queue
/// caps that answer 429 or 503 (`GateError::RateLimited`, `GateError::QueueFull`).
pub const LIMITS: [&str; 9] = [
    "requests_per_second (submit)",
    "requests_per_second (files)",
    "requests_per_second (read)",
    "prompts_per_minute",
    "upload_bytes_per_second",
    "ws_per_ip",
    "gpu_seconds_per_day",
    "max_waiting",
    "max_queued",
];

/// How many distinct node classes get a series of their own; later ones count as `other`.
/// ComfyUI with many custom node packs has a few thousand classes, of which a fleet runs a few
/// dozen; the cap keeps a client that invents class names from growing the scrape.
pub const MAX_NODE_CLASSES: usize = 256;

/// Bucket bounds (seconds) for prompt-level times: queue wait, run, end to end. From 50 ms (a
/// cached run) to 30 minutes (a long video job), about ×2 apart.
const PROMPT_BUCKETS: [f64; 16] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0,
];

/// Bucket bounds (seconds) for one node's execution: from 1 ms (a primitive) to 10 minutes.
const NODE_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0,
];

/// Makes a histogram with fixed buckets (a `Family` needs a constructor that is not a closure
/// capturing anything).
#[derive(Clone, Copy)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A histogram family with fixed buckets.
pub type Histograms<L> = Family<L, Histogram, Buckets>;

/// The gate's event-time metrics and the registry that encodes them with the state the
/// registered collectors read at scrape time. One per gate (tests run several in a process).
pub struct Metrics {
    registry: Mutex<Registry>,
    /// `[metrics] enabled`: when false nothing is recorded ([`Metrics::on`]).
    enabled: bool,
    /// `comfy_gate_http_requests_total{route, code}`: client requests by route class and status.
    pub requests: Family<RequestLabels, Counter>,
    /// `comfy_gate_prompts_submitted_total{band}`: prompts accepted by `POST /prompt`.
    pub prompts_submitted: Family<BandLabel, Counter>,
    /// `comfy_gate_prompts_finished_total{outcome}`: success, error, interrupted, failed (the
    /// gate ended it), timeout (`max_run_time`), deleted.
    pub prompts_finished: Family<OutcomeLabel, Counter>,
    /// `comfy_gate_result_cache_hits_total`: prompts answered from the result cache
    /// (`[cache]`), without a GPU.
    pub cache_hits: Counter,
    /// `comfy_gate_prompts_retried_total{reason}`: runs lost to a failure and run again.
    pub prompts_retried: Family<ReasonLabel, Counter>,
    /// `comfy_gate_prompts_evacuated_total{reason}`: prompts moved off a backend before they
    /// ran there (drain, retirement, its failure), not counted against their retries.
    pub prompts_evacuated: Family<ReasonLabel, Counter>,
    /// `comfy_gate_queue_wait_seconds{backend}`: acceptance to the start of the last run.
    pub queue_wait: Histograms<BackendLabel>,
    /// `comfy_gate_run_seconds{backend}`: the last run, start to end.
    pub run_time: Histograms<BackendLabel>,
    /// `comfy_gate_end_to_end_seconds{backend}`: acceptance to the end.
    pub end_to_end: Histograms<BackendLabel>,
    /// `comfy_gate_node_execution_seconds{class}`: one node's execution (from one `executing`
    /// transition to the next, ComfyUI's only per-node timing on the wire).
    pub node_time: Histograms<ClassLabel>,
    /// `comfy_gate_nodes_cached_total{class}`: nodes ComfyUI reported in `execution_cached`.
    pub nodes_cached: Family<ClassLabel, Counter>,
    /// `comfy_gate_checkpoint_loads_total{backend}` and `_load_seconds`: checkpoint loader
    /// nodes that ran (a load, not a cache hit).
    pub checkpoint_loads: Family<BackendLabel, Counter>,
    pub checkpoint_load_time: Histograms<BackendLabel>,
    /// `comfy_gate_placement_decisions_total{backend, reason}`.
    pub placements: Family<PlacementLabels, Counter>,
    /// `comfy_gate_upstream_reconnects_total{backend}`: the gate's socket to a backend opened
    /// again after it had been open.
    pub upstream_reconnects: Family<BackendLabel, Counter>,
    /// `comfy_gate_rate_limited_total{limit}`: requests and prompts refused by a limit.
    pub rate_limited: Family<LimitLabel, Counter>,
    /// Node classes with a series of their own (see [`MAX_NODE_CLASSES`]).
    classes: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Metrics {
    /// Empty metrics, with `build_info` and `start_time_seconds` (now) registered; `enabled`
    /// false (`[metrics] enabled = false`) records nothing.
    pub fn new(enabled: bool) -> Self {
        let metrics = Self {
            registry: Mutex::new(Registry::with_prefix("comfy_gate")),
            enabled,
            requests: Family::default(),
            prompts_submitted: Family::default(),
            prompts_finished: Family::default(),
            cache_hits: Counter::default(),
            prompts_retried: Family::default(),
            prompts_evacuated: Family::default(),
            queue_wait: Family::new_with_constructor(Buckets(&PROMPT_BUCKETS)),
            run_time: Family::new_with_constructor(Buckets(&PROMPT_BUCKETS)),
            end_to_end: Family::new_with_constructor(Buckets(&PROMPT_BUCKETS)),
            node_time: Family::new_with_constructor(Buckets(&NODE_BUCKETS)),
            nodes_cached: Family::default(),
            checkpoint_loads: Family::default(),
            checkpoint_load_time: Family::new_with_constructor(Buckets(&PROMPT_BUCKETS)),
            placements: Family::default(),
            upstream_reconnects: Family::default(),
            rate_limited: Family::default(),
            classes: Mutex::new(HashSet::new()),
        };
        metrics.register_all();
        metrics.zero_known_series();
        metrics
    }

    /// Counters whose label values are a fixed set start at 0, so `rate()` and `increase()`
    /// see their first event (Prometheus' advice: a series that appears with its first event
    /// hides that event).
    fn zero_known_series(&self) {
        for outcome in OUTCOMES {
            let _ = self
                .prompts_finished
                .get_or_create(&OutcomeLabel { outcome });
        }
        for reason in REQUEUE_REASONS {
            let _ = self.prompts_retried.get_or_create(&ReasonLabel { reason });
            let _ = self
                .prompts_evacuated
                .get_or_create(&ReasonLabel { reason });
        }
        for limit in LIMITS {
            let _ = self.rate_limited.get_or_create(&LimitLabel { limit });
        }
    }

    /// Gives each priority band its `prompts_submitted_total` series at 0 (`scheduler.bands`,
    /// read at start).
    pub fn zero_bands(&self, bands: &[String]) {
        for band in bands {
            let _ = self
                .prompts_submitted
                .get_or_create(&BandLabel { band: band.clone() });
        }
    }

    /// Gives backend `name` its series at 0 (reconnects, checkpoint loads, and the prompt-time
    /// histograms), so a new backend shows on dashboards before its first prompt. Called when
    /// its loops start (at start and when a reload adds it).
    pub fn zero_backend(&self, name: &str) {
        let label = BackendLabel {
            backend: name.to_string(),
        };
        let _ = self.upstream_reconnects.get_or_create(&label);
        let _ = self.checkpoint_loads.get_or_create(&label);
        for h in [&self.queue_wait, &self.run_time, &self.end_to_end] {
            let _ = h.get_or_create(&label);
        }
    }

    fn register_all(&self) {
        let mut r = self.lock();
        r.register(
            "http_requests",
            "Client requests by route class and status code",
            self.requests.clone(),
        );
        r.register(
            "prompts_submitted",
            "Prompts accepted by POST /prompt, by priority band",
            self.prompts_submitted.clone(),
        );
        r.register("prompts_finished", "Prompts that ended, by outcome (success, error, interrupted, failed, timeout, deleted)", self.prompts_finished.clone());
        r.register(
            "result_cache_hits",
            "Prompts answered from the result cache, without a GPU",
            self.cache_hits.clone(),
        );
        r.register(
            "prompts_retried",
            "Runs lost to a failure and run again, by reason",
            self.prompts_retried.clone(),
        );
        r.register(
            "prompts_evacuated",
            "Prompts moved off a backend before running there, by reason",
            self.prompts_evacuated.clone(),
        );
        r.register(
            "nodes_cached",
            "Nodes ComfyUI answered from its cache, by node class",
            self.nodes_cached.clone(),
        );
        r.register(
            "checkpoint_loads",
            "Checkpoint loader nodes that ran, by backend",
            self.checkpoint_loads.clone(),
        );
        r.register(
            "placement_decisions",
            "Placement decisions by chosen backend and reason",
            self.placements.clone(),
        );
        r.register(
            "upstream_reconnects",
            "The gate's socket to a backend opened again",
            self.upstream_reconnects.clone(),
        );
        r.register(
            "rate_limited",
            "Requests and prompts refused by a limit, by limit",
            self.rate_limited.clone(),
        );
        let s = || Unit::Seconds;
        r.register_with_unit(
            "queue_wait",
            "Acceptance to the start of the last run, by backend",
            s(),
            self.queue_wait.clone(),
        );
        r.register_with_unit(
            "run",
            "The last run, start to end, by backend",
            s(),
            self.run_time.clone(),
        );
        r.register_with_unit(
            "end_to_end",
            "Acceptance to the end, by backend",
            s(),
            self.end_to_end.clone(),
        );
        r.register_with_unit(
            "node_execution",
            "One node's execution, by node class",
            s(),
            self.node_time.clone(),
        );
        r.register_with_unit(
            "checkpoint_load",
            "A checkpoint loader node's execution, by backend",
            s(),
            self.checkpoint_load_time.clone(),
        );
        let build = Family::<Vec<(String, String)>, Gauge>::default();
        build
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        r.register("build_info", "The gate's version (always 1)", build);
        let started: Gauge<f64, AtomicU64> = Gauge::default();
        started.set(unix_seconds());
        r.register_with_unit(
            "start_time",
            "When this gate started, Unix time",
            s(),
            started,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// These metrics if they are being recorded (`[metrics] enabled`), for a record site:
    /// `if let Some(m) = metrics.on() { … }`.
    pub fn on(&self) -> Option<&Self> {
        self.enabled.then_some(self)
    }

    /// Adds a collector whose state is read at every scrape (the admin layer's fleet view).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// The OpenMetrics text exposition (ends with `# EOF`), for `GET /metrics` with content
    /// type [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail; a collector's error would be a bug, and half a
        // scrape is still better than none.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.lock());
        out
    }

    /// The label for node class `class`: itself while fewer than [`MAX_NODE_CLASSES`] have
    /// been seen (and it is a plausible class name), `other` after.
    pub fn class_label(&self, class: &str) -> ClassLabel {
        let plausible = !class.is_empty() && class.len() <= 128;
        let mut seen = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        let own = plausible
            && (seen.contains(class)
                || (seen.len() < MAX_NODE_CLASSES && seen.insert(class.into())));
        ClassLabel {
            class: if own { class.into() } else { "other".into() },
        }
    }

    /// Counts one client request (called as its response is done).
    pub fn request(&self, route: &'static str, code: u16) {
        if !self.enabled {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels { route, code })
            .inc();
    }
}

/// `GET /metrics`'s content type: OpenMetrics 1.0 text, which Prometheus negotiates.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds since the Unix epoch, now.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A gauge family built at scrape time: rows of `(labels, value)` encoded under `name` (the
/// registry's prefix is added), with `unit` appended as OpenMetrics requires.
pub fn encode_gauges<L>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Gauge<f64, AtomicU64>>::default();
    for (labels, value) in rows {
        family.get_or_create(&labels).set(value);
    }
    let metric = encoder.encode_descriptor(name, help, unit.as_ref(), family.metric_type())?;
    family.encode(metric)
}

#[cfg(test)]
mod tests;
