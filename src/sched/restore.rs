//! The prompt table as a restart finds it in the store: what waited waits again, what was on
//! a backend is re-attached when that backend's socket opens (`recovery::reconcile`) or run
//! again if the backend is no longer configured.

use super::prompts::{PromptRecord, PromptTable, Stage};
use super::timeline::Happened;
use crate::fleet::Fleet;

/// The prompt table as the store left it: waiting prompts queued again; a prompt on a backend
/// re-attached once that backend's socket opens (`recovery::reconcile`), or run again if its
/// backend is no longer configured.
pub fn restore_table(fleet: &Fleet, counter: i64, records: Vec<PromptRecord>) -> PromptTable {
    let mut table = PromptTable::default();
    table.set_counter(counter);
    let restored = records.len();
    for mut r in records {
        let owner_known = r
            .owner
            .as_deref()
            .is_some_and(|o| fleet.index_of(o).is_some());
        let requeue = match r.stage {
            Stage::Queued => true,
            Stage::Dispatching | Stage::OnBackend | Stage::Finishing => !owner_known,
            Stage::Done => false,
        };
        if requeue && r.stage != Stage::Queued {
            // Its backend is no longer configured: the attempt there ended with the gate.
            let reason = "backend_removed".to_string();
            r.timeline
                .mark(crate::protocol::now_ms(), Happened::Requeued { reason });
        }
        let id = r.id.clone();
        table.admit(r);
        if requeue {
            table.enqueue(&id);
        }
    }
    if restored > 0 {
        tracing::info!(
            prompts = restored,
            queued = table.queue_len(),
            "state restored"
        );
    }
    table
}
