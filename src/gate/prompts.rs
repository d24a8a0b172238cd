//! Every prompt the gate accepted: who sent it, where it runs, and the gate queue of prompts
//! that wait for a slot (ordered by the gate's global `number`, then prompt_id, as ComfyUI's
//! heap orders them).

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value, json};

/// Whether a backend's `/queue` answer lists `id` as running or pending.
pub fn queue_lists(queue: &Value, id: &str) -> bool {
    ["queue_running", "queue_pending"].iter().any(|k| {
        queue[*k]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i[1] == id))
    })
}

/// Where a prompt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// In the gate queue.
    Queued,
    /// Being sent to `owner`.
    Dispatching,
    /// Accepted by `owner` (queued or running there).
    OnBackend,
    /// Finished (any outcome), deleted or refused.
    Done,
}

/// What the gate saw of a prompt's run, enough to write its history entry itself if the backend
/// cannot give it (it died right after finishing).
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    pub messages: Vec<Value>,
    pub outputs: Map<String, Value>,
    pub meta: Map<String, Value>,
}

/// One accepted prompt. Fields not marked `skip` are persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    pub number: Number,
    /// The client's request body (`prompt`, `extra_data`, `partial_execution_targets` …).
    pub body: Map<String, Value>,
    /// The client's own `client_id`, if it sent one (events go to that socket only).
    pub client_id: Option<String>,
    /// Who submitted it (API key, `Comfy-User` or peer IP): scopes interrupt/clear.
    pub identity: String,
    pub stage: Stage,
    pub owner: Option<usize>,
    pub create_time: i64,
    /// Runs lost to failed backends so far (bounded by `recovery.max_retries`).
    #[serde(default)]
    pub attempts: u32,
    /// Backends it was sent to before (a retry prefers others).
    #[serde(default)]
    pub tried: Vec<usize>,
    /// The one out-of-memory retry was used.
    #[serde(default)]
    pub oom_retried: bool,
    /// Only backends with at least this much VRAM (bytes) may take it (after an OOM).
    #[serde(default)]
    pub min_vram_total: Option<u64>,
    /// `execution_start` seen on the owner.
    #[serde(skip)]
    pub started: bool,
    #[serde(skip)]
    pub started_at: Option<Instant>,
    /// Last event from the owner for this prompt (stall detection).
    #[serde(skip)]
    pub last_event: Option<Instant>,
    /// Last `executing` node, for the reconnect replay.
    #[serde(skip)]
    pub last_node: Option<String>,
    /// The current run will be thrown away and the prompt run again (OOM or timeout retry):
    /// its remaining events are not shown to the client.
    #[serde(skip)]
    pub retry_after_run: bool,
    /// When the gate asked the owner to interrupt it for exceeding `max_run_time`.
    #[serde(skip)]
    pub deadline_interrupt: Option<Instant>,
    #[serde(skip)]
    pub log: RunLog,
    /// When the last `executing` node started (node timings: checkpoint load times).
    #[serde(skip)]
    pub last_node_at: Option<Instant>,
    /// Checkpoint load seconds measured in the current run.
    #[serde(skip)]
    pub load_measured_s: f64,
    /// Times the dispatcher passed it over for another prompt's checkpoint affinity.
    #[serde(skip)]
    pub skips: u32,
}

impl PromptRecord {
    /// A freshly accepted prompt, waiting.
    pub fn new(
        id: String,
        number: Number,
        body: Map<String, Value>,
        client_id: Option<String>,
        identity: String,
    ) -> Self {
        Self {
            id,
            number,
            body,
            client_id,
            identity,
            stage: Stage::Queued,
            owner: None,
            create_time: crate::protocol::now_ms(),
            attempts: 0,
            tried: Vec::new(),
            oom_retried: false,
            min_vram_total: None,
            started: false,
            started_at: None,
            last_event: None,
            last_node: None,
            retry_after_run: false,
            deadline_interrupt: None,
            log: RunLog::default(),
            last_node_at: None,
            load_measured_s: 0.0,
            skips: 0,
        }
    }

    /// Back to waiting: no owner, no run state.
    pub fn reset_run(&mut self) {
        self.stage = Stage::Queued;
        self.owner = None;
        self.started = false;
        self.started_at = None;
        self.last_event = None;
        self.last_node = None;
        self.retry_after_run = false;
        self.deadline_interrupt = None;
        self.log = RunLog::default();
        self.last_node_at = None;
        self.load_measured_s = 0.0;
    }

    /// The client-facing 5-element queue item `[number, id, prompt, extra_data, outputs]`.
    pub fn queue_item(&self, outputs: Vec<String>) -> Value {
        json!([
            self.number,
            self.id,
            self.body.get("prompt").cloned().unwrap_or(Value::Null),
            self.client_extra_data(),
            outputs
        ])
    }

    /// `extra_data` as the client would see it on one ComfyUI.
    pub fn client_extra_data(&self) -> Value {
        let mut extra = match self.body.get("extra_data") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        for key in ["auth_token_comfy_org", "api_key_comfy_org"] {
            extra.remove(key);
        }
        if let Some(cid) = &self.client_id {
            extra.insert("client_id".into(), json!(cid));
        }
        extra.insert("create_time".into(), json!(self.create_time));
        Value::Object(extra)
    }
}

/// All records plus the gate queue.
#[derive(Default)]
pub struct PromptTable {
    records: HashMap<String, PromptRecord>,
    queue: Vec<String>,
    counter: i64,
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

    pub fn get_mut(&mut self, id: &str) -> Option<&mut PromptRecord> {
        self.records.get_mut(id)
    }

    pub fn insert(&mut self, rec: PromptRecord) {
        self.records.insert(rec.id.clone(), rec);
    }

    pub fn remove(&mut self, id: &str) -> Option<PromptRecord> {
        self.unqueue(id);
        self.records.remove(id)
    }

    /// Puts records back at the head of the gate queue (a retry goes first), in number order.
    pub fn enqueue_front(&mut self, ids: &[String]) {
        let mut ids: Vec<String> = ids
            .iter()
            .filter(|i| self.records.contains_key(*i))
            .cloned()
            .collect();
        ids.sort_by(|a, b| {
            let (x, y) = (key(&self.records[a].number), key(&self.records[b].number));
            x.partial_cmp(&y)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.cmp(b))
        });
        for id in ids.iter().rev() {
            self.unqueue(id);
            if let Some(rec) = self.records.get_mut(id) {
                rec.reset_run();
            }
            self.queue.insert(0, id.clone());
        }
    }

    /// Puts a record in the gate queue at its place by `(number, id)`.
    pub fn enqueue(&mut self, id: &str) {
        let Some(rec) = self.records.get_mut(id) else {
            return;
        };
        rec.reset_run();
        let k = (key(&rec.number), id.to_string());
        self.unqueue(id);
        let records = &self.records;
        let pos = self
            .queue
            .iter()
            .position(|q| {
                let r = &records[q];
                (key(&r.number), q.clone()) > k
            })
            .unwrap_or(self.queue.len());
        self.queue.insert(pos, id.to_string());
    }

    /// Removes from the gate queue; true if it was there.
    pub fn unqueue(&mut self, id: &str) -> bool {
        match self.queue.iter().position(|q| q == id) {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    /// The first queued prompt.
    pub fn head(&self) -> Option<&str> {
        self.queue.first().map(String::as_str)
    }

    pub fn queued(&self) -> impl Iterator<Item = &PromptRecord> {
        self.queue.iter().filter_map(|id| self.records.get(id))
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn records(&self) -> impl Iterator<Item = &PromptRecord> {
        self.records.values()
    }

    /// Prompts dispatched and not finished.
    pub fn in_flight(&self) -> usize {
        self.records
            .values()
            .filter(|r| matches!(r.stage, Stage::Dispatching | Stage::OnBackend))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, number: Number) -> PromptRecord {
        PromptRecord::new(id.into(), number, Map::new(), None, "x".into())
    }

    #[test]
    fn queue_orders_by_number_then_id() {
        let mut t = PromptTable::default();
        for (id, n) in [("b", 2), ("a", 2), ("f", -5), ("c", 1)] {
            t.insert(rec(id, Number::from(n)));
            t.enqueue(id);
        }
        let ids: Vec<&str> = t.queued().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["f", "c", "a", "b"]);
        assert!(t.unqueue("c"));
        assert_eq!(t.head(), Some("f"));
        assert_eq!(t.next_number(false), Number::from(0));
        assert_eq!(t.next_number(true), Number::from(-1));
        t.enqueue_front(&["b".to_string(), "a".to_string()]);
        let ids: Vec<&str> = t.queued().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "f"], "retries go first, in number order");
    }
}
