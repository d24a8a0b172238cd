//! Scenarios for [`decide`]: holds, affinity and aging, the switching rule, VRAM fit,
//! capabilities, retries, several assignments per pass; the placement policy's own scenarios
//! (`gate/placement` unit tests, `tests/placement.rs`) replayed through `decide`, the last two
//! with a small queue simulation that drives `decide` as the dispatcher does.

use std::sync::Arc;

use serde_json::{Value, json};

use super::decide::{Assignment, BackendView, FleetView, Owned, Rules, Waiting, decide};
use crate::fleet::capabilities::Capabilities;
use crate::fleet::picker::profile::profile;
use crate::fleet::picker::stats::Learned;
use crate::fleet::picker::{GpuAware, LeastInFlight, Picker, RoundRobin};

const GB: u64 = 1_000_000_000;
const X: &str = "x.safetensors";
const Y: &str = "y.safetensors";

fn graph(ckpt: &str, side: u64, batch: u64) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "model": ["4", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": batch}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}
    })
}

fn waiting(id: &str, number: f64, g: Value) -> Waiting {
    Waiting::new(id, number, Arc::new(g))
}

fn backend(name: &str) -> BackendView {
    BackendView {
        name: name.into(),
        accepts_work: true,
        inflight: 0,
        max_inflight: 2,
        vram_total: 80 * GB,
        vram_free: Some(40 * GB),
        capabilities: None,
        owns: Vec::new(),
    }
}

fn fleet(backends: Vec<BackendView>) -> FleetView {
    FleetView {
        backends,
        uploads: Default::default(),
    }
}

/// `b` runs one prompt of `g` in 1 s and has loaded `ckpt` in `load_s` (now resident).
fn learn(l: &mut Learned, b: usize, g: &Value, ckpt: &str, load_s: f64) {
    l.observe_run(b, &profile(g), 1.0, 0.0);
    l.observe_load(b, ckpt, load_s);
}

fn ids(a: &[Assignment]) -> Vec<(&str, usize)> {
    a.iter().map(|a| (a.prompt.as_str(), a.backend)).collect()
}

/// Backend 0 has X resident and is full (one slot, running an X prompt); backend 1 is free with
/// Y resident; loads cost 10 s, runs 1 s.
fn x_busy_y_free() -> (FleetView, Learned) {
    let mut l = Learned::default();
    learn(&mut l, 0, &graph(X, 512, 1), X, 10.0);
    learn(&mut l, 1, &graph(Y, 512, 1), Y, 10.0);
    let mut b0 = backend("x-busy");
    b0.max_inflight = 1;
    b0.inflight = 1;
    b0.owns.push(Owned {
        profile: profile(&graph(X, 512, 1)),
        number: 0.0,
        ran_s: Some(0.5),
    });
    let mut b1 = backend("y-free");
    b1.max_inflight = 1;
    (fleet(vec![b0, b1]), l)
}

#[test]
fn a_prompt_holds_for_a_busier_backend_with_its_checkpoint_and_lets_the_next_go() {
    let (f, l) = x_busy_y_free();
    let q = [
        waiting("x", 1.0, graph(X, 512, 1)),
        waiting("y", 2.0, graph(Y, 512, 1)),
    ];
    let a = decide(&q, &f, &l, &GpuAware::default(), &Rules::default());
    assert_eq!(ids(&a), [("y", 1)], "x waits for backend 0, y goes to 1");
    assert_eq!(a[0].passed_over, ["x"]);
    assert_eq!(a[0].expected_s, 1.0, "its checkpoint is resident there");
    assert_eq!(f.backends[a[0].backend].name, "y-free");
}

#[test]
fn the_affinity_window_bounds_holds_and_aging_ends_waiting() {
    let (f, l) = x_busy_y_free();
    let q = [
        waiting("x1", 1.0, graph(X, 512, 1)),
        waiting("x2", 2.0, graph(X, 512, 1)),
        waiting("y", 3.0, graph(Y, 512, 1)),
    ];
    let p = GpuAware::default();
    let window = |n| Rules {
        affinity_window: n,
        ..Rules::default()
    };
    assert!(
        decide(&q, &f, &l, &p, &window(2)).is_empty(),
        "two holds end the scan"
    );
    let a = decide(&q, &f, &l, &p, &window(3));
    assert_eq!(ids(&a), [("y", 1)]);
    assert_eq!(a[0].passed_over, ["x1", "x2"]);

    // The dispatcher counts skips; after `max_skips` the prompt takes the free backend.
    let rules = Rules {
        max_skips: 2,
        ..Rules::default()
    };
    let mut x = waiting("x", 1.0, graph(X, 512, 1));
    let mut taken = Vec::new();
    for round in 0..3 {
        let q = [
            x.clone(),
            waiting(&format!("y{round}"), 2.0, graph(Y, 512, 1)),
        ];
        let a = decide(&q, &f, &l, &p, &rules);
        x.skips += a.iter().filter(|a| a.passed_over.contains(&x.id)).count() as u32;
        taken.push(
            ids(&a)
                .iter()
                .map(|(i, b)| format!("{i}@{b}"))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(taken, [vec!["y0@1"], vec!["y1@1"], vec!["x@1"]]);
    // Waiting `max_wait_ms` ages it too.
    let old = Waiting {
        waited_ms: Rules::default().max_wait_ms,
        ..waiting("x", 1.0, graph(X, 512, 1))
    };
    let a = decide(&[old], &f, &l, &p, &Rules::default());
    assert_eq!(ids(&a), [("x", 1)]);
}

#[test]
fn a_prompt_that_would_switch_checkpoints_lets_a_resident_one_go_first() {
    let mut l = Learned::default();
    learn(&mut l, 0, &graph(Y, 512, 1), Y, 5.0);
    learn(&mut l, 0, &graph(X, 512, 1), X, 5.0);
    let f = fleet(vec![backend("only")]);
    let q = [
        waiting("y", 1.0, graph(Y, 512, 1)),
        waiting("x", 2.0, graph(X, 512, 1)),
    ];
    let a = decide(&q, &f, &l, &GpuAware::default(), &Rules::default());
    assert_eq!(ids(&a), [("x", 0), ("y", 0)], "X is resident: x first");
    assert_eq!(a[0].passed_over, ["y"]);
    assert_eq!((a[1].skips, a[1].expected_s), (1, 6.0), "y then loads Y");
    // Without a known load time nothing says y would switch: queue order.
    let a = decide(
        &q,
        &f,
        &Learned::default(),
        &GpuAware::default(),
        &Rules::default(),
    );
    assert_eq!(ids(&a), [("y", 0), ("x", 0)]);
}

#[test]
fn a_prompt_goes_only_where_its_vram_need_fits() {
    // SD at 2048² × 2: 1.2 GB per megapixel × 8.4 MP ≈ 10 GB of activations.
    let huge = || waiting("huge", 1.0, graph(X, 2048, 2));
    let mut small = backend("small");
    small.vram_total = 8 * GB;
    let mut big = backend("big");
    big.max_inflight = 1;
    big.inflight = 1;
    let f = fleet(vec![small.clone(), big.clone()]);
    let a = decide(
        &[huge()],
        &f,
        &Learned::default(),
        &GpuAware::default(),
        &Rules::default(),
    );
    assert!(a.is_empty(), "waits for the busy big card: {a:?}");
    big.inflight = 0;
    let f = fleet(vec![small.clone(), big.clone()]);
    let a = decide(
        &[huge()],
        &f,
        &Learned::default(),
        &GpuAware::default(),
        &Rules::default(),
    );
    assert_eq!(ids(&a), [("huge", 1)]);
    assert!(a[0].need.vram_bytes > 8 * GB);
    // After an OOM: only cards with at least `min_vram_total`, although the small one is free
    // and the prompt fits it.
    let retry = Waiting {
        min_vram_total: Some(24 * GB),
        ..waiting("retry", 1.0, graph(X, 512, 1))
    };
    let mut small_roomy = small;
    small_roomy.vram_free = Some(8 * GB);
    let f = fleet(vec![small_roomy.clone(), big]);
    let a = decide(
        std::slice::from_ref(&retry),
        &f,
        &Learned::default(),
        &LeastInFlight,
        &Rules::default(),
    );
    assert_eq!(ids(&a), [("retry", 1)]);
    let a = decide(
        &[waiting("plain", 1.0, graph(X, 512, 1))],
        &f,
        &Learned::default(),
        &LeastInFlight,
        &Rules::default(),
    );
    assert_eq!(
        ids(&a),
        [("plain", 0)],
        "without the OOM bound the first free card"
    );
    // An unread card (total 0) takes anything.
    let mut unread = backend("unread");
    unread.vram_total = 0;
    let a = decide(
        &[huge()],
        &fleet(vec![unread]),
        &Learned::default(),
        &LeastInFlight,
        &Rules::default(),
    );
    assert_eq!(ids(&a), [("huge", 0)]);
}

fn caps(ckpts: &[&str], load_image: bool) -> Arc<Capabilities> {
    let mut info = json!({
        "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [ckpts, {}]}}},
        "KSampler": {"input": {"required": {"model": ["MODEL"]}}},
        "EmptyLatentImage": {"input": {"required": {"width": ["INT"]}}},
        "SaveImage": {"input": {"required": {"images": ["IMAGE"]}}, "output_node": true}
    });
    if load_image {
        info["LoadImage"] =
            json!({"input": {"required": {"image": [["x.png"], {"image_upload": true}]}}});
    }
    let mut c = Capabilities::from_object_info(&info);
    c.add_model_sizes(&json!(
        ckpts
            .iter()
            .map(|n| json!({"name": n, "size": 7 * GB}))
            .collect::<Vec<_>>()
    ));
    Arc::new(c)
}

#[test]
fn a_prompt_goes_only_where_every_class_and_file_it_names_is() {
    let mut has_x = backend("has-x");
    has_x.capabilities = Some(caps(&[X], false));
    has_x.vram_free = Some(70 * GB);
    let mut has_y = backend("has-y");
    has_y.capabilities = Some(caps(&[Y], true));
    let mut f = fleet(vec![has_x, has_y]);
    let run = |f: &FleetView, g: Value| {
        let a = decide(
            &[waiting("p", 1.0, g)],
            f,
            &Learned::default(),
            &GpuAware::default(),
            &Rules::default(),
        );
        a.first().map(|a| a.backend)
    };
    assert_eq!(run(&f, graph(X, 512, 1)), Some(0));
    assert_eq!(
        run(&f, graph(Y, 512, 1)),
        Some(1),
        "its model is on 1 only, though 0 has more room"
    );
    let a = decide(
        &[waiting("p", 1.0, graph(Y, 512, 1))],
        &f,
        &Learned::default(),
        &GpuAware::default(),
        &Rules::default(),
    );
    assert_eq!(
        a[0].need.vram_bytes,
        7 * GB + 314_572_800,
        "model size from the capabilities"
    );
    let mut odd = graph(X, 512, 1);
    odd["10"] = json!({"class_type": "SuperResolution", "inputs": {}});
    assert_eq!(run(&f, odd.clone()), None, "a class no backend has");
    let upload = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "mine.png"}}});
    assert_eq!(
        run(&f, upload.clone()),
        None,
        "an upload the gate does not hold"
    );
    Arc::make_mut(&mut f.uploads).insert("mine.png".into());
    assert_eq!(run(&f, upload), Some(1), "the gate places its uploads");
    let tagged = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "mine.png [input]"}}});
    assert_eq!(run(&f, tagged), Some(1));
    f.backends[1].capabilities = None;
    assert_eq!(run(&f, odd), Some(1), "unknown capabilities: assumed able");
}

#[test]
fn a_retry_prefers_a_backend_it_has_not_tried_and_falls_back_to_one_it_has() {
    let mut roomy = backend("roomy");
    roomy.vram_free = Some(70 * GB);
    let f = fleet(vec![roomy, backend("other")]);
    let retry = Waiting {
        tried: vec![0],
        ..waiting("r", 1.0, graph(X, 512, 1))
    };
    let p = GpuAware::default();
    let first = decide(
        &[waiting("r", 1.0, graph(X, 512, 1))],
        &f,
        &Learned::default(),
        &p,
        &Rules::default(),
    );
    assert_eq!(ids(&first), [("r", 0)], "the roomier card without a retry");
    let a = decide(
        std::slice::from_ref(&retry),
        &f,
        &Learned::default(),
        &p,
        &Rules::default(),
    );
    assert_eq!(ids(&a), [("r", 1)]);
    let mut f = f;
    f.backends[1].accepts_work = false;
    let a = decide(&[retry], &f, &Learned::default(), &p, &Rules::default());
    assert_eq!(
        ids(&a),
        [("r", 0)],
        "nothing else can take it: the tried one"
    );
}

#[test]
fn one_pass_fills_every_free_slot_and_each_assignment_sees_the_ones_before() {
    let f = fleet(vec![backend("a"), backend("b")]);
    let q: Vec<Waiting> = (0..5)
        .map(|i| waiting(&format!("p{i}"), i as f64, graph(X, 512, 1)))
        .collect();
    let a = decide(
        &q,
        &f,
        &Learned::default(),
        &LeastInFlight,
        &Rules::default(),
    );
    assert_eq!(
        ids(&a),
        [("p0", 0), ("p1", 1), ("p2", 0), ("p3", 1)],
        "p4 waits"
    );
    let a = decide(
        &q,
        &f,
        &Learned::default(),
        &GpuAware::default(),
        &Rules::default(),
    );
    assert_eq!(a.len(), 4);
    let score = |a: &Assignment| a.choice.scores.iter().find(|s| s.0 == a.backend).unwrap().1;
    let run = score(&a[0]);
    assert_eq!(score(&a[1]), run, "the other card is as free");
    assert_eq!(score(&a[2]), 2.0 * run, "the third waits behind one prompt");
    assert!(a.iter().all(|a| a.passed_over.is_empty()));
}

#[test]
fn nothing_is_assigned_when_no_backend_accepts_work() {
    let mut f = fleet(vec![backend("a"), backend("b")]);
    for b in &mut f.backends {
        b.accepts_work = false;
    }
    let q = [waiting("p", 1.0, graph(X, 512, 1))];
    assert!(
        decide(
            &q,
            &f,
            &Learned::default(),
            &GpuAware::default(),
            &Rules::default()
        )
        .is_empty()
    );
    assert!(
        decide(
            &[],
            &fleet(vec![backend("a")]),
            &Learned::default(),
            &LeastInFlight,
            &Rules::default()
        )
        .is_empty()
    );
}

// ---- The placement policy's own scenarios, through `decide`.

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
