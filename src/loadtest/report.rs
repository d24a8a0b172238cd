//! What a load test measured: per-prompt outcomes folded into counts, nearest-rank percentiles,
//! throughput and errors by kind, printable as a table or as JSON. The outcomes themselves, with
//! their times in the run, stay in the report (not in its JSON, which stays one screen long) for
//! the charts of `--report FILE.html` (see `html`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// How one prompt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Succeeded,
    /// The error kind: an HTTP status (`http_503`), ComfyUI's error type, the
    /// `exception_type` of an `execution_error`, `interrupted` or `connection`.
    Failed(String),
    TimedOut,
}

/// One prompt's result and timings.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The `prompt_id` the load generator gave it.
    pub prompt_id: String,
    pub status: Status,
    /// When it was submitted, counted from the run's start.
    pub submitted_at: Duration,
    /// When it ended (or timed out), counted from the run's start.
    pub ended_at: Duration,
    /// The name of the backend that ran it: `None` without [`super::Options::admin_url`] (the
    /// gate's client API does not say which backend ran a prompt); with it, the name its last
    /// placement chose, or [`UNKNOWN_BACKEND`] when none was seen (never placed, or its
    /// decision left the gate's list before it was read).
    pub backend: Option<String>,
    /// Submit → `execution_start` (when the start was seen).
    pub queue_wait: Option<Duration>,
    /// `execution_start` → end (succeeded prompts).
    pub run_time: Option<Duration>,
    /// Submit → end (succeeded prompts).
    pub latency: Option<Duration>,
}

/// Nearest-rank percentiles of one measure, in seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    /// `None` without samples.
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Option<Self> {
        let mut v: Vec<Duration> = samples.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let rank = |p: f64| {
            let r = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[r.clamp(1, v.len()) - 1].as_secs_f64()
        };
        Some(Self {
            samples: v.len(),
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
        })
    }
}

/// The result of a load test.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub url: String,
    /// `closed` (users submit one prompt after another) or `open` (Poisson arrivals).
    pub mode: String,
    pub users: usize,
    pub total: u64,
    pub succeeded: u64,
    /// Ended in an error (timeouts are counted apart).
    pub failed: u64,
    pub timed_out: u64,
    /// From the first submission to the last prompt's end, in seconds.
    pub wall_time_s: f64,
    /// Succeeded prompts per minute of wall time.
    pub throughput_per_min: f64,
    pub queue_wait_s: Option<Percentiles>,
    pub run_time_s: Option<Percentiles>,
    pub latency_s: Option<Percentiles>,
    pub errors: BTreeMap<String, u64>,
    /// Prompts (any outcome) by the name of the backend that ran them; `(unknown)` for those
    /// no placement named. Empty when the backends were not known (no `admin_url`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, u64>,
    /// The options the run was given, as (name, value) for the HTML report's summary.
    #[serde(skip)]
    pub settings: Vec<(String, String)>,
    /// Every prompt's outcome, in the order they ended (for the HTML report's charts).
    #[serde(skip)]
    pub outcomes: Vec<Outcome>,
}

/// The name [`Report::backends`] counts a prompt under when no placement named its backend.
pub const UNKNOWN_BACKEND: &str = "(unknown)";

impl Report {
    /// Folds `outcomes` into counts and percentiles; `wall` is the run's duration.
    pub fn from_outcomes(
        url: &str,
        mode: &str,
        users: usize,
        outcomes: &[Outcome],
        wall: Duration,
    ) -> Self {
        let mut errors = BTreeMap::new();
        let (mut succeeded, mut failed, mut timed_out) = (0, 0, 0);
        for o in outcomes {
            match &o.status {
                Status::Succeeded => succeeded += 1,
                Status::Failed(kind) => {
                    failed += 1;
                    *errors.entry(kind.clone()).or_insert(0) += 1;
                }
                Status::TimedOut => {
                    timed_out += 1;
                    *errors.entry("timeout".to_string()).or_insert(0) += 1;
                }
            }
        }
        let mut backends = BTreeMap::new();
        if outcomes.iter().any(|o| o.backend.is_some()) {
            for o in outcomes {
                let name = o.backend.as_deref().unwrap_or(UNKNOWN_BACKEND);
                *backends.entry(name.to_string()).or_insert(0) += 1;
            }
        }
        let minutes = wall.as_secs_f64() / 60.0;
        Self {
            url: url.to_string(),
            mode: mode.to_string(),
            users,
            total: outcomes.len() as u64,
            succeeded,
            failed,
            timed_out,
            wall_time_s: wall.as_secs_f64(),
            throughput_per_min: if minutes > 0.0 {
                succeeded as f64 / minutes
            } else {
                0.0
            },
            queue_wait_s: Percentiles::of(outcomes.iter().filter_map(|o| o.queue_wait)),
            run_time_s: Percentiles::of(outcomes.iter().filter_map(|o| o.run_time)),
            latency_s: Percentiles::of(outcomes.iter().filter_map(|o| o.latency)),
            errors,
            backends,
            settings: Vec::new(),
            outcomes: outcomes.to_vec(),
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// The report as a table.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "load test of {} ({} users, {} loop)",
            self.url, self.users, self.mode
        )?;
        writeln!(
            f,
            "  prompts     total {}  succeeded {}  failed {}  timed out {}",
            self.total, self.succeeded, self.failed, self.timed_out
        )?;
        writeln!(
            f,
            "  wall time   {}  throughput {:.1} /min",
            secs(self.wall_time_s),
            self.throughput_per_min
        )?;
        writeln!(
            f,
            "\n  {:<12} {:>8} {:>11} {:>11} {:>11}",
            "", "samples", "p50", "p95", "p99"
        )?;
        for (name, p) in [
            ("queue wait", &self.queue_wait_s),
            ("run time", &self.run_time_s),
            ("latency", &self.latency_s),
        ] {
            match p {
                Some(p) => writeln!(
                    f,
                    "  {:<12} {:>8} {:>11} {:>11} {:>11}",
                    name,
                    p.samples,
                    secs(p.p50),
                    secs(p.p95),
                    secs(p.p99)
                )?,
                None => writeln!(
                    f,
                    "  {:<12} {:>8} {:>11} {:>11} {:>11}",
                    name, 0, "-", "-", "-"
                )?,
            }
        }
        if !self.errors.is_empty() {
            writeln!(f, "\n  errors by kind")?;
            for (kind, n) in &self.errors {
                writeln!(f, "    {kind:<40} {n}")?;
            }
        }
        if !self.backends.is_empty() {
            writeln!(f, "\n  prompts by backend")?;
            for (name, n) in &self.backends {
                writeln!(f, "    {name:<40} {n}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let ms = |v: u64| Duration::from_millis(v);
        let p = Percentiles::of((1..=100).map(ms)).unwrap();
        assert_eq!((p.p50, p.p95, p.p99), (0.05, 0.095, 0.099));
        let p = Percentiles::of([ms(3), ms(1), ms(2)]).unwrap();
        assert_eq!((p.p50, p.p95, p.p99), (0.002, 0.003, 0.003));
        assert!(Percentiles::of([]).is_none());
    }
}
