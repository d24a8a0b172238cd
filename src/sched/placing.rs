//! Where the live scheduler meets the pure decision: one dispatch pass builds the snapshot
//! ([`super::snapshot`]) from the prompt table and the fleet, asks [`decide`] which waiting
//! prompts go where, and applies its assignments to the table (slot reserved, decision
//! recorded, skips counted). It runs under the scheduler's lock, so a decision and the slots
//! it takes are one step.

use serde_json::json;

use super::decide::{Assignment, Rules, decide};
use super::prompts::PromptRecord;
use super::snapshot::{BackendView, FleetView, Owned, Waiting};
use super::{SchedState, Scheduler};
use crate::protocol::now_ms;

/// The fleet as a pass sees it: per backend its slots in use (from the table), health, VRAM,
/// capabilities and the work it owns; and the uploads the gate holds.
fn fleet_view(sched: &Scheduler, s: &SchedState) -> FleetView {
    let fleet = &sched.fleet;
    let mut owns: Vec<Vec<Owned>> = vec![Vec::new(); fleet.backends().len()];
    for r in s.table.records().filter(|r| r.holds_slot(None)) {
        if let Some(b) = r.owner.as_deref().and_then(|o| fleet.index_of(o)) {
            owns[b].push(Owned {
                profile: r.graph().1.clone(),
                number: r.number.as_f64().unwrap_or(0.0),
                ran_s: r.started_at.map(|at| at.elapsed().as_secs_f64()),
            });
        }
    }
    let backends = fleet
        .backends()
        .iter()
        .zip(owns)
        .map(|(b, owns)| {
            let (vram_total, vram_free) = fleet.vram(b.index);
            BackendView {
                name: b.name().to_string(),
                accepts_work: b.accepts_work(),
                inflight: s.table.slots_used(b.name()),
                max_inflight: b.config.max_inflight,
                vram_total,
                vram_free,
                capabilities: b.capabilities.load_full(),
                owns,
            }
        })
        .collect();
    FleetView {
        backends,
        uploads: sched.files.upload_names(),
    }
}

/// A waiting prompt as the snapshot carries it; `now` in ms since the epoch.
fn waiting(sched: &Scheduler, r: &PromptRecord, now: i64) -> Waiting {
    let (prompt, profile) = r.graph().clone();
    Waiting {
        id: r.id.clone(),
        number: r.number.as_f64().unwrap_or(0.0),
        prompt,
        profile,
        tried: r
            .tried
            .iter()
            .filter_map(|t| sched.fleet.index_of(t))
            .collect(),
        min_vram_total: r.min_vram_total,
        skips: r.skips,
        waited_ms: u64::try_from(now - r.create_time).unwrap_or(0),
    }
}

/// Reserves the assigned slot (Queued → Dispatching), counts the skips of the prompts passed
/// over, and records the decision for `/admin/decisions`; the backend's index if it took.
fn apply(sched: &Scheduler, s: &mut SchedState, a: Assignment) -> Option<usize> {
    let fleet = &sched.fleet;
    if !s.table.reserve(&a.prompt, fleet.get(a.backend).name()) {
        return None;
    }
    for id in &a.passed_over {
        if let Some(r) = s.table.get_mut(id) {
            r.skips += 1;
        }
    }
    let name = |i: usize| fleet.get(i).name().to_string();
    let decision = json!({
        "at": now_ms(),
        "prompt_id": a.prompt,
        "policy": sched.picker().name(),
        "chosen": name(a.choice.id),
        "runner_up": a.choice.runner_up.map(name),
        "scores": a.choice.scores.iter().map(|(i, sc)| json!({"backend": name(*i), "score": sc})).collect::<Vec<_>>(),
        "need_vram_bytes": a.need.vram_bytes,
        "expected_s": a.expected_s,
        "skips": a.skips,
        "reason": a.choice.reason,
    });
    Scheduler::record_decision(s, decision);
    Some(a.backend)
}

/// One dispatch pass over the head of the gate queue: the prompts that go now and their
/// backends, their slots reserved.
pub fn dispatch_pass(sched: &Scheduler, s: &mut SchedState) -> Vec<(String, usize)> {
    let rules = Rules::from(&sched.config.placement);
    let now = now_ms();
    // Each step scans `rules.scan` prompts not yet taken: enough for every free slot's step.
    let free: usize = sched
        .fleet
        .backends()
        .iter()
        .map(|b| {
            b.config
                .max_inflight
                .saturating_sub(s.table.slots_used(b.name()))
        })
        .sum();
    let waiting: Vec<Waiting> = s
        .table
        .queued()
        .take(rules.scan + free)
        .map(|r| waiting(sched, r, now))
        .collect();
    if waiting.is_empty() {
        return Vec::new();
    }
    let fleet = fleet_view(sched, s);
    let assignments = decide(&waiting, &fleet, &s.learned, sched.picker(), &rules);
    assignments
        .into_iter()
        .filter_map(|a| {
            let id = a.prompt.clone();
            apply(sched, s, a).map(|b| (id, b))
        })
        .collect()
}

/// For a new prompt while nothing waits ahead of it: its backend now, if one has a free slot.
pub fn place_now(sched: &Scheduler, s: &mut SchedState, id: &str) -> Option<usize> {
    let rules = Rules::from(&sched.config.placement);
    let one = [waiting(sched, s.table.get(id)?, now_ms())];
    let fleet = fleet_view(sched, s);
    let a = decide(&one, &fleet, &s.learned, sched.picker(), &rules)
        .into_iter()
        .next()?;
    apply(sched, s, a)
}
