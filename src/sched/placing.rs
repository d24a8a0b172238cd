//! Where the live scheduler meets the pure decision: one dispatch pass builds the snapshot
//! ([`super::snapshot`]) from the prompt table and the fleet, puts the waiting prompts in
//! priority band and fair share order ([`super::fair`]), asks [`decide`] which of them go
//! where, and applies its assignments to the table (slot reserved, decision recorded, skips
//! counted, the user's share charged). It runs under the scheduler's lock, so a decision and
//! the slots it takes are one step.
//!
//! `limits.max_running` is applied here and in `decide`: a user with that many prompts on
//! backends offers none this pass (so its backlog cannot fill the scan and hide other users'
//! prompts), a user with `n` left offers at most `n` + [`CAPPED_LOOKAHEAD`] (enough for `decide`
//! to pass over a few it cannot place now), and `decide` counts the `n` down as it assigns.

use std::collections::HashMap;

use serde_json::json;

use super::decide::{Assignment, Rules, decide};
use super::fair::{self, Entry};
use super::prompts::PromptRecord;
use super::snapshot::{BackendView, Cap, FleetView, Owned, Waiting};
use super::tenant::Tenant;
use super::timeline::Happened;
use super::{SchedState, Scheduler};
use crate::config::Auth;
use crate::metrics::PlacementLabels;
use crate::protocol::now_ms;

/// Prompts offered beyond a capped user's `n` left: those `decide` may pass over (held for a
/// busy backend, runnable nowhere now) without the user losing its turn to them.
pub const CAPPED_LOOKAHEAD: usize = 8;

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
                max_inflight: b.max_inflight(),
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
        waited_ms: waited_ms(r, now),
        cap: None,
        band: 0,
    }
}

fn waited_ms(r: &PromptRecord, now: i64) -> u64 {
    u64::try_from(now - r.create_time).unwrap_or(0)
}

/// A waiting prompt as the fair order sees it: its tenant, its band now (aged), its weight,
/// and whether it is an admin's `front` prompt.
fn entry<'a>(sched: &Scheduler, r: &'a PromptRecord, now: i64) -> Entry<'a> {
    let auth = &sched.config.load().auth;
    let rank = auth.band(&r.tenant.band).unwrap_or(auth.default_band);
    Entry {
        tenant: &r.tenant.key,
        band: fair::effective_band(
            rank,
            waited_ms(r, now),
            sched.config.load().placement.max_wait_ms,
        ),
        weight: r.tenant.weight,
        first: r.front && r.tenant.admin,
    }
}

/// A tenant's `limits.max_running` (0: none): its user's, or `[limits]`'s for anonymous
/// clients and for users no longer configured.
fn max_running(auth: &Auth, t: &Tenant) -> u32 {
    t.user
        .as_deref()
        .and_then(|name| auth.users.iter().find(|u| u.name == name))
        .map_or(auth.limits.max_running, |u| u.limits.max_running)
}

/// The running caps of one pass, per tenant key: `None` for a tenant without one.
#[derive(Default)]
struct Caps<'a> {
    of: HashMap<&'a str, Option<Cap>>,
}

impl<'a> Caps<'a> {
    fn get(&mut self, sched: &Scheduler, s: &SchedState, t: &'a Tenant) -> Option<Cap> {
        let next = self.of.len();
        *self.of.entry(&t.key).or_insert_with(|| {
            let limit = max_running(&sched.config.load().auth, t) as usize;
            (limit > 0).then(|| Cap {
                group: next,
                left: limit.saturating_sub(s.table.sent_by(&t.key)),
            })
        })
    }
}

/// Whether nothing in the gate queue could go before a new prompt: it is empty, or every
/// prompt in it belongs to a user with `limits.max_running` prompts on backends already.
pub fn nothing_waits(sched: &Scheduler, s: &SchedState) -> bool {
    let mut caps = Caps::default();
    s.table
        .queued()
        .all(|r| caps.get(sched, s, &r.tenant).is_some_and(|c| c.left == 0))
}

/// What a dispatch charges the prompt's user (see [`fair::FairShare::charge`]).
struct Planned {
    tenant: String,
    band: usize,
    weight: f64,
    first: bool,
    cost: f64,
}

impl Planned {
    fn of(e: &Entry<'_>, cost: f64) -> Self {
        Self {
            tenant: e.tenant.to_string(),
            band: e.band,
            weight: e.weight,
            first: e.first,
            cost,
        }
    }

    fn charge(&self, s: &mut SchedState, id: &str) {
        let e = Entry {
            tenant: &self.tenant,
            band: self.band,
            weight: self.weight,
            first: self.first,
        };
        s.fair.charge(id, &e, self.cost);
    }
}

/// Reserves the assigned slot (Queued → Dispatching), counts the skips of the prompts passed
/// over, charges the user's share and records the decision for `/admin/decisions`; the
/// backend's index if it took.
fn apply(
    sched: &Scheduler,
    s: &mut SchedState,
    a: Assignment,
    planned: Option<&Planned>,
) -> Option<usize> {
    let fleet = &sched.fleet;
    if !s.table.reserve(&a.prompt, fleet.get(a.backend).name()) {
        return None;
    }
    if let Some(p) = planned {
        p.charge(s, &a.prompt);
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
        "tenant": planned.map(|p| p.tenant.as_str()),
        "band": planned.and_then(|p| sched.config.load().auth.bands.get(p.band).cloned()),
    });
    Scheduler::record_decision(s, decision);
    let backend = name(a.choice.id);
    if let Some(metrics) = sched.fleet.metrics.on() {
        let labels = PlacementLabels {
            backend: backend.clone(),
            reason: a.choice.kind,
        };
        metrics.placements.get_or_create(&labels).inc();
    }
    if let Some(r) = s.table.get_mut(&a.prompt) {
        let reason = a.choice.reason.clone();
        r.timeline
            .mark(now_ms(), Happened::Dispatched { backend, reason });
    }
    Some(a.backend)
}

/// One dispatch pass over the gate queue: the prompts that go now and their backends, their
/// slots reserved.
pub fn dispatch_pass(sched: &Scheduler, s: &mut SchedState) -> Vec<(String, usize)> {
    let rules = Rules::from(&sched.config.load().placement);
    let now = now_ms();
    // Charges of prompts that left their backends without a measured run keep their estimate.
    let table = &s.table;
    s.fair
        .retain_charges(|id| table.get(id).is_some_and(|r| r.holds_slot(None)));
    // Each step scans `rules.scan` prompts not yet taken: enough for every free slot's step.
    let free: usize = sched
        .fleet
        .backends()
        .iter()
        .filter(|b| b.accepts_work())
        .map(|b| {
            b.max_inflight()
                .saturating_sub(s.table.slots_used(b.name()))
        })
        .sum();
    // Nothing can go (the common case while a backlog waits): the queue is not read.
    if free == 0 {
        return Vec::new();
    }
    let (waiting, mut planned) = {
        let s: &SchedState = s;
        let mut caps = Caps::default();
        let mut offered: HashMap<&str, usize> = HashMap::new();
        let mut records: Vec<(&PromptRecord, Option<Cap>)> = Vec::new();
        for r in s.table.queued() {
            let cap = caps.get(sched, s, &r.tenant);
            if let Some(c) = cap {
                let n = offered.entry(&r.tenant.key).or_default();
                if c.left == 0 || *n >= c.left + CAPPED_LOOKAHEAD {
                    continue;
                }
                *n += 1;
            }
            records.push((r, cap));
        }
        let entries: Vec<Entry<'_>> = records.iter().map(|(r, _)| entry(sched, r, now)).collect();
        let backends = sched.fleet.backends().len();
        let mut costs: HashMap<usize, f64> = HashMap::new();
        let order = s.fair.order(&entries, rules.scan + free, |i| {
            let c = fair::expected_s(&s.learned, backends, &records[i].0.graph().1);
            costs.insert(i, c);
            c
        });
        let planned: HashMap<String, Planned> = order
            .iter()
            .map(|&i| (records[i].0.id.clone(), Planned::of(&entries[i], costs[&i])))
            .collect();
        let waiting: Vec<Waiting> = order
            .iter()
            .map(|&i| {
                let (r, cap) = records[i];
                Waiting {
                    cap,
                    band: entries[i].band,
                    ..waiting(sched, r, now)
                }
            })
            .collect();
        (waiting, planned)
    };
    if waiting.is_empty() {
        return Vec::new();
    }
    let fleet = fleet_view(sched, s);
    let assignments = decide(&waiting, &fleet, &s.learned, sched.picker(), &rules);
    assignments
        .into_iter()
        .filter_map(|a| {
            let id = a.prompt.clone();
            let p = planned.remove(&id);
            apply(sched, s, a, p.as_ref()).map(|b| (id, b))
        })
        .collect()
}

/// For a new prompt while nothing waits ahead of it ([`nothing_waits`]): its backend now, if
/// one has a free slot and its user may send one more.
pub fn place_now(sched: &Scheduler, s: &mut SchedState, id: &str) -> Option<usize> {
    let rules = Rules::from(&sched.config.load().placement);
    let now = now_ms();
    let r = s.table.get(id)?;
    let cap = Caps::default().get(sched, s, &r.tenant);
    if cap.is_some_and(|c| c.left == 0) {
        return None;
    }
    let cost = fair::expected_s(&s.learned, sched.fleet.backends().len(), &r.graph().1);
    let planned = Planned::of(&entry(sched, r, now), cost);
    let one = [Waiting {
        cap,
        ..waiting(sched, r, now)
    }];
    let fleet = fleet_view(sched, s);
    let a = decide(&one, &fleet, &s.learned, sched.picker(), &rules)
        .into_iter()
        .next()?;
    apply(sched, s, a, Some(&planned))
}
