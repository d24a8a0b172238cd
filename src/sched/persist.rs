//! How the scheduler's state reaches the store: a record's state is encoded and appended to the
//! store's log ([`super::writer`]) under the scheduler's lock, so the store ends with every
//! record's latest state (appends are in the order of the state changes), and the caller waits
//! for the commit after releasing the lock: the fsync is never under it, and concurrent
//! requests share one.

use super::store::{self, StoreError};
use super::writer::{Ticket, Write};
use super::{SchedState, Scheduler};

impl Scheduler {
    /// Appends the current state of records `ids` (those still known) and the number counter
    /// to the store's log. The caller holds the scheduler's lock (`s`), and waits on the
    /// ticket after releasing it.
    pub(super) fn stage(&self, s: &SchedState, ids: &[&str]) -> Ticket {
        let records = ids.iter().filter_map(|id| s.table.get(id));
        let writes: Result<Vec<Write>, StoreError> = records.map(store::record_write).collect();
        match writes {
            Ok(mut writes) => {
                writes.push(Write::Counter(s.table.counter()));
                self.store.append(writes)
            }
            Err(e) => Ticket::failed(&e),
        }
    }

    /// Persists the current state of some records and the number counter, durably. Blocking
    /// (see [`Ticket::wait`]); [`Scheduler::persist_durably`] from async code.
    pub fn try_persist(&self, ids: &[&str]) -> Result<(), StoreError> {
        let ticket = self.stage(&self.lock(), ids);
        ticket.wait()
    }

    /// [`Scheduler::try_persist`], logging a failure (the state in memory stays authoritative).
    pub fn persist(&self, ids: &[&str]) {
        if let Err(e) = self.try_persist(ids) {
            tracing::error!(error = %e, "could not persist prompt state");
        }
    }

    /// [`Scheduler::persist`] without blocking a thread: returns once the records' state is
    /// durable, logging a failure.
    pub async fn persist_durably(&self, ids: &[&str]) {
        let ticket = self.stage(&self.lock(), ids);
        if let Err(e) = ticket.durable().await {
            tracing::error!(error = %e, "could not persist prompt state");
        }
    }

    /// A prompt whose admission did not become durable (its batch failed): out of the table
    /// (its place and any slot it took freed) and out of the store, as if never submitted. The
    /// removal is appended under the lock, after any copy of the record appended meanwhile
    /// (the dispatcher may have placed it), so none outlives it in the store.
    pub(super) fn unadmit(&self, id: &str) {
        let forgotten = {
            let mut s = self.lock();
            s.table
                .remove(id)
                .map(|_| self.store.append(store::forget_writes(id).into()))
        };
        // Not waited for: the caller answers an error either way.
        drop(forgotten);
        self.wake();
        self.broadcast_status();
    }
}
