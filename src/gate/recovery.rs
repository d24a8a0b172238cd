//! Nothing accepted is lost (design §2 "Recovery").
//!
//! - A finished prompt's history entry is collected from its backend (or written from the
//!   events the gate saw) and persisted before its client hears `executing {node: null}`.
//! - A backend that goes down, stalls, or loses prompts gives its unfinished prompts back: they
//!   return to the head of the gate queue with the same id and number, up to `max_retries`;
//!   after that the client gets `execution_error` and an error history entry saying why.
//! - A prompt past `max_run_time` is interrupted and reported (or retried).
//! - After a restart, prompts that were on backends are re-attached, collected or re-run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::Gate;
use super::prompts::{PromptRecord, Stage};
use crate::config::RunTimeAction;
use crate::protocol::now_ms;

impl Gate {
    /// Persists the current state of some records and the number counter, durably.
    pub fn try_persist(&self, ids: &[&str]) -> Result<(), super::store::StoreError> {
        let (records, counter): (Vec<PromptRecord>, i64) = {
            let t = self.lock_prompts();
            (
                ids.iter().filter_map(|id| t.get(id).cloned()).collect(),
                t.counter(),
            )
        };
        let refs: Vec<&PromptRecord> = records.iter().collect();
        self.store.save(&refs, Some(counter))
    }

    /// [`Gate::try_persist`], logging a failure (the state in memory stays authoritative).
    pub fn persist(&self, ids: &[&str]) {
        if let Err(e) = self.try_persist(ids) {
            tracing::error!(error = %e, "could not persist prompt state");
        }
    }

    /// Stores a finished prompt's history entry (memory and disk), bounded by count and age.
    pub(super) fn keep_history(&self, id: &str, entry: Value) {
        let finished_at = completion_time(&entry).unwrap_or_else(now_ms);
        let record = self.lock_prompts().get(id).cloned();
        if let Some(r) = &record
            && let Err(e) = self.store.save_history(r, finished_at, &entry)
        {
            tracing::error!(error = %e, prompt = id, "could not persist a history entry");
        }
        let dropped = {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            h.shift_remove(id);
            h.insert(id.to_string(), (finished_at, Arc::new(entry)));
            let max_age_ms = self.config.recovery.history_max_age_hours as i64 * 3_600_000;
            let mut dropped = Vec::new();
            while let Some((oldest, (t, _))) = h.first() {
                if h.len() > self.config.recovery.history_max_entries || now_ms() - *t > max_age_ms
                {
                    dropped.push(oldest.clone());
                    h.shift_remove_index(0);
                } else {
                    break;
                }
            }
            dropped
        };
        if !dropped.is_empty() {
            let mut t = self.lock_prompts();
            for id in &dropped {
                t.remove(id);
            }
            drop(t);
            if let Err(e) = self.store.remove(&dropped) {
                tracing::error!(error = %e, "could not prune history");
            }
        }
    }

    /// Drops a history entry the gate holds (`POST /history` delete).
    pub fn forget_history(&self, id: &str) {
        let removed = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shift_remove(id)
            .is_some();
        if removed && let Err(e) = self.store.delete_history(id) {
            tracing::error!(error = %e, "could not delete a history entry");
        }
    }

    /// A history entry the gate holds (shared: entries do not change once kept).
    pub fn gate_history(&self, id: &str) -> Option<Arc<Value>> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|(_, e)| e.clone())
    }

    /// The prompt's final `executing {node: null}` arrived from `backend`: free the slot, then
    /// (in the background) collect and persist its history before the client hears it ended.
    pub fn completed(self: &Arc<Self>, backend: usize, id: &str) {
        let (retry, client) = {
            let t = self.lock_prompts();
            match t.get(id) {
                Some(r)
                    if r.owner == Some(backend)
                        && matches!(r.stage, Stage::Dispatching | Stage::OnBackend) =>
                {
                    (r.retry_after_run, r.client_id.clone())
                }
                _ => return,
            }
        };
        if retry {
            self.finish_without_done(backend, id);
            self.requeue(&[id.to_string()], false);
            return;
        }
        self.learn_from_run(backend, id);
        self.finish(backend, id);
        let gate = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let entry = match gate.fetch_history(backend, &id).await {
                Some(e) => e,
                None => gate.history_from_events(&id),
            };
            gate.keep_history(&id, entry);
            if let Some(sid) = client {
                gate.sessions.send_json(
                    &sid,
                    "executing",
                    json!({ "node": null, "prompt_id": id }),
                );
            }
        });
    }

    /// A prompt ran to its end on `backend`: its run time teaches the placement.
    fn learn_from_run(&self, backend: usize, id: &str) {
        let (prompt, started_at, load) = {
            let t = self.lock_prompts();
            let Some(r) = t.get(id) else { return };
            (r.body["prompt"].clone(), r.started_at, r.load_measured_s)
        };
        if let Some(at) = started_at {
            let prof = super::placement::profile::profile(&prompt);
            self.learned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe_run(backend, &prof, at.elapsed().as_secs_f64(), load);
        }
    }

    /// The owner's `/history/{id}` entry, shown as from one ComfyUI.
    async fn fetch_history(&self, backend: usize, id: &str) -> Option<Value> {
        let b = self.backend(backend).clone();
        let path = format!("/history/{}", super::routes::encode_segment(id));
        for _ in 0..3 {
            if let Ok((code, mut v)) = self.upstream.get_json(&b.config, &path).await
                && code.is_success()
                && let Some(entry) = v.get_mut(id)
            {
                let mut entry = entry.take();
                self.restore_entry(backend, &mut entry);
                return Some(entry);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// A history entry written from the events the gate saw (the backend could not give one).
    fn history_from_events(&self, id: &str) -> Value {
        let t = self.lock_prompts();
        let Some(r) = t.get(id) else {
            return Value::Null;
        };
        let success = r.log.messages.iter().any(|m| m[0] == "execution_success");
        let outputs = self.output_nodes_of(&r.body["prompt"]);
        json!({
            "prompt": r.queue_item(outputs),
            "outputs": r.log.outputs,
            "status": { "status_str": if success { "success" } else { "error" }, "completed": success, "messages": r.log.messages },
            "meta": r.log.meta,
        })
    }

    /// Ends a prompt as failed at the gate: `execution_error` and `executing {node: null}` to its
    /// client, an error history entry saying why.
    pub fn fail_prompt(
        &self,
        id: &str,
        exception_type: &str,
        message: &str,
        extra: Option<(&str, Value)>,
    ) {
        let (client, owner, entry, error) = {
            let mut t = self.lock_prompts();
            let Some(r) = t.get_mut(id) else { return };
            if r.stage == Stage::Done {
                return;
            }
            let owner = r
                .owner
                .filter(|_| matches!(r.stage, Stage::Dispatching | Stage::OnBackend));
            let mut error = json!({
                "prompt_id": id, "node_id": null, "node_type": null, "executed": [],
                "exception_message": message, "exception_type": exception_type,
                "traceback": [], "current_inputs": {}, "current_outputs": [],
                "timestamp": now_ms(),
            });
            if let Some((k, v)) = extra {
                error[k] = v;
            }
            let mut messages = r.log.messages.clone();
            messages.retain(|m| m[0] == "execution_start" || m[0] == "execution_cached");
            messages.push(json!(["execution_error", error]));
            r.retry_after_run = false;
            r.deadline_interrupt = None;
            r.stage = Stage::Done;
            let entry = json!({
                "prompt": r.queue_item(Vec::new()),
                "outputs": {},
                "status": { "status_str": "error", "completed": false, "messages": messages },
                "meta": {},
            });
            (r.client_id.clone(), owner, entry, error)
        };
        self.lock_prompts().unqueue(id);
        if let Some(o) = owner {
            self.backend(o).release_slot();
            self.wake.notify_one();
        }
        self.keep_history(id, entry);
        if let Some(sid) = client {
            self.sessions.send_json(&sid, "execution_error", error);
            self.sessions
                .send_json(&sid, "executing", json!({ "node": null, "prompt_id": id }));
        }
        self.broadcast_status();
    }

    /// Puts prompts back at the head of the gate queue. `failure` counts the run against
    /// `max_retries`; a prompt out of retries is reported failed instead.
    pub fn requeue(&self, ids: &[String], failure: bool) {
        let mut back = Vec::new();
        let mut out_of_retries = Vec::new();
        {
            let mut t = self.lock_prompts();
            for id in ids {
                let Some(r) = t.get_mut(id) else { continue };
                if r.stage == Stage::Done {
                    continue;
                }
                if let Some(o) = r.owner
                    && !r.tried.contains(&o)
                {
                    r.tried.push(o);
                }
                if failure {
                    r.attempts += 1;
                }
                if r.attempts > self.config.recovery.max_retries {
                    out_of_retries.push((id.clone(), r.attempts, r.owner));
                } else {
                    back.push(id.clone());
                }
            }
            t.enqueue_front(&back);
        }
        let refs: Vec<&str> = back.iter().map(String::as_str).collect();
        self.persist(&refs);
        for (id, attempts, owner) in out_of_retries {
            let name = owner
                .map(|o| self.backend(o).name().to_string())
                .unwrap_or_default();
            self.fail_prompt(
                &id,
                "comfy_gate.BackendFailed",
                &format!("the prompt was lost {attempts} times to failed backends (last: {name}); max_retries is {}", self.config.recovery.max_retries),
                None,
            );
        }
        if !back.is_empty() {
            tracing::info!(prompts = ?back, "prompts returned to the gate queue");
            self.broadcast_status();
            self.wake.notify_one();
        }
    }

    /// A backend failed: every prompt on it goes back to the gate queue (counted as a failure).
    pub fn evacuate(self: &Arc<Self>, backend: usize, reason: &str) {
        let ids: Vec<String> = {
            let t = self.lock_prompts();
            t.records()
                .filter(|r| {
                    r.owner == Some(backend)
                        && matches!(r.stage, Stage::Dispatching | Stage::OnBackend)
                })
                .map(|r| r.id.clone())
                .collect()
        };
        let b = self.backend(backend).clone();
        *b.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
        b.inflight.store(0, Ordering::SeqCst);
        if ids.is_empty() {
            return;
        }
        tracing::warn!(
            backend = b.name(),
            reason,
            prompts = ids.len(),
            "moving prompts off a failed backend"
        );
        // If the backend is alive but stuck, take the prompts off it so they do not run twice.
        let gate = self.clone();
        let stale = ids.clone();
        tokio::spawn(async move {
            let body = json!({ "delete": stale });
            let _ = gate.upstream.post_json(&b.config, "/queue", &body).await;
            for id in &stale {
                let _ = gate
                    .upstream
                    .post_json(&b.config, "/interrupt", &json!({ "prompt_id": id }))
                    .await;
            }
        });
        self.requeue(&ids, true);
    }

    /// After the upstream socket (re)opens, or after a gate restart: prompts the gate believes
    /// are on this backend are followed (still listed), collected (finished while nobody
    /// listened) or re-run (lost).
    pub async fn reconcile(self: &Arc<Self>, backend: usize) {
        let ids: Vec<String> = self
            .lock_prompts()
            .records()
            .filter(|r| {
                r.owner == Some(backend) && matches!(r.stage, Stage::Dispatching | Stage::OnBackend)
            })
            .map(|r| r.id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let b = self.backend(backend).clone();
        let Ok((_, queue)) = self.upstream.get_json(&b.config, "/queue").await else {
            return;
        };
        let mut lost = Vec::new();
        for id in ids {
            if super::prompts::queue_lists(&queue, &id) {
                if let Some(r) = self.lock_prompts().get_mut(&id) {
                    r.stage = Stage::OnBackend;
                    r.last_event = Some(Instant::now());
                }
                continue;
            }
            match self.fetch_history(backend, &id).await {
                Some(entry) => {
                    let client = self
                        .lock_prompts()
                        .get(&id)
                        .and_then(|r| r.client_id.clone());
                    self.finish(backend, &id);
                    self.keep_history(&id, entry);
                    if let Some(sid) = client {
                        self.sessions.send_json(
                            &sid,
                            "executing",
                            json!({ "node": null, "prompt_id": id }),
                        );
                    }
                }
                None => {
                    self.finish_without_done(backend, &id);
                    lost.push(id);
                }
            }
        }
        if !lost.is_empty() {
            self.requeue(&lost, true);
        }
    }

    /// Frees a lost prompt's slot without marking it finished.
    fn finish_without_done(&self, backend: usize, id: &str) {
        let b = self.backend(backend);
        let mut running = b.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.as_deref() == Some(id) {
            *running = None;
        }
        b.release_slot();
    }

    /// Drains a backend: no new prompts; prompts waiting in its queue (not started) are taken
    /// off it and go back to the head of the gate queue (not counted as failures). Returns the
    /// ids moved.
    pub async fn drain(self: &Arc<Self>, backend: usize) -> Vec<String> {
        let b = self.backend(backend).clone();
        b.draining.store(true, Ordering::SeqCst);
        let waiting: Vec<String> = self
            .lock_prompts()
            .records()
            .filter(|r| r.owner == Some(backend) && r.stage == Stage::OnBackend && !r.started)
            .map(|r| r.id.clone())
            .collect();
        if waiting.is_empty() {
            return waiting;
        }
        let _ = self
            .upstream
            .post_json(&b.config, "/queue", &json!({ "delete": waiting }))
            .await;
        let Ok((_, queue)) = self.upstream.get_json(&b.config, "/queue").await else {
            return Vec::new();
        };
        let moved: Vec<String> = waiting
            .into_iter()
            .filter(|id| !super::prompts::queue_lists(&queue, id))
            .filter(|id| {
                self.lock_prompts()
                    .get(id)
                    .is_some_and(|r| !r.started && r.stage == Stage::OnBackend)
            })
            .collect();
        for id in &moved {
            self.finish_without_done(backend, id);
        }
        self.requeue(&moved, false);
        moved
    }

    pub fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }

    /// Stall detection and `max_run_time`, checked a few times a second.
    fn check_deadlines(self: &Arc<Self>) {
        let stall = self.config.stall_timeout();
        let max_run = self.config.max_run_time();
        let grace = stall
            .min(Duration::from_secs(30))
            .max(Duration::from_secs(2));
        let mut stalled_backends = Vec::new();
        let mut to_interrupt = Vec::new();
        let mut to_fail = Vec::new();
        {
            let mut t = self.lock_prompts();
            let ids: Vec<String> = t
                .records()
                .filter(|r| r.stage == Stage::OnBackend && r.started)
                .map(|r| r.id.clone())
                .collect();
            for id in ids {
                let Some(r) = t.get_mut(&id) else { continue };
                let owner = r.owner.unwrap_or(0);
                if let Some(at) = r.deadline_interrupt {
                    if at.elapsed() > grace {
                        to_fail.push((id.clone(), owner));
                    }
                    continue;
                }
                if r.started_at.is_some_and(|s| s.elapsed() > max_run) {
                    r.deadline_interrupt = Some(Instant::now());
                    if self.config.recovery.max_run_time_action == RunTimeAction::Retry {
                        r.retry_after_run = true;
                        r.attempts += 1;
                    }
                    to_interrupt.push((id.clone(), owner));
                    continue;
                }
                if r.last_event.is_some_and(|e| e.elapsed() > stall)
                    && !stalled_backends.contains(&owner)
                {
                    stalled_backends.push(owner);
                }
            }
        }
        for (id, owner) in to_interrupt {
            tracing::warn!(prompt = id, "prompt exceeded max_run_time; interrupting it");
            let gate = self.clone();
            tokio::spawn(async move {
                let b = gate.backend(owner).clone();
                let _ = gate
                    .upstream
                    .post_json(&b.config, "/interrupt", &json!({ "prompt_id": id }))
                    .await;
            });
        }
        for (id, owner) in to_fail {
            // The interrupt did not end it: the backend is stuck. Report and move on.
            self.fail_prompt(
                &id,
                "comfy_gate.MaxRunTimeExceeded",
                &format!("the prompt ran longer than max_run_time ({} s) and did not stop when interrupted", max_run.as_secs()),
                None,
            );
            self.mark_stalled(owner, "an interrupted prompt did not stop");
        }
        for b in stalled_backends {
            self.mark_stalled(b, "a running prompt made no progress within stall_timeout");
        }
        // A backend that is down gives its prompts back.
        let down: Vec<usize> = self
            .backends
            .iter()
            .filter(|b| b.health() == super::fleet::Health::Down)
            .map(|b| b.id)
            .collect();
        for b in down {
            let has_prompts = self.lock_prompts().records().any(|r| {
                r.owner == Some(b) && matches!(r.stage, Stage::Dispatching | Stage::OnBackend)
            });
            if has_prompts {
                self.evacuate(b, "the backend is down");
            }
        }
    }

    /// A backend that accepts work but makes no progress: down until it shows life again.
    pub fn mark_stalled(self: &Arc<Self>, backend: usize, reason: &str) {
        let b = self.backend(backend).clone();
        b.stalled.store(true, Ordering::SeqCst);
        if b.force_down() {
            self.fleet_generation.fetch_add(1, Ordering::SeqCst);
        }
        self.evacuate(backend, reason);
    }
}

/// The timestamp of an entry's last status message.
pub fn completion_time(entry: &Value) -> Option<i64> {
    entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m[1]["timestamp"].as_i64())
}

/// Runs the deadline checks until the gate stops.
pub async fn watchdog_loop(gate: Arc<Gate>) {
    loop {
        tokio::select! {
            _ = gate.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        gate.check_deadlines();
    }
}

/// Logs kept per run for [`Gate::history_from_events`].
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
