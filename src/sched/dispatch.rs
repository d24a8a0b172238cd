//! The dispatcher (design §2 "Late binding"): whenever a slot frees, a prompt arrives or a
//! backend comes back, it takes waiting prompts off the gate queue ([`placing::dispatch_pass`]) and
//! forwards each to the backend chosen for it. A backend that refuses a prompt it validated
//! (400) ends it as ComfyUI reports a failed run; one that cannot be reached gives it back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

use super::{Failure, Outcome, Scheduler, placing};
use crate::error::GateError;

/// The dispatcher also looks at the queue this often without being woken (aging, telemetry
/// that changed without an event).
pub const IDLE_TICK: Duration = Duration::from_millis(200);

/// What a backend said to a forwarded prompt.
pub enum Forwarded {
    /// 200: the prompt is the backend's now.
    Accepted(Bytes),
    /// 400 (validation): it will never run there.
    Rejected(Bytes),
    /// Connection error or unexpected status: nothing was applied.
    Failed,
}

/// Sends a reserved prompt (`Dispatching` on `backend`) there: the files it names first
/// (`Files::ensure_inputs`, whose rewrites change only the forwarded copy), then
/// `POST /prompt` with the gate's id, number and upstream clientId. On a 200 the prompt is
/// `OnBackend` (if it is still this backend's); otherwise the caller decides (the slot is
/// still held).
pub async fn forward(sched: &Scheduler, id: &str, backend: usize) -> Forwarded {
    let b = sched.fleet.get(backend).clone();
    let mut body = {
        let s = sched.lock();
        // Still reserved for this backend: it may have been given back or deleted since.
        let Some(r) = s
            .table
            .get(id)
            .filter(|_| s.table.is_dispatching_to(id, b.name()))
        else {
            return Forwarded::Failed;
        };
        let mut body = r.body.clone();
        body.insert("prompt_id".into(), json!(r.id));
        body.insert("number".into(), json!(r.number));
        body.insert("client_id".into(), json!(b.upstream_client_id));
        body
    };
    match sched
        .files
        .ensure_inputs(&sched.fleet, backend, &body["prompt"])
        .await
    {
        // The forwarded copy names the files as placed there; the record keeps the client's.
        Ok(rewrites) => {
            if let Some(prompt) = body.get_mut("prompt") {
                crate::files::place::apply(prompt, &rewrites);
            }
        }
        // A file that cannot be had or that the backend will not take: the prompt's error (a
        // retry would meet it again), not the backend's.
        Err(GateError::BadRequest(message)) => {
            tracing::warn!(prompt = id, backend = b.name(), %message, "a file could not be placed");
            sched.end(id, Outcome::Failed(Failure::gate("FileNotPlaced", message)));
            return Forwarded::Failed;
        }
        Err(e) => {
            tracing::warn!(backend = b.name(), error = %e, "could not place files on backend");
            sched.fleet.record_health(backend, false);
            return Forwarded::Failed;
        }
    }
    let result = sched
        .fleet
        .upstream
        .post_json(&b.config, "/prompt", &Value::Object(body))
        .await;
    match result {
        Ok((status, bytes)) if status == StatusCode::OK => {
            let (taken, owner, put_unsent) = {
                let mut s = sched.lock();
                let put_unsent = s.table.is_unanswered(id);
                let taken = s.table.accepted(id, b.name());
                (
                    taken,
                    s.table.get(id).and_then(|r| r.owner.clone()),
                    put_unsent,
                )
            };
            if taken && put_unsent {
                // Forwarded at submit, now listed: ComfyUI's `PromptQueue.put` sends `status`.
                sched.broadcast_status();
            }
            if !taken {
                // A late yes: the prompt went elsewhere meanwhile. The copy this backend now
                // holds is nobody's; take it off again (unless the prompt is back there).
                if owner.as_deref() != Some(b.name()) {
                    drop_copy(sched, backend, id);
                }
                return Forwarded::Failed;
            }
            sched.persist_durably(&[id]).await;
            tracing::debug!(prompt = id, backend = b.name(), "dispatched");
            Forwarded::Accepted(bytes)
        }
        Ok((status, bytes)) if status == StatusCode::BAD_REQUEST => Forwarded::Rejected(bytes),
        Ok((status, _)) => {
            tracing::warn!(backend = b.name(), %status, "backend refused a prompt");
            sched.fleet.record_health(backend, false);
            Forwarded::Failed
        }
        Err(e @ GateError::Unreachable { .. }) => {
            tracing::warn!(error = %e, "forwarding a prompt failed");
            sched.fleet.record_health(backend, false);
            Forwarded::Failed
        }
        Err(e) => {
            // Sent, and the connection broke before an answer: the backend may have died on
            // this very prompt (see `quarantine`).
            tracing::warn!(prompt = id, error = %e, "forwarding a prompt failed mid-request");
            sched.fleet.record_health(backend, false);
            sched.suspect_dispatch(id, backend);
            Forwarded::Failed
        }
    }
}

/// Asks `backend` to drop its copy of `id` (delete it from its queue, interrupt it if it
/// runs), in the background.
pub fn drop_copy(sched: &Scheduler, backend: usize, id: &str) {
    let (fleet, id) = (sched.fleet.clone(), id.to_string());
    tokio::spawn(async move {
        let b = fleet.get(backend);
        let one = json!({ "delete": [id] });
        let _ = fleet.upstream.post_json(&b.config, "/queue", &one).await;
        let interrupt = json!({ "prompt_id": id });
        let _ = fleet
            .upstream
            .post_json(&b.config, "/interrupt", &interrupt)
            .await;
    });
}

/// Sends queued prompts while slots are free (one [`placing::dispatch_pass`] fills every slot it
/// can); sleeps until woken (or [`IDLE_TICK`]).
pub async fn dispatcher_loop(sched: Arc<Scheduler>) {
    loop {
        let (placed, owners_stored) = {
            let mut s = sched.lock();
            let placed = placing::dispatch_pass(&sched, &mut s);
            let ids: Vec<&str> = placed.iter().map(|(id, _)| id.as_str()).collect();
            let stored = (!ids.is_empty()).then(|| sched.stage(&s, &ids));
            (placed, stored)
        };
        // Each owner is durable before its prompt is sent (a restart looks for it there): one
        // commit for the whole pass, awaited off the scheduler's lock. A pass the store could
        // not take sends nothing: its prompts wait again, and the next pass comes after a tick
        // (a failing disk must not spin this loop).
        if let Some(ticket) = owners_stored
            && let Err(e) = ticket.durable().await
        {
            tracing::error!(error = %e, "could not persist a dispatch pass; its prompts wait");
            sched.unplace(&placed);
            tokio::select! {
                _ = sched.stop.cancelled() => return,
                _ = tokio::time::sleep(IDLE_TICK) => {}
            }
            continue;
        }
        for (id, backend) in placed {
            let sched = sched.clone();
            tokio::spawn(async move {
                match forward(&sched, &id, backend).await {
                    Forwarded::Accepted(_) => {}
                    Forwarded::Rejected(body) => {
                        let failure = rejection(&sched, &id, &body);
                        sched.end_refused(&id, sched.fleet.get(backend).name(), failure);
                    }
                    Forwarded::Failed => sched.unreserve(&id, backend),
                }
            });
        }
        tokio::select! {
            _ = sched.stop.cancelled() => return,
            _ = sched.woken() => {}
            _ = tokio::time::sleep(IDLE_TICK) => {}
        }
    }
}

/// A prompt that waited in the gate queue was refused by the backend's validation: reported as
/// ComfyUI reports a failed run, carrying the validation messages (`node_errors`).
fn rejection(sched: &Scheduler, id: &str, body: &Bytes) -> Failure {
    let answer: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &answer["error"];
    let node_errors = &answer["node_errors"];
    let first_node = node_errors
        .as_object()
        .and_then(|m| m.keys().next().cloned());
    let node_type = first_node.as_ref().and_then(|n| {
        sched.lock().table.get(id).and_then(|r| {
            r.body["prompt"][n]["class_type"]
                .as_str()
                .map(str::to_string)
        })
    });
    Failure {
        exception_type: error["type"]
            .as_str()
            .unwrap_or("prompt_outputs_failed_validation")
            .to_string(),
        exception_message: validation_message(error, node_errors),
        node_id: first_node,
        node_type,
        node_errors: Some(node_errors.clone()),
    }
}

/// "Prompt outputs failed validation" plus every node's "message: details" line.
fn validation_message(error: &Value, node_errors: &Value) -> String {
    let mut lines = vec![
        error["message"]
            .as_str()
            .unwrap_or("Prompt outputs failed validation")
            .to_string(),
    ];
    for (node, entry) in node_errors.as_object().into_iter().flatten() {
        for e in entry["errors"].as_array().into_iter().flatten() {
            lines.push(format!(
                "{} {node}: {}: {}",
                entry["class_type"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or(""),
                e["details"].as_str().unwrap_or("")
            ));
        }
    }
    lines.join("\n")
}
