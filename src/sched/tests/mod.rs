//! Scenarios for [`decide`]: holds, affinity and aging, the switching rule, VRAM fit,
//! capabilities, retries, several assignments per pass; the placement policy's own scenarios
//! (`gate/placement` unit tests, `tests/placement.rs`) replayed through `decide`, the last two
//! with a small queue simulation that drives `decide` as the dispatcher does.

use std::sync::Arc;

use serde_json::{Value, json};

use super::decide::{Assignment, BackendView, Cap, FleetView, Owned, Rules, Waiting, decide};
use crate::fleet::capabilities::Capabilities;
use crate::fleet::picker::profile::profile;
use crate::fleet::picker::stats::Learned;
use crate::fleet::picker::{GpuAware, LeastInFlight, Picker, RoundRobin};

mod policy;

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
fn a_prompt_of_a_lower_band_does_not_pass_a_held_one_that_a_free_backend_takes() {
    let (f, l) = x_busy_y_free();
    let p = GpuAware::default();
    let banded = |id: &str, number: f64, ckpt: &str, band: usize| Waiting {
        band,
        ..waiting(id, number, graph(ckpt, 512, 1))
    };
    // x (interactive) would wait for backend 0; y (batch) may not take backend 1 before it.
    let q = [banded("x", 1.0, X, 0), banded("y", 2.0, Y, 1)];
    let a = decide(&q, &f, &l, &p, &Rules::default());
    assert_eq!(ids(&a), [("x", 1)], "x takes the free slot");
    assert!(a[0].passed_over.is_empty());
    // Of one band, the hold stands (as before bands).
    let q = [banded("x", 1.0, X, 1), banded("y", 2.0, Y, 1)];
    assert_eq!(ids(&decide(&q, &f, &l, &p, &Rules::default())), [("y", 1)]);
    // A higher-band prompt that no free backend takes does not block the lower band.
    let big_only = Waiting {
        min_vram_total: Some(100 * GB),
        ..banded("x", 1.0, X, 0)
    };
    let q = [big_only, banded("y", 2.0, Y, 1)];
    assert_eq!(ids(&decide(&q, &f, &l, &p, &Rules::default())), [("y", 1)]);
    // A yielding prompt (it would load a checkpoint) goes before a lower band's resident one.
    let mut l = Learned::default();
    learn(&mut l, 0, &graph(Y, 512, 1), Y, 5.0);
    learn(&mut l, 0, &graph(X, 512, 1), X, 5.0);
    let one = fleet(vec![backend("only")]);
    let q = [banded("y", 1.0, Y, 0), banded("x", 2.0, X, 1)];
    let a = decide(&q, &one, &l, &p, &Rules::default());
    assert_eq!(
        ids(&a),
        [("y", 0), ("x", 0)],
        "y first, though X is resident"
    );
    assert!(a[0].passed_over.is_empty());
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

fn capped(id: &str, number: f64, group: usize, left: usize) -> Waiting {
    Waiting {
        cap: Some(Cap { group, left }),
        ..waiting(id, number, graph(X, 512, 1))
    }
}

#[test]
fn a_user_at_its_running_cap_is_skipped_and_others_go() {
    let f = fleet(vec![backend("g0"), backend("g1")]);
    let l = Learned::default();
    let p = GpuAware::default();
    // a may send one more, b none; c has no cap. Four free slots.
    let q = [
        capped("a1", 1.0, 0, 1),
        capped("a2", 2.0, 0, 1),
        capped("b1", 3.0, 1, 0),
        capped("a3", 4.0, 0, 1),
        waiting("c1", 5.0, graph(X, 512, 1)),
        waiting("c2", 6.0, graph(X, 512, 1)),
    ];
    let a = decide(&q, &f, &l, &p, &Rules::default());
    let took: Vec<&str> = a.iter().map(|a| a.prompt.as_str()).collect();
    assert_eq!(took, ["a1", "c1", "c2"]);
    assert!(
        a.iter().all(|a| a.passed_over.is_empty()),
        "a capped prompt is not passed over: {a:?}"
    );
    // Capped prompts take no place in the scan: with a scan of 2, the uncapped ones behind a
    // long capped backlog still go.
    let mut q: Vec<Waiting> = (0..10)
        .map(|i| capped(&format!("b{i}"), i as f64, 0, 0))
        .collect();
    q.push(waiting("c", 20.0, graph(X, 512, 1)));
    let rules = Rules {
        scan: 2,
        ..Rules::default()
    };
    let a = decide(&q, &f, &l, &p, &rules);
    assert_eq!(ids(&a), [("c", 0)]);
    // A cap of 2 left takes two in one pass.
    let q = [
        capped("d1", 1.0, 7, 2),
        capped("d2", 2.0, 7, 2),
        capped("d3", 3.0, 7, 2),
    ];
    let a = decide(&q, &f, &l, &p, &Rules::default());
    assert_eq!(a.len(), 2);
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
