//! The instance's prompt queue and history, with ComfyUI's ordering and paging rules.
//!
//! ComfyUI keeps a heap ordered by `(number, prompt_id)`, one running item, and an
//! insertion-ordered history capped at 10,000 entries (reference §4.3–4.9, §5.1).

use comfy_wire::protocol::paging::page;
use indexmap::IndexMap;
use serde_json::{Map, Number, Value, json};

/// ComfyUI's `MAXIMUM_HISTORY_SIZE`.
pub const MAX_HISTORY: usize = 10_000;

/// One queued prompt: ComfyUI's 6-tuple.
#[derive(Clone, Debug)]
pub struct QueueItem {
    /// An int when the server assigned it, a float when the client did.
    pub number: Number,
    pub prompt_id: String,
    pub prompt: Value,
    pub extra_data: Map<String, Value>,
    pub outputs: Vec<String>,
    /// Keys of `SENSITIVE_EXTRA_DATA_KEYS`, never shown in `/queue` or `/history`.
    pub sensitive: Map<String, Value>,
}

impl QueueItem {
    fn order_key(&self) -> (f64, &str) {
        (self.number.as_f64().unwrap_or(0.0), self.prompt_id.as_str())
    }

    /// The 5-element JSON array of `/queue` and history (`prompt` slot).
    pub fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    /// The `client_id` the prompt was submitted with (`None` when absent).
    pub fn client_id(&self) -> Option<String> {
        self.extra_data.get("client_id").map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
    }
}

/// Queue, running item and history of one instance.
#[derive(Debug, Default)]
pub struct PromptQueue {
    pending: Vec<QueueItem>,
    running: Option<QueueItem>,
    history: IndexMap<String, Value>,
    /// ComfyUI's `self.number`: advanced by every POST without `number`.
    pub counter: i64,
}

impl PromptQueue {
    /// `queue_remaining`: pending + running.
    pub fn remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    pub fn push(&mut self, item: QueueItem) {
        let pos = self
            .pending
            .iter()
            .position(|p| {
                p.order_key()
                    .partial_cmp(&item.order_key())
                    .map(|o| o.is_gt())
                    .unwrap_or(false)
            })
            .unwrap_or(self.pending.len());
        self.pending.insert(pos, item);
    }

    /// Takes the lowest item and marks it running.
    pub fn start_next(&mut self) -> Option<QueueItem> {
        if self.running.is_some() || self.pending.is_empty() {
            return None;
        }
        let item = self.pending.remove(0);
        self.running = Some(item.clone());
        Some(item)
    }

    pub fn running(&self) -> Option<&QueueItem> {
        self.running.as_ref()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the running item and records its history entry.
    pub fn finish(&mut self, prompt_id: &str, entry: Value) {
        if self.running.as_ref().map(|r| r.prompt_id.as_str()) == Some(prompt_id) {
            self.running = None;
        }
        if self.history.len() > MAX_HISTORY {
            self.history.shift_remove_index(0);
        }
        self.history.insert(prompt_id.to_string(), entry);
    }

    /// Drops the running item without history (the process died).
    pub fn abandon_running(&mut self) {
        self.running = None;
    }

    /// `{"queue_running": […], "queue_pending": […]}`.
    pub fn to_json(&self) -> Value {
        let running: Vec<Value> = self.running.iter().map(QueueItem::to_json).collect();
        let pending: Vec<Value> = self.pending.iter().map(QueueItem::to_json).collect();
        json!({ "queue_running": running, "queue_pending": pending })
    }

    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    /// Removes the first pending item with this id (ComfyUI removes only one).
    pub fn delete_pending(&mut self, prompt_id: &str) -> bool {
        match self.pending.iter().position(|p| p.prompt_id == prompt_id) {
            Some(i) => {
                self.pending.remove(i);
                true
            }
            None => false,
        }
    }

    pub fn history_entry(&self, prompt_id: &str) -> Option<&Value> {
        self.history.get(prompt_id)
    }

    /// `GET /history` with ComfyUI's paging: `max_items` alone (or with a negative offset)
    /// gives the last N; `offset >= 0` starts at that index.
    pub fn history_page(&self, max_items: Option<i64>, offset: i64) -> Map<String, Value> {
        page(self.history.iter(), self.history.len(), max_items, offset)
    }

    pub fn clear_history(&mut self) {
        self.history.clear();
    }

    pub fn delete_history(&mut self, prompt_id: &str) {
        self.history.shift_remove(prompt_id);
    }

    pub fn history_len(&self) -> usize {
        self.history.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(number: Number, id: &str) -> QueueItem {
        QueueItem {
            number,
            prompt_id: id.into(),
            prompt: json!({}),
            extra_data: Map::new(),
            outputs: vec![],
            sensitive: Map::new(),
        }
    }

    #[test]
    fn lowest_number_runs_first_and_ties_break_by_id() {
        let mut q = PromptQueue::default();
        q.push(item(Number::from(2), "b"));
        q.push(item(Number::from(-1), "z"));
        q.push(item(Number::from(2), "a"));
        let order: Vec<String> = std::iter::from_fn(|| {
            let next = q.start_next()?;
            q.finish(&next.prompt_id, json!({}));
            Some(next.prompt_id)
        })
        .collect();
        assert_eq!(order, ["z", "a", "b"]);
    }

    #[test]
    fn history_paging_follows_comfyui() {
        let mut q = PromptQueue::default();
        for i in 0..5 {
            q.finish(&format!("p{i}"), json!(i));
        }
        let keys = |m: Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(q.history_page(Some(2), -1)), ["p3", "p4"]);
        assert_eq!(keys(q.history_page(Some(2), 1)), ["p1", "p2"]);
        assert_eq!(keys(q.history_page(None, 3)), ["p3", "p4"]);
        assert_eq!(q.history_page(None, -1).len(), 5);
    }
}
