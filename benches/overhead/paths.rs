//! The HTTP cases of the overhead bench, each path (direct, gate, nginx, and a second gate
//! binary when one is given to compare against) measured in interleaved rounds
//! ([`crate::rounds::in_turn`]): per path the median req/s, p50 and p99 over the rounds and the
//! spread of req/s.

use std::net::SocketAddr;
use std::time::Duration;

use crate::rounds::{Spread, in_turn, ratio};
use crate::support::{HttpCase, fmt_ms, http_load};

/// Rounds per path.
pub const ROUNDS: usize = 5;
/// Warm-up of each round (the connections open, pools fill).
pub const WARMUP: Duration = Duration::from_millis(500);
/// Measurement of each round.
pub const MEASURE: Duration = Duration::from_secs(2);
/// Concurrent keep-alive connections of the load generator.
pub const CONNS: usize = 32;

/// One path's summary over the rounds.
pub struct PathStats {
    pub label: &'static str,
    pub rps: Spread,
    pub p50: Spread,
    pub p99: Spread,
    pub errors: u64,
}

/// A case's paths, in the order measured.
pub struct CaseResult {
    pub name: String,
    pub paths: Vec<PathStats>,
}

impl CaseResult {
    /// The path labelled `label`, if measured.
    pub fn get(&self, label: &str) -> Option<&PathStats> {
        self.paths.iter().find(|p| p.label == label)
    }

    /// Median req/s of `a` over median req/s of `b` (NaN when either is missing).
    pub fn rps_ratio(&self, a: &str, b: &str) -> f64 {
        match (self.get(a), self.get(b)) {
            (Some(a), Some(b)) => ratio(a.rps.median, b.rps.median),
            _ => f64::NAN,
        }
    }

    /// Markdown rows, one per path: req/s median (range), p50, p99, ×direct, ×nginx.
    pub fn rows(&self) -> Vec<String> {
        let r = |x: f64| {
            if x.is_nan() {
                "—".to_string()
            } else {
                format!("×{x:.2}")
            }
        };
        self.paths
            .iter()
            .map(|p| {
                let errors = match p.errors {
                    0 => String::new(),
                    n => format!(" ({n} errors)"),
                };
                format!(
                    "| {} | {}{errors} | {:.0} ({}) | {} | {} | {} | {} |",
                    self.name,
                    p.label,
                    p.rps.median,
                    p.rps.range(0),
                    fmt_ms(p.p50.median),
                    fmt_ms(p.p99.median),
                    r(self.rps_ratio(p.label, "direct")),
                    r(self.rps_ratio(p.label, "nginx")),
                )
            })
            .collect()
    }
}

/// `case` on each of `paths`, `ROUNDS` rounds in turn.
pub async fn measure(case: &HttpCase, paths: &[(&'static str, SocketAddr)]) -> CaseResult {
    let runs = in_turn(paths.len(), ROUNDS, async |i, round| {
        let (label, addr) = paths[i];
        let s = http_load(
            addr,
            &case.path,
            case.expect_min_bytes,
            CONNS,
            WARMUP,
            MEASURE,
        )
        .await;
        println!(
            "overhead: {} via {label} (round {}): {:.0} req/s, p50 {}, p99 {}, {} errors",
            case.name,
            round + 1,
            s.rps(),
            fmt_ms(s.p50_ms()),
            fmt_ms(s.p99_ms()),
            s.errors
        );
        s
    })
    .await;
    let paths = paths
        .iter()
        .zip(runs)
        .map(|((label, _), runs)| {
            let of = |f: fn(&crate::support::LoadStats) -> f64| {
                Spread::of(&runs.iter().map(f).collect::<Vec<_>>())
            };
            PathStats {
                label,
                rps: of(|s| s.rps()),
                p50: of(|s| s.p50_ms()),
                p99: of(|s| s.p99_ms()),
                errors: runs.iter().map(|s| s.errors).sum(),
            }
        })
        .collect();
    CaseResult {
        name: case.name.clone(),
        paths,
    }
}
