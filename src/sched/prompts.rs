//! Every prompt the gate accepted and the one state machine it moves through; the gate queue of
//! prompts that wait for a slot (ordered by the gate's global `number`, then prompt_id, as
//! ComfyUI's heap orders them); and the slots each backend has in use.
//!
//! ```text
//!   admit ─► Queued ─reserve─► Dispatching ─accepted─► OnBackend ─ran─► Finishing ─finish─► Done
//!              ▲                    │                      │                                  ▲
//!              └──── enqueue / enqueue_front (forward failed, backend lost, retry) ◄──┘       │
//!   any state but Done ───────────────────── finish (the gate ends it) ───────────────────────┘
//!   Queued ─remove─► gone (deleted while waiting: ComfyUI keeps no history of it)
//! ```
//!
//! Slots are derived from the table, in one place: a prompt holds a slot on its owner while it
//! is `Dispatching` or `OnBackend`, and every transition in or out of those stages goes through
//! this file, and the transitions that act for a backend (`accepted`, `unreserve`, `ran`) change
//! nothing unless that backend still holds the prompt (a late answer to a forward that lost it
//! must not touch the new owner's slot). Nothing else writes a stage or an owner, so a slot cannot leak or be released
//! twice. Ending a prompt (history, persistence, telling its client) is the scheduler's
//! `end`; this table only records the transition.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;

use serde_json::Number;

use super::queue::{GateQueue, Key};
pub use super::record::{PromptRecord, RunLog, Stage};

/// All records, the gate queue, and the slots in use per backend.
#[derive(Default)]
pub struct PromptTable {
    records: HashMap<String, PromptRecord>,
    queue: GateQueue,
    counter: i64,
    /// Backend name → prompts holding a slot there (`Dispatching` or `OnBackend`).
    slots: HashMap<String, usize>,
    /// Tenant key → its prompts holding a slot anywhere (`limits.max_running`).
    sent: HashMap<String, usize>,
    /// Backend name → the prompt between `execution_start` and its end there.
    running: HashMap<String, String>,
    /// Records that are `Done` (kept for their history entries): `remaining` without a scan.
    ended: usize,
    /// User name (auth on) → ids of the records of that user's prompts: what a user may see,
    /// without a scan of everyone's.
    by_user: HashMap<String, HashSet<String>>,
    /// Prompts forwarded at submit whose backend has not answered yet: not yet listed or
    /// counted, as ComfyUI lists a prompt only once it validated (a refusal leaves no trace).
    unanswered: HashSet<String>,
}

/// Where a prompt stands in `/queue`, by ComfyUI's lists (`PromptQueue.queue` and
/// `currently_running` in its `execution.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// `queue_pending`: waiting in the gate queue, being sent, or accepted but not started.
    Pending,
    /// `queue_running`: started, or ran and its history entry is being collected.
    Running,
}

fn key(n: &Number) -> f64 {
    n.as_f64().unwrap_or(0.0)
}

impl PromptTable {
    pub fn counter(&self) -> i64 {
        self.counter
    }

    pub fn set_counter(&mut self, counter: i64) {
        self.counter = counter;
    }

    /// The next global number: ComfyUI's counter, negated for `front`.
    pub fn next_number(&mut self, front: bool) -> Number {
        let n = self.counter;
        self.counter += 1;
        Number::from(if front { -n } else { n })
    }

    pub fn contains(&self, id: &str) -> bool {
        self.records.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&PromptRecord> {
        self.records.get(id)
    }

    /// A record's bookkeeping (run log, timings, retry flags). Stage and owner are the
    /// transitions' alone: do not write them through this.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut PromptRecord> {
        self.records.get_mut(id)
    }

    pub fn records(&self) -> impl Iterator<Item = &PromptRecord> {
        self.records.values()
    }

    /// Takes in a record as it is (a new prompt, or one restored from the store), counting the
    /// slot it holds. A restored record that was dispatched is re-attached to its owner.
    pub fn admit(&mut self, mut rec: PromptRecord) {
        // Restored from the store: whatever was being sent or collected is on its backend until
        // `recovery::reconcile` has asked it.
        if matches!(rec.stage, Stage::Dispatching | Stage::Finishing) {
            rec.stage = Stage::OnBackend;
        }
        if let (true, Some(owner)) = (rec.holds_slot(None), rec.owner.clone()) {
            *self.slots.entry(owner).or_default() += 1;
            *self.sent.entry(rec.tenant.key.clone()).or_default() += 1;
        }
        if rec.stage == Stage::Done {
            self.ended += 1;
        }
        if let Some(user) = rec.tenant.user.clone() {
            self.by_user.entry(user).or_default().insert(rec.id.clone());
        }
        if let Some(old) = self.records.insert(rec.id.clone(), rec) {
            if old.stage == Stage::Done {
                self.ended -= 1;
            }
            let id = &old.id;
            if let Some(user) = &old.tenant.user
                && self.records[id].tenant.user.as_ref() != Some(user)
            {
                self.forget_user_record(user, id);
            }
        }
    }

    /// Where `r` is listed in `/queue`; `None` once it has ended (its history entry is kept
    /// under the same lock) or while its forward at submit awaits the backend's answer.
    pub fn listed(&self, r: &PromptRecord) -> Option<Listed> {
        if self.unanswered.contains(&r.id) {
            return None;
        }
        match r.stage {
            Stage::Queued | Stage::Dispatching => Some(Listed::Pending),
            Stage::OnBackend if !r.started => Some(Listed::Pending),
            Stage::OnBackend | Stage::Finishing => Some(Listed::Running),
            Stage::Done => None,
        }
    }

    /// `queue_remaining` as ComfyUI counts it (`get_tasks_remaining`): the prompts listed.
    pub fn remaining(&self) -> usize {
        let n = self.records.len() - self.ended - self.unanswered.len();
        debug_assert_eq!(
            n,
            self.records
                .values()
                .filter(|r| self.listed(r).is_some())
                .count()
        );
        n
    }

    /// Whether `id` was forwarded at submit and is not yet listed (see [`PromptTable::listed`]).
    pub fn is_unanswered(&self, id: &str) -> bool {
        self.unanswered.contains(id)
    }

    /// `id` was just reserved to be forwarded at submit: unlisted until its backend answers.
    pub fn await_first_answer(&mut self, id: &str) {
        if self
            .records
            .get(id)
            .is_some_and(|r| r.stage == Stage::Dispatching)
        {
            self.unanswered.insert(id.to_string());
        }
    }

    /// Releases the slot `id` holds, if any (the one place slots go down).
    fn release(&mut self, id: &str) {
        self.unanswered.remove(id);
        let Some(r) = self.records.get(id) else {
            return;
        };
        if !r.holds_slot(None) {
            return;
        }
        let owner = r.owner.clone().unwrap_or_default();
        if let Some(n) = self.slots.get_mut(&owner) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.sent.get_mut(&r.tenant.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.sent.remove(&r.tenant.key);
            }
        }
        if self.running.get(&owner).map(String::as_str) == Some(id) {
            self.running.remove(&owner);
        }
    }

    /// Slots in use on `backend`.
    pub fn slots_used(&self, backend: &str) -> usize {
        self.slots.get(backend).copied().unwrap_or(0)
    }

    /// Prompts of tenant `key` holding a slot (sent to a backend and not finished there).
    pub fn sent_by(&self, key: &str) -> usize {
        self.sent.get(key).copied().unwrap_or(0)
    }

    /// The prompt running on `backend` (between `execution_start` and its end).
    pub fn running_on(&self, backend: &str) -> Option<&str> {
        self.running.get(backend).map(String::as_str)
    }

    /// Queued → Dispatching on `backend`: out of the gate queue, a slot taken.
    pub fn reserve(&mut self, id: &str, backend: &str) -> bool {
        match self.records.get(id) {
            Some(r) if r.stage == Stage::Queued => {}
            _ => return false,
        }
        self.unqueue(id);
        let r = self.records.get_mut(id).expect("checked above");
        r.stage = Stage::Dispatching;
        r.owner = Some(backend.to_string());
        *self.slots.entry(backend.to_string()).or_default() += 1;
        *self.sent.entry(r.tenant.key.clone()).or_default() += 1;
        true
    }

    /// Whether `id` is still being sent to `backend` (a late answer from a forward that lost
    /// the prompt to another backend must change nothing).
    pub fn is_dispatching_to(&self, id: &str, backend: &str) -> bool {
        self.records
            .get(id)
            .is_some_and(|r| r.stage == Stage::Dispatching && r.owner.as_deref() == Some(backend))
    }

    /// Dispatching → OnBackend: `backend` answered 200. True also when it started there before
    /// the answer came (its events came first); false, and nothing changes, if the prompt is no
    /// longer being sent there.
    pub fn accepted(&mut self, id: &str, backend: &str) -> bool {
        let started_there = self.records.get(id).is_some_and(|r| {
            r.stage == Stage::OnBackend && r.started && r.owner.as_deref() == Some(backend)
        });
        if started_there {
            // Its events came before the answer: it is the backend's already.
            return true;
        }
        if !self.is_dispatching_to(id, backend) {
            return false;
        }
        self.unanswered.remove(id);
        if let Some(r) = self.records.get_mut(id) {
            r.stage = Stage::OnBackend;
            r.last_event = Some(Instant::now());
        }
        true
    }

    /// Dispatching → Queued at the head: sending it to `backend` failed (nothing was applied
    /// there), so it goes first again and prefers another backend next time. False, and
    /// nothing changes, if the prompt is no longer being sent there.
    pub fn unreserve(&mut self, id: &str, backend: &str) -> bool {
        if !self.is_dispatching_to(id, backend) {
            return false;
        }
        if let Some(r) = self.records.get_mut(id)
            && !r.tried.iter().any(|t| t == backend)
        {
            r.tried.push(backend.to_string());
        }
        self.enqueue_front(&[id.to_string()]);
        true
    }

    /// Re-attaches a restored prompt that `backend`'s own `/queue` lists: `running` says it
    /// runs there now (it is watched again from now on).
    pub fn reattached(&mut self, id: &str, backend: &str, running: bool) {
        if !self
            .records
            .get(id)
            .is_some_and(|r| r.holds_slot(Some(backend)))
        {
            return;
        }
        if running {
            self.started_unseen(id, backend);
        }
        if let Some(r) = self.records.get_mut(id) {
            r.last_event = Some(Instant::now());
        }
    }

    /// It runs on `backend`, but the gate did not see it start (see
    /// [`PromptRecord::start_unseen`]).
    pub fn started_unseen(&mut self, id: &str, backend: &str) {
        self.started(id, backend);
        if let Some(r) = self.records.get_mut(id).filter(|r| r.started) {
            r.start_unseen = true;
        }
    }

    /// `execution_start` arrived from its owner `backend`.
    pub fn started(&mut self, id: &str, backend: &str) {
        let Some(r) = self.records.get_mut(id) else {
            return;
        };
        if !r.holds_slot(Some(backend)) {
            return;
        }
        r.stage = Stage::OnBackend;
        r.started = true;
        r.started_at = Some(Instant::now());
        self.unanswered.remove(id);
        self.running.insert(backend.to_string(), id.to_string());
    }

    /// A new prompt whose result exists already (the result cache, [`super::cache`]): admitted
    /// straight to Finishing (listed as running, as ComfyUI lists a prompt until its history
    /// entry is kept), never queued nor sent, so no delete or dispatch acts on it before it
    /// ends.
    pub fn admit_answered(&mut self, rec: PromptRecord) {
        let id = rec.id.clone();
        self.admit(rec);
        if let Some(r) = self.records.get_mut(&id) {
            r.stage = Stage::Finishing;
        }
    }

    /// Dispatching/OnBackend → Finishing: it ran to its end on `backend`, whose slot is free
    /// again. False if it was not in flight there.
    pub fn ran(&mut self, id: &str, backend: &str) -> bool {
        if !self
            .records
            .get(id)
            .is_some_and(|r| r.holds_slot(Some(backend)))
        {
            return false;
        }
        self.release(id);
        if let Some(r) = self.records.get_mut(id) {
            r.stage = Stage::Finishing;
            r.ran_at = Some(Instant::now());
        }
        true
    }

    /// Any stage but Done → Done (releasing its slot, leaving the queue); `None` if it is
    /// unknown or already ended, so a prompt ends at most once.
    pub fn finish(&mut self, id: &str) -> Option<&PromptRecord> {
        if self.records.get(id)?.stage == Stage::Done {
            return None;
        }
        self.release(id);
        self.unqueue(id);
        let r = self.records.get_mut(id)?;
        r.stage = Stage::Done;
        self.ended += 1;
        r.retry_after_run = false;
        r.deadline_interrupt = None;
        Some(r)
    }

    /// Forgets a record (deleted while waiting, or its history entry was pruned), releasing a
    /// slot it holds.
    pub fn remove(&mut self, id: &str) -> Option<PromptRecord> {
        self.release(id);
        self.unqueue(id);
        let r = self.records.remove(id)?;
        if r.stage == Stage::Done {
            self.ended -= 1;
        }
        if let Some(user) = &r.tenant.user {
            self.forget_user_record(user, id);
        }
        Some(r)
    }

    fn forget_user_record(&mut self, user: &str, id: &str) {
        if let Some(ids) = self.by_user.get_mut(user) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    /// The records of user `name`'s prompts (auth on), any stage.
    pub fn records_of_user<'a>(
        &'a self,
        name: &str,
    ) -> impl Iterator<Item = &'a PromptRecord> + 'a {
        self.by_user
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| self.records.get(id))
    }

    /// Back to waiting, at the head of the gate queue (a retry goes first), in number order;
    /// slots held are released. Prompts already ended are left alone.
    pub fn enqueue_front(&mut self, ids: &[String]) {
        let mut ids: Vec<String> = ids
            .iter()
            .filter(|i| self.records.get(*i).is_some_and(|r| r.stage != Stage::Done))
            .cloned()
            .collect();
        ids.sort_by(|a, b| {
            let (x, y) = (key(&self.records[a].number), key(&self.records[b].number));
            x.partial_cmp(&y)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.cmp(b))
        });
        for id in ids.iter().rev() {
            self.release(id);
            self.unqueue(id);
            if let Some(rec) = self.records.get_mut(id) {
                rec.reset_run();
            }
            self.queue.push_front(id.clone());
        }
    }

    /// Back to waiting at its place by `(number, id)`; a slot held is released.
    pub fn enqueue(&mut self, id: &str) {
        if !self.records.get(id).is_some_and(|r| r.stage != Stage::Done) {
            return;
        }
        self.release(id);
        self.unqueue(id);
        let rec = self.records.get_mut(id).expect("checked above");
        rec.reset_run();
        let k = Key(key(&rec.number));
        let records = &self.records;
        let key_of = |q: &str| Key(records.get(q).map_or(0.0, |r| key(&r.number)));
        self.queue.insert(k, id.to_string(), key_of);
    }

    /// Removes from the gate queue; true if it was there.
    fn unqueue(&mut self, id: &str) -> bool {
        let Some(r) = self.records.get(id) else {
            return false;
        };
        self.queue.remove(Key(key(&r.number)), id)
    }

    /// Whether it waits in the gate queue.
    pub fn is_waiting(&self, id: &str) -> bool {
        self.records
            .get(id)
            .is_some_and(|r| r.stage == Stage::Queued)
    }

    /// The waiting prompts, in queue order.
    pub fn queued(&self) -> impl Iterator<Item = &PromptRecord> {
        self.queue.iter().filter_map(|id| self.records.get(id))
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Prompts dispatched and not finished.
    pub fn in_flight(&self) -> usize {
        self.slots.values().sum()
    }

    /// Ids of the prompts `backend` has accepted and not finished (`OnBackend` there): what a
    /// reconnect checks. Prompts still being sent are the live forwards' business.
    pub fn accepted_ids(&self, backend: &str) -> Vec<String> {
        self.records
            .values()
            .filter(|r| r.stage == Stage::OnBackend && r.owner.as_deref() == Some(backend))
            .map(|r| r.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn rec(id: &str, number: Number) -> PromptRecord {
        PromptRecord::new(
            id.into(),
            number,
            Map::new(),
            None,
            "x".into(),
            Default::default(),
        )
    }

    fn table(ids: &[(&str, i64)]) -> PromptTable {
        let mut t = PromptTable::default();
        for (id, n) in ids {
            t.admit(rec(id, Number::from(*n)));
            t.enqueue(id);
        }
        t
    }

    #[test]
    fn queue_orders_by_number_then_id() {
        let mut t = table(&[("b", 2), ("a", 2), ("f", -5), ("c", 1)]);
        let ids: Vec<&str> = t.queued().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["f", "c", "a", "b"]);
        assert!(t.reserve("c", "g0"));
        assert_eq!(t.queued().next().map(|r| r.id.as_str()), Some("f"));
        assert_eq!(t.next_number(false), Number::from(0));
        assert_eq!(t.next_number(true), Number::from(-1));
        t.enqueue_front(&["b".to_string(), "a".to_string()]);
        let ids: Vec<&str> = t.queued().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "f"], "retries go first, in number order");
    }

    #[test]
    fn slots_follow_the_transitions_and_are_released_once() {
        let mut t = table(&[("p", 1), ("q", 2)]);
        assert!(t.reserve("p", "g0") && t.reserve("q", "g0"));
        assert!(
            !t.reserve("p", "g1"),
            "only a waiting prompt can be reserved"
        );
        assert_eq!(t.slots_used("g0"), 2);
        assert!(!t.accepted("p", "g1"));
        assert_eq!(
            t.get("p").unwrap().stage,
            Stage::Dispatching,
            "not its backend"
        );
        assert!(t.accepted("p", "g0"));
        t.started("p", "g0");
        assert_eq!(t.running_on("g0"), Some("p"));
        assert!(t.ran("p", "g0"));
        assert!(!t.ran("p", "g0"), "a second completion frees nothing");
        assert_eq!((t.slots_used("g0"), t.running_on("g0")), (1, None));
        assert_eq!(t.get("p").unwrap().stage, Stage::Finishing);
        assert!(t.finish("p").is_some());
        assert!(t.finish("p").is_none(), "a prompt ends once");
        t.enqueue_front(&["q".to_string()]);
        assert_eq!(t.slots_used("g0"), 0, "a requeue releases the slot");
        assert!(t.finish("q").is_some());
        assert_eq!(
            (t.slots_used("g0"), t.queue_len(), t.in_flight()),
            (0, 0, 0)
        );
        assert!(!t.is_waiting("q"));
        t.enqueue("q");
        assert_eq!(t.queue_len(), 0, "an ended prompt does not come back");
    }

    #[test]
    fn a_late_answer_from_a_backend_that_lost_the_prompt_changes_nothing() {
        let mut t = table(&[("p", 1)]);
        t.reserve("p", "a");
        t.enqueue_front(&["p".to_string()]);
        t.reserve("p", "b");
        assert!(!t.unreserve("p", "a"), "a's failure is not b's");
        assert!(!t.accepted("p", "a"));
        assert_eq!((t.slots_used("a"), t.slots_used("b")), (0, 1));
        assert_eq!(t.get("p").unwrap().stage, Stage::Dispatching);
        assert!(t.unreserve("p", "b"));
        assert_eq!(t.slots_used("b"), 0);
        assert_eq!(
            t.get("p").unwrap().tried,
            ["b"],
            "the next try prefers another"
        );
        assert!(t.is_waiting("p"));
    }

    #[test]
    fn prompts_sent_are_counted_per_tenant_as_slots_are() {
        let mut t = PromptTable::default();
        for (id, key) in [("a1", "user:a"), ("a2", "user:a"), ("b1", "user:b")] {
            let mut r = rec(id, Number::from(1));
            r.tenant.key = key.into();
            t.admit(r);
            t.enqueue(id);
        }
        assert!(t.reserve("a1", "g0") && t.reserve("a2", "g1") && t.reserve("b1", "g0"));
        assert_eq!((t.sent_by("user:a"), t.sent_by("user:b")), (2, 1));
        assert!(t.accepted("a1", "g0"));
        t.started("a1", "g0");
        assert!(t.ran("a1", "g0"));
        assert_eq!(t.sent_by("user:a"), 1, "a run that ended holds nothing");
        t.enqueue_front(&["a2".to_string()]);
        assert!(t.remove("b1").is_some());
        assert_eq!((t.sent_by("user:a"), t.sent_by("user:b")), (0, 0));
        let mut r = rec("c", Number::from(2));
        r.tenant.key = "user:c".into();
        r.stage = Stage::OnBackend;
        r.owner = Some("g0".into());
        t.admit(r);
        assert_eq!(
            t.sent_by("user:c"),
            1,
            "a restored prompt on a backend counts"
        );
        assert!(t.finish("c").is_some());
        assert_eq!(t.sent_by("user:c"), 0);
    }

    #[test]
    fn removing_a_dispatched_prompt_frees_its_slot() {
        let mut t = table(&[("p", 1)]);
        t.reserve("p", "g0");
        assert!(t.remove("p").is_some());
        assert_eq!(t.slots_used("g0"), 0);
    }

    #[test]
    fn a_restored_dispatched_record_is_reattached_with_its_slot() {
        let mut t = PromptTable::default();
        let mut r = rec("p", Number::from(3));
        r.stage = Stage::Dispatching;
        r.owner = Some("g1".into());
        t.admit(r);
        assert_eq!(t.get("p").unwrap().stage, Stage::OnBackend);
        assert_eq!(t.slots_used("g1"), 1);
        assert_eq!(t.accepted_ids("g1"), ["p"]);
    }
}
