//! Every prompt the gate accepted: who sent it, where it runs, and the gate queue of prompts
//! that wait for a slot (ordered by the gate's global `number`, then prompt_id, as ComfyUI's
//! heap orders them).

use std::collections::HashMap;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// One accepted prompt.
#[derive(Clone, Debug)]
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
    /// `execution_start` seen on the owner.
    pub started: bool,
    /// Last `executing` node, for the reconnect replay.
    pub last_node: Option<String>,
    /// A history entry the gate itself holds (a prompt refused by a backend after waiting).
    pub gate_history: Option<Value>,
    pub create_time: i64,
}

impl PromptRecord {
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

    /// Puts a record in the gate queue at its place by `(number, id)`.
    pub fn enqueue(&mut self, id: &str) {
        let Some(rec) = self.records.get_mut(id) else {
            return;
        };
        rec.stage = Stage::Queued;
        rec.owner = None;
        rec.started = false;
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
        PromptRecord {
            id: id.into(),
            number,
            body: Map::new(),
            client_id: None,
            identity: "x".into(),
            stage: Stage::Queued,
            owner: None,
            started: false,
            last_node: None,
            gate_history: None,
            create_time: 0,
        }
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
    }
}
