//! The discrete-event simulation of `scheduling_des`: a fleet of simulated comfy-sims driven by
//! the gate's real `sched::decide` whenever a prompt arrives or a slot frees. Service and
//! checkpoint load times come from comfy-sim's cost model; a backend runs one prompt at a time,
//! the prompts it owns in number order, and reloads its checkpoint when the previous prompt
//! there used another (comfy-sim's output cache); `Learned` is fed as the gate feeds it (a load
//! when the loader node ends, a run when the prompt ends). The gate sees durations at the
//! end-to-end bench's time scale, so its absolute thresholds (`tolerance_s`, `max_wait_ms`) act
//! as they do there. An out-of-memory run counts as failed (the gate's one OOM retry is not
//! modelled). Also used by `benches/scheduling.rs` to print the DES's figures beside its own.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use comfy_gate::fleet::capabilities::Capabilities;
use comfy_gate::fleet::picker::Picker;
use comfy_gate::fleet::picker::stats::Learned;
use comfy_gate::sched::decide::{BackendView, FleetView, Owned, Rules, Waiting, decide};

use crate::workload::{BASELINE_GB, Job, Outcome, cost, sim_capabilities};

/// Gate seconds per simulated second (the end-to-end bench's time scale).
const GATE_TIME_SCALE: f64 = 0.1;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

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
    /// Speed-weighted GPU seconds spent loading checkpoints.
    load_fleet_s: f64,
    /// Speed-weighted GPU seconds idle while prompts waited in the gate.
    idle_waiting_fleet_s: f64,
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
            self.load_fleet_s += load_s * g.speed;
            self.at(self.now + load_s, Event::Loaded(b));
        }
        self.at(self.now + run_s, Event::Done(b));
    }

    fn run(&mut self, picker: &dyn Picker, rules: &Rules) {
        for (i, j) in self.jobs.iter().enumerate() {
            self.at(j.at_s, Event::Arrive(i));
        }
        while let Some(Reverse((At(t, _), e))) = self.events.pop() {
            if !self.queue.is_empty() {
                let idle: f64 = self
                    .gpus
                    .iter()
                    .filter(|g| g.running.is_none())
                    .map(|g| g.speed)
                    .sum();
                self.idle_waiting_fleet_s += idle * (t - self.now);
            }
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

/// Where a policy's fleet time went, as shares of the fleet's capacity over the makespan
/// (speed-weighted GPU seconds: a second of the speed-2 GPU counts twice a speed-1 one's).
pub struct Diag {
    /// Loading checkpoints.
    pub loading: f64,
    /// Idle while prompts waited in the gate (late binding holds, or nothing fits there).
    pub idle_waiting: f64,
}

/// Plays `jobs` on `fleet` ((speed, VRAM GB) per GPU) with `picker`, at most `max_inflight`
/// prompts per backend (1000: bound at once) and the default `Rules`.
pub fn simulate(
    jobs: &[Job],
    fleet: &[(f64, f64)],
    picker: &dyn Picker,
    max_inflight: usize,
) -> (Outcome, Diag) {
    let waits = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| Waiting::new(format!("job-{i}"), i as f64, Arc::new(j.graph(i as u64))))
        .collect();
    let gpus = fleet
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
        load_fleet_s: 0.0,
        idle_waiting_fleet_s: 0.0,
    };
    sim.run(picker, &Rules::default());
    let latencies: Vec<f64> = jobs
        .iter()
        .zip(&sim.ends)
        .filter_map(|(j, e)| e.map(|(t, _)| t - j.at_s))
        .collect();
    let makespan = sim.ends.iter().flatten().map(|e| e.0).fold(0.0, f64::max);
    let busy: f64 = sim.gpus.iter().map(|g| g.busy_s).sum();
    let capacity_s = makespan * fleet.iter().map(|f| f.0).sum::<f64>();
    let outcome = Outcome {
        latencies,
        makespan,
        busy_share: busy / (makespan * fleet.len() as f64),
        loads: sim.loads,
        failed: sim
            .ends
            .iter()
            .filter(|e| !matches!(e, Some((_, true))))
            .count(),
    };
    let diag = Diag {
        loading: sim.load_fleet_s / capacity_s,
        idle_waiting: sim.idle_waiting_fleet_s / capacity_s,
    };
    (outcome, diag)
}
