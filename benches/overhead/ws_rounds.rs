//! WebSocket event delivery in interleaved rounds: each round connects `CLIENTS` clients
//! straight to the sim, then as many to the gate, and times `PROMPTS` `execution_start`
//! events on each; the gate's added latency is taken per round (gate − direct of that round),
//! then its median and range over the rounds.

use crate::rounds::{Spread, in_turn};
use crate::support::{fmt_ms, group_thousands, ws_latency};

/// Rounds per path.
pub const ROUNDS: usize = 3;
/// Connected clients in each round.
pub const CLIENTS: usize = 1_000;
/// Prompts (one `execution_start` each, for the next client in turn) per round.
pub const PROMPTS: usize = 300;

/// One path's summary: its p50 and p99, and what it adds to direct's of the same round.
pub struct WsPath {
    pub label: &'static str,
    pub p50: Spread,
    pub p99: Spread,
    pub added_p50: Spread,
    pub added_p99: Spread,
}

/// The paths, direct first, and the fewest clients any round connected.
pub struct WsResult {
    pub clients: usize,
    pub paths: Vec<WsPath>,
}

impl WsResult {
    /// The path labelled `label`, if measured.
    pub fn get(&self, label: &str) -> Option<&WsPath> {
        self.paths.iter().find(|p| p.label == label)
    }

    /// Markdown rows in the HTTP table's columns.
    pub fn rows(&self) -> Vec<String> {
        let case = format!(
            "WS execution_start delivery ({} clients)",
            group_thousands(self.clients)
        );
        self.paths
            .iter()
            .map(|p| {
                let added = match p.label {
                    "direct" => "—".to_string(),
                    _ => format!(
                        "added p50 {:+.2} ms ({}), p99 {:+.2} ms ({})",
                        p.added_p50.median,
                        p.added_p50.range(2),
                        p.added_p99.median,
                        p.added_p99.range(2)
                    ),
                };
                format!(
                    "| {case} | {} | — | {} | {} | {added} | — |",
                    p.label,
                    fmt_ms(p.p50.median),
                    fmt_ms(p.p99.median)
                )
            })
            .collect()
    }
}

/// `ROUNDS` rounds of each of `urls` (direct first) in turn.
pub async fn measure(urls: &[(&'static str, String)]) -> WsResult {
    let runs = in_turn(urls.len(), ROUNDS, async |i, round| {
        let (label, url) = &urls[i];
        let r = ws_latency(url, &format!("{label}{round}"), CLIENTS, PROMPTS).await;
        println!(
            "overhead: ws delivery via {label} (round {}): {} clients, {} events, p50 {}, p99 {}",
            round + 1,
            r.clients,
            r.latencies_ms.len(),
            fmt_ms(r.p50_ms()),
            fmt_ms(r.p99_ms())
        );
        (r.clients, r.p50_ms(), r.p99_ms())
    })
    .await;
    type Run = (usize, f64, f64);
    let col = |path: usize, f: fn(&Run) -> f64| -> Vec<f64> { runs[path].iter().map(f).collect() };
    let added = |path: usize, f: fn(&Run) -> f64| -> Spread {
        let d: Vec<f64> = col(path, f)
            .iter()
            .zip(col(0, f))
            .map(|(g, d)| g - d)
            .collect();
        Spread::of(&d)
    };
    WsResult {
        clients: runs.iter().flatten().map(|r| r.0).min().unwrap_or(0),
        paths: urls
            .iter()
            .enumerate()
            .map(|(i, (label, _))| WsPath {
                label,
                p50: Spread::of(&col(i, |r| r.1)),
                p99: Spread::of(&col(i, |r| r.2)),
                added_p50: added(i, |r| r.1),
                added_p99: added(i, |r| r.2),
            })
            .collect(),
    }
}
