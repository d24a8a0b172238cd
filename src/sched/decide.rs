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
//!
//! The order of `waiting` is the caller's: the gate offers its queue in priority band and fair
//! share order ([`super::fair`]), which the rules above bend only within their window and
//! within a band ([`Waiting::band`]): when the scan reaches a prompt of a lower band than one
//! held or yielding in the step, the first of those that a free backend takes goes there
//! instead (so an `interactive` prompt takes the next free slot rather than wait for a better
//! backend while `batch` prompts take the free ones); only if no free backend takes any of
//! them may the lower band's prompts go. A
//! prompt whose user has as many prompts on backends as `limits.max_running` allows
//! ([`Waiting::cap`], counted down as the pass assigns) is not looked at: it does not take a
//! place in the scan, is never held and is not counted as passed over, so the prompts of other
//! users behind it go.

use std::collections::HashMap;

use crate::config::PlacementConfig;
use crate::fleet::picker::stats::Learned;
use crate::fleet::picker::{Choice, Need, Picker};

use super::outlook::{Outlook, Pass, Placement, Prep, choose};
pub use super::snapshot::{BackendView, Cap, FleetView, Owned, Waiting};

/// How many waiting prompts, from the head of the queue, one step looks at.
pub const SCAN: usize = 64;

/// The reordering bounds (`[placement]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rules {
    /// Waiting prompts one step looks at, from the head of the queue. Default [`SCAN`].
    pub scan: usize,
    /// Holds per step (`affinity_window`); 1 disables reordering for holds.
    pub affinity_window: usize,
    /// A prompt passed over this many times no longer waits or yields.
    pub max_skips: u32,
    /// A prompt waiting this many milliseconds no longer waits or yields.
    pub max_wait_ms: u64,
    /// `placement.vram_margin`: how far a predicted need may exceed the largest card and still
    /// be tried there (see [`super::fit`]).
    pub vram_margin: f64,
}

impl From<&PlacementConfig> for Rules {
    fn from(p: &PlacementConfig) -> Self {
        Self {
            scan: SCAN,
            affinity_window: p.affinity_window,
            max_skips: p.max_skips,
            max_wait_ms: p.max_wait_ms,
            vram_margin: p.vram_margin,
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
        caps: waiting
            .iter()
            .filter_map(|w| w.cap)
            .map(|c| (c.group, c.left))
            .collect(),
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
    /// Per cap group: prompts it may still send.
    caps: HashMap<usize, usize>,
}

impl State<'_> {
    /// One step: the first prompt (within the scan) whose best backend has a free slot, after
    /// holds and the switching rule; `None` if none can go.
    fn step(&mut self) -> Option<Step> {
        let scan: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| !self.taken[i] && self.may_send(i))
            .take(self.rules.scan)
            .collect();
        let mut held: Vec<usize> = Vec::new();
        // What each backend has to do, plus the work the held prompts will add (list
        // scheduling: a prompt behind them sees those backends as busier).
        let mut outlooks = self.pass.outlooks(self.learned);
        // The first prompt that could go now but would load a checkpoint, and how many holds
        // were ahead of it.
        let mut switching: Option<(Step, usize)> = None;
        // The band of the prompts held or yielding so far in this step: a prompt of a lower
        // band may not pass them (affinity reorders within a band); one of them takes a free
        // backend first, if any takes it.
        let mut barrier: Option<usize> = None;
        for i in scan {
            if barrier.is_some_and(|b| self.waiting[i].band > b) {
                if let Some(step) = self.forced(&held, &mut switching, &outlooks) {
                    return Some(step);
                }
                // No free backend takes any of them: the lower band may use it.
                barrier = None;
            }
            let w = &self.waiting[i];
            let band = Some(barrier.map_or(w.band, |b| b.min(w.band)));
            let aged =
                self.skips[i] >= self.rules.max_skips || w.waited_ms >= self.rules.max_wait_ms;
            let prep = self.preps[i].get_or_insert_with(|| {
                Prep::new(w, self.pass.fleet, self.learned, self.rules.vram_margin)
            });
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
                            barrier = band;
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
                    barrier = band;
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

    /// The first (in queue order) of the prompts held or yielding in this step that a free
    /// backend takes now, the others ahead of it passed over; `None` if none can go.
    fn forced(
        &self,
        held: &[usize],
        switching: &mut Option<(Step, usize)>,
        outlooks: &[Outlook],
    ) -> Option<Step> {
        let mut ahead = held.to_vec();
        ahead.extend(switching.as_ref().map(|(s, _)| s.index));
        ahead.sort_unstable();
        for (k, &c) in ahead.iter().enumerate() {
            let passed = ahead[..k].to_vec();
            if switching.as_ref().is_some_and(|(s, _)| s.index == c) {
                let (step, _) = switching.take()?;
                return Some(Step { passed, ..step });
            }
            let Some(prep) = self.preps[c].as_ref() else {
                continue;
            };
            let w = &self.waiting[c];
            let placement = choose(
                w,
                prep,
                true,
                &self.pass,
                outlooks,
                self.learned,
                self.picker,
            );
            if let Placement::Place(choice, need, expected_s, _) = placement {
                return Some(Step {
                    index: c,
                    choice,
                    need,
                    expected_s,
                    passed,
                });
            }
        }
        None
    }

    /// Whether waiting prompt `i`'s user may have one more prompt sent.
    fn may_send(&self, i: usize) -> bool {
        self.waiting[i]
            .cap
            .is_none_or(|c| self.caps.get(&c.group).is_some_and(|&left| left > 0))
    }

    /// Reserves the step's slot in the working snapshot and counts the skips.
    fn apply(&mut self, step: Step) -> Assignment {
        for &p in &step.passed {
            self.skips[p] += 1;
        }
        let w = &self.waiting[step.index];
        if let Some(left) = w.cap.and_then(|c| self.caps.get_mut(&c.group)) {
            *left = left.saturating_sub(1);
        }
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
