//! The placement decision (design §3): which waiting prompt goes to which backend. For one
//! prompt: which backends may take it, what each has to do before it (work and the checkpoint
//! that work leaves resident, so a prompt behind others of another checkpoint is charged the
//! load), and what the policy picks. For the queue: holds, the affinity window with aging, and
//! checkpoint switches (see [`take_next`]). Runs under the scheduler's lock, so a decision and
//! the slot it takes are one step.

use std::collections::HashMap;

use serde_json::json;

use super::prompts::PromptRecord;
use super::{SchedState, Scheduler};
use crate::fleet::picker::{Candidate, Choice, Need, profile};
use crate::protocol::now_ms;

/// Waiting prompts a dispatch pass looks at, from the head of the gate queue.
pub const SCAN_DEPTH: usize = 64;

/// What a backend has to do before a new prompt could start there, as the gate expects it.
#[derive(Clone, Debug, Default)]
pub struct Outlook {
    pub busy_s: f64,
    /// The checkpoint resident once that work is done.
    pub checkpoint: Option<String>,
}

/// Where a prompt should go now.
pub enum Placement {
    /// Its best backend has a free slot: the choice, the need, the expected seconds there, and
    /// whether its checkpoint must be loaded there first.
    Place(Choice, Need, f64, bool),
    /// Its best backend is full: wait for it (what it adds there: seconds, checkpoint).
    Hold(usize, Outlook),
    /// No backend can take it now.
    Nowhere,
}

/// What every backend has to do, as the gate expects it now: the prompts it owns,
/// re-estimated with what is known now, in the order they will run there (started first, then
/// by number), and the checkpoint resident once they are done. One pass over the prompt table;
/// a dispatch pass computes it once and adds its holds.
pub fn outlooks(sched: &Scheduler, s: &SchedState) -> HashMap<usize, Outlook> {
    let mut ahead: HashMap<&str, Vec<&PromptRecord>> = HashMap::new();
    for x in s.table.records() {
        if let (true, Some(b)) = (x.holds_slot(None), x.owner.as_deref()) {
            ahead.entry(b).or_default().push(x);
        }
    }
    sched
        .fleet
        .backends()
        .iter()
        .map(|backend| {
            let b = backend.index;
            let mut o = Outlook {
                busy_s: 0.0,
                checkpoint: s.learned.resident(b).map(str::to_string),
            };
            let mut mine = ahead.remove(backend.name()).unwrap_or_default();
            mine.sort_by(|x, y| {
                let key = |r: &PromptRecord| (r.started_at.is_none(), r.number.as_f64());
                let (kx, ky) = (key(x), key(y));
                kx.0.cmp(&ky.0)
                    .then(kx.1.partial_cmp(&ky.1).unwrap_or(std::cmp::Ordering::Equal))
            });
            for x in mine {
                let p = profile::profile(&x.body["prompt"]);
                let cost =
                    s.learned.run_s(b, &p) + s.learned.load_after(b, o.checkpoint.as_deref(), &p);
                let elapsed = x.started_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
                o.busy_s += (cost - elapsed).max(0.0);
                if p.checkpoint.is_some() {
                    o.checkpoint = p.checkpoint;
                }
            }
            (b, o)
        })
        .collect()
}

/// The placement decision for `r` among the backends that may take it: healthy, not draining
/// or stalled, every class and file it names, its VRAM need within the card, enough VRAM after
/// an OOM, preferably one it did not fail on. `Hold` when the best backend is full (the prompt
/// waits for it); with `free_only` only backends with a free slot count. `outlooks`: what each
/// backend has to do first (see [`outlooks`]), holds included.
pub fn choose(
    sched: &Scheduler,
    s: &SchedState,
    r: &PromptRecord,
    free_only: bool,
    outlooks: &HashMap<usize, Outlook>,
) -> Placement {
    let fleet = &sched.fleet;
    let learned = &s.learned;
    let prompt = &r.body["prompt"];
    let prof = profile::profile(prompt);
    let ckpt_bytes = prof.checkpoint.as_ref().and_then(|c| {
        fleet.backends().iter().find_map(|b| {
            b.capabilities
                .load()
                .as_ref()
                .and_then(|caps| caps.model_bytes.get(c).copied())
        })
    });
    let need = Need {
        vram_bytes: profile::vram_need(&prof, ckpt_bytes, learned.peak(prof.shape)),
    };
    let outlook = |b: usize| outlooks.get(&b).cloned().unwrap_or_default();
    let uploaded = |n: &str| sched.files.uploaded(n);
    let free =
        |b: &crate::fleet::BackendState| s.table.slots_used(b.name()) < b.config.max_inflight;
    let eligible = |b: &&std::sync::Arc<crate::fleet::BackendState>| {
        let total = fleet.vram(b.index).0;
        b.accepts_work()
            && (!free_only || free(b))
            && r.min_vram_total.is_none_or(|min| total >= min)
            && (total == 0 || need.vram_bytes <= total)
            && fleet.can_run(b.index, prompt, &uploaded)
    };
    let candidates = |avoid_tried: bool| -> Vec<Candidate> {
        fleet
            .backends()
            .iter()
            .filter(eligible)
            .filter(|b| !avoid_tried || !r.tried.iter().any(|t| t == b.name()))
            .map(|b| (b, outlook(b.index)))
            .map(|(b, o)| Candidate {
                id: b.index,
                free: free(b),
                inflight: s.table.slots_used(b.name()),
                max_inflight: b.config.max_inflight,
                vram_total: fleet.vram(b.index).0,
                vram_free: fleet.vram(b.index).1,
                queued_s: o.busy_s,
                run_s: learned.run_s(b.index, &prof),
                load_s: learned.load_after(b.index, o.checkpoint.as_deref(), &prof),
                need_here: if prof.checkpoint.is_some()
                    && learned.resident(b.index) == prof.checkpoint.as_deref()
                {
                    need.vram_bytes.saturating_sub(ckpt_bytes.unwrap_or(0))
                } else {
                    need.vram_bytes
                },
            })
            .collect()
    };
    let first = candidates(true);
    let (cands, choice) = match sched.picker().pick(&need, &first) {
        Some(c) => (first, c),
        None => {
            let all = candidates(false);
            match sched.picker().pick(&need, &all) {
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
                checkpoint: prof.checkpoint,
            },
        );
    }
    Placement::Place(choice, need, expected, chosen.load_s > 0.0)
}

/// Reserves the chosen slot for `id` (Queued → Dispatching) and records the decision.
pub fn commit(
    sched: &Scheduler,
    s: &mut SchedState,
    id: &str,
    choice: Choice,
    need: Need,
    expected_s: f64,
) -> Option<usize> {
    let fleet = &sched.fleet;
    let name = |i: usize| fleet.get(i).name().to_string();
    let skips = s.table.get(id)?.skips;
    if !s.table.reserve(id, fleet.get(choice.id).name()) {
        return None;
    }
    let decision = json!({
        "at": now_ms(),
        "prompt_id": id,
        "policy": sched.picker().name(),
        "chosen": name(choice.id),
        "runner_up": choice.runner_up.map(name),
        "scores": choice.scores.iter().map(|(i, sc)| json!({"backend": name(*i), "score": sc})).collect::<Vec<_>>(),
        "need_vram_bytes": need.vram_bytes,
        "expected_s": expected_s,
        "skips": skips,
        "reason": choice.reason,
    });
    Scheduler::record_decision(s, decision);
    Some(choice.id)
}

/// Takes the next prompt to dispatch and reserves its slot: the first queued prompt whose best
/// backend has a free slot. A prompt whose best backend is full waits for it (a hold: the GPU
/// with its checkpoint resident, say, will finish it sooner) while prompts behind it, within
/// `affinity_window` holds, go ahead. A prompt passed over `max_skips` times or waiting
/// `max_wait_ms` no longer waits: it takes the best free backend (aging, so nothing starves).
/// A prompt that would switch a free backend's checkpoint lets one behind it (within the
/// window) that finds its checkpoint resident go first.
pub fn take_next(sched: &Scheduler, s: &mut SchedState) -> Option<(String, usize)> {
    let cfg = &sched.config.placement;
    let ids: Vec<String> = s
        .table
        .queued()
        .take(SCAN_DEPTH)
        .map(|r| r.id.clone())
        .collect();
    let mut held: Vec<String> = Vec::new();
    let mut outlooks = outlooks(sched, s);
    let mut switching: Option<(String, Choice, Need, f64, usize)> = None;
    for id in &ids {
        let Some(r) = s.table.get(id) else { continue };
        let aged = r.skips >= cfg.max_skips || now_ms() - r.create_time >= cfg.max_wait_ms as i64;
        match choose(sched, s, r, aged, &outlooks) {
            Placement::Place(choice, need, expected, loads) => {
                if loads && !aged {
                    if switching.is_none() {
                        switching = Some((id.clone(), choice, need, expected, held.len()));
                    }
                    continue;
                }
                let passed: Vec<String> = held
                    .iter()
                    .chain(switching.as_ref().map(|s| &s.0))
                    .cloned()
                    .collect();
                count_skip(s, &passed);
                return commit(sched, s, id, choice, need, expected).map(|b| (id.clone(), b));
            }
            Placement::Hold(backend, adds) => {
                let h = outlooks.entry(backend).or_default();
                h.busy_s += adds.busy_s;
                if adds.checkpoint.is_some() {
                    h.checkpoint = adds.checkpoint;
                }
                held.push(id.clone());
                if held.len() >= cfg.affinity_window {
                    break;
                }
            }
            Placement::Nowhere => {}
        }
    }
    let (id, choice, need, expected, held_ahead) = switching?;
    count_skip(s, &held[..held_ahead]);
    commit(sched, s, &id, choice, need, expected).map(|b| (id, b))
}

/// For a new prompt while nothing waits: its backend now, if one has a free slot.
pub fn place_now(sched: &Scheduler, s: &mut SchedState, id: &str) -> Option<usize> {
    let outlooks = outlooks(sched, s);
    let Placement::Place(choice, need, expected, _) =
        choose(sched, s, s.table.get(id)?, false, &outlooks)
    else {
        return None;
    };
    commit(sched, s, id, choice, need, expected)
}

/// The prompts `passed` were passed over once more (aging).
fn count_skip(s: &mut SchedState, passed: &[String]) {
    for id in passed {
        if let Some(r) = s.table.get_mut(id) {
            r.skips += 1;
        }
    }
}
