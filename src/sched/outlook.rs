//! The two steps under [`decide`](super::decide::decide): what each backend has to do before a
//! new prompt could start there (its *outlook*: the work it owns, re-estimated with what is
//! learned now, and the checkpoint that work leaves resident, so a prompt behind work of another
//! checkpoint is charged the load), and the placement of one prompt given those outlooks
//! (filter, then ask the picker). Both read only the snapshot and the pass's working state.

use crate::fleet::picker::profile::{self, Profile};
use crate::fleet::picker::stats::Learned;
use crate::fleet::picker::{Candidate, Choice, Need, Picker};

use super::fit::{VramFit, vram_fit};
use super::snapshot::{FleetView, Owned, Waiting};

/// What a backend has to do before a new prompt could start there, as the gate expects it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outlook {
    /// Expected seconds of work ahead (runs and checkpoint loads, less what already ran).
    pub busy_s: f64,
    /// The checkpoint resident once that work is done (`None`: unknown or none).
    pub checkpoint: Option<String>,
}

/// The pass's working copy of what the snapshot says about slots and owned work: the
/// assignments made earlier in the same pass are added here, so later prompts see them.
#[derive(Debug)]
pub struct Pass<'a> {
    pub fleet: &'a FleetView,
    /// Slots in use per backend (index as in `fleet.backends`), this pass's reservations included.
    pub inflight: Vec<usize>,
    /// Work assigned to each backend during this pass (not started).
    pub added: Vec<Vec<Owned>>,
}

impl<'a> Pass<'a> {
    pub fn new(fleet: &'a FleetView) -> Self {
        Self {
            fleet,
            inflight: fleet.backends.iter().map(|b| b.inflight).collect(),
            added: vec![Vec::new(); fleet.backends.len()],
        }
    }

    /// Free slots of backend `b` now.
    pub fn free_slots(&self, b: usize) -> usize {
        self.fleet.backends[b]
            .max_inflight
            .saturating_sub(self.inflight[b])
    }

    /// Reserves a slot on `b` for `work` (it will run after what `b` owns, by its number).
    pub fn reserve(&mut self, b: usize, work: Owned) {
        self.inflight[b] += 1;
        self.added[b].push(work);
    }

    /// Every backend's outlook: the work it owns in run order (started first, then by number),
    /// each costed as its expected run plus the checkpoint load behind the work before it, less
    /// the seconds it already ran. Indexed like `fleet.backends`.
    pub fn outlooks(&self, learned: &Learned) -> Vec<Outlook> {
        (0..self.fleet.backends.len())
            .map(|b| {
                let mut o = Outlook {
                    busy_s: 0.0,
                    checkpoint: learned.resident(b).map(str::to_string),
                };
                let mut mine: Vec<&Owned> = self.fleet.backends[b]
                    .owns
                    .iter()
                    .chain(&self.added[b])
                    .collect();
                mine.sort_by(|x, y| {
                    (x.ran_s.is_none())
                        .cmp(&y.ran_s.is_none())
                        .then(x.number.total_cmp(&y.number))
                });
                for x in mine {
                    let p = &x.profile;
                    let cost =
                        learned.run_s(b, p) + learned.load_after(b, o.checkpoint.as_deref(), p);
                    o.busy_s += (cost - x.ran_s.unwrap_or(0.0)).max(0.0);
                    if p.checkpoint.is_some() {
                        o.checkpoint = p.checkpoint.clone();
                    }
                }
                o
            })
            .collect()
    }
}

/// What one waiting prompt needs, worked out once per `decide` call: its VRAM need and which
/// backends can run it (every class and file it names; unknown capabilities: assume it can).
#[derive(Debug)]
pub struct Prep {
    pub need: Need,
    /// Size in bytes of its checkpoint, from the first backend that lists it.
    pub ckpt_bytes: Option<u64>,
    /// Per backend: it has every class and file the prompt names.
    pub runnable: Vec<bool>,
}

impl Prep {
    /// `margin`: `placement.vram_margin` (a need over every card but within it is tried on the
    /// largest, see [`super::fit`]).
    pub fn new(w: &Waiting, fleet: &FleetView, learned: &Learned, margin: f64) -> Self {
        let ckpt_bytes = w
            .profile
            .checkpoint
            .as_deref()
            .and_then(|c| fleet.ckpt_bytes(c));
        let mut need = Need {
            vram_bytes: profile::vram_need(&w.profile, ckpt_bytes, learned.peak(w.profile.shape)),
        };
        let runnable: Vec<bool> = (0..fleet.backends.len())
            .map(|b| fleet.can_run(b, &w.prompt))
            .collect();
        let totals: Vec<u64> = (0..fleet.backends.len())
            .filter(|&b| runnable[b])
            .map(|b| fleet.backends[b].vram_total)
            .collect();
        if let VramFit::Stretch { largest } = vram_fit(need.vram_bytes, &totals, margin) {
            need.vram_bytes = largest;
        }
        Self {
            need,
            ckpt_bytes,
            runnable,
        }
    }
}

/// Where a prompt should go now.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    /// Its best backend has a free slot: the choice, the need, the expected seconds there
    /// (run + load), and whether its checkpoint must be loaded there first.
    Place(Choice, Need, f64, bool),
    /// Its best backend is full: wait for it; what it adds there (seconds, checkpoint).
    Hold(usize, Outlook),
    /// No backend can take it now.
    Nowhere,
}

/// The placement of `w` among the backends that may take it: accepting work, every class and
/// file it names, its VRAM need within the card, enough VRAM after an OOM, preferably one it has
/// not tried (else any). With `free_only` only backends with a free slot count.
pub fn choose(
    w: &Waiting,
    prep: &Prep,
    free_only: bool,
    pass: &Pass<'_>,
    outlooks: &[Outlook],
    learned: &Learned,
    picker: &dyn Picker,
) -> Placement {
    let fleet = pass.fleet;
    let need = prep.need;
    let eligible = |b: usize| {
        let v = &fleet.backends[b];
        v.accepts_work
            && (!free_only || pass.free_slots(b) > 0)
            && w.min_vram_total.is_none_or(|min| v.vram_total >= min)
            && (v.vram_total == 0 || need.vram_bytes <= v.vram_total)
            && prep.runnable[b]
    };
    let candidates = |avoid_tried: bool| -> Vec<Candidate> {
        (0..fleet.backends.len())
            .filter(|&b| eligible(b))
            .filter(|b| !avoid_tried || !w.tried.contains(b))
            .map(|b| candidate(b, w, prep, pass, &outlooks[b], learned))
            .collect()
    };
    let first = candidates(true);
    let (cands, choice) = match picker.pick(&need, &first) {
        Some(c) => (first, c),
        None => {
            let all = candidates(false);
            match picker.pick(&need, &all) {
                Some(c) => (all, c),
                None => return Placement::Nowhere,
            }
        }
    };
    let Some(chosen) = cands.iter().find(|c| c.id == choice.id) else {
        return Placement::Nowhere;
    };
    let expected = chosen.run_s + chosen.load_s;
    if !chosen.free {
        return Placement::Hold(
            chosen.id,
            Outlook {
                busy_s: expected,
                checkpoint: w.profile.checkpoint.clone(),
            },
        );
    }
    Placement::Place(choice, need, expected, chosen.load_s > 0.0)
}

/// What the picker knows of backend `b` for prompt `w`.
fn candidate(
    b: usize,
    w: &Waiting,
    prep: &Prep,
    pass: &Pass<'_>,
    o: &Outlook,
    learned: &Learned,
) -> Candidate {
    let v = &pass.fleet.backends[b];
    let p: &Profile = &w.profile;
    let resident_here = p.checkpoint.is_some() && learned.resident(b) == p.checkpoint.as_deref();
    Candidate {
        id: b,
        free: pass.free_slots(b) > 0,
        inflight: pass.inflight[b],
        max_inflight: v.max_inflight,
        vram_total: v.vram_total,
        vram_free: v.vram_free,
        queued_s: o.busy_s,
        run_s: learned.run_s(b, p),
        load_s: learned.load_after(b, o.checkpoint.as_deref(), p),
        need_here: if resident_here {
            prep.need
                .vram_bytes
                .saturating_sub(prep.ckpt_bytes.unwrap_or(0))
        } else {
            prep.need.vram_bytes
        },
    }
}
