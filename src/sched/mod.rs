//! The scheduler: every accepted prompt, the gate queue, which prompt goes to which backend and
//! when, what happens to prompts when backends fail, and how a prompt ends (design §2).
//!
//! It owns its state behind one lock ([`Scheduler`]'s `state`: the prompt table with its state
//! machine, the learned speeds, the recent decisions), so a decision and the slot it takes are
//! one step. Around it, each file is one concern:
//!
//! - [`admission`]: `POST /prompt`: record, then forward at once or hold;
//! - [`dispatch`]: the dispatcher loop, forwarding, and a backend's refusal;
//! - [`placing`]: the decision for one pass over the queue and a snapshot of the fleet;
//! - [`fair`]: the order the waiting prompts are offered in (priority bands, fair share);
//! - [`events`]: upstream events routed to the prompt's client, completion;
//! - [`recovery`]: re-attach after a socket opens or a restart, drain, prompts back to the
//!   queue when their backend fails (`requeue`, `evacuate`);
//! - [`watchdog`]: `max_run_time`, silent prompts, backends that went down, unplaceable prompts;
//! - [`stall`]: a silent prompt's backend asked before anything moves;
//! - [`history`], [`store`], [`writer`], `persist`: what survives, and how (one ordered log of
//!   changes, appended under the scheduler's lock, committed in groups off it);
//! - [`cache`]: the result cache (`[cache]`, opt-in): identical prompts answered without a GPU;
//! - [`audit`], [`usage`]: what each prompt that ended cost, and whose it was;
//! - [`tenant`], [`access`]: whose a prompt is, and what a caller may see and touch.
//!
//! There is exactly one way for a prompt to end: [`Scheduler::end`], which writes the history
//! entry, persists, accounts for it ([`audit`]: its usage and its audit line) and tells the
//! client with ComfyUI's terminal events. The table's transitions ([`prompts::PromptTable`])
//! guarantee it happens once.

pub mod access;
pub mod activity;
pub mod admission;
pub mod audit;
pub mod cache;
mod cached;
pub mod decide;
pub mod dispatch;
mod ending;
pub mod events;
pub mod fair;
pub mod fit;
pub mod history;
pub mod outcome;
pub mod outlook;
mod persist;
pub mod placing;
pub mod prompts;
pub mod quarantine;
pub mod queue;
pub mod record;
pub mod recovery;
pub mod restore;
pub mod snapshot;
pub mod stall;
pub mod store;
pub mod tenant;
pub mod timeline;
pub mod usage;
pub mod views;
pub mod watchdog;
pub mod writer;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::files::Files;
use crate::fleet::Fleet;
use crate::fleet::picker::{self, Picker, stats::Learned};
use crate::protocol::now_ms;
use crate::sessions::Sessions;
use history::{History, completion_time};
use outcome::failure_entry;
pub use outcome::{Failure, Outcome};
use prompts::{PromptRecord, PromptTable, Stage};
use store::Store;
use writer::{Table, Ticket, Write};

/// Placement decisions kept for `/admin/decisions`.
pub const DECISIONS_KEPT: usize = 256;

/// What the scheduler's one lock guards.
pub struct SchedState {
    pub table: PromptTable,
    /// Run times, load times, VRAM peaks and resident checkpoints learned from the fleet.
    pub learned: Learned,
    /// The most recent placement decisions, newest last.
    pub decisions: VecDeque<Value>,
    /// Backend name → when its failure was blamed on a dispatch (see [`quarantine`]).
    pub blamed: HashMap<String, tokio::time::Instant>,
    /// Who was served lately, per priority band (see [`fair`]).
    pub fair: fair::FairShare,
}

/// The scheduler component.
pub struct Scheduler {
    pub config: Arc<crate::config::Live>,
    pub fleet: Arc<Fleet>,
    pub sessions: Arc<Sessions>,
    pub files: Arc<Files>,
    state: Mutex<SchedState>,
    pub history: History,
    store: Arc<Store>,
    picker: Box<dyn Picker>,
    /// Wakes the dispatcher: a slot freed, a prompt arrived.
    wake: Notify,
    /// Held while a `status` count is taken and sent (see [`views`]).
    status_order: Mutex<()>,
    /// The audit log and the usage ledger: every end is accounted there ([`audit`]).
    audit: Arc<audit::Audit>,
    /// `[metrics] timelines` as the gate started (read once: a reload says restart).
    pub timelines: bool,
    /// The result cache (`[cache]` as the gate started).
    pub cache: cache::ResultCache,
    pub stop: CancellationToken,
}

impl Scheduler {
    /// A scheduler over `table` (restored from the store) and its history.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<crate::config::Live>,
        fleet: Arc<Fleet>,
        sessions: Arc<Sessions>,
        files: Arc<Files>,
        store: Arc<Store>,
        table: PromptTable,
        history: History,
        audit: Arc<audit::Audit>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            timelines: config.load().metrics.timelines,
            cache: cache::ResultCache::new(config.load().cache.clone(), files.clone()),
            picker: picker::for_policy(config.load().placement.policy),
            config,
            fleet,
            sessions,
            files,
            state: Mutex::new(SchedState {
                table,
                learned: Learned::default(),
                decisions: VecDeque::new(),
                blamed: HashMap::new(),
                fair: fair::FairShare::default(),
            }),
            history,
            store,
            wake: Notify::new(),
            status_order: Mutex::new(()),
            audit,
            stop,
        }
    }

    /// The one lock, for the scheduler's own files only. Hold it briefly, never across an
    /// await.
    fn lock(&self) -> MutexGuard<'_, SchedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn picker(&self) -> &dyn Picker {
        &*self.picker
    }

    /// Wakes the dispatcher.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for [`Scheduler::wake`] (or a fleet change).
    pub async fn woken(&self) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = self.fleet.changed.notified() => {}
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The audit log and the usage ledger.
    pub fn audit(&self) -> &Arc<audit::Audit> {
        &self.audit
    }

    /// GPU-seconds the tenant `tenant_key` ([`tenant::Tenant::key`]: `user:NAME`, `ip:ADDR`)
    /// was charged in the current UTC day by prompts that ended (the `gpu_seconds_per_day`
    /// quota; see [`usage::Usage::gpu_seconds_today`]). Cheap: no scan, its own short lock.
    pub fn gpu_seconds_today(&self, tenant_key: &str) -> f64 {
        self.audit.usage().gpu_seconds_today(tenant_key)
    }

    /// The node now executing for a client's running prompt (the reconnect replay); `session`
    /// is its session key.
    pub fn running_node_of(&self, session: &str) -> Option<String> {
        self.lock()
            .table
            .records()
            .filter(|r| r.started && r.session().as_deref() == Some(session))
            .filter(|r| r.stage == Stage::OnBackend)
            .find_map(|r| r.last_node.clone())
    }

    /// Whether the gate knows prompt `id` (waiting, in flight, or ended with a history entry).
    pub fn knows(&self, id: &str) -> bool {
        self.lock().table.contains(id)
    }

    /// Where prompt `id` is: its stage, whether it started, its owner's name.
    pub fn whereabouts(&self, id: &str) -> Option<(Stage, bool, Option<String>)> {
        let s = self.lock();
        let r = s.table.get(id)?;
        Some((r.stage, r.started, r.owner.clone()))
    }

    /// Ids of `identity`'s prompts that `pick` accepts (what a call without ids may touch).
    pub fn prompts_of(&self, identity: &str, pick: impl Fn(&PromptRecord) -> bool) -> Vec<String> {
        self.lock()
            .table
            .records()
            .filter(|r| r.identity == identity && pick(r))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Recent placement decisions, oldest first.
    pub fn recent_decisions(&self) -> Vec<Value> {
        self.lock().decisions.iter().cloned().collect()
    }

    /// The newest `n` placement decisions, newest first.
    pub fn recent_decisions_newest(&self, n: usize) -> Vec<Value> {
        self.lock()
            .decisions
            .iter()
            .rev()
            .take(n)
            .cloned()
            .collect()
    }

    /// Slots in use on each backend, by fleet index.
    pub fn slots_used(&self) -> Vec<usize> {
        let s = self.lock();
        self.fleet
            .backends()
            .iter()
            .map(|b| s.table.slots_used(b.name()))
            .collect()
    }

    /// Ends prompt `id`: the one way a prompt leaves the system (see [`Outcome`]). A prompt
    /// already ended is left alone, so each client hears each end once.
    pub fn end(&self, id: &str, outcome: Outcome) {
        self.end_where(id, outcome, |_| true);
    }

    /// A backend refused (400) the prompt being sent to it: it ends as a failed run, unless it
    /// is no longer being sent to `backend` (a late answer to a forward that lost it).
    pub fn end_refused(&self, id: &str, backend: &str, failure: Failure) {
        self.end_where(id, Outcome::Failed(failure), |r| {
            r.stage == Stage::Dispatching && r.owner.as_deref() == Some(backend)
        });
    }

    /// [`Scheduler::end`] if `guard` accepts the record, checked under the same lock as the
    /// transition. The history entry is kept under that lock too, so the prompt is never in
    /// neither or both of `/queue` and `/history` (see [`views`]); then its client hears it
    /// ended as from ComfyUI's `prompt_worker`: `execution_error` (if the gate ended it),
    /// `status`, `executing` with node `null`.
    fn end_where(&self, id: &str, outcome: Outcome, guard: impl Fn(&PromptRecord) -> bool) {
        let failure = match outcome {
            Outcome::Deleted { from } => return self.delete_where(id, from.as_deref(), guard),
            Outcome::Ran(entry) => Err(entry),
            Outcome::Failed(f) => Ok(f),
        };
        // Its key in the result cache, if its inputs are as they were at submit.
        let cache_key = match &failure {
            Err(_) => self.cache_key_at_end(id),
            Ok(_) => None,
        };
        let ended = {
            let mut s = self.lock();
            let Some(r) = s
                .table
                .get(id)
                .filter(|r| r.stage != Stage::Done && guard(r))
            else {
                return;
            };
            let (entry, error) = match &failure {
                Err(entry) => (entry.clone(), None),
                Ok(f) => {
                    let (entry, error) = failure_entry(r, f);
                    (entry, Some(error))
                }
            };
            let finished_at = completion_time(&entry).unwrap_or_else(now_ms);
            let outcome = ending::outcome_label(
                r,
                &match &failure {
                    Ok(f) => audit::Ending::Failed(&entry, &f.exception_type),
                    Err(_) => audit::Ending::Ran(&entry),
                },
            );
            if let Some(r) = s.table.get_mut(id) {
                r.outcome = Some(outcome);
                let outcome = outcome.to_string();
                r.timeline
                    .mark(now_ms(), timeline::Happened::Finished { outcome });
            }
            let entry = Arc::new(entry);
            let record = s.table.finish(id).cloned();
            if let Some(r) = s.table.get_mut(id) {
                r.shed_body();
            }
            let replaced = self.history.summary(id);
            let dropped = self.history.insert(id, finished_at, entry.clone());
            // Its outputs' names are held before any other entry's go (they may share some).
            self.files.hold_outputs(&entry);
            if let (Some(key), "success") = (cache_key, outcome) {
                self.cache.remember(key, id, &entry);
            }
            for (id, _) in &dropped {
                s.table.remove(id);
            }
            // Appended under the lock of the transition: the store's order is the table's.
            // Stored shed: its body is in the entry (a restart would only shed it again).
            let saved = record.as_ref().map(|r| {
                let mut stored = r.clone();
                stored.shed_body();
                let pruned = dropped.iter().flat_map(|(id, _)| store::forget_writes(id));
                match store::history_writes(&stored, finished_at, &entry) {
                    Ok(writes) => self
                        .store
                        .append(writes.into_iter().chain(pruned).collect()),
                    Err(e) => Ticket::failed(&e),
                }
            });
            record.map(|r| (r, error, entry, dropped, replaced, saved))
        };
        let Some((record, error, entry, dropped, replaced, saved)) = ended else {
            return;
        };
        if let Some(old) = replaced {
            self.files.forget_outputs(&old);
        }
        self.wake();
        // Durable before its client hears it ended; from then on memory keeps the entry slim.
        match saved.map(Ticket::wait) {
            Some(Err(e)) => {
                tracing::error!(error = %e, prompt = %record.id, "could not persist a history entry");
            }
            Some(Ok(())) => self.history.written(id, &entry),
            None => {}
        }
        for (_, entry) in &dropped {
            self.files.forget_outputs(entry);
        }
        self.account(
            &record,
            match &failure {
                Ok(f) => audit::Ending::Failed(&entry, &f.exception_type),
                Err(_) => audit::Ending::Ran(&entry),
            },
        );
        let session = record.session();
        if let (Some(sid), Some(error)) = (&session, &error) {
            self.sessions
                .send_json(sid, "execution_error", error.clone());
        }
        if let (Some(sid), None, false) = (&session, &error, record.terminal_sent) {
            // It ended while the gate was not listening (found finished on reconnect): its
            // client still hears how, from the entry.
            if let Some((kind, data)) = outcome::terminal_of(&entry) {
                self.sessions.send_json(sid, &kind, data);
            }
        }
        self.broadcast_status();
        if let Some(sid) = &session {
            self.sessions
                .send_json(sid, "executing", json!({ "node": null, "prompt_id": id }));
        }
    }

    /// The result-cache key of prompt `id` if it has one (`[cache]` on, not opted out, not
    /// itself a cache hit) and its inputs are still what they were at submit: an input file
    /// overwritten while it waited or ran makes its result no answer for either contents.
    fn cache_key_at_end(&self, id: &str) -> Option<cache::Key> {
        let (key, body, user) = {
            let s = self.lock();
            let r = s.table.get(id)?;
            (r.cache_key?, r.body.clone(), r.tenant.user.clone())
        };
        let scope = self.cache.scope(user.as_deref());
        (cache::key_of(&scope, &body, &self.files) == key).then_some(key)
    }

    /// A delete of a prompt that never ran (`from` `None`: waiting in the gate queue; `Some`:
    /// accepted there and not started): it leaves without a history entry, as on ComfyUI.
    fn delete_where(&self, id: &str, from: Option<&str>, guard: impl Fn(&PromptRecord) -> bool) {
        let removed = {
            let mut s = self.lock();
            let never_ran = s.table.get(id).is_some_and(|r| {
                guard(r)
                    && match from {
                        None => r.stage == Stage::Queued,
                        Some(b) => {
                            r.stage == Stage::OnBackend
                                && !r.started
                                && r.owner.as_deref() == Some(b)
                        }
                    }
            });
            let removed = if never_ran { s.table.remove(id) } else { None };
            removed.map(|r| (r, self.store.append(store::forget_writes(id).into())))
        };
        if let Some((r, forgotten)) = removed {
            self.account(&r, audit::Ending::Deleted);
            self.forget(forgotten, true);
        }
    }

    /// A prompt that leaves without a history entry: its slot may have freed, its record goes
    /// from the store (`forgotten`: the removal, appended under the lock that removed it from
    /// the table), and clients hear the new queue length.
    fn forget(&self, forgotten: Ticket, was_listed: bool) {
        self.wake();
        if let Err(e) = forgotten.wait() {
            tracing::error!(error = %e, "could not forget a prompt");
        }
        if was_listed {
            self.broadcast_status();
        }
    }

    /// `POST /history` `delete`: the entry and the ended prompt's record go together, under the
    /// state lock, so the id is unknown again (a backend's entry under it shows, and the id may
    /// be used again, as on ComfyUI). The names its outputs were shown under go too
    /// ([`Files::forget_outputs`]).
    pub fn forget_history(&self, id: &str) {
        let (entry, forgotten) = {
            let mut s = self.lock();
            let ended = s.table.get(id).is_some_and(|r| r.stage == Stage::Done);
            if ended {
                s.table.remove(id);
            }
            // A record of the same id that has not ended (the id reused since) stays stored.
            let writes = store::forget_writes(id).into_iter().filter(|w| {
                ended
                    || !matches!(
                        w,
                        Write::Delete {
                            table: Table::Prompts,
                            ..
                        }
                    )
            });
            let forgotten = self.store.append(writes.collect());
            (self.history.remove(id), forgotten)
        };
        if let Err(e) = forgotten.wait() {
            tracing::error!(error = %e, "could not delete a history entry");
        }
        if let Some(entry) = entry {
            self.files.forget_outputs(&entry);
        }
    }

    /// Prompts holding a slot on backend `name`: sent there and not ended (a retiring backend
    /// is gone when this reaches 0).
    pub fn held_by(&self, backend: &str) -> usize {
        self.lock().table.slots_used(backend)
    }

    /// A prompt the backend refused with a 400 at submit, answered to the client as it came:
    /// it was never admitted, so nothing else remains of it (unless it was already moved on).
    /// True if it was removed; false if it had moved on meanwhile (then it waits and runs).
    pub fn refused_at_submit(&self, id: &str, backend: usize) -> bool {
        let b = self.fleet.get(backend);
        let name = b.name();
        let (forgotten, was_listed) = {
            let mut s = self.lock();
            let was_listed = s.table.get(id).and_then(|r| s.table.listed(r)).is_some();
            let removed = s.table.is_dispatching_to(id, name) && s.table.remove(id).is_some();
            let forgotten = removed.then(|| self.store.append(store::forget_writes(id).into()));
            (forgotten, was_listed)
        };
        let removed = forgotten.is_some();
        if let Some(forgotten) = forgotten {
            self.forget(forgotten, was_listed);
        }
        removed
    }

    /// Sending `id` to `backend` failed, nothing applied: back to the head of the queue (if it
    /// is still this backend's to send), persisted, the dispatcher woken.
    pub fn unreserve(&self, id: &str, backend: usize) {
        let b = self.fleet.get(backend);
        let name = b.name();
        let mut s = self.lock();
        if s.table.unreserve(id, name) {
            if let Some(r) = s.table.get_mut(id) {
                let reason = "not_sent".to_string();
                r.timeline
                    .mark(now_ms(), timeline::Happened::Requeued { reason });
            }
            drop(s);
            self.persist(&[id]);
            self.wake();
        }
    }

    /// Records a placement decision for `/admin/decisions` and the debug log.
    fn record_decision(s: &mut SchedState, decision: Value) {
        tracing::debug!(prompt = %decision["prompt_id"], backend = %decision["chosen"], reason = %decision["reason"], "placed");
        s.decisions.push_back(decision);
        while s.decisions.len() > DECISIONS_KEPT {
            s.decisions.pop_front();
        }
    }
}
