//! How a prompt ends: the argument of [`Scheduler::end`](super::Scheduler::end), and the
//! ComfyUI-shaped error a prompt the gate ends itself carries.

use serde_json::{Value, json};

use super::prompts::PromptRecord;
use crate::protocol::now_ms;

/// How a prompt ends (the argument of [`super::Scheduler::end`]).
#[derive(Debug)]
pub enum Outcome {
    /// It ran to its end on its backend; this is its history entry as the client sees it. Its
    /// terminal event (`execution_success`, `execution_error`, `execution_interrupted`) came
    /// from the backend itself; the gate adds `executing {node: null}` once the entry is kept.
    Ran(Value),
    /// The gate ended it (out of retries, refused after waiting, max run time, no backend
    /// left): `execution_error` and `executing {node: null}` to its client, an error entry.
    Failed(Failure),
    /// Deleted before it started (`POST /queue` delete or clear): gone, a `status` update, no
    /// history entry, as ComfyUI does. `from`: `None` from the gate queue (it must still wait
    /// there), `Some(backend)` from that backend's queue, which confirmed it gone (it must still
    /// be that backend's, not started).
    Deleted { from: Option<String> },
}

/// Why the gate ended a prompt, as ComfyUI's `execution_error` fields.
#[derive(Clone, Debug, Default)]
pub struct Failure {
    /// `comfy_gate.BackendFailed`, `comfy_gate.MaxRunTimeExceeded`, … or ComfyUI's own type
    /// for a validation refusal.
    pub exception_type: String,
    pub exception_message: String,
    pub node_id: Option<String>,
    pub node_type: Option<String>,
    /// ComfyUI's `node_errors` when a backend refused the prompt's validation.
    pub node_errors: Option<Value>,
}

impl Failure {
    /// A failure of the gate's own, `comfy_gate.{kind}`.
    pub fn gate(kind: &str, message: String) -> Self {
        Self {
            exception_type: format!("comfy_gate.{kind}"),
            exception_message: message,
            ..Default::default()
        }
    }
}

/// The error history entry and `execution_error` data for a prompt the gate ends (the shape of
/// ComfyUI's `execution.py` `execution_error` message and history status).
pub(super) fn failure_entry(r: &PromptRecord, f: &Failure) -> (Value, Value) {
    let mut error = json!({
        "prompt_id": r.id, "node_id": f.node_id, "node_type": f.node_type, "executed": [],
        "exception_message": f.exception_message, "exception_type": f.exception_type,
        "traceback": [], "current_inputs": {}, "current_outputs": [],
        "timestamp": now_ms(),
    });
    if let Some(ne) = &f.node_errors {
        error["node_errors"] = ne.clone();
    }
    let mut messages = r.log.messages.clone();
    messages.retain(|m| m[0] == "execution_start" || m[0] == "execution_cached");
    messages.push(json!(["execution_error", error]));
    let entry = json!({
        "prompt": r.queue_item(Vec::new()),
        "outputs": {},
        "status": { "status_str": "error", "completed": false, "messages": messages },
        "meta": {},
    });
    (entry, error)
}

/// The terminal event a history entry records (`execution_success`, `execution_error` or
/// `execution_interrupted`, the last of its status messages): `(kind, data)`.
pub(super) fn terminal_of(entry: &Value) -> Option<(String, Value)> {
    entry["status"]["messages"]
        .as_array()?
        .iter()
        .rev()
        .find_map(|m| {
            let kind = m[0].as_str()?;
            matches!(
                kind,
                "execution_success" | "execution_error" | "execution_interrupted"
            )
            .then(|| (kind.to_string(), m[1].clone()))
        })
}
