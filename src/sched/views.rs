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
//! - every `status` is computed from the table and queued to clients under that lock, so a
//!   count never runs ahead of the history and clients receive counts in the order they were
//!   taken.
//!
//! Backends' own `status` messages are not relayed: their counts say nothing of the gate queue
//! or of other backends, and a backend sends its final `status` before the gate holds the
//! finished prompt's history entry.

use std::sync::Arc;

use serde_json::{Value, json};

use super::Scheduler;
use super::prompts::{PromptRecord, Stage};
use super::recovery::output_nodes_of;

/// Where a prompt stands in `/queue`, by ComfyUI's lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// `queue_pending`: waiting in the gate queue, being sent, or accepted but not started.
    Pending,
    /// `queue_running`: started, or ran and its history entry is being collected.
    Running,
}

/// Where `r` is listed in `/queue`; `None` once it has ended (its history entry is kept).
pub fn listed(r: &PromptRecord) -> Option<Listed> {
    match r.stage {
        Stage::Queued | Stage::Dispatching => Some(Listed::Pending),
        Stage::OnBackend if !r.started => Some(Listed::Pending),
        Stage::OnBackend | Stage::Finishing => Some(Listed::Running),
        Stage::Done => None,
    }
}

/// The gate's prompts as ComfyUI's `/queue` lists them: items `[number, prompt_id, prompt,
/// extra_data, outputs_to_execute]`, each list in number order.
#[derive(Debug, Default)]
pub struct QueueView {
    pub running: Vec<Value>,
    pub pending: Vec<Value>,
}

impl Scheduler {
    /// `queue_remaining` as ComfyUI counts it: the prompts pending or running.
    pub fn queue_remaining(&self) -> usize {
        self.lock()
            .table
            .records()
            .filter(|r| listed(r).is_some())
            .count()
    }

    /// `{"exec_info": {"queue_remaining": N}}`, for `GET /prompt` and `status`.
    pub fn queue_info(&self) -> Value {
        exec_info(self.queue_remaining())
    }

    /// Sends every client `status` with the count as it is now (computed and queued under the
    /// state lock, so counts reach each client in the order they were taken).
    pub fn broadcast_status(&self) {
        let s = self.lock();
        let n = s.table.records().filter(|r| listed(r).is_some()).count();
        self.sessions
            .broadcast_json("status", json!({ "status": exec_info(n) }));
        drop(s);
    }

    /// The `status` a client gets on connect (`{"status": …, "sid": sid}`), queued under the
    /// state lock like every other `status`.
    pub fn send_status_to(&self, sid: &str) {
        let s = self.lock();
        let n = s.table.records().filter(|r| listed(r).is_some()).count();
        self.sessions
            .send_json(sid, "status", json!({ "status": exec_info(n), "sid": sid }));
        drop(s);
    }

    /// The gate's prompts in `/queue`, as they are at one moment.
    pub fn queue_view(&self) -> QueueView {
        let listed_now = {
            let s = self.lock();
            listed_items(s.table.records())
        };
        self.with_outputs(listed_now)
    }

    /// `/queue` and every history entry (`(finished_at_ms, id, entry)`, oldest first) taken at
    /// one moment, so each prompt is in exactly one of them (`/api/jobs` shows both at once).
    pub fn queue_and_history(&self) -> (QueueView, Vec<(i64, String, Arc<Value>)>) {
        let (listed_now, history) = {
            let s = self.lock();
            (listed_items(s.table.records()), self.history.all())
        };
        (self.with_outputs(listed_now), history)
    }

    /// Fills each item's `outputs_to_execute` and sorts each list by number, then id (ComfyUI's
    /// heap order).
    fn with_outputs(&self, items: Vec<(Listed, Arc<Value>, Value)>) -> QueueView {
        let mut view = QueueView::default();
        for (list, graph, mut item) in items {
            item[4] = json!(output_nodes_of(self, &graph));
            match list {
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

/// Each listed record's list, graph and queue item (outputs still empty).
fn listed_items<'a>(
    records: impl Iterator<Item = &'a PromptRecord>,
) -> Vec<(Listed, Arc<Value>, Value)> {
    records
        .filter_map(|r| Some((listed(r)?, r.graph().0.clone(), r.queue_item(Vec::new()))))
        .collect()
}

/// ComfyUI's queue order: number, then prompt id.
pub fn by_number(a: &Value, b: &Value) -> std::cmp::Ordering {
    let (x, y) = (a[0].as_f64().unwrap_or(0.0), b[0].as_f64().unwrap_or(0.0));
    x.partial_cmp(&y)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then_with(|| a[1].as_str().cmp(&b[1].as_str()))
}
