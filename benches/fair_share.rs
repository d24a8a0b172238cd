//! Fair share and priority bands in simulated time (issue 13): the discrete-event model of
//! `benches/scheduling_des.rs` (the same fleet, comfy-sim's cost model, `Learned` fed as the
//! gate feeds it, backends that run what they hold in number order), with users, and the
//! dispatcher's order in two variants: plain FIFO (the gate before fair share: queue order,
//! bent only by `decide`'s holds and affinity) and the gate's order now ([`FairShare::order`]:
//! bands, then start-time fair queueing of GPU seconds, charged at dispatch and corrected at
//! the end, as `sched::placing` and `sched::events` do). Both go through the same `decide`.
//!
//! Cases, each over several seeds (job sizes and checkpoints from the scheduling trace's mix):
//! - **fair share**: user H posts 200 prompts at t = 0; user L posts one every 4 s (±1 s) from
//!   t = 2 s, 30 in all. L's queue wait (posted → started on a GPU) at p50 and p95, fair against
//!   FIFO; H's makespan (its last prompt's end) and its rate; the GPU time L used while H had
//!   work, in fleet seconds (GPU seconds × the GPU's speed / the fleet's summed speed), and
//!   where the growth of H's makespan went (L's work, H's extra checkpoint loads, idle GPUs).
//! - **weights**: two users post 100 prompts each at t = 0, weights 2 and 1: the GPU seconds
//!   each got until the first of them was done.
//! - **bands**: a `batch` user posts 50 prompts at t = 0; an `interactive` user posts one at
//!   t = 5 s. How many prompts were dispatched after it was posted and before it (0: it took
//!   the next free slot), and its wait to start, with one slot per GPU and with two.
//! - the cost of the order itself: `FairShare::order` over a 10,000-prompt queue of 50 users.
//!
//! No timed assertions: it prints tables (`docs/benchmarks.md` keeps a run).

#[path = "support/workload.rs"]
mod workload;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Instant;

use comfy_gate::fleet::capabilities::Capabilities;
use comfy_gate::fleet::picker::GpuAware;
use comfy_gate::fleet::picker::stats::Learned;
use comfy_gate::sched::decide::{BackendView, FleetView, Owned, Rules, SCAN, Waiting, decide};
use comfy_gate::sched::fair::{self, Entry, FairShare};
use workload::{FLEET, Job, cost, pct, sim_capabilities, trace};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// comfy-sim's VRAM held by the process itself (GB).
const BASELINE_GB: f64 = 0.4;
const SEEDS: [u64; 5] = [1, 2, 3, 4, 5];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    Loaded(usize),
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

/// A user: tenant key, band rank (0 highest), weight.
struct User {
    key: &'static str,
    rank: usize,
    weight: f64,
}

/// One prompt: its job, whose, when posted. Prompts are numbered in posting order.
struct Task {
    job: Job,
    user: usize,
    at_s: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Order {
    Fifo,
    Fair,
}

struct Running {
    task: usize,
    start: f64,
    load_s: f64,
}

struct Gpu {
    speed: f64,
    vram_gb: f64,
    /// Tasks held here, by number; the first may be running.
    owned: Vec<usize>,
    running: Option<Running>,
    last_ckpt: Option<&'static str>,
    /// Its size in GB.
    last_ckpt_gb: f64,
}

/// When each task was dispatched, started, ended, and on which GPU.
#[derive(Clone, Copy, Default)]
struct Times {
    dispatched: Option<f64>,
    started: Option<f64>,
    ended: Option<f64>,
    gpu: usize,
    /// Seconds of its run spent loading its checkpoint.
    load_s: f64,
}

struct Sim<'a> {
    tasks: &'a [Task],
    users: &'a [User],
    waits: Vec<Waiting>,
    gpus: Vec<Gpu>,
    max_inflight: usize,
    caps: Arc<Capabilities>,
    learned: Learned,
    fair: FairShare,
    order: Order,
    queue: Vec<usize>,
    events: BinaryHeap<Reverse<(At, Event)>>,
    seq: u64,
    now: f64,
    times: Vec<Times>,
    /// Tasks in the order they were dispatched.
    dispatch_order: Vec<usize>,
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
                            .filter(|r| r.task == j)
                            .map(|r| self.now - r.start),
                    })
                    .collect();
                let working = g
                    .running
                    .as_ref()
                    .map_or(0.0, |r| self.tasks[r.task].job.working_gb());
                let used = BASELINE_GB + g.last_ckpt_gb + working;
                BackendView {
                    name: format!("gpu{b}"),
                    accepts_work: true,
                    inflight: g.owned.len(),
                    max_inflight: self.max_inflight,
                    vram_total: (g.vram_gb * GIB) as u64,
                    vram_free: Some(((g.vram_gb - used).max(0.0) * GIB) as u64),
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

    fn entry(&self, j: usize) -> Entry<'static> {
        let u = &self.users[self.tasks[j].user];
        Entry {
            tenant: u.key,
            band: fair::effective_band(
                u.rank,
                self.waits[j].waited_ms,
                Rules::default().max_wait_ms,
            ),
            weight: u.weight,
            first: false,
        }
    }

    fn cost(&self, j: usize) -> f64 {
        fair::expected_s(&self.learned, self.gpus.len(), &self.waits[j].profile)
    }

    fn dispatch(&mut self) {
        let free: usize = self
            .gpus
            .iter()
            .map(|g| self.max_inflight.saturating_sub(g.owned.len()))
            .sum();
        if free == 0 || self.queue.is_empty() {
            return;
        }
        for &j in &self.queue {
            self.waits[j].waited_ms = ((self.now - self.tasks[j].at_s) * 1000.0) as u64;
        }
        let k = SCAN + free;
        let offered: Vec<usize> = match self.order {
            Order::Fifo => self.queue.iter().take(k).copied().collect(),
            Order::Fair => {
                let entries: Vec<Entry> = self.queue.iter().map(|&j| self.entry(j)).collect();
                self.fair
                    .order(&entries, k, |i| self.cost(self.queue[i]))
                    .into_iter()
                    .map(|i| self.queue[i])
                    .collect()
            }
        };
        let waiting: Vec<Waiting> = offered
            .iter()
            .map(|&j| Waiting {
                band: match self.order {
                    Order::Fifo => 0,
                    Order::Fair => self.entry(j).band,
                },
                ..self.waits[j].clone()
            })
            .collect();
        let fleet = self.fleet();
        let assigned = decide(
            &waiting,
            &fleet,
            &self.learned,
            &GpuAware::default(),
            &Rules::default(),
        );
        for a in &assigned {
            let j: usize = a.prompt.parse().expect("task id");
            self.queue.retain(|&q| q != j);
            for w in &mut self.waits {
                if a.passed_over.contains(&w.id) {
                    w.skips += 1;
                }
            }
            if self.order == Order::Fair {
                let (e, c) = (self.entry(j), self.cost(j));
                self.fair.charge(&a.prompt, &e, c);
            }
            self.times[j].dispatched = Some(self.now);
            self.dispatch_order.push(j);
            let g = &mut self.gpus[a.backend];
            g.owned.push(j);
            g.owned.sort_unstable();
            self.start(a.backend);
        }
    }

    fn start(&mut self, b: usize) {
        let g = &mut self.gpus[b];
        if g.running.is_some() {
            return;
        }
        let Some(&j) = g.owned.first() else { return };
        let job = &self.tasks[j].job;
        let load_s = if g.last_ckpt != Some(job.ckpt) {
            g.last_ckpt_gb = job.ckpt_gb();
            g.last_ckpt_gb * cost::LOAD_SECONDS_PER_GB
        } else {
            0.0
        };
        g.last_ckpt = Some(job.ckpt);
        let run_s = load_s + job.service_s(g.speed);
        g.running = Some(Running {
            task: j,
            start: self.now,
            load_s,
        });
        self.times[j].started = Some(self.now);
        self.times[j].gpu = b;
        self.times[j].load_s = load_s;
        if load_s > 0.0 {
            self.at(self.now + load_s, Event::Loaded(b));
        }
        self.at(self.now + run_s, Event::Done(b));
    }

    fn run(&mut self) {
        for (i, t) in self.tasks.iter().enumerate() {
            self.at(t.at_s, Event::Arrive(i));
        }
        while let Some(Reverse((At(t, _), e))) = self.events.pop() {
            self.now = t;
            match e {
                Event::Arrive(j) => {
                    self.queue.push(j);
                    self.dispatch();
                }
                Event::Loaded(b) => {
                    let r = self.gpus[b].running.as_ref().expect("loading");
                    let (ckpt, secs) = (self.tasks[r.task].job.ckpt, r.load_s);
                    self.learned.observe_load(b, ckpt, secs);
                }
                Event::Done(b) => {
                    let g = &mut self.gpus[b];
                    let r = g.running.take().expect("running");
                    g.owned.retain(|&j| j != r.task);
                    self.times[r.task].ended = Some(t);
                    let secs = t - r.start;
                    self.fair.settle(&r.task.to_string(), Some(secs));
                    let p = self.waits[r.task].profile.clone();
                    self.learned.observe_run(b, &p, secs, r.load_s);
                    self.start(b);
                    self.dispatch();
                }
            }
        }
    }
}

/// What one play gave: per task its times; the tasks in the order they were dispatched.
struct Played {
    times: Vec<Times>,
    dispatch_order: Vec<usize>,
}

/// Plays `tasks` (sorted by posting time) of `users` under `order`.
fn simulate(tasks: &[Task], users: &[User], order: Order, max_inflight: usize) -> Played {
    let waits = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| Waiting::new(i.to_string(), i as f64, Arc::new(t.job.graph(i as u64))))
        .collect();
    let gpus = FLEET
        .iter()
        .map(|&(speed, vram_gb)| Gpu {
            speed,
            vram_gb,
            owned: Vec::new(),
            running: None,
            last_ckpt: None,
            last_ckpt_gb: 0.0,
        })
        .collect();
    let mut sim = Sim {
        tasks,
        users,
        waits,
        gpus,
        max_inflight,
        caps: Arc::new(sim_capabilities()),
        learned: Learned::default(),
        fair: FairShare::default(),
        order,
        queue: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        times: vec![Times::default(); tasks.len()],
        dispatch_order: Vec::new(),
    };
    sim.run();
    assert!(
        sim.times.iter().all(|t| t.ended.is_some()),
        "every prompt ran"
    );
    Played {
        times: sim.times,
        dispatch_order: sim.dispatch_order,
    }
}

/// Jobs of the scheduling trace's mix (sizes, checkpoints), `n` of them, for `seed`.
fn jobs(seed: u64, n: usize) -> Vec<Job> {
    trace(0.95, seed, n)
}

fn sorted(mut tasks: Vec<Task>) -> Vec<Task> {
    tasks.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    tasks
}

/// A seeded uniform number in [0, 1).
fn uniform(seed: u64, i: u64) -> f64 {
    let x = (seed ^ 0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(i.wrapping_mul(1442695040888963407));
    let x = x ^ (x >> 29);
    ((x.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 11) as f64) / ((1u64 << 53) as f64)
}

fn fleet_speed() -> f64 {
    FLEET.iter().map(|f| f.0).sum()
}

/// Where the fleet's time went until H's last prompt ended, in fleet seconds (GPU seconds × the
/// GPU's speed / the fleet's summed speed): H's end is the sum of these.
struct Account {
    h_end: f64,
    /// H's runs without their checkpoint loads (the same work under any order).
    h_work: f64,
    h_loads: f64,
    /// L's runs, loads included, up to H's end.
    l_work: f64,
    /// GPUs idle before H's end (the tail: the last prompts on some GPUs while others wait).
    idle: f64,
}

fn account(tasks: &[Task], times: &[Times]) -> Account {
    let h_end = tasks
        .iter()
        .zip(times)
        .filter(|(t, _)| t.user == 0)
        .map(|(_, x)| x.ended.unwrap())
        .fold(0.0, f64::max);
    let w = |g: usize| FLEET[g].0 / fleet_speed();
    let mut a = Account {
        h_end,
        h_work: 0.0,
        h_loads: 0.0,
        l_work: 0.0,
        idle: 0.0,
    };
    let mut busy = [0.0f64; FLEET.len()];
    for (t, x) in tasks.iter().zip(times) {
        let (s, e) = (x.started.unwrap(), x.ended.unwrap());
        let within = (e.min(h_end) - s).max(0.0);
        busy[x.gpu] += within;
        if t.user == 0 {
            a.h_work += (within - x.load_s) * w(x.gpu);
            a.h_loads += x.load_s * w(x.gpu);
        } else {
            a.l_work += within * w(x.gpu);
        }
    }
    a.idle = (0..FLEET.len()).map(|g| (h_end - busy[g]) * w(g)).sum();
    a
}

fn fair_share_case() {
    println!(
        "## Fair share: H posts 200 prompts at t = 0, L one every 4 s (±1 s) from t = 2 s, 30 in all\n"
    );
    println!("Simulated seconds; fleet speeds 2/1/1/0.5, `max_inflight` 2, gpu_aware.\n");
    println!(
        "| seed | L wait p50 FIFO → fair (s) | L wait p95 FIFO → fair (s) | p95 fair/FIFO | H makespan FIFO → fair (s) | H rate fair/FIFO | L's work before H's end, fair (fleet s) | H makespan + (s) | = L's work + | H's loads + | idle + | L GPU s in all |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let users = [
        User {
            key: "user:H",
            rank: 0,
            weight: 1.0,
        },
        User {
            key: "user:L",
            rank: 0,
            weight: 1.0,
        },
    ];
    let mut ratios = Vec::new();
    let mut rate_ratios = Vec::new();
    for seed in SEEDS {
        let h = jobs(seed, 200);
        let l = jobs(seed + 1000, 30);
        let mut tasks: Vec<Task> = h
            .into_iter()
            .map(|job| Task {
                job,
                user: 0,
                at_s: 0.0,
            })
            .collect();
        tasks.extend(l.into_iter().enumerate().map(|(i, job)| Task {
            job,
            user: 1,
            at_s: 2.0 + 4.0 * i as f64 + (uniform(seed, i as u64) * 2.0 - 1.0),
        }));
        let tasks = sorted(tasks);
        let fifo = simulate(&tasks, &users, Order::Fifo, 2).times;
        let fair = simulate(&tasks, &users, Order::Fair, 2).times;
        let waits = |times: &[Times]| -> Vec<f64> {
            tasks
                .iter()
                .zip(times)
                .filter(|(t, _)| t.user == 1)
                .map(|(t, x)| x.started.unwrap() - t.at_s)
                .collect()
        };
        let (wf, wq) = (waits(&fifo), waits(&fair));
        let (af, aq) = (account(&tasks, &fifo), account(&tasks, &fair));
        let l_gpu_s: f64 = tasks
            .iter()
            .zip(&fair)
            .filter(|(t, _)| t.user == 1)
            .map(|(_, x)| x.ended.unwrap() - x.started.unwrap())
            .sum();
        debug_assert!((aq.h_end - (aq.h_work + aq.h_loads + aq.l_work + aq.idle)).abs() < 1e-6);
        let ratio = pct(&wq, 0.95) / pct(&wf, 0.95);
        ratios.push(ratio);
        rate_ratios.push(af.h_end / aq.h_end);
        println!(
            "| {seed} | {:.1} → {:.1} | {:.1} → {:.1} | {:.3} | {:.1} → {:.1} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            pct(&wf, 0.5),
            pct(&wq, 0.5),
            pct(&wf, 0.95),
            pct(&wq, 0.95),
            ratio,
            af.h_end,
            aq.h_end,
            af.h_end / aq.h_end,
            aq.l_work,
            aq.h_end - af.h_end,
            aq.l_work - af.l_work,
            aq.h_loads - af.h_loads,
            aq.idle - af.idle,
            l_gpu_s,
        );
    }
    println!(
        "\nL's p95 wait, fair/FIFO: median {:.3}, worst {:.3}. H's rate, fair/FIFO: median {:.3}, worst {:.3}.\n",
        pct(&ratios, 0.5),
        ratios.iter().copied().fold(0.0, f64::max),
        pct(&rate_ratios, 0.5),
        rate_ratios.iter().copied().fold(f64::INFINITY, f64::min),
    );
}

fn weights_case() {
    println!("## Weights: A (weight 2) and B (weight 1) post 100 prompts each at t = 0\n");
    println!("| seed | GPU s A : B until the first is done (fair) | same, FIFO |");
    println!("|---|---|---|");
    let users = [
        User {
            key: "user:A",
            rank: 0,
            weight: 2.0,
        },
        User {
            key: "user:B",
            rank: 0,
            weight: 1.0,
        },
    ];
    for seed in SEEDS {
        let mut tasks: Vec<Task> = jobs(seed, 100)
            .into_iter()
            .map(|job| Task {
                job,
                user: 0,
                at_s: 0.0,
            })
            .collect();
        tasks.extend(jobs(seed + 2000, 100).into_iter().map(|job| Task {
            job,
            user: 1,
            at_s: 0.0,
        }));
        let share = |times: &[Times]| -> f64 {
            let last = |u: usize| {
                tasks
                    .iter()
                    .zip(times)
                    .filter(|(t, _)| t.user == u)
                    .map(|(_, x)| x.ended.unwrap())
                    .fold(0.0, f64::max)
            };
            let until = last(0).min(last(1));
            let used = |u: usize| -> f64 {
                tasks
                    .iter()
                    .zip(times)
                    .filter(|(t, _)| t.user == u)
                    .map(|(_, x)| (x.ended.unwrap().min(until) - x.started.unwrap()).max(0.0))
                    .sum()
            };
            used(0) / used(1)
        };
        let fair = simulate(&tasks, &users, Order::Fair, 2).times;
        let fifo = simulate(&tasks, &users, Order::Fifo, 2).times;
        println!("| {seed} | {:.2} | {:.2} |", share(&fair), share(&fifo));
    }
    println!();
}

fn bands_case() {
    println!("## Bands: `batch` posts 50 prompts at t = 0, `interactive` one at t = 5 s\n");
    println!(
        "| seed | `max_inflight` | dispatched before it after it was posted, FIFO → bands | its wait to start FIFO → bands (s) |"
    );
    println!("|---|---|---|---|");
    let users = [
        User {
            key: "user:batchy",
            rank: 1,
            weight: 1.0,
        },
        User {
            key: "user:inter",
            rank: 0,
            weight: 1.0,
        },
    ];
    for seed in SEEDS {
        let mut tasks: Vec<Task> = jobs(seed, 50)
            .into_iter()
            .map(|job| Task {
                job,
                user: 0,
                at_s: 0.0,
            })
            .collect();
        let mut one = jobs(seed + 3000, 1);
        tasks.push(Task {
            job: one.remove(0),
            user: 1,
            at_s: 5.0,
        });
        let tasks = sorted(tasks);
        let i = tasks.iter().position(|t| t.user == 1).unwrap();
        for max_inflight in [1, 2] {
            let row = |order: Order| -> (usize, f64) {
                let played = simulate(&tasks, &users, order, max_inflight);
                let at = tasks[i].at_s;
                let before = played
                    .dispatch_order
                    .iter()
                    .take_while(|&&j| j != i)
                    .filter(|&&j| played.times[j].dispatched.is_some_and(|d| d >= at))
                    .count();
                (before, played.times[i].started.unwrap() - at)
            };
            let (bf, wf) = row(Order::Fifo);
            let (bb, wb) = row(Order::Fair);
            println!("| {seed} | {max_inflight} | {bf} → {bb} | {wf:.2} → {wb:.2} |");
        }
    }
    println!();
}

fn order_cost() {
    let keys: Vec<String> = (0..50).map(|t| format!("user:{t}")).collect();
    let entries50: Vec<Entry> = (0..10_000)
        .map(|i| Entry {
            tenant: &keys[(i * 7) % 50],
            band: (i / 7) % 2,
            weight: 1.0 + (i % 3) as f64,
            first: false,
        })
        .collect();
    let mut fs = FairShare::default();
    for (i, e) in entries50.iter().take(500).enumerate() {
        fs.charge(&i.to_string(), e, 1.0 + (i % 5) as f64);
    }
    let runs = 200;
    let t0 = Instant::now();
    let mut n = 0;
    for _ in 0..runs {
        n += fs
            .order(&entries50, SCAN + 8, |i| 1.0 + (i % 4) as f64)
            .len();
    }
    let per = t0.elapsed().as_secs_f64() / runs as f64;
    assert_eq!(n, runs * (SCAN + 8));
    println!(
        "## The order's cost\n\n`FairShare::order` over 10,000 waiting prompts of 50 users in 2 bands, first {} of them: {:.0} µs per call (mean of {runs}).\n",
        SCAN + 8,
        per * 1e6
    );
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let cases: [(&str, fn()); 4] = [
        ("fair", fair_share_case),
        ("weights", weights_case),
        ("bands", bands_case),
        ("cost", order_cost),
    ];
    println!(
        "# Fair share and priority bands (simulated time, `sched::decide` with the fair order)\n"
    );
    for (name, case) in cases {
        if filter.as_ref().is_none_or(|f| name.contains(f.as_str())) {
            case();
        }
    }
}
