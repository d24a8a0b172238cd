//! How the scheduler's state reaches the store: a record's state is encoded and appended to the
//! store's log ([`super::writer`]) under the scheduler's lock, so the store ends with every
//! record's latest state (appends are in the order of the state changes), and the caller waits
//! for the commit after releasing the lock: the fsync is never under it, and concurrent
//! requests share one.

use super::prompts::Stage;
use super::store::{self, StoreError};
use super::writer::{Ticket, Write};
use super::{SchedState, Scheduler, dispatch};

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

    /// A prompt whose admission could not be stored: out of the table (its place and any slot
    /// it took freed) and out of the store, as if never submitted. The removal is appended
    /// under the lock, after any copy of the record appended meanwhile, so none outlives it in
    /// the store. If it was already sent (a later batch that held it committed), its backend is
    /// asked to drop it ([`dispatch::drop_copy`]).
    pub(super) fn unadmit(&self, id: &str) {
        let (forgotten, sent_to) = {
            let mut s = self.lock();
            let Some(r) = s.table.remove(id) else {
                return;
            };
            let sent_to = (r.stage != Stage::Queued)
                .then_some(r.owner)
                .flatten()
                .and_then(|o| self.fleet.index_of(&o));
            let forgotten = self.store.append(store::forget_writes(id).into());
            (forgotten, sent_to)
        };
        // Not waited for: the caller answers an error either way.
        drop(forgotten);
        if let Some(backend) = sent_to {
            dispatch::drop_copy(self, backend, id);
        }
        self.wake();
        self.broadcast_status();
    }

    /// Prompts a dispatch pass reserved (`(id, backend)`) whose owners could not be stored:
    /// back to the gate queue unsent, as if the pass had not placed them (the store still
    /// holds them waiting). One given back or deleted meanwhile is left as it is.
    pub(super) fn unplace(&self, placed: &[(String, usize)]) {
        let mut s = self.lock();
        for (id, backend) in placed {
            let b = self.fleet.get(*backend);
            if s.table.is_dispatching_to(id, b.name()) {
                s.table.enqueue_front(std::slice::from_ref(id));
            }
        }
    }
}
