//! Issue 15, acceptance 6: what metrics and timelines cost the gate. Two gates over the same
//! sim, one as configured by default and one with `[metrics] enabled = false, timelines =
//! false`, measured in turn (on, off, on, off …) so drift on a shared machine hits both alike;
//! each side's median over the rounds is compared, with its range.
//!
//! Two paths: a proxied request (`GET /history/{id}` asked of the backend: the request
//! counter is all of issue 15 on it) and whole prompts through the gate, closed loop (every
//! transition marks the timeline; every node, placement and end updates counters and
//! histograms).

use std::time::Duration;

use comfy_gate::loadtest::{LoadTest, Options};

use crate::rounds::median_and_range;
use crate::support::{GateProcess, fmt_ms, http_load};

/// Rounds per side (alternating).
const ROUNDS: usize = 5;
/// Each HTTP round: warm-up, then measurement.
const HTTP_WARMUP: Duration = Duration::from_millis(500);
const HTTP_MEASURE: Duration = Duration::from_secs(3);
/// Each prompt round: concurrent users, for this long.
const PROMPT_USERS: usize = 8;
const PROMPT_MEASURE: Duration = Duration::from_secs(4);
/// The switch the "off" gate is started with.
pub const OFF: &str = "[metrics]\nenabled = false\ntimelines = false\n";

/// One line of the result: the case, each side's median rate and range.
pub struct Cost {
    pub case: String,
    pub on: f64,
    pub off: f64,
    pub spread_on: (f64, f64),
    pub spread_off: (f64, f64),
}

impl Cost {
    /// `on / off` of the medians (1.00: no cost).
    pub fn ratio(&self) -> f64 {
        self.on / self.off
    }

    /// A markdown row: case, on (range), off (range), ratio.
    pub fn row(&self) -> String {
        format!(
            "| {} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | ×{:.3} ({:+.1} %) |",
            self.case,
            self.on,
            self.spread_on.0,
            self.spread_on.1,
            self.off,
            self.spread_off.0,
            self.spread_off.1,
            self.ratio(),
            (self.ratio() - 1.0) * 100.0
        )
    }
}

/// `measure` of each gate in turn (on, off, on …), `ROUNDS` times each: the two sides' rates.
async fn in_turn(
    on: &GateProcess,
    off: &GateProcess,
    mut measure: impl AsyncFnMut(&GateProcess, &'static str) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(measure(on, "on").await);
        b.push(measure(off, "off").await);
    }
    (a, b)
}

impl Cost {
    /// The medians and ranges of each side's rates.
    fn of(case: String, (on, off): (Vec<f64>, Vec<f64>)) -> Self {
        let ((on, spread_on), (off, spread_off)) = (median_and_range(on), median_and_range(off));
        Cost {
            case,
            on,
            off,
            spread_on,
            spread_off,
        }
    }
}

/// The proxied request, `ROUNDS` times per side, in turn.
pub async fn http_cost(on: &GateProcess, off: &GateProcess, case: &str, path: &str) -> Cost {
    let rates = in_turn(on, off, async |gate, side| {
        let s = http_load(gate.addr, path, 100, 32, HTTP_WARMUP, HTTP_MEASURE).await;
        assert_eq!(s.errors, 0, "errors measuring {path}");
        println!(
            "metrics cost: {case} via gate ({side}): {:.0} req/s, p99 {}",
            s.rps(),
            fmt_ms(s.p99_ms())
        );
        s.rps()
    })
    .await;
    Cost::of(format!("{case}, req/s"), rates)
}

/// Whole prompts (the loadtest's txt2img, a fresh seed each), `PROMPT_USERS` closed-loop users
/// for `PROMPT_MEASURE`, `ROUNDS` times per side, in turn.
pub async fn prompt_cost(on: &GateProcess, off: &GateProcess) -> Cost {
    let rates = in_turn(on, off, async |gate, side| {
        let report = LoadTest::new(Options {
            users: PROMPT_USERS,
            duration: Some(PROMPT_MEASURE),
            vary_seed: true,
            ..Options::new(&gate.url())
        })
        .run()
        .await
        .expect("the load test runs");
        assert_eq!(report.failed + report.timed_out, 0, "prompts failed");
        let per_s = report.succeeded as f64 / report.wall_time_s;
        println!(
            "metrics cost: prompts via gate ({side}): {per_s:.1} prompts/s ({} in {:.1} s)",
            report.succeeded, report.wall_time_s
        );
        per_s
    })
    .await;
    Cost::of(
        format!("whole prompts, {PROMPT_USERS} users closed loop, prompts/s"),
        rates,
    )
}
