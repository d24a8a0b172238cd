//! The scheduling decision as one pure function: given the waiting prompts in queue order and a
//! snapshot of the fleet, which prompts go to which backends now.
//!
//! Why pure: the decision used to read live locks, atomics and clocks inside the gate, so it
//! could be tested only end to end and compared with other policies only on real sockets. Here
//! the caller builds a [`FleetView`] and a list of [`Waiting`] prompts once per dispatch pass
//! (the snapshot carries ages, so nothing reads a clock), calls [`decide`], and applies the
//! [`Assignment`]s: reserve the slot, record the owner, bump the `skips` of the prompts passed
//! over. The same function then runs in unit tests, in a criterion bench and in a
//! discrete-event simulation of a fleet (`benches/scheduling_des.rs`).
//!
//! Semantics (late binding, design §2–3): a pass is a series of steps, each taking at most one
//! prompt, until a step takes none. A step scans the first [`Rules::scan`] waiting prompts in
//! order. A prompt whose best backend is full waits for it (a hold: the GPU with its checkpoint
//! resident, say, will finish it sooner), and its expected work is added to that backend's
//! outlook, so prompts behind it see it as busier; at most `affinity_window` holds per step. A
//! prompt that could go now but would load a checkpoint lets a later one that finds its
//! checkpoint resident go first (checkpoint switches cost more than most prompts run); failing
//! that, it goes. A prompt passed over `max_skips` times or waiting `max_wait_ms` no longer waits
//! or yields: it takes the best free backend (aging, so nothing starves). Each assignment
//! reserves a slot in the pass's working copy of the snapshot, so later steps see it.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::config::PlacementConfig;
use crate::fleet::capabilities::Capabilities;
use crate::fleet::picker::profile::{self, Profile};
use crate::fleet::picker::stats::Learned;
use crate::fleet::picker::{Choice, Need, Picker};

use super::outlook::{Pass, Placement, Prep, choose};

/// How many waiting prompts, from the head of the queue, one step looks at.
pub const SCAN: usize = 64;

/// One prompt a backend owns (sent there and not finished).
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    /// What it asks of the GPU (see [`profile::profile`]).
    pub profile: Profile,
    /// The gate's global queue number; a backend runs what it owns started first, then by
    /// number.
    pub number: f64,
    /// Seconds it has been running, `None` if it has not started.
    pub ran_s: Option<f64>,
}

/// One backend as the snapshot sees it.
#[derive(Clone, Debug)]
pub struct BackendView {
    /// The backend's configured name (for decision records and logs).
    pub name: String,
    /// Healthy, not draining, not stalled: it may get new work.
    pub accepts_work: bool,
    /// Slots in use (prompts sent there and not finished).
    pub inflight: usize,
    /// Slots in all (`scheduler.max_inflight`).
    pub max_inflight: usize,
    /// Total VRAM in bytes; 0 if never read (then any need fits).
    pub vram_total: u64,
    /// Free VRAM in bytes from a reading younger than `stale_after_ms`; `None` otherwise (no
    /// headroom).
    pub vram_free: Option<u64>,
    /// What it can run; `None` until read (then it is assumed to run anything).
    pub capabilities: Option<Arc<Capabilities>>,
    /// The prompts it owns, in any order (see [`Owned`] for the run order).
    pub owns: Vec<Owned>,
}

/// The fleet at the start of a pass. Backends are referred to by their index here.
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    pub backends: Vec<BackendView>,
    /// Names of the uploads the gate holds (as in its input directory, e.g. `cat.png` or
    /// `sub/cat.png`): a prompt naming one may go to a backend that lacks it (the gate places
    /// it there).
    pub uploads: HashSet<String>,
}

impl FleetView {
    /// Whether the gate holds an upload of that name (a ` [input]` suffix is ignored; a name
    /// that climbs out of the input directory never counts).
    pub fn uploaded(&self, name: &str) -> bool {
        let plain = name.strip_suffix(" [input]").unwrap_or(name);
        !plain.contains("..") && self.uploads.contains(plain)
    }

    /// Whether backend `b` has every node class and file `prompt` names (unknown
    /// capabilities: assume it has).
    pub fn can_run(&self, b: usize, prompt: &Value) -> bool {
        match &self.backends[b].capabilities {
            Some(caps) => caps.missing(prompt, &|n| self.uploaded(n)).is_none(),
            None => true,
        }
    }

    /// The size in bytes of model file `name`, from the first backend that lists it.
    pub fn ckpt_bytes(&self, name: &str) -> Option<u64> {
        self.backends.iter().find_map(|b| {
            b.capabilities
                .as_ref()
                .and_then(|c| c.model_bytes.get(name).copied())
        })
    }
}

/// One prompt in the gate queue.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub id: String,
    /// The gate's global queue number (the order it will run in once owned).
    pub number: f64,
    /// Its graph (the `prompt` object of the request): the capability check reads it.
    pub prompt: Arc<Value>,
    /// `profile::profile(&prompt)`, computed once by the caller.
    pub profile: Profile,
    /// Backends (indices) it ran on before; a retry prefers others.
    pub tried: Vec<usize>,
    /// Only backends with at least this much total VRAM (bytes) may take it (after an OOM).
    pub min_vram_total: Option<u64>,
    /// Times it was passed over for other prompts' affinity so far.
    pub skips: u32,
    /// Milliseconds since it was accepted.
    pub waited_ms: u64,
}

impl Waiting {
    /// A fresh prompt: never tried, never skipped, just accepted.
    pub fn new(id: impl Into<String>, number: f64, prompt: Arc<Value>) -> Self {
        Self {
            id: id.into(),
            number,
            profile: profile::profile(&prompt),
            prompt,
            tried: Vec::new(),
            min_vram_total: None,
            skips: 0,
            waited_ms: 0,
        }
    }
}

/// The reordering bounds (`[placement]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Waiting prompts one step looks at, from the head of the queue. Default [`SCAN`].
    pub scan: usize,
    /// Holds per step (`affinity_window`); 1 disables reordering for holds.
    pub affinity_window: usize,
    /// A prompt passed over this many times no longer waits or yields.
    pub max_skips: u32,
    /// A prompt waiting this many milliseconds no longer waits or yields.
    pub max_wait_ms: u64,
}

impl From<&PlacementConfig> for Rules {
    fn from(p: &PlacementConfig) -> Self {
        Self {
            scan: SCAN,
            affinity_window: p.affinity_window,
            max_skips: p.max_skips,
            max_wait_ms: p.max_wait_ms,
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self::from(&PlacementConfig::default())
    }
}

/// One prompt sent to one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The prompt's id.
    pub prompt: String,
    /// Index into `FleetView.backends`.
    pub backend: usize,
    /// The picker's answer: chosen, runner-up, scores, reason.
    pub choice: Choice,
    /// Its predicted VRAM need.
    pub need: Need,
    /// Expected seconds there: run plus checkpoint load.
    pub expected_s: f64,
    /// Its own `skips` when it was taken (for the decision record).
    pub skips: u32,
    /// Prompts passed over for this one, in queue order: the caller adds 1 to each one's
    /// `skips` (aging). Later assignments of the same pass already counted them.
    pub passed_over: Vec<String>,
}

/// The assignments of one dispatch pass, in the order they were made: `waiting` in queue
/// order, `fleet` as it is now, `learned` the gate's estimates, `picker` the policy. Pure:
/// the same inputs give the same answer (a stateful picker, such as round robin, advances).
pub fn decide(
    waiting: &[Waiting],
    fleet: &FleetView,
    learned: &Learned,
    picker: &dyn Picker,
    rules: &Rules,
) -> Vec<Assignment> {
    let mut state = State {
        waiting,
        learned,
        picker,
        rules,
        pass: Pass::new(fleet),
        taken: vec![false; waiting.len()],
        skips: waiting.iter().map(|w| w.skips).collect(),
        preps: (0..waiting.len()).map(|_| None).collect(),
    };
    let mut out = Vec::new();
    while let Some(step) = state.step() {
        out.push(state.apply(step));
    }
    out
}

/// A prompt one step takes: its index in `waiting`, the placement, and the indices passed over.
struct Step {
    index: usize,
    choice: Choice,
    need: Need,
    expected_s: f64,
    passed: Vec<usize>,
}

/// The working state of one pass.
struct State<'a> {
    waiting: &'a [Waiting],
    learned: &'a Learned,
    picker: &'a dyn Picker,
    rules: &'a Rules,
    pass: Pass<'a>,
    /// Per waiting prompt: assigned in this pass.
    taken: Vec<bool>,
    /// Per waiting prompt: its skips, this pass's included.
    skips: Vec<u32>,
    /// Per waiting prompt: its need and where it can run, once looked at.
    preps: Vec<Option<Prep>>,
}

impl State<'_> {
    /// One step: the first prompt (within the scan) whose best backend has a free slot, after
    /// holds and the switching rule; `None` if none can go.
    fn step(&mut self) -> Option<Step> {
        let scan: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| !self.taken[i])
            .take(self.rules.scan)
            .collect();
        let mut held: Vec<usize> = Vec::new();
        // What each backend has to do, plus the work the held prompts will add (list
        // scheduling: a prompt behind them sees those backends as busier).
        let mut outlooks = self.pass.outlooks(self.learned);
        // The first prompt that could go now but would load a checkpoint, and how many holds
        // were ahead of it.
        let mut switching: Option<(Step, usize)> = None;
        for i in scan {
            let w = &self.waiting[i];
            let aged =
                self.skips[i] >= self.rules.max_skips || w.waited_ms >= self.rules.max_wait_ms;
            let prep =
                self.preps[i].get_or_insert_with(|| Prep::new(w, self.pass.fleet, self.learned));
            let placement = choose(
                w,
                prep,
                aged,
                &self.pass,
                &outlooks,
                self.learned,
                self.picker,
            );
            match placement {
                Placement::Place(choice, need, expected_s, loads) => {
                    let step = Step {
                        index: i,
                        choice,
                        need,
                        expected_s,
                        passed: Vec::new(),
                    };
                    if loads && !aged {
                        if switching.is_none() {
                            switching = Some((step, held.len()));
                        }
                        continue;
                    }
                    let mut passed = held;
                    passed.extend(switching.map(|(s, _)| s.index));
                    return Some(Step { passed, ..step });
                }
                Placement::Hold(b, adds) => {
                    let o = &mut outlooks[b];
                    o.busy_s += adds.busy_s;
                    if adds.checkpoint.is_some() {
                        o.checkpoint = adds.checkpoint;
                    }
                    held.push(i);
                    if held.len() >= self.rules.affinity_window {
                        break;
                    }
                }
                Placement::Nowhere => {}
            }
        }
        let (step, held_ahead) = switching?;
        held.truncate(held_ahead);
        Some(Step {
            passed: held,
            ..step
        })
    }

    /// Reserves the step's slot in the working snapshot and counts the skips.
    fn apply(&mut self, step: Step) -> Assignment {
        for &p in &step.passed {
            self.skips[p] += 1;
        }
        let w = &self.waiting[step.index];
        let backend = step.choice.id;
        self.pass.reserve(
            backend,
            Owned {
                profile: w.profile.clone(),
                number: w.number,
                ran_s: None,
            },
        );
        self.taken[step.index] = true;
        Assignment {
            prompt: w.id.clone(),
            backend,
            choice: step.choice,
            need: step.need,
            expected_s: step.expected_s,
            skips: self.skips[step.index],
            passed_over: step
                .passed
                .iter()
                .map(|&p| self.waiting[p].id.clone())
                .collect(),
        }
    }
}
