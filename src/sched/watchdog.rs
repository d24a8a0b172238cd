//! The watchdog, a few times a second: prompts past `max_run_time`, prompts whose backend fell
//! silent (judged in [`super::stall`]), backends that went down with prompts on them, waiting
//! prompts no live backend can run, and VRAM peaks to learn.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::prompts::Stage;
use super::{Failure, Outcome, Scheduler, fit, stall};
use crate::config::RunTimeAction;
use crate::fleet::Health;
use crate::fleet::picker::profile::{self, Profile};

/// How often the watchdog looks.
pub const TICK: Duration = Duration::from_millis(200);
/// After a `max_run_time` interrupt, how long the backend has to stop the prompt, at least.
pub const MIN_INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// … and at most (it is also bounded by `stall_timeout`).
pub const MAX_INTERRUPT_GRACE: Duration = Duration::from_secs(30);

/// Runs the checks until the gate stops.
pub async fn watchdog_loop(sched: Arc<Scheduler>) {
    loop {
        tokio::select! {
            _ = sched.stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        check(&sched);
    }
}

/// What one look found to do.
#[derive(Default)]
struct Findings {
    interrupt: Vec<(String, usize)>,
    fail: Vec<(String, usize)>,
    silent: Vec<(String, usize)>,
}

/// One look.
fn check(sched: &Arc<Scheduler>) {
    let found = look(sched);
    for (id, owner) in found.interrupt {
        tracing::warn!(prompt = id, "prompt exceeded max_run_time; interrupting it");
        let sched = sched.clone();
        tokio::spawn(async move {
            let b = sched.fleet.get(owner).clone();
            let _ = sched
                .fleet
                .upstream
                .post_json(&b.config, "/interrupt", &json!({ "prompt_id": id }))
                .await;
        });
    }
    let max_run = sched.config.load().max_run_time();
    for (id, owner) in found.fail {
        // The interrupt did not end it: the backend is stuck. Report and move on.
        let message = format!(
            "the prompt ran longer than max_run_time ({} s) and did not stop when interrupted",
            max_run.as_secs()
        );
        sched.end(
            &id,
            Outcome::Failed(Failure::gate("MaxRunTimeExceeded", message)),
        );
        stall::stall(sched, owner, "an interrupted prompt did not stop");
    }
    for (id, owner) in found.silent {
        let sched = sched.clone();
        tokio::spawn(async move { stall::corroborate(&sched, &id, owner).await });
    }
    // A backend that is down gives its prompts back (one gone holds none; its health is
    // the last its loops saw).
    for b in sched.fleet.backends().iter() {
        if b.health() == Health::Down && !b.is_gone() {
            sched.evacuate(b.index, "the backend is down");
        }
    }
    end_unplaceable(sched);
    learn_peaks(sched);
    mark_running(sched);
}

/// Finds prompts past their deadlines, and silent ones to corroborate.
fn look(sched: &Scheduler) -> Findings {
    let stall = sched.config.load().stall_timeout();
    let max_run = sched.config.load().max_run_time();
    let grace = stall.clamp(MIN_INTERRUPT_GRACE, MAX_INTERRUPT_GRACE);
    let retry = sched.config.load().recovery.max_run_time_action == RunTimeAction::Retry;
    let mut found = Findings::default();
    let mut s = sched.lock();
    let accepted: Vec<String> = s
        .table
        .records()
        .filter(|r| r.stage == Stage::OnBackend)
        .map(|r| r.id.clone())
        .collect();
    for id in accepted {
        let Some(r) = s.table.get_mut(&id) else {
            continue;
        };
        let Some(owner) = r.owner.as_deref().and_then(|o| sched.fleet.index_of(o)) else {
            continue;
        };
        if !r.corroborating && r.last_event.is_some_and(|e| e.elapsed() > stall) {
            // Silent past stall_timeout (started or not: one the gate never saw start may
            // have started while nobody listened): its backend is asked.
            r.corroborating = true;
            found.silent.push((id.clone(), owner));
        }
        if !r.started {
            continue;
        }
        if let Some(at) = r.deadline_interrupt {
            if at.elapsed() > grace {
                found.fail.push((id, owner));
            }
            continue;
        }
        if r.started_at.is_some_and(|s| s.elapsed() > max_run) {
            r.deadline_interrupt = Some(Instant::now());
            if retry {
                r.retry_after_run = true;
                r.retry_reason = Some("max_run_time");
                r.attempts += 1;
            }
            found.interrupt.push((id, owner));
        }
    }
    found
}

/// Waiting prompts that no backend that is up can run (every backend with their node classes
/// and model files is down, or every such card is too small: [`fit`]) end failed once that has
/// been so for
/// `recovery.unplaceable_timeout_ms`; one that becomes runnable again starts the count anew.
fn end_unplaceable(sched: &Scheduler) {
    let limit = Duration::from_millis(sched.config.load().recovery.unplaceable_timeout_ms);
    let graphs: Vec<(String, Arc<serde_json::Value>, Profile)> = {
        let s = sched.lock();
        s.table
            .queued()
            .map(|r| {
                let (graph, profile) = r.graph();
                (r.id.clone(), graph.clone(), profile.clone())
            })
            .collect()
    };
    let uploaded = |n: &str| sched.files.uploaded(n);
    let fleet = &sched.fleet;
    let up = fleet.up();
    let stranded: Vec<(String, bool)> = graphs
        .into_iter()
        .map(|(id, prompt, profile)| {
            let able: Vec<usize> = up
                .iter()
                .copied()
                .filter(|&b| fleet.can_run(b, &prompt, &uploaded))
                .collect();
            // A card too small for it (beyond the margin) is no place for it either.
            let fits = !matches!(
                fit::fleet_fit(sched, &profile, &able),
                fit::VramFit::Never { .. }
            );
            (id, !able.is_empty() && fits)
        })
        .collect();
    let mut expired = Vec::new();
    {
        let mut s = sched.lock();
        for (id, runnable) in stranded {
            let Some(r) = s.table.get_mut(&id) else {
                continue;
            };
            if runnable {
                r.unplaceable_since = None;
            } else if r
                .unplaceable_since
                .get_or_insert_with(Instant::now)
                .elapsed()
                >= limit
            {
                expired.push(id);
            }
        }
    }
    for id in expired {
        let message = format!(
            "no backend that can run the prompt (its nodes, its files, its VRAM) was up for unplaceable_timeout_ms ({} ms)",
            limit.as_millis()
        );
        sched.end(&id, Outcome::Failed(Failure::gate("NoBackend", message)));
    }
}

/// VRAM in use while a prompt runs alone on a backend is a peak for its shape.
fn learn_peaks(sched: &Scheduler) {
    let mut s = sched.lock();
    for b in sched.fleet.backends().iter() {
        let Some(prompt) = s
            .table
            .running_on(b.name())
            .and_then(|id| s.table.get(id))
            .map(|r| &r.body["prompt"])
        else {
            continue;
        };
        let t = b.telemetry.load();
        if t.read_at.is_none_or(|at| at.elapsed() > TICK) {
            continue;
        }
        let shape = profile::profile(prompt).shape;
        let used = t.vram_total.saturating_sub(t.vram_free);
        s.learned.observe_peak(shape, used);
    }
}

/// Tells each backend whether a prompt of the gate's runs there (its probe and socket then leave
/// silence to the stall check).
fn mark_running(sched: &Scheduler) {
    let s = sched.lock();
    for b in sched.fleet.backends().iter() {
        let runs = s.table.running_on(b.name()).is_some();
        b.runs_prompt
            .store(runs, std::sync::atomic::Ordering::SeqCst);
    }
}
