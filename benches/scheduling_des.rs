//! Scheduling quality in simulated time: the fleet, checkpoints, seeded trace and loads of
//! `benches/scheduling.rs`, but instead of real sims and a real gate, a deterministic
//! discrete-event simulation that calls the gate's decision (`sched::decide`) whenever a prompt
//! arrives or a slot frees. Service and checkpoint load times come from comfy-sim's cost model;
//! a backend runs one prompt at a time, the prompts it owns in number order, and reloads its
//! checkpoint when the previous prompt there used another (comfy-sim's output cache); `Learned`
//! is fed as the gate feeds it (a load when the loader node ends, a run when the prompt ends).
//! The gate sees durations at the end-to-end bench's time scale, so its absolute thresholds
//! (`tolerance_s`, `max_wait_ms`) act as they do there. An out-of-memory run counts as failed
//! (the gate's one OOM retry is not modelled; none occur on this trace).
//!
//! Prints the end-to-end bench's table for a 10,000-prompt trace and for its 80-job trace, at
//! 70 % and 95 % load. `cargo bench --bench scheduling_des -- WORD` runs only the policies whose
//! name contains WORD.

#[path = "support/workload.rs"]
mod workload;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Instant;

use comfy_gate::fleet::capabilities::Capabilities;
use comfy_gate::fleet::picker::stats::Learned;
use comfy_gate::fleet::picker::{GpuAware, LeastInFlight, Picker, RoundRobin};
use comfy_gate::sched::decide::{BackendView, FleetView, Owned, Rules, Waiting, decide};
use workload::{Bound, FLEET, Job, Outcome, cost, print_head, print_row, sim_capabilities, trace};

/// Gate seconds per simulated second (the end-to-end bench's time scale).
const GATE_TIME_SCALE: f64 = 0.1;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// comfy-sim's VRAM held by the process itself (GB).
const BASELINE_GB: f64 = 0.4;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    /// The checkpoint loader of the prompt running on this backend ended.
    Loaded(usize),
    /// The prompt running on this backend ended.
    Done(usize),
}

/// Simulated seconds, ordered (events at equal times go in insertion order).
#[derive(Clone, Copy, PartialEq)]
struct At(f64, u64);
impl Eq for At {}
impl PartialOrd for At {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for At {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

struct Running {
    job: usize,
    start: f64,
    load_s: f64,
}

/// One simulated comfy-sim.
struct Gpu {
    speed: f64,
    vram_gb: f64,
    /// Jobs bound here and not finished, by number (arrival order); the first may be running.
    owned: Vec<usize>,
    running: Option<Running>,
    /// The checkpoint of the last prompt run here (its loader output is cached).
    last_ckpt: Option<&'static str>,
    /// Resident checkpoints, least recently used first: (name, GB).
    resident: Vec<(&'static str, f64)>,
    busy_s: f64,
}

impl Gpu {
    fn used_gb(&self, working: f64) -> f64 {
        BASELINE_GB + self.resident.iter().map(|r| r.1).sum::<f64>() + working
    }

    /// comfy-sim's `load_model` and sampling fit check; false: out of memory.
    fn fits(&mut self, j: &Job) -> bool {
        let size = j.ckpt_gb();
        if let Some(pos) = self.resident.iter().position(|r| r.0 == j.ckpt) {
            let r = self.resident.remove(pos);
            self.resident.push(r);
        } else {
            if size + BASELINE_GB > self.vram_gb {
                return false;
            }
            while self.used_gb(size) > self.vram_gb && !self.resident.is_empty() {
                self.resident.remove(0);
            }
            self.resident.push((j.ckpt, size));
        }
        if self.used_gb(j.working_gb()) > self.vram_gb {
            self.resident.clear();
            return false;
        }
        true
    }
}

struct Sim<'a> {
    jobs: &'a [Job],
    waits: Vec<Waiting>,
    gpus: Vec<Gpu>,
    max_inflight: usize,
    caps: Arc<Capabilities>,
    learned: Learned,
    queue: Vec<Waiting>,
    events: BinaryHeap<Reverse<(At, Event)>>,
    seq: u64,
    now: f64,
    ends: Vec<Option<(f64, bool)>>,
    loads: u64,
}

impl Sim<'_> {
    fn at(&mut self, t: f64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((At(t, self.seq), e)));
    }

    fn fleet(&self) -> FleetView {
        let backends = self
            .gpus
            .iter()
            .enumerate()
            .map(|(b, g)| {
                let owns = g
                    .owned
                    .iter()
                    .map(|&j| Owned {
                        profile: self.waits[j].profile.clone(),
                        number: j as f64,
                        ran_s: g
                            .running
                            .as_ref()
                            .filter(|r| r.job == j)
                            .map(|r| (self.now - r.start) * GATE_TIME_SCALE),
                    })
                    .collect();
                let working = g
                    .running
                    .as_ref()
                    .map_or(0.0, |r| self.jobs[r.job].working_gb());
                BackendView {
                    name: format!("gpu{b}"),
                    accepts_work: true,
                    inflight: g.owned.len(),
                    max_inflight: self.max_inflight,
                    vram_total: (g.vram_gb * GIB) as u64,
                    vram_free: Some(((g.vram_gb - g.used_gb(working)).max(0.0) * GIB) as u64),
                    capabilities: Some(self.caps.clone()),
                    owns,
                }
            })
            .collect();
        FleetView {
            backends,
            uploads: Default::default(),
        }
    }

    fn dispatch(&mut self, picker: &dyn Picker, rules: &Rules) {
        for w in &mut self.queue {
            let j = w.number as usize;
            w.waited_ms = ((self.now - self.jobs[j].at_s) * GATE_TIME_SCALE * 1000.0) as u64;
        }
        let fleet = self.fleet();
        let assigned = decide(&self.queue, &fleet, &self.learned, picker, rules);
        for a in &assigned {
            let j = index_of(&a.prompt);
            self.queue.retain(|w| w.number as usize != j);
            for w in &mut self.queue {
                if a.passed_over.contains(&w.id) {
                    w.skips += 1;
                }
            }
            self.gpus[a.backend].owned.push(j);
            self.gpus[a.backend].owned.sort_unstable();
            self.start(a.backend);
        }
    }

    /// Starts the next prompt on `b` if it is idle.
    fn start(&mut self, b: usize) {
        let g = &mut self.gpus[b];
        if g.running.is_some() {
            return;
        }
        let Some(&j) = g.owned.first() else { return };
        let job = &self.jobs[j];
        if !g.fits(job) {
            g.owned.remove(0);
            g.last_ckpt = None;
            self.ends[j] = Some((self.now, false));
            return self.start(b);
        }
        let load_s = if g.last_ckpt != Some(job.ckpt) {
            job.ckpt_gb() * cost::LOAD_SECONDS_PER_GB
        } else {
            0.0
        };
        g.last_ckpt = Some(job.ckpt);
        let run_s = load_s + job.service_s(g.speed);
        g.running = Some(Running {
            job: j,
            start: self.now,
            load_s,
        });
        if load_s > 0.0 {
            self.loads += 1;
            self.at(self.now + load_s, Event::Loaded(b));
        }
        self.at(self.now + run_s, Event::Done(b));
    }

    fn run(&mut self, picker: &dyn Picker, rules: &Rules) {
        for (i, j) in self.jobs.iter().enumerate() {
            self.at(j.at_s, Event::Arrive(i));
        }
        while let Some(Reverse((At(t, _), e))) = self.events.pop() {
            self.now = t;
            match e {
                Event::Arrive(j) => {
                    self.queue.push(self.waits[j].clone());
                    self.dispatch(picker, rules);
                }
                Event::Loaded(b) => {
                    let r = self.gpus[b].running.as_ref().expect("loading");
                    let (ckpt, secs) = (self.jobs[r.job].ckpt, r.load_s * GATE_TIME_SCALE);
                    self.learned.observe_load(b, ckpt, secs);
                }
                Event::Done(b) => {
                    let g = &mut self.gpus[b];
                    let r = g.running.take().expect("running");
                    g.owned.retain(|&j| j != r.job);
                    g.busy_s += t - r.start;
                    self.ends[r.job] = Some((t, true));
                    let p = &self.waits[r.job].profile;
                    let scale = GATE_TIME_SCALE;
                    self.learned
                        .observe_run(b, p, (t - r.start) * scale, r.load_s * scale);
                    self.start(b);
                    self.dispatch(picker, rules);
                }
            }
        }
    }
}

/// The trace index in a `job-N` id.
fn index_of(id: &str) -> usize {
    id["job-".len()..].parse().expect("job id")
}

fn simulate(jobs: &[Job], picker: &dyn Picker, max_inflight: usize) -> Outcome {
    let waits = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| Waiting::new(format!("job-{i}"), i as f64, Arc::new(j.graph(i as u64))))
        .collect();
    let gpus = FLEET
        .iter()
        .map(|&(speed, vram_gb)| Gpu {
            speed,
            vram_gb,
            owned: Vec::new(),
            running: None,
            last_ckpt: None,
            resident: Vec::new(),
            busy_s: 0.0,
        })
        .collect();
    let mut sim = Sim {
        jobs,
        waits,
        gpus,
        max_inflight,
        caps: Arc::new(sim_capabilities()),
        learned: Learned::default(),
        queue: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        ends: vec![None; jobs.len()],
        loads: 0,
    };
    sim.run(picker, &Rules::default());
    let latencies: Vec<f64> = jobs
        .iter()
        .zip(&sim.ends)
        .filter_map(|(j, e)| e.map(|(t, _)| t - j.at_s))
        .collect();
    let makespan = sim.ends.iter().flatten().map(|e| e.0).fold(0.0, f64::max);
    let busy: f64 = sim.gpus.iter().map(|g| g.busy_s).sum();
    Outcome {
        latencies,
        makespan,
        busy_share: busy / (makespan * FLEET.len() as f64),
        loads: sim.loads,
        failed: sim
            .ends
            .iter()
            .filter(|e| !matches!(e, Some((_, true))))
            .count(),
    }
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    type Policy = (&'static str, fn() -> Box<dyn Picker>, usize);
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
    for n in [10_000usize, 80] {
        println!(
            "# Scheduling DES ({n} jobs, fleet speeds 2/1/1/0.5, VRAM 80/24/24/12 GB, simulated time)\n"
        );
        for load in [0.70, 0.95] {
            let jobs = trace(load, 42, n);
            let lb = Bound::of(&jobs);
            println!("## Load {:.0} % of capacity\n", load * 100.0);
            print_head(&jobs, &lb);
            let mut timings = Vec::new();
            for (name, picker, max_inflight) in &policies {
                if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                    continue;
                }
                let t0 = Instant::now();
                let o = simulate(&jobs, picker().as_ref(), *max_inflight);
                timings.push(format!("{name}: {:.2} s", t0.elapsed().as_secs_f64()));
                print_row(name, &o, &lb);
            }
            println!("\nwall time per policy: {}\n", timings.join("; "));
        }
    }
}
