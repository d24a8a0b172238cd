//! Poison prompts (issue 12, input 1): a prompt that kills the backend it is sent to or runs on
//! would otherwise go to the next backend, and the next, forever, while the prompts that merely
//! shared those backends are the ones charged retries.
//!
//! A prompt whose dispatch breaks the connection mid-request (sent, no answer: the backend died
//! or hung while validating it), or that was running on a backend that failed, is a suspect of
//! that failure. Once it is a suspect on `recovery.quarantine_after` different backends it is
//! quarantined: ended with `execution_error` (`comfy_gate.Quarantined`) and a history entry,
//! never sent again. A failure explained by a dispatch is charged to that prompt alone: the
//! backend's other prompts go back to the queue without a retry counted, for [`BLAME_WINDOW`].
//! A backend that could not be reached at all (nothing was sent) makes no suspect.

use std::time::Duration;

use tokio::time::Instant;

use super::prompts::Stage;
use super::{Failure, Outcome, SchedState, Scheduler};

/// How long a backend's failure stays explained by the dispatch that broke it.
pub const BLAME_WINDOW: Duration = Duration::from_secs(60);

impl Scheduler {
    /// Sending `id` to `backend` broke the connection after the request went out: `id` is a
    /// suspect, and the failure is blamed on it. True if that quarantined it (it has ended).
    pub fn suspect_dispatch(&self, id: &str, backend: usize) -> bool {
        let name = self.fleet.get(backend).name().to_string();
        let quarantined = {
            let mut s = self.lock();
            s.blamed.insert(name.clone(), Instant::now());
            suspect(
                &mut s,
                id,
                &name,
                self.config.load().recovery.quarantine_after,
            )
        };
        match quarantined {
            Some(on) => {
                self.quarantine(id, &on);
                true
            }
            None => false,
        }
    }

    /// Ends `id` as quarantined after the failures of the backends `on`.
    pub(super) fn quarantine(&self, id: &str, on: &[String]) {
        tracing::warn!(prompt = id, backends = ?on, "prompt quarantined");
        let message = format!(
            "the prompt was being sent to or running on {} backends when each failed ({}); \
             it is not sent again (recovery.quarantine_after is {})",
            on.len(),
            on.join(", "),
            self.config.load().recovery.quarantine_after
        );
        self.end(id, Outcome::Failed(Failure::gate("Quarantined", message)));
    }
}

/// Notes that `backend` failed while `id` was being sent or running there; the backends it is
/// a suspect on when that reaches `after` (0: never).
pub(super) fn suspect(
    s: &mut SchedState,
    id: &str,
    backend: &str,
    after: u32,
) -> Option<Vec<String>> {
    let r = s.table.get_mut(id)?;
    if !r.suspected_on.iter().any(|b| b == backend) {
        r.suspected_on.push(backend.to_string());
    }
    (after > 0 && r.suspected_on.len() >= after as usize).then(|| r.suspected_on.clone())
}

/// Whether a failure of `backend` now is explained by a dispatch: one that broke it (within
/// [`BLAME_WINDOW`]), or one in flight to it as it failed (its sender will name the suspect;
/// the two are seen in either order).
pub(super) fn explained(s: &SchedState, backend: &str) -> bool {
    let blamed = s
        .blamed
        .get(backend)
        .is_some_and(|t| t.elapsed() < BLAME_WINDOW);
    blamed
        || s.table
            .records()
            .any(|r| r.stage == Stage::Dispatching && r.owner.as_deref() == Some(backend))
}
