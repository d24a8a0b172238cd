//! Scheduling quality in simulated time, held to a clairvoyant reference (issue 16): a
//! deterministic discrete-event simulation (`scheduling_des/sim.rs`) that calls the gate's
//! decision (`sched::decide`) whenever a prompt arrives or a slot frees, on three fleet shapes
//! (the end-to-end bench's heterogeneous four, eight equal GPUs, 64 mixed), at 70 % and 95 % of
//! each fleet's capacity, over five seeds of the scheduling trace.
//!
//! The reference (`support/clairvoyant.rs`) is computed from each trace: every job on the GPU
//! where it would finish first, knowing exact service times and paying checkpoint loads, placed
//! in arrival order or reordered within the gate's window (`max_skips`) by one of two greedy
//! rules. The reference is whichever of the three has the lowest p95 on that trace (all of its
//! figures): the gate may reorder within that window, so holding it only to the in-order
//! schedule would flatter it wherever reordering pays; the three rows are printed too (ratios
//! to the reference, so the winner shows 1.00).
//!
//! Prints, per shape and load, each policy's p50, p95, p99 and makespan over the reference's
//! (median over seeds, min–max in brackets), its checkpoint loads, the share of the fleet's
//! capacity (speed-weighted GPU seconds over the makespan) spent loading checkpoints and idle
//! while prompts waited in the gate, and failures; then the targets block (the gate default's
//! p95 ÷ the reference's against 1.2× at 95 % load and 1.1× at 70 %). `cargo bench --bench
//! scheduling_des -- WORD` runs only the policies or the shapes whose name contains WORD.

#[path = "support/clairvoyant.rs"]
mod clairvoyant;
#[path = "scheduling_des/report.rs"]
mod report;
#[path = "scheduling_des/sim.rs"]
mod sim;
#[path = "support/workload.rs"]
mod workload;

use std::time::Instant;

use comfy_gate::fleet::picker::{GpuAware, LeastInFlight, Picker, RoundRobin};
use comfy_gate::sched::decide::Rules;
use report::{Row, Target, print_table, print_targets, spread};
use workload::{Shape, trace_on};

const SEEDS: [u64; 5] = [42, 43, 44, 45, 46];
const LOADS: [f64; 2] = [0.70, 0.95];
/// Jobs per trace (about 150 per GPU on the 64, 1,250 on the 8: past the warm-up either way;
/// more makes the nginx-like rows on the 64, whose queues grow without bound, slow to play).
const JOBS: usize = 10_000;

type Policy = (&'static str, fn() -> Box<dyn Picker>, usize);

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let policies: [Policy; 4] = [
        (
            "gate default (gpu_aware, late binding)",
            || Box::new(GpuAware::default()),
            2,
        ),
        (
            "gate gpu_aware, bound immediately",
            || Box::new(GpuAware::default()),
            1000,
        ),
        (
            "round robin (nginx-like picker)",
            || Box::new(RoundRobin::default()),
            1000,
        ),
        (
            "least connections (nginx-like picker)",
            || Box::new(LeastInFlight),
            1000,
        ),
    ];
    let max_skips = Rules::default().max_skips;
    let mut targets = Vec::new();
    for shape in Shape::all() {
        if !policies.iter().any(|p| wanted(&filter, &shape, p.0)) {
            continue;
        }
        let n = JOBS;
        println!(
            "# Scheduling DES: {}, {n} jobs, seeds {}–{}, simulated time\n",
            shape.name,
            SEEDS[0],
            SEEDS[SEEDS.len() - 1]
        );
        for load in LOADS {
            let t0 = Instant::now();
            let mut refs: Vec<Row> = clairvoyant::Rule::ALL
                .iter()
                .map(|r| Row {
                    name: r.name().to_string(),
                    ..Row::default()
                })
                .collect();
            let mut rows: Vec<Row> = Vec::new();
            let (mut abs, mut winners) = (Vec::new(), Vec::new());
            let mut wall: std::collections::BTreeMap<&str, f64> = Default::default();
            for &seed in &SEEDS {
                let jobs = trace_on(load, seed, n, &shape.gpus);
                let (all, best) = clairvoyant::references(&jobs, &shape.gpus, max_skips);
                let r = all[best].summary();
                abs.push(r);
                winners.push(all[best].rule.name());
                for (row, c) in refs.iter_mut().zip(&all) {
                    row.ratios.push(c.summary().ratio(&r));
                    row.loads.push(c.loads as f64);
                    row.failed.push(c.failed as f64);
                }
                let mut k = 0;
                for (name, picker, max_inflight) in &policies {
                    if !wanted(&filter, &shape, name) {
                        continue;
                    }
                    if rows.len() <= k {
                        rows.push(Row {
                            name: name.to_string(),
                            ..Row::default()
                        });
                    }
                    let t1 = Instant::now();
                    let (o, d) =
                        sim::simulate(&jobs, &shape.gpus, picker().as_ref(), *max_inflight);
                    *wall.entry(*name).or_default() += t1.elapsed().as_secs_f64();
                    let row = &mut rows[k];
                    row.ratios.push(o.summary().ratio(&r));
                    row.loads.push(o.loads as f64);
                    row.loading.push(d.loading);
                    row.idle_waiting.push(d.idle_waiting);
                    row.failed.push(o.failed as f64);
                    if name.starts_with("gate default") {
                        targets_p95(&mut targets, &shape, load, o.summary().p95 / r.p95);
                    }
                    k += 1;
                }
            }
            println!("## Load {:.0} % of capacity\n", load * 100.0);
            let col = |f: fn(&workload::Summary) -> f64| {
                spread(&abs.iter().map(f).collect::<Vec<_>>(), 1)
            };
            println!(
                "Reference (s, median (range) over seeds): p50 {}, p95 {}, p99 {}, makespan {}. Lowest p95 per seed: {}.\n",
                col(|s| s.p50),
                col(|s| s.p95),
                col(|s| s.p99),
                col(|s| s.makespan),
                winners.join("; ")
            );
            refs.extend(rows);
            print_table(&refs);
            let each: Vec<String> = wall.iter().map(|(k, v)| format!("{k} {v:.1} s")).collect();
            println!(
                "\nwall time: {:.1} s ({})\n",
                t0.elapsed().as_secs_f64(),
                each.join("; ")
            );
        }
    }
    print_targets(&targets);
}

/// Whether `cargo bench -- WORD` asks for this policy on this shape: WORD in either name.
fn wanted(filter: &Option<String>, shape: &Shape, policy: &str) -> bool {
    filter
        .as_ref()
        .is_none_or(|f| policy.contains(f.as_str()) || shape.name.contains(f.as_str()))
}

/// Adds one seed's gate-default p95 ratio to the targets line of (`shape`, `load`).
fn targets_p95(targets: &mut Vec<Target>, shape: &Shape, load: f64, ratio: f64) {
    match targets
        .iter_mut()
        .find(|t| t.shape == shape.name && t.load == load)
    {
        Some(t) => t.p95.push(ratio),
        None => targets.push(Target {
            shape: shape.name,
            load,
            p95: vec![ratio],
        }),
    }
}
