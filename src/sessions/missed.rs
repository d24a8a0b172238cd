//! Terminal events of clients that were away (issue 12, input 4). A client that follows its
//! prompts only over `/ws` and was disconnected when one ended (its network dropped, or the gate
//! itself restarted and finished the prompt on reconnecting to its backend) would otherwise wait
//! forever for `execution_success` / `executing {node: null}`. ComfyUI replays only the running
//! node on reconnect; the gate, which outlives a client's socket more often, also keeps each
//! terminal event it could not deliver and sends it when that `clientId` connects again.
//!
//! Bounded three ways: [`KEPT_FOR`] of age, [`PER_CLIENT`] events per client, [`CLIENTS`]
//! clients (the one whose newest event is oldest goes first).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// How long an undelivered terminal event is kept.
pub const KEPT_FOR: Duration = Duration::from_secs(600);
/// Undelivered terminal events kept per client (the oldest go first).
pub const PER_CLIENT: usize = 32;
/// Clients with undelivered events kept.
pub const CLIENTS: usize = 2048;

/// Whether ComfyUI's client library treats this event as the end of a prompt: `execution_success`,
/// `execution_error`, `execution_interrupted`, or `executing` with node `null`.
pub fn is_terminal(kind: &str, data: &Value) -> bool {
    matches!(
        kind,
        "execution_success" | "execution_error" | "execution_interrupted"
    ) || (kind == "executing" && data.get("node").is_some_and(Value::is_null))
}

/// Undelivered terminal events by client sid: `(when kept, the message text)`, oldest first.
#[derive(Default)]
pub struct Missed {
    by_client: Mutex<HashMap<String, VecDeque<(Instant, String)>>>,
}

impl Missed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<(Instant, String)>>> {
        self.by_client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `text` (a whole event message) for `sid`, within the bounds.
    pub fn keep(&self, sid: &str, text: String) {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, q| q.back().is_some_and(|(t, _)| now - *t < KEPT_FOR));
        if !map.contains_key(sid) && map.len() >= CLIENTS {
            let stalest = map
                .iter()
                .min_by_key(|(_, q)| q.back().map(|(t, _)| *t))
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                map.remove(&k);
            }
        }
        let q = map.entry(sid.to_string()).or_default();
        if q.len() >= PER_CLIENT {
            q.pop_front();
        }
        q.push_back((now, text));
    }

    /// Takes what was kept for `sid` and is still within [`KEPT_FOR`], oldest first.
    pub fn take(&self, sid: &str) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .remove(sid)
            .into_iter()
            .flatten()
            .filter(|(t, _)| now - *t < KEPT_FOR)
            .map(|(_, text)| text)
            .collect()
    }

    /// Clients with events kept.
    pub fn clients(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_endings_are_terminal() {
        assert!(is_terminal("execution_success", &json!({})));
        assert!(is_terminal("executing", &json!({"node": null})));
        assert!(!is_terminal("executing", &json!({"node": "3"})));
        assert!(!is_terminal("progress", &json!({})));
    }

    #[test]
    fn kept_per_client_in_order_and_bounded() {
        let m = Missed::default();
        for i in 0..(PER_CLIENT + 3) {
            m.keep("a", format!("{i}"));
        }
        m.keep("b", "x".into());
        let a = m.take("a");
        assert_eq!(a.len(), PER_CLIENT);
        assert_eq!(a[0], "3", "the oldest went first");
        assert!(m.take("a").is_empty(), "taken once");
        assert_eq!(m.take("b"), vec!["x".to_string()]);
    }
}
