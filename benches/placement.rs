//! One placement decision over 4, 16 and 64 backends, for the default policy and the baselines.
//! The picker is pure, so this measures the policy itself, not sockets.

use std::hint::black_box;

use comfy_gate::fleet::picker::{Candidate, GpuAware, LeastInFlight, Need, Picker, RoundRobin};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn fleet(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            id: i,
            free: i % 3 != 0,
            inflight: i % 3,
            max_inflight: 2,
            vram_total: 80 << 30,
            vram_free: Some(((i as u64 * 7919) % 70 + 5) << 30),
            queued_s: (i % 5) as f64 * 1.5,
            run_s: 3.0 + (i % 4) as f64 * 0.5,
            load_s: if i % 2 == 0 { 0.0 } else { 4.0 },
            need_here: 12 << 30,
        })
        .collect()
}

fn placement(c: &mut Criterion) {
    let need = Need {
        vram_bytes: 12 << 30,
    };
    let policies: Vec<(&str, Box<dyn Picker>)> = vec![
        ("gpu_aware", Box::new(GpuAware::default())),
        ("least_inflight", Box::new(LeastInFlight)),
        ("round_robin", Box::new(RoundRobin::default())),
    ];
    let mut group = c.benchmark_group("placement");
    for n in [4usize, 16, 64] {
        let candidates = fleet(n);
        for (name, picker) in &policies {
            group.bench_with_input(BenchmarkId::new(*name, n), &candidates, |b, cands| {
                b.iter(|| picker.pick(black_box(&need), black_box(cands)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
