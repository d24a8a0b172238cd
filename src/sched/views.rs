//! What clients see of the gate's prompts, as one ComfyUI shows it: `/queue` (running and
//! pending), the `status` count, and `/history`, all read from the prompt table and the history
//! under the scheduler's one lock.
//!
//! ComfyUI moves a prompt from pending to running to history under one mutex (`PromptQueue.get`
//! and `PromptQueue.task_done` in its `execution.py`) and computes `queue_remaining` from that
//! state (`get_tasks_remaining`: pending plus running) each time it sends `status`. The gate
//! keeps the same invariant over any number of backends:
//!
//! - a prompt the gate accepted is in exactly one of the queue or the history at every moment:
//!   `Queued`, `Dispatching` and `OnBackend` before its start are pending, `OnBackend` after its
//!   start and `Finishing` are running, and its history entry is kept under the same lock as
//!   its move to `Done` ([`Scheduler::end`]);
//! - every `status` count is taken from the table (so it never runs ahead of the history) and
//!   counts are taken and sent one at a time, so clients receive them in the order taken;
//! - a prompt forwarded at submit is listed once its backend accepted it, as ComfyUI lists a
//!   prompt only once it validated (a refusal leaves no trace).
//!
//! Prompts sent to a backend directly, not through the gate, are listed in `/queue` (see
//! `api::merged`) but not counted: the gate hears of them only when asked.
//!
//! Backends' own `status` messages are not relayed: their counts say nothing of the gate queue
//! or of other backends, and a backend sends its final `status` before the gate holds the
//! finished prompt's history entry.

use std::sync::Arc;

use serde_json::{Number, Value, json};

use super::Scheduler;
pub use super::prompts::Listed;
use super::prompts::{PromptRecord, PromptTable};
use super::recovery::output_nodes_of;

/// The gate's prompts as ComfyUI's `/queue` lists them: items `[number, prompt_id, prompt,
/// extra_data, outputs_to_execute]`, each list in number order.
#[derive(Debug, Default)]
pub struct QueueView {
    pub running: Vec<Value>,
    pub pending: Vec<Value>,
}

/// What a queue item is made of, taken under the lock without copying a prompt (prompts and
/// their `extra_data` can be tens of MB: the item is written out after the lock is released).
struct ItemParts {
    list: Listed,
    number: Number,
    id: String,
    graph: Arc<Value>,
    extra: Arc<Value>,
}

impl Scheduler {
    /// `queue_remaining` as ComfyUI counts it: the prompts pending or running.
    pub fn queue_remaining(&self) -> usize {
        self.lock().table.remaining()
    }

    /// What the gate holds, for `/admin/records`: prompt records (in memory and in the store),
    /// history entries, file aliases, input uploads, client sessions, placement decisions,
    /// learned prompt shapes (each bounded: `fleet::picker::stats::MAX_SHAPES`).
    pub fn records(&self) -> Value {
        let (prompts, decisions, learned_shapes) = {
            let s = self.lock();
            (
                s.table.records().count(),
                s.decisions.len(),
                s.learned.shapes(),
            )
        };
        let files = self.files.counts();
        let stored = match self.store().counts() {
            Ok((p, h, a)) => json!({ "prompts": p, "history": h, "aliases": a }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        json!({
            "prompts": prompts,
            "history": self.history.len(),
            "files": files,
            "sessions": self.sessions.len(),
            "missed_endings_clients": self.sessions.missed_clients(),
            "decisions": decisions,
            "learned_shapes": {"vram_peaks": learned_shapes.0, "run_times": learned_shapes.1},
            "store": stored,
            "audit": self.audit().counts(),
        })
    }

    /// `{"exec_info": {"queue_remaining": N}}`, for `GET /prompt` and `status`.
    pub fn queue_info(&self) -> Value {
        exec_info(self.queue_remaining())
    }

    /// Sends every client `status` with the count as it is now. Counts are taken and sent one
    /// at a time (`status_order`), so each client receives them in the order they were taken.
    pub fn broadcast_status(&self) {
        let _order = self.status_order.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.queue_remaining();
        self.sessions
            .broadcast_json("status", json!({ "status": exec_info(n) }));
    }

    /// The `status` a client gets on connect (`{"status": …, "sid": sid}`), in order with every
    /// other `status`; `session` is its session key.
    pub fn send_status_to(&self, session: &str, sid: &str) {
        let _order = self.status_order.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.queue_remaining();
        self.sessions.send_json(
            session,
            "status",
            json!({ "status": exec_info(n), "sid": sid }),
        );
    }

    /// The gate's prompts in `/queue`, as they are at one moment: everyone's, or (`user`) only
    /// that user's (nobody else's prompt is even copied).
    pub fn queue_view(&self, user: Option<&str>) -> QueueView {
        let parts = item_parts(&self.lock().table, user);
        self.items(parts)
    }

    /// `/queue` and every history entry (`(finished_at_ms, id, entry)`, oldest first) taken at
    /// one moment, so each prompt is in exactly one of them (`/api/jobs` shows both at once);
    /// the queue of `user` only, with one.
    pub fn queue_and_history(
        &self,
        user: Option<&str>,
    ) -> (QueueView, Vec<(i64, String, Arc<Value>)>) {
        let (parts, history) = {
            let s = self.lock();
            (item_parts(&s.table, user), self.history.all())
        };
        (self.items(parts), history)
    }

    /// The queue items, each list sorted by number, then id (ComfyUI's heap order).
    fn items(&self, parts: Vec<ItemParts>) -> QueueView {
        let mut view = QueueView::default();
        for p in parts {
            let outputs = output_nodes_of(self, &p.graph);
            let item = json!([p.number, p.id, *p.graph, *p.extra, outputs]);
            match p.list {
                Listed::Running => view.running.push(item),
                Listed::Pending => view.pending.push(item),
            }
        }
        view.running.sort_by(by_number);
        view.pending.sort_by(by_number);
        view
    }
}

/// `{"exec_info": {"queue_remaining": n}}` (ComfyUI's `get_queue_info`).
fn exec_info(n: usize) -> Value {
    json!({ "exec_info": { "queue_remaining": n } })
}

/// The parts of every listed prompt's queue item.
fn item_parts(table: &PromptTable, user: Option<&str>) -> Vec<ItemParts> {
    let records: Box<dyn Iterator<Item = &PromptRecord>> = match user {
        Some(name) => Box::new(table.records_of_user(name)),
        None => Box::new(table.records()),
    };
    records
        .filter_map(|r| {
            Some(ItemParts {
                list: table.listed(r)?,
                number: r.number.clone(),
                id: r.id.clone(),
                graph: r.graph().0.clone(),
                extra: r.client_extra().clone(),
            })
        })
        .collect()
}

/// ComfyUI's queue order: number, then prompt id.
pub fn by_number(a: &Value, b: &Value) -> std::cmp::Ordering {
    let (x, y) = (a[0].as_f64().unwrap_or(0.0), b[0].as_f64().unwrap_or(0.0));
    x.partial_cmp(&y)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then_with(|| a[1].as_str().cmp(&b[1].as_str()))
}
