//! Nothing accepted is lost (design §2 "Recovery"): after an upstream socket (re)opens or the
//! gate restarts, the prompts the gate believes are on that backend are followed (still
//! listed there), collected (finished while nobody listened) or re-run (lost); a drained
//! backend gives back the prompts still waiting in its queue; a failed backend's prompts go
//! back to the gate queue (`requeue`, `evacuate`), charged a retry if they were running. Also
//! here: what a backend's
//! answers look like once shown as from one ComfyUI (the client's own clientId, the gate's
//! numbers, gate-wide file names), and the run log kept to write an entry when a backend
//! cannot give one.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::prompts::{PromptRecord, Stage};
use super::timeline::Happened;
use super::{Failure, Outcome, Scheduler, quarantine};
use crate::fleet::probe::{queue_lists, queue_runs};

/// Tries at the owner's `/history/{id}` before writing the entry from the events seen.
pub const HISTORY_TRIES: u32 = 3;
/// Wait between those tries.
pub const HISTORY_RETRY: Duration = Duration::from_millis(50);

/// Re-attaches, collects or re-runs the prompts `backend` had accepted (after its socket
/// (re)opened, or a gate restart): listed in its `/queue`, they are followed again (a running one
/// is watched from now on); finished while nobody listened, their entry is collected; neither,
/// they were lost and run again. Prompts being sent right now are left to their forward.
pub async fn reconcile(sched: &Arc<Scheduler>, backend: usize) {
    let b = sched.fleet.get(backend).clone();
    let ids = sched.lock().table.accepted_ids(b.name());
    if ids.is_empty() {
        return;
    }
    let mut queue = None;
    for _ in 0..HISTORY_TRIES {
        match sched.fleet.upstream.get_json(&b.config, "/queue").await {
            Ok((status, q)) if status.is_success() => {
                queue = Some(q);
                break;
            }
            _ => tokio::time::sleep(HISTORY_RETRY).await,
        }
    }
    let Some(queue) = queue else {
        // Not answering: its health decides (a backend that goes down gives its prompts back).
        return;
    };
    let mut lost = Vec::new();
    for id in ids {
        if queue_lists(&queue, &id) {
            let running = queue_runs(&queue, &id);
            sched.lock().table.reattached(&id, b.name(), running);
            continue;
        }
        match fetch_history(sched, backend, &id).await {
            Some(entry) => {
                if sched.lock().table.ran(&id, b.name()) {
                    sched.end(&id, Outcome::Ran(entry));
                }
            }
            None => lost.push(id),
        }
    }
    if !lost.is_empty() {
        sched.give_back(backend, &lost, true, "backend_lost");
    }
}

/// Drains a backend: no new prompts; prompts waiting in its queue (not started) are taken off
/// it and go back to the head of the gate queue (not counted as failures). Returns the ids
/// moved.
pub async fn drain(sched: &Arc<Scheduler>, backend: usize) -> Vec<String> {
    sched.fleet.set_draining(backend, true);
    take_back_unstarted(sched, backend).await
}

/// Takes the prompts waiting in a backend's queue (sent, not started) off it and puts them back
/// at the head of the gate queue (not counted as failures); for a backend that takes no new
/// work (drained, retired). Returns the ids moved.
pub async fn take_back_unstarted(sched: &Arc<Scheduler>, backend: usize) -> Vec<String> {
    let b = sched.fleet.get(backend);
    let not_started = |r: &PromptRecord| {
        r.owner.as_deref() == Some(b.name()) && r.stage == Stage::OnBackend && !r.started
    };
    let waiting: Vec<String> = sched
        .lock()
        .table
        .records()
        .filter(|r| not_started(r))
        .map(|r| r.id.clone())
        .collect();
    if waiting.is_empty() {
        return waiting;
    }
    let upstream = &sched.fleet.upstream;
    let _ = upstream
        .post_json(&b.config, "/queue", &json!({ "delete": waiting }))
        .await;
    let Ok((_, queue)) = upstream.get_json(&b.config, "/queue").await else {
        return Vec::new();
    };
    let mut moved = Vec::new();
    for id in waiting {
        let gone =
            !queue_lists(&queue, &id) && sched.lock().table.get(&id).is_some_and(not_started);
        // Not listed because it ran meanwhile? Its history would say so; then its end is coming.
        if gone && fetch_history(sched, backend, &id).await.is_none() {
            moved.push(id);
        }
    }
    sched.give_back(backend, &moved, false, "taken_back");
    moved
}

/// Rewrites a backend's queue item or history `prompt` tuple to the client's view.
pub fn restore_item(sched: &Scheduler, backend: usize, item: &mut Value) {
    let Some(id) = item.get(1).and_then(Value::as_str).map(str::to_string) else {
        return;
    };
    let b = sched.fleet.get(backend);
    let s = sched.lock();
    let rec = s
        .table
        .get(&id)
        .filter(|r| r.owner.as_deref() == Some(b.name()));
    if let Some(extra) = item.get_mut(3).and_then(Value::as_object_mut) {
        let ours =
            extra.get("client_id").and_then(Value::as_str) == Some(b.upstream_client_id.as_str());
        if ours {
            extra.remove("client_id");
            if let Some(cid) = rec.and_then(|r| r.client_id.clone()) {
                extra.insert("client_id".into(), json!(cid));
            }
        }
        if let Some(r) = rec {
            extra.insert("create_time".into(), json!(r.create_time));
        }
    }
    if let (Some(r), Some(slot)) = (rec, item.get_mut(0)) {
        *slot = json!(r.number);
    }
    // The backend ran a copy whose file references may name files placed there for it
    // (`files::place`); the entry shows the prompt the client sent.
    if let (Some(r), Some(slot)) = (rec, item.get_mut(2))
        && let Some(prompt) = r.body.get("prompt")
    {
        *slot = prompt.clone();
    }
}

/// A backend's history entry as the client sees it.
pub fn restore_entry(sched: &Scheduler, backend: usize, entry: &mut Value) {
    if let Some(item) = entry.get_mut("prompt") {
        restore_item(sched, backend, item);
    }
    if let Some(outputs) = entry.get_mut("outputs") {
        sched
            .files
            .alias_outputs(sched.fleet.get(backend).name(), outputs);
    }
}

/// Output node ids of a prompt, by any backend's node definitions.
pub fn output_nodes_of(sched: &Scheduler, prompt: &Value) -> Vec<String> {
    let caps: Vec<_> = sched
        .fleet
        .backends()
        .iter()
        .filter_map(|b| b.capabilities.load_full())
        .collect();
    prompt
        .as_object()
        .into_iter()
        .flat_map(|m| m.iter())
        .filter(|(_, n)| {
            let class = n["class_type"].as_str().unwrap_or("");
            caps.iter().any(|c| c.is_output(class))
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// Keeps what a run's events say, for a history entry written from them.
pub fn log_event(r: &mut PromptRecord, kind: &str, data: &Value) {
    match kind {
        "execution_start"
        | "execution_cached"
        | "execution_success"
        | "execution_error"
        | "execution_interrupted" => {
            r.log.messages.push(json!([kind, data]));
        }
        "executed" => {
            if let Some(node) = data["node"].as_str()
                && !data["output"].is_null()
            {
                r.log
                    .outputs
                    .insert(node.to_string(), data["output"].clone());
                let mut meta = Map::new();
                meta.insert("node_id".into(), json!(node));
                meta.insert("display_node".into(), data["display_node"].clone());
                meta.insert("parent_node".into(), Value::Null);
                meta.insert("real_node_id".into(), json!(node));
                r.log.meta.insert(node.to_string(), Value::Object(meta));
            }
        }
        _ => {}
    }
}

/// The owner's `/history/{id}` entry, shown as from one ComfyUI.
pub async fn fetch_history(sched: &Scheduler, backend: usize, id: &str) -> Option<Value> {
    let b = sched.fleet.get(backend).clone();
    let path = format!("/history/{}", crate::fleet::upstream::encode_segment(id));
    for _ in 0..HISTORY_TRIES {
        if let Ok((code, mut v)) = sched.fleet.upstream.get_json(&b.config, &path).await
            && code.is_success()
            && let Some(entry) = v.get_mut(id)
        {
            let mut entry = entry.take();
            restore_entry(sched, backend, &mut entry);
            return Some(entry);
        }
        tokio::time::sleep(HISTORY_RETRY).await;
    }
    None
}

/// A history entry written from the events the gate saw (the backend could not give one).
pub fn history_from_events(sched: &Scheduler, id: &str) -> Value {
    let s = sched.lock();
    let Some(r) = s.table.get(id) else {
        return Value::Null;
    };
    let success = r.log.messages.iter().any(|m| m[0] == "execution_success");
    let outputs = output_nodes_of(sched, &r.body["prompt"]);
    json!({
        "prompt": r.queue_item(outputs),
        "outputs": r.log.outputs,
        "status": { "status_str": if success { "success" } else { "error" }, "completed": success, "messages": r.log.messages },
        "meta": r.log.meta,
    })
}

/// Prompts going back to the gate queue when their backend failed (`requeue`, `evacuate`).
impl Scheduler {
    /// [`Scheduler::requeue`] of those of `ids` that still hold a slot on `backend` (a prompt
    /// that finished or moved meanwhile is not given back twice).
    pub fn give_back(&self, backend: usize, ids: &[String], failure: bool, reason: &'static str) {
        self.requeue_from(Some(self.fleet.get(backend).name()), ids, failure, reason);
    }

    /// Puts prompts back at the head of the gate queue. `failure` counts the run against
    /// `max_retries`; a prompt out of retries ends failed instead. `reason`, one fixed word
    /// (`backend_failed`, `backend_lost`, `stalled`, `taken_back`, `out_of_memory`,
    /// `max_run_time`), goes on its timeline and labels `comfy_gate_prompts_retried_total`
    /// (a run lost, or one to run again) or `comfy_gate_prompts_evacuated_total` (moved before
    /// it ran there).
    pub fn requeue(&self, ids: &[String], failure: bool, reason: &'static str) {
        self.requeue_from(None, ids, failure, reason);
    }

    /// [`Scheduler::requeue`]; with `from`, only prompts that still hold a slot there, checked
    /// under the same lock.
    fn requeue_from(
        &self,
        from: Option<&str>,
        ids: &[String],
        failure: bool,
        reason: &'static str,
    ) {
        let metrics = self.fleet.metrics.on();
        let label = crate::metrics::ReasonLabel { reason };
        let mut back = Vec::new();
        let mut out_of_retries = Vec::new();
        let mut quarantined = Vec::new();
        {
            let mut s = self.lock();
            // A failure a dispatch broke is that prompt's alone (see `quarantine`).
            let explained = from.is_some_and(|b| quarantine::explained(&s, b));
            for id in ids {
                let Some(r) = s.table.get_mut(id) else {
                    continue;
                };
                let still_there = from.is_none_or(|b| r.holds_slot(Some(b)));
                if r.stage == Stage::Done || !still_there {
                    continue;
                }
                let owner = r.owner.clone();
                if let Some(o) = owner.clone()
                    && !r.tried.contains(&o)
                {
                    r.tried.push(o);
                }
                // Only a prompt running there when it failed is charged (and suspected); one
                // that merely waited in its queue runs again for free.
                let charged = failure && r.started && !explained;
                if charged {
                    r.attempts += 1;
                }
                let is_retry = charged || r.retry_after_run;
                let attempts = r.attempts;
                let out_of_retries_now = attempts > self.config.load().recovery.max_retries;
                if let (true, Some(o)) = (charged, owner.as_deref()) {
                    let after = self.config.load().recovery.quarantine_after;
                    let suspected = quarantine::suspect(&mut s, id, o, after);
                    if let (Some(on), false) = (suspected, out_of_retries_now) {
                        quarantined.push((id.clone(), on));
                        continue;
                    }
                }
                if out_of_retries_now {
                    out_of_retries.push((id.clone(), attempts, owner));
                    continue;
                }
                if let Some(m) = metrics {
                    let counted = if is_retry {
                        &m.prompts_retried
                    } else {
                        &m.prompts_evacuated
                    };
                    counted.get_or_create(&label).inc();
                }
                if let Some(r) = s.table.get_mut(id) {
                    let reason = reason.to_string();
                    r.timeline
                        .mark(crate::protocol::now_ms(), Happened::Requeued { reason });
                }
                back.push(id.clone());
            }
            s.table.enqueue_front(&back);
        }
        let refs: Vec<&str> = back.iter().map(String::as_str).collect();
        self.persist(&refs);
        for (id, on) in quarantined {
            self.quarantine(&id, &on);
        }
        for (id, attempts, owner) in out_of_retries {
            let message = format!(
                "the prompt was lost {attempts} times to failed backends (last: {}); max_retries is {}",
                owner.unwrap_or_default(),
                self.config.load().recovery.max_retries
            );
            self.end(
                &id,
                Outcome::Failed(Failure::gate("BackendFailed", message)),
            );
        }
        if !back.is_empty() {
            tracing::info!(prompts = ?back, "prompts returned to the gate queue");
            self.broadcast_status();
            self.wake();
        }
    }

    /// A backend failed: every prompt on it goes back to the gate queue (counted as a
    /// failure), and the backend is asked to drop them, in case it is alive but stuck, so they
    /// do not run twice.
    pub fn evacuate(self: &Arc<Self>, backend: usize, reason: &str) {
        let b = self.fleet.get(backend).clone();
        let ids: Vec<String> = {
            let s = self.lock();
            s.table
                .records()
                .filter(|r| r.holds_slot(Some(b.name())))
                .map(|r| r.id.clone())
                .collect()
        };
        if ids.is_empty() {
            return;
        }
        tracing::warn!(
            backend = b.name(),
            reason,
            prompts = ids.len(),
            "moving prompts off a failed backend"
        );
        let fleet = self.fleet.clone();
        let stale = ids.clone();
        tokio::spawn(async move {
            let body = json!({ "delete": stale });
            let _ = fleet.upstream.post_json(&b.config, "/queue", &body).await;
            for id in &stale {
                let _ = fleet
                    .upstream
                    .post_json(&b.config, "/interrupt", &json!({ "prompt_id": id }))
                    .await;
            }
        });
        self.give_back(backend, &ids, true, "backend_failed");
    }
}
