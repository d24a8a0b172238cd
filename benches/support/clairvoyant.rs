//! The clairvoyant reference the scheduling benches hold the gate to (issue 16): computed from
//! the trace, not run. It knows every job's exact service time on every GPU (comfy-sim's cost
//! model, [`Job::service_s`]) and pays checkpoint loads as the sims do: a job whose checkpoint
//! is not the one the previous job on that GPU used waits `ckpt_gb × LOAD_SECONDS_PER_GB` first.
//! A job goes only where it fits alone (the sim's baseline, its checkpoint and its sampling
//! working memory within the card). Each GPU runs what it was given in
//! the order given, one at a time, starting each job at its arrival or when the GPU frees,
//! whichever is later (no gap filling, no preemption).
//!
//! Three rules place the jobs, each job on the GPU where it would *finish* first (load
//! included; the busy fast GPU can beat the idle slow one):
//!
//! - [`Rule::InOrder`]: in arrival order.
//! - [`Rule::EarliestFinish`] and [`Rule::Resident`] reorder within the window the gate allows
//!   (`placement.max_skips`, default 8). A decision is made at `t`, the later of the first GPU
//!   to free and the oldest unplaced job's arrival; the window is the first `max_skips + 1`
//!   unplaced jobs in arrival order that have arrived by `t`. `EarliestFinish` takes the one
//!   whose best finish is soonest (ties: the older); `Resident` takes the oldest whose best
//!   placement loads no checkpoint, or the oldest if all would load (the gate's own switching
//!   rule, done with exact times). Each job in the window ahead of the one taken counts a skip;
//!   a job skipped `max_skips` times is taken next (the gate's aging), so no job waits longer
//!   than `max_skips` placements behind younger ones.
//!
//! None of the three is an optimum (that is NP-hard with loads and arrivals); each is a
//! schedule that was available to a scheduler with perfect knowledge and the gate's freedom.

// Each bench uses its own part of this file.
#![allow(dead_code)]

use crate::workload::{BASELINE_GB, Job, Summary, cost, pct};

/// How the reference orders its placements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Arrival order.
    InOrder,
    /// Within the window, the job that finishes first.
    EarliestFinish,
    /// Within the window, the oldest job that loads no checkpoint.
    Resident,
}

impl Rule {
    pub const ALL: [Rule; 3] = [Rule::InOrder, Rule::EarliestFinish, Rule::Resident];

    pub fn name(self) -> &'static str {
        match self {
            Rule::InOrder => "clairvoyant, in order",
            Rule::EarliestFinish => "clairvoyant, window: earliest finish first",
            Rule::Resident => "clairvoyant, window: resident checkpoint first",
        }
    }
}

/// One rule's schedule of a trace. Times in simulated seconds.
pub struct Reference {
    pub rule: Rule,
    pub latencies: Vec<f64>,
    pub makespan: f64,
    /// Checkpoint loads it paid.
    pub loads: u64,
    /// Jobs no GPU holds.
    pub failed: usize,
}

impl Reference {
    pub fn summary(&self) -> Summary {
        Summary::of(&self.latencies, self.makespan)
    }

    pub fn p95(&self) -> f64 {
        pct(&self.latencies, 0.95)
    }
}

struct Gpu {
    speed: f64,
    vram_gb: f64,
    /// When the work given to it so far ends (s).
    free_at: f64,
    /// The checkpoint of the last job given to it.
    last: Option<&'static str>,
}

/// Where `j` would finish first: (GPU, end s, loads a checkpoint); `None` if it fits nowhere.
fn best(gpus: &[Gpu], j: &Job) -> Option<(usize, f64, bool)> {
    let mut out: Option<(usize, f64, bool)> = None;
    let ckpt_gb = j.ckpt_gb();
    let need_gb = BASELINE_GB + ckpt_gb + j.working_gb();
    for (b, g) in gpus.iter().enumerate() {
        if need_gb > g.vram_gb {
            continue;
        }
        let loads = g.last != Some(j.ckpt);
        let load_s = if loads {
            ckpt_gb * cost::LOAD_SECONDS_PER_GB
        } else {
            0.0
        };
        let end = g.free_at.max(j.at_s) + load_s + j.service_s(g.speed);
        if out.is_none_or(|o| end < o.1) {
            out = Some((b, end, loads));
        }
    }
    out
}

/// The schedule `rule` makes of `jobs` (arrival order) on `fleet` ((speed, VRAM GB) per GPU),
/// reordering within `max_skips` as described in the module doc.
pub fn schedule(jobs: &[Job], fleet: &[(f64, f64)], rule: Rule, max_skips: u32) -> Reference {
    let mut gpus: Vec<Gpu> = fleet
        .iter()
        .map(|&(speed, vram_gb)| Gpu {
            speed,
            vram_gb,
            free_at: 0.0,
            last: None,
        })
        .collect();
    let mut unplaced: std::collections::VecDeque<usize> = (0..jobs.len()).collect();
    let mut skips = vec![0u32; jobs.len()];
    let (mut latencies, mut loads, mut failed) = (Vec::with_capacity(jobs.len()), 0, 0);
    let window = max_skips as usize + 1;
    while let Some(&head) = unplaced.front() {
        let mut pick = 0;
        if rule != Rule::InOrder && skips[head] < max_skips {
            let first_free = gpus.iter().map(|g| g.free_at).fold(f64::INFINITY, f64::min);
            let t = first_free.max(jobs[head].at_s);
            let mut head_best = None;
            for (k, &j) in unplaced.iter().take(window).enumerate() {
                if jobs[j].at_s > t {
                    break;
                }
                let Some((_, end, loads)) = best(&gpus, &jobs[j]) else {
                    continue;
                };
                match rule {
                    Rule::EarliestFinish => {
                        if head_best.is_none_or(|e| end < e) {
                            head_best = Some(end);
                            pick = k;
                        }
                    }
                    _ => {
                        if !loads {
                            pick = k;
                            break;
                        }
                    }
                }
            }
        }
        for &j in unplaced.iter().take(pick) {
            skips[j] += 1;
        }
        let j = unplaced.remove(pick).expect("in the window");
        let job = &jobs[j];
        match best(&gpus, job) {
            Some((b, end, load)) => {
                let g = &mut gpus[b];
                g.free_at = end;
                g.last = Some(job.ckpt);
                loads += load as u64;
                latencies.push(end - job.at_s);
            }
            None => failed += 1,
        }
    }
    let makespan = gpus.iter().map(|g| g.free_at).fold(0.0, f64::max);
    Reference {
        rule,
        latencies,
        makespan,
        loads,
        failed,
    }
}

/// All three rules' schedules, and the index of the reference among them: the one with the
/// lowest p95 (the targets are about p95, and each rule was open to a clairvoyant scheduler with
/// the gate's freedom, so the gate is held to the best of them).
pub fn references(jobs: &[Job], fleet: &[(f64, f64)], max_skips: u32) -> (Vec<Reference>, usize) {
    let all: Vec<Reference> = Rule::ALL
        .iter()
        .map(|&r| schedule(jobs, fleet, r, max_skips))
        .collect();
    let best = (0..all.len())
        .min_by(|&a, &b| all[a].p95().total_cmp(&all[b].p95()))
        .expect("three rules");
    (all, best)
}

/// The three rules' rows of a one-trace table (`workload::print_head`), against `r`.
pub fn print_rows(all: &[Reference], r: &Summary) {
    for c in all {
        let s = c.summary();
        let x = s.ratio(r);
        println!(
            "| {} (computed) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.1} ({:.2}) | | {} | {} |",
            c.rule.name(),
            s.p50,
            x[0],
            s.p95,
            x[1],
            s.p99,
            x[2],
            s.makespan,
            x[3],
            c.loads,
            c.failed
        );
    }
}
