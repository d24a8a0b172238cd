//! The placement decision for one prompt (design §3): which backends may take it, what each
//! has to do before it (work and the checkpoint that work leaves resident, so a prompt behind
//! others of another checkpoint is charged the load), and what the policy picks; plus the record
//! of recent decisions that `/admin/decisions` shows. The queue scan that asks for decisions is
//! in `dispatch`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::Gate;
use super::placement::{Candidate, Choice, Need, profile};
use super::prompts::{PromptRecord, Stage};
use crate::protocol::now_ms;

/// What a backend has to do before a new prompt could start there, as the gate expects it.
#[derive(Clone, Debug, Default)]
pub(super) struct Outlook {
    pub busy_s: f64,
    /// The checkpoint resident once that work is done.
    pub checkpoint: Option<String>,
}

/// Where a prompt should go now.
pub(super) enum Placement {
    /// Its best backend has a free slot: the choice, the need, the expected seconds there, and
    /// whether its checkpoint must be loaded there first.
    Place(Choice, Need, f64, bool),
    /// Its best backend is full: wait for it (what it adds there: seconds, checkpoint).
    Hold(usize, Outlook),
    /// No backend can take it now.
    Nowhere,
}

impl Gate {
    /// What every backend has to do, as the gate expects it now: the prompts it owns,
    /// re-estimated with what is known now, in the order they will run there (started first,
    /// then by number), and the checkpoint resident once they are done. One pass over the
    /// prompt table; a dispatch pass computes it once and adds its holds.
    pub(super) fn outlooks(&self, table: &super::prompts::PromptTable) -> HashMap<usize, Outlook> {
        let learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        let mut ahead: HashMap<usize, Vec<&PromptRecord>> = HashMap::new();
        for x in table.records() {
            if let (Some(b), Stage::Dispatching | Stage::OnBackend) = (x.owner, x.stage) {
                ahead.entry(b).or_default().push(x);
            }
        }
        self.backends
            .iter()
            .map(|backend| {
                let b = backend.id;
                let mut o = Outlook {
                    busy_s: 0.0,
                    checkpoint: learned.resident(b).map(str::to_string),
                };
                let mut mine = ahead.remove(&b).unwrap_or_default();
                mine.sort_by(|x, y| {
                    let key = |r: &PromptRecord| (r.started_at.is_none(), r.number.as_f64());
                    let (kx, ky) = (key(x), key(y));
                    kx.0.cmp(&ky.0)
                        .then(kx.1.partial_cmp(&ky.1).unwrap_or(std::cmp::Ordering::Equal))
                });
                for x in mine {
                    let p = profile::profile(&x.body["prompt"]);
                    let cost =
                        learned.run_s(b, &p) + learned.load_after(b, o.checkpoint.as_deref(), &p);
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

    /// The placement decision for `r` among the backends that may take it: healthy, not
    /// draining or stalled, every class and file it names, its VRAM need within the card, enough
    /// VRAM after an OOM, preferably one it did not fail on. `Hold` when the best backend is full
    /// (the prompt waits for it); with `free_only` only backends with a free slot count.
    /// `outlooks`: what each backend has to do first (see [`Gate::outlooks`]), holds included.
    pub(super) fn choose(
        &self,
        r: &PromptRecord,
        free_only: bool,
        outlooks: &HashMap<usize, Outlook>,
    ) -> Placement {
        let prompt = &r.body["prompt"];
        let prof = profile::profile(prompt);
        let learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        let ckpt_bytes = prof.checkpoint.as_ref().and_then(|c| {
            self.backends.iter().find_map(|b| {
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
        let eligible = |b: &&Arc<super::fleet::BackendState>| {
            let total = self.vram(b.id).0;
            b.accepts_work()
                && (!free_only || b.free_slots() > 0)
                && r.min_vram_total.is_none_or(|min| total >= min)
                && (total == 0 || need.vram_bytes <= total)
                && self.can_run(b.id, prompt)
        };
        let candidates = |avoid_tried: bool| -> Vec<Candidate> {
            self.backends
                .iter()
                .filter(eligible)
                .filter(|b| !avoid_tried || !r.tried.contains(&b.id))
                .map(|b| (b, outlook(b.id)))
                .map(|(b, o)| Candidate {
                    id: b.id,
                    free: b.free_slots() > 0,
                    inflight: b.inflight.load(Ordering::SeqCst),
                    max_inflight: b.config.max_inflight,
                    vram_total: self.vram(b.id).0,
                    vram_free: self.vram(b.id).1,
                    queued_s: o.busy_s,
                    run_s: learned.run_s(b.id, &prof),
                    load_s: learned.load_after(b.id, o.checkpoint.as_deref(), &prof),
                    need_here: if prof.checkpoint.is_some()
                        && learned.resident(b.id) == prof.checkpoint.as_deref()
                    {
                        need.vram_bytes.saturating_sub(ckpt_bytes.unwrap_or(0))
                    } else {
                        need.vram_bytes
                    },
                })
                .collect()
        };
        let first = candidates(true);
        let (cands, choice) = match self.picker.pick(&need, &first) {
            Some(c) => (first, c),
            None => {
                let all = candidates(false);
                match self.picker.pick(&need, &all) {
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

    /// Reserves the chosen slot and records the decision; the caller holds `reserve`.
    pub(super) fn commit(
        &self,
        r: &mut PromptRecord,
        choice: Choice,
        need: Need,
        expected_s: f64,
    ) -> usize {
        let b = self.backend(choice.id);
        b.inflight.fetch_add(1, Ordering::SeqCst);
        let name = |id: usize| self.backend(id).name().to_string();
        let decision = json!({
            "at": now_ms(),
            "prompt_id": r.id,
            "policy": self.picker.name(),
            "chosen": name(choice.id),
            "runner_up": choice.runner_up.map(name),
            "scores": choice.scores.iter().map(|(id, s)| json!({"backend": name(*id), "score": s})).collect::<Vec<_>>(),
            "need_vram_bytes": need.vram_bytes,
            "expected_s": expected_s,
            "skips": r.skips,
            "reason": choice.reason,
        });
        tracing::debug!(prompt = %r.id, backend = b.name(), reason = %decision["reason"], "placed");
        let mut d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        d.push_back(decision);
        while d.len() > 256 {
            d.pop_front();
        }
        choice.id
    }

    /// Recent placement decisions, oldest first.
    pub fn recent_decisions(&self) -> Vec<Value> {
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
