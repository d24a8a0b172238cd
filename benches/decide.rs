//! One scheduling decision (`sched::decide`) over 4, 16 and 64 backends with 1,000 waiting
//! prompts: the scheduling bench's mix of checkpoints and sizes, comfy-sim's real capabilities
//! (every prompt is checked against them), each backend owning some work, half of them with a
//! free slot. Pure: no sockets, no locks, no clock.

#[path = "support/workload.rs"]
mod workload;

use std::hint::black_box;
use std::sync::Arc;

use comfy_gate::fleet::picker::stats::Learned;
use comfy_gate::fleet::picker::{GpuAware, LeastInFlight, Picker, RoundRobin};
use comfy_gate::sched::decide::{BackendView, FleetView, Owned, Rules, Waiting, decide};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use workload::{FLEET, sim_capabilities, trace};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn setup(n: usize) -> (Vec<Waiting>, FleetView, Learned) {
    let jobs = trace(0.95, 42, 1000);
    let waiting: Vec<Waiting> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| Waiting {
            skips: (i % 3) as u32,
            waited_ms: (i as u64 * 37) % 70_000,
            ..Waiting::new(format!("job-{i}"), i as f64, Arc::new(j.graph(i as u64)))
        })
        .collect();
    let caps = Arc::new(sim_capabilities());
    let mut learned = Learned::default();
    let backends = (0..n)
        .map(|b| {
            let (speed, vram) = FLEET[b % FLEET.len()];
            let mine: Vec<Owned> = (0..1 + b % 2)
                .map(|k| {
                    let w = &waiting[(b * 7 + k * 13) % waiting.len()];
                    Owned {
                        profile: w.profile.clone(),
                        number: -((b * 2 + k) as f64),
                        ran_s: (k == 0).then_some(0.3),
                    }
                })
                .collect();
            let j = &jobs[b % jobs.len()];
            let p = &waiting[b % jobs.len()].profile;
            learned.observe_load(b, j.ckpt, j.ckpt_gb() * workload::cost::LOAD_SECONDS_PER_GB);
            learned.observe_run(b, p, j.service_s(speed), 0.0);
            BackendView {
                name: format!("gpu{b}"),
                accepts_work: b % 17 != 16,
                inflight: mine.len(),
                max_inflight: 2,
                vram_total: (vram * GIB) as u64,
                vram_free: Some(((vram - 9.0).max(1.0) * GIB) as u64),
                capabilities: Some(caps.clone()),
                owns: mine,
            }
        })
        .collect();
    let fleet = FleetView {
        backends,
        uploads: Default::default(),
    };
    (waiting, fleet, learned)
}

fn bench(c: &mut Criterion) {
    let rules = Rules::default();
    let mut group = c.benchmark_group("decide_1000_waiting");
    for n in [4usize, 16, 64] {
        let (waiting, fleet, learned) = setup(n);
        // Round robin keeps its turn between calls (strict rotation: when the turn's backend is
        // full the prompts wait for it), so a pass may assign nothing; the others always fill
        // the free slots here.
        let policies: Vec<(&str, Box<dyn Picker>)> = vec![
            ("gpu_aware", Box::new(GpuAware::default())),
            ("least_inflight", Box::new(LeastInFlight)),
            ("round_robin", Box::new(RoundRobin::default())),
        ];
        for (name, picker) in &policies {
            let made = decide(&waiting, &fleet, &learned, picker.as_ref(), &rules).len();
            assert!(
                made > 0 || *name == "round_robin",
                "{name} over {n} backends assigns something"
            );
            group.bench_with_input(BenchmarkId::new(*name, n), &n, |b, _| {
                b.iter(|| {
                    decide(
                        black_box(&waiting),
                        black_box(&fleet),
                        &learned,
                        picker.as_ref(),
                        &rules,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
