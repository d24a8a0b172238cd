//! The placement policy's own scenarios (the picker's unit tests and `tests/placement.rs`)
//! replayed through `decide`, the last two with a small queue simulation that drives `decide`
//! as the dispatcher does.

use super::*;

fn one(f: &FleetView, l: &Learned, p: &dyn Picker) -> Assignment {
    let q = [waiting("p", 1.0, graph(X, 512, 1))];
    decide(&q, f, l, p, &Rules::default()).remove(0)
}

#[test]
fn gpu_aware_most_headroom_wins_when_times_are_equal() {
    let p = GpuAware::default();
    let with_free = |a: Option<u64>, b: Option<u64>| {
        let mut f = fleet(vec![backend("a"), backend("b")]);
        f.backends[0].vram_free = a.map(|g| g * GB);
        f.backends[1].vram_free = b.map(|g| g * GB);
        one(&f, &Learned::default(), &p).backend
    };
    assert_eq!(with_free(Some(10), Some(40)), 1);
    assert_eq!(with_free(Some(60), Some(40)), 0);
    assert_eq!(
        with_free(None, Some(20)),
        1,
        "a stale reading has no headroom"
    );
}

#[test]
fn gpu_aware_sooner_completion_beats_headroom_and_a_resident_checkpoint_saves_the_load() {
    let g = graph(X, 512, 1);
    let mut l = Learned::default();
    learn(&mut l, 0, &g, X, 3.0);
    learn(&mut l, 1, &g, X, 3.0);
    let mut f = fleet(vec![backend("busy-roomy"), backend("idle-tight")]);
    f.backends[0].vram_free = Some(70 * GB);
    f.backends[1].vram_free = Some(10 * GB);
    for n in 0..2 {
        f.backends[0].owns.push(Owned {
            profile: profile(&g),
            number: n as f64,
            ran_s: None,
        });
    }
    f.backends[0].inflight = 2;
    f.backends[0].max_inflight = 4;
    let a = one(&f, &l, &GpuAware::default());
    assert_eq!((a.backend, a.choice.runner_up), (1, Some(0)));
    assert!(
        a.choice.reason.contains("runner-up 0 (later)"),
        "{}",
        a.choice.reason
    );
    // Same work ahead, but Y is resident on 0: X costs a load there.
    learn(&mut l, 0, &graph(Y, 512, 1), Y, 3.0);
    let f = fleet(vec![backend("a"), backend("b")]);
    assert_eq!(one(&f, &l, &GpuAware::default()).backend, 1);
}

#[test]
fn baselines_rotate_and_count_prompts_in_flight() {
    let f = fleet(vec![backend("a"), backend("b"), backend("c")]);
    let rr = RoundRobin::default();
    let seq: Vec<usize> = (0..6)
        .map(|_| one(&f, &Learned::default(), &rr).backend)
        .collect();
    assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    let mut busy = f.clone();
    busy.backends[0].inflight = 1;
    assert_eq!(one(&busy, &Learned::default(), &LeastInFlight).backend, 1);
}

/// Drives `decide` as the dispatcher does over a queue submitted at once: each backend runs one
/// prompt at a time (work ÷ speed, plus `load_s` when its checkpoint differs from the last),
/// `Learned` is fed as the gate feeds it. Returns (checkpoint loads, prompts per backend, the
/// largest `skips` any prompt had when taken).
fn drain(
    speeds: &[f64],
    prompts: Vec<Value>,
    picker: &dyn Picker,
    rules: &Rules,
    load_s: f64,
) -> (u32, Vec<u32>, u32) {
    let mut queue: Vec<Waiting> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, g)| waiting(&format!("p{i}"), i as f64, g))
        .collect();
    let mut learned = Learned::default();
    // Per backend: (prompt, its end, its load seconds) and the last checkpoint it ran.
    let mut running: Vec<Option<(Waiting, f64, f64)>> = vec![None; speeds.len()];
    let mut last: Vec<Option<String>> = vec![None; speeds.len()];
    let (mut loads, mut done, mut max_skips, mut now) = (0, vec![0; speeds.len()], 0, 0.0);
    while !queue.is_empty() || running.iter().any(Option::is_some) {
        let f = fleet(
            running
                .iter()
                .enumerate()
                .map(|(b, r)| BackendView {
                    max_inflight: 1,
                    inflight: r.is_some() as usize,
                    ..backend(&format!("gpu{b}"))
                })
                .collect(),
        );
        for a in decide(&queue, &f, &learned, picker, rules) {
            max_skips = max_skips.max(a.skips);
            let pos = queue.iter().position(|w| w.id == a.prompt).unwrap();
            let w = queue.remove(pos);
            for q in queue.iter_mut().filter(|q| a.passed_over.contains(&q.id)) {
                q.skips += 1;
            }
            let load = if last[a.backend] != w.profile.checkpoint {
                load_s
            } else {
                0.0
            };
            loads += (load > 0.0) as u32;
            last[a.backend] = w.profile.checkpoint.clone();
            let end = now + load + w.profile.work / speeds[a.backend];
            running[a.backend] = Some((w, end, load));
        }
        let b = (0..speeds.len())
            .filter(|&b| running[b].is_some())
            .min_by(|&x, &y| {
                running[x]
                    .as_ref()
                    .unwrap()
                    .1
                    .total_cmp(&running[y].as_ref().unwrap().1)
            })
            .expect("something runs");
        let (w, end, load) = running[b].take().unwrap();
        let ckpt = w.profile.checkpoint.clone().unwrap();
        if load > 0.0 {
            learned.observe_load(b, &ckpt, load);
        }
        learned.observe_run(b, &w.profile, load + w.profile.work / speeds[b], load);
        now = end;
        done[b] += 1;
    }
    (loads, done, max_skips)
}

/// `tests/placement.rs` item 5: two checkpoints over two backends: far fewer loads than round
/// robin, and no prompt passed over more than the aging bound allows.
#[test]
fn checkpoint_affinity_beats_round_robin() {
    let mut x = 7u64;
    let mix: Vec<Value> = (0..32)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            graph(if (x >> 33).is_multiple_of(2) { X } else { Y }, 512, 1)
        })
        .collect();
    let rules = Rules {
        max_skips: 4,
        ..Rules::default()
    };
    let (rr, _, _) = drain(
        &[1.0, 1.0],
        mix.clone(),
        &RoundRobin::default(),
        &rules,
        20.0,
    );
    let (gpu, _, skips) = drain(&[1.0, 1.0], mix, &GpuAware::default(), &rules, 20.0);
    assert!(
        gpu * 2 <= rr,
        "far fewer loads: gpu_aware {gpu} vs round robin {rr}"
    );
    assert!(skips <= 4, "aging bound: passed over {skips} times");
}

/// `tests/placement.rs` item 6: backends of speed 1 and 3: the faster completes about three
/// times as many.
#[test]
fn a_faster_gpu_draws_more_work() {
    let prompts = (0..40).map(|_| graph(X, 512, 1)).collect();
    let (_, done, _) = drain(
        &[1.0, 3.0],
        prompts,
        &GpuAware::default(),
        &Rules::default(),
        0.0,
    );
    let ratio = done[1] as f64 / done[0].max(1) as f64;
    assert_eq!(done[0] + done[1], 40);
    assert!(
        (2.0..=4.5).contains(&ratio),
        "about three times as many: {done:?}"
    );
}
