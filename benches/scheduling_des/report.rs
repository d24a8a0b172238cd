//! The DES's tables over seeds: per policy the median ratio to the clairvoyant reference and
//! its spread (min–max over seeds), and the targets block.

use crate::workload::pct;

/// One row's figures, one entry per seed.
#[derive(Default)]
pub struct Row {
    pub name: String,
    /// p50, p95, p99 and makespan over the reference's, per seed.
    pub ratios: Vec<[f64; 4]>,
    pub loads: Vec<f64>,
    /// Share of fleet capacity spent loading checkpoints (DES rows only).
    pub loading: Vec<f64>,
    /// Share of fleet capacity idle while prompts waited in the gate (DES rows only).
    pub idle_waiting: Vec<f64>,
    pub failed: Vec<f64>,
}

/// "median (min–max)" of `v` with `d` decimals; "–" when empty.
pub fn spread(v: &[f64], d: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.d$} ({lo:.d$}–{hi:.d$})", pct(v, 0.5))
}

fn shares(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let pc: Vec<f64> = v.iter().map(|x| x * 100.0).collect();
    format!("{} %", spread(&pc, 1))
}

pub fn print_table(rows: &[Row]) {
    println!(
        "| policy | p50 ×ref | p95 ×ref | p99 ×ref | makespan ×ref | ckpt loads | loading | idle, prompts waiting | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let col = |k: usize| spread(&r.ratios.iter().map(|x| x[k]).collect::<Vec<_>>(), 2);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            col(0),
            col(1),
            col(2),
            col(3),
            spread(&r.loads, 0),
            shares(&r.loading),
            shares(&r.idle_waiting),
            spread(&r.failed, 0),
        );
    }
}

/// One line of the targets block: the gate default's p95 over the reference's, per seed.
pub struct Target {
    pub shape: &'static str,
    pub load: f64,
    pub p95: Vec<f64>,
}

impl Target {
    /// The bound the issue sets: 1.2× at 95 % load, 1.1× at 70 %.
    pub fn bound(&self) -> f64 {
        if self.load > 0.9 { 1.2 } else { 1.1 }
    }
}

pub fn print_targets(targets: &[Target]) {
    println!("## Targets: gate default p95 ÷ clairvoyant reference p95\n");
    println!(
        "| fleet | load | gate default p95 ÷ ref, median (range over seeds) | target | status |"
    );
    println!("|---|---|---|---|---|");
    for t in targets {
        let bound = t.bound();
        let median = pct(&t.p95, 0.5);
        let over = t.p95.iter().filter(|&&x| x > bound).count();
        let status = if over == 0 {
            "holds, every seed".to_string()
        } else if median <= bound {
            format!(
                "holds at the median; misses in {over} of {} seeds",
                t.p95.len()
            )
        } else {
            format!(
                "misses by {:.0} % at the median ({over} of {} seeds over)",
                (median / bound - 1.0) * 100.0,
                t.p95.len()
            )
        };
        println!(
            "| {} | {:.0} % | {} | ≤ {bound:.1}× | {status} |",
            t.shape,
            t.load * 100.0,
            spread(&t.p95, 2)
        );
    }
    println!();
}
