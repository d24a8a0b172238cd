//! Silence judged on evidence (design §2 "Recovery"; the backend states in
//! [`crate::fleet::backend`]). ComfyUI sends nothing while a node without a progress bar runs (a
//! video encoder, a large VAE decode, a checkpoint load, a remote API node), so a prompt silent
//! past `stall_timeout` is corroborated before anything moves: its backend's own `/queue`, and
//! if need be its `/history`, are asked.
//!
//! | the backend says | started (the gate saw `execution_start`) | not started |
//! |---|---|---|
//! | running, the node had no progress bar | busy: look again after another `stall_timeout` | it started while nobody listened: watched from now on |
//! | running, the node was reporting progress | stuck: the backend is stalled | (cannot be: no progress seen) |
//! | waiting in its queue | busy | waiting behind others: look again later |
//! | in its history | finished: the entry is kept and the prompt ends | the same |
//! | neither | lost: the backend is stalled | lost: it runs again elsewhere |
//! | no answer in time | stalled | stalled |

use std::sync::Arc;

use serde_json::Value;
use tokio::time::Instant;

use super::{Outcome, Scheduler, recovery};
use crate::fleet::probe::{queue_lists, queue_runs};

/// What a silent prompt's backend says of it.
enum Seen {
    /// Its `/queue` lists it as running.
    Running,
    /// Its `/queue` lists it as waiting.
    Waiting,
    /// Not listed, but its history has it: it finished (its entry).
    Finished(Value),
    /// Neither listed nor in its history.
    Missing,
    /// `/queue` did not answer in time.
    NoAnswer,
}

/// What to do about a silent prompt.
enum Verdict {
    /// Alive: look again after another `stall_timeout`.
    Busy,
    /// It ended; here is its entry.
    Ended(Value),
    /// Never ran there, and it is not there: give it back.
    Lost,
    /// The backend is stuck.
    Stalled(&'static str),
}

/// Asks `/queue` (and `/history` if it is not listed) of `owner` about silent prompt `id`.
async fn ask(sched: &Scheduler, id: &str, owner: usize) -> Seen {
    let b = sched.fleet.get(owner);
    let timeout = sched
        .config
        .load()
        .stall_timeout()
        .min(sched.config.load().upstream_timeout());
    let answer = tokio::time::timeout(timeout, sched.fleet.upstream.get_json(&b.config, "/queue"));
    match answer.await {
        Ok(Ok((status, q))) if status.is_success() => {
            if queue_runs(&q, id) {
                Seen::Running
            } else if queue_lists(&q, id) {
                Seen::Waiting
            } else {
                // Not listed: it may just have finished, its end still on its way.
                match recovery::fetch_history(sched, owner, id).await {
                    Some(entry) => Seen::Finished(entry),
                    None => Seen::Missing,
                }
            }
        }
        _ => Seen::NoAnswer,
    }
}

/// A prompt fell silent past `stall_timeout`: asks its backend before judging (see the table
/// in the module doc).
pub async fn corroborate(sched: &Arc<Scheduler>, id: &str, owner: usize) {
    let seen = ask(sched, id, owner).await;
    let b = sched.fleet.get(owner).clone();
    let verdict = {
        let mut s = sched.lock();
        let Some(r) = s.table.get_mut(id).filter(|r| r.holds_slot(Some(b.name()))) else {
            return;
        };
        r.corroborating = false;
        let (started, progress) = (r.started, r.reports_progress);
        let runs = matches!(seen, Seen::Running);
        let verdict = match seen {
            Seen::Running if started && progress => {
                Verdict::Stalled("a node reporting progress fell silent past stall_timeout")
            }
            Seen::Running | Seen::Waiting => Verdict::Busy,
            Seen::Finished(entry) => Verdict::Ended(entry),
            Seen::Missing if started => {
                Verdict::Stalled("the backend no longer lists a prompt it was running")
            }
            Seen::Missing => Verdict::Lost,
            Seen::NoAnswer => Verdict::Stalled("a silent backend did not answer for its prompt"),
        };
        if let Verdict::Busy = verdict {
            r.last_event = Some(Instant::now());
            if !started && runs {
                // It started while nobody listened: watched from now on.
                s.table.reattached(id, b.name(), true);
            }
        }
        verdict
    };
    match verdict {
        Verdict::Busy => tracing::debug!(prompt = id, backend = b.name(), "silent but alive"),
        Verdict::Ended(entry) => {
            if sched.lock().table.ran(id, b.name()) {
                sched.end(id, Outcome::Ran(entry));
            }
        }
        Verdict::Lost => sched.give_back(owner, &[id.to_string()], true, "stalled"),
        Verdict::Stalled(reason) => stall(sched, owner, reason),
    }
}

/// A backend that accepts work but makes no progress: no work until it shows life again (a
/// prompt event, or a probe that finds its queue idle), and its prompts move.
pub fn stall(sched: &Arc<Scheduler>, backend: usize, reason: &str) {
    sched.fleet.mark_stalled(backend, reason);
    sched.evacuate(backend, reason);
}
