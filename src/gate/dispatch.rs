//! Admission and late binding: `POST /prompt` records the prompt, then forwards it at once if a
//! slot is free (returning the backend's answer verbatim) or holds it in the gate queue; the
//! dispatcher sends queued prompts, lowest `number` first, whenever a slot frees.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::Gate;
use super::placement::{Choice, Need};
use super::placing::Placement;
use super::prompts::{PromptRecord, Stage};
use crate::error::GateError;
use crate::http::{Body, json as json_resp};
use crate::protocol::{errors, now_ms};

/// What a backend said to a forwarded prompt.
enum Forwarded {
    /// 200: the prompt is the backend's now.
    Accepted(Bytes),
    /// 400 (validation): it will never run there.
    Rejected(Bytes),
    /// Connection error or unexpected status: nothing was applied.
    Failed,
}

impl Gate {
    /// `POST /prompt`.
    pub async fn submit(
        self: &Arc<Self>,
        identity: String,
        body: &[u8],
    ) -> Result<Response<Body>, GateError> {
        let mut data: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(GateError::BadRequest(
                    "the body must be a JSON object".into(),
                ));
            }
            Err(e) => return Err(GateError::BadJson(e.to_string())),
        };
        if !data.contains_key("prompt") {
            return Ok(json_resp(StatusCode::BAD_REQUEST, &errors::no_prompt()));
        }
        if !data["prompt"].is_object() {
            return Err(GateError::BadRequest(
                "`prompt` must be an object of nodes".into(),
            ));
        }
        if let Some(refusal) = self.refusal(&data["prompt"]) {
            return Ok(json_resp(StatusCode::BAD_REQUEST, &refusal));
        }
        if data.get("extra_data").is_some_and(|e| !e.is_object()) {
            return Err(GateError::BadRequest(
                "`extra_data` must be an object".into(),
            ));
        }
        let id = match data.remove("prompt_id") {
            Some(v) => errors::python_str(&v),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let client_id = data.remove("client_id").map(|v| errors::python_str(&v));
        let front = data
            .remove("front")
            .is_some_and(|v| v.as_bool().unwrap_or(!v.is_null()));
        let explicit = data.remove("number");
        let direct = {
            let _reserve = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
            let mut table = self.lock_prompts();
            if table.contains(&id) {
                return Err(GateError::DuplicatePromptId(id));
            }
            let number = match explicit {
                Some(Value::Number(n)) => {
                    let f = n.as_f64().unwrap_or(0.0);
                    serde_json::Number::from_f64(f)
                        .ok_or_else(|| GateError::BadRequest("`number` must be finite".into()))?
                }
                Some(_) => return Err(GateError::BadRequest("`number` must be a number".into())),
                None => table.next_number(front),
            };
            table.insert(PromptRecord::new(
                id.clone(),
                number,
                data,
                client_id,
                identity,
            ));
            let slot = if table.queue_len() == 0 {
                self.reserve_slot(&mut table, &id)
            } else {
                None
            };
            match slot {
                Some(b) => {
                    let r = table.get_mut(&id).expect("just inserted");
                    r.stage = Stage::Dispatching;
                    r.owner = Some(b);
                    Some(b)
                }
                None => {
                    table.enqueue(&id);
                    None
                }
            }
        };
        // Durable before anyone hears of it: a gate killed from here on still runs it.
        if let Err(e) = self.try_persist(&[&id]) {
            let mut t = self.lock_prompts();
            t.remove(&id);
            if let Some(b) = direct {
                self.backend(b).release_slot();
            }
            return Err(GateError::Unavailable(e.to_string()));
        }
        let number = self.lock_prompts().get(&id).map(|r| r.number.clone());
        let queued_answer = || {
            json_resp(
                StatusCode::OK,
                &json!({ "prompt_id": id, "number": number, "node_errors": {} }),
            )
        };
        let Some(backend) = direct else {
            self.broadcast_status();
            self.wake.notify_one();
            return Ok(queued_answer());
        };
        match self.forward(&id, backend).await {
            Forwarded::Accepted(body) => {
                // The backend echoes the explicit number as a float; show the gate's own.
                let mut answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if answer.is_object() {
                    answer["number"] = json!(number);
                    return Ok(json_resp(StatusCode::OK, &answer));
                }
                Ok(raw_json(StatusCode::OK, body))
            }
            Forwarded::Rejected(body) => {
                self.lock_prompts().remove(&id);
                if let Err(e) = self.store.remove(std::slice::from_ref(&id)) {
                    tracing::error!(error = %e, "could not forget a refused prompt");
                }
                Ok(raw_json(StatusCode::BAD_REQUEST, body))
            }
            Forwarded::Failed => {
                self.lock_prompts().enqueue(&id);
                self.persist(&[&id]);
                self.broadcast_status();
                self.wake.notify_one();
                Ok(queued_answer())
            }
        }
    }

    /// Chooses and reserves a backend for `id` (none if it should wait); the caller holds
    /// `reserve`.
    fn reserve_slot(&self, table: &mut super::prompts::PromptTable, id: &str) -> Option<usize> {
        let outlooks = self.outlooks(table);
        let Placement::Place(choice, need, expected, _) =
            self.choose(table.get(id)?, false, &outlooks)
        else {
            return None;
        };
        let r = table.get_mut(id)?;
        Some(self.commit(r, choice, need, expected))
    }

    /// Sends a recorded prompt to `backend` (whose slot is reserved) and settles the slot on
    /// failure.
    async fn forward(&self, id: &str, backend: usize) -> Forwarded {
        let b = self.backend(backend).clone();
        let body = {
            let t = self.lock_prompts();
            let Some(r) = t.get(id) else {
                b.release_slot();
                return Forwarded::Failed;
            };
            let mut body = r.body.clone();
            body.insert("prompt_id".into(), json!(r.id));
            body.insert("number".into(), json!(r.number));
            body.insert("client_id".into(), json!(b.upstream_client_id));
            body
        };
        if let Err(e) = self
            .files
            .ensure_inputs(self, backend, &body["prompt"])
            .await
        {
            tracing::warn!(backend = b.name(), error = %e, "could not place uploads on backend");
            self.record_health(backend, false);
            b.release_slot();
            return Forwarded::Failed;
        }
        let result = self
            .upstream
            .post_json(&b.config, "/prompt", &Value::Object(body))
            .await;
        match result {
            Ok((status, bytes)) if status == StatusCode::OK => {
                if let Some(r) = self.lock_prompts().get_mut(id)
                    && r.stage == Stage::Dispatching
                {
                    r.stage = Stage::OnBackend;
                    r.last_event = Some(std::time::Instant::now());
                }
                self.persist(&[id]);
                tracing::debug!(prompt = id, backend = b.name(), "dispatched");
                Forwarded::Accepted(bytes)
            }
            Ok((status, bytes)) if status == StatusCode::BAD_REQUEST => {
                b.release_slot();
                self.wake.notify_one();
                Forwarded::Rejected(bytes)
            }
            Ok((status, _)) => {
                tracing::warn!(backend = b.name(), %status, "backend refused a prompt");
                self.record_health(backend, false);
                b.release_slot();
                Forwarded::Failed
            }
            Err(e) => {
                tracing::warn!(error = %e, "forwarding a prompt failed");
                self.record_health(backend, false);
                b.release_slot();
                Forwarded::Failed
            }
        }
    }

    /// A prompt that waited in the gate queue was refused by the backend: report it as ComfyUI
    /// reports a failed run (an `execution_error` on the client's socket and an error history
    /// entry carrying the validation messages).
    fn report_rejected(&self, id: &str, body: &Bytes) {
        let answer: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let error = &answer["error"];
        let node_errors = &answer["node_errors"];
        let first_node = node_errors
            .as_object()
            .and_then(|m| m.keys().next().cloned());
        let (client, message, entry) = {
            let mut t = self.lock_prompts();
            let Some(r) = t.get_mut(id) else { return };
            let node_type = first_node.as_ref().and_then(|n| {
                r.body["prompt"][n]["class_type"]
                    .as_str()
                    .map(str::to_string)
            });
            let message = json!({
                "prompt_id": id,
                "node_id": first_node,
                "node_type": node_type,
                "executed": [],
                "exception_message": validation_message(error, node_errors),
                "exception_type": error["type"].as_str().unwrap_or("prompt_outputs_failed_validation"),
                "traceback": [],
                "current_inputs": {},
                "current_outputs": [],
                "node_errors": node_errors,
                "timestamp": now_ms(),
            });
            let entry = json!({
                "prompt": r.queue_item(Vec::new()),
                "outputs": {},
                "status": { "status_str": "error", "completed": false, "messages": [["execution_error", message]] },
                "meta": {},
            });
            r.stage = Stage::Done;
            (r.client_id.clone(), message, entry)
        };
        self.keep_history(id, entry);
        if let Some(sid) = client {
            self.sessions.send_json(&sid, "execution_error", message);
            self.sessions
                .send_json(&sid, "executing", json!({ "node": null, "prompt_id": id }));
        }
        self.broadcast_status();
    }

    /// Takes the next prompt to dispatch and reserves its slot: the first queued prompt whose
    /// best backend has a free slot. A prompt whose best backend is full waits for it (a hold:
    /// the GPU with its checkpoint resident, say, will finish it sooner) while prompts behind it,
    /// within `affinity_window` holds, go ahead. A prompt passed over `max_skips` times or waiting
    /// `max_wait_ms` no longer waits: it takes the best free backend (aging, so nothing starves).
    fn take_next(&self) -> Option<(String, usize)> {
        let _reserve = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = self.lock_prompts();
        let ids: Vec<String> = table.queued().take(64).map(|r| r.id.clone()).collect();
        let mut held: Vec<String> = Vec::new();
        // What each backend has to do, plus the work the held prompts will add (list
        // scheduling: a prompt behind them sees those backends as busier).
        let mut outlooks = self.outlooks(&table);
        // The first prompt that could go now but would load a checkpoint there: a prompt behind
        // it (within the window) that finds its checkpoint resident goes first (checkpoint
        // switches cost more than most prompts run); else it goes.
        let mut switching: Option<(String, Choice, Need, f64, usize)> = None;
        for id in &ids {
            let Some(r) = table.get(id) else { continue };
            let aged = r.skips >= self.config.placement.max_skips
                || now_ms() - r.create_time >= self.config.placement.max_wait_ms as i64;
            match self.choose(r, aged, &outlooks) {
                Placement::Place(choice, need, expected, loads) => {
                    if loads && !aged {
                        if switching.is_none() {
                            switching = Some((id.clone(), choice, need, expected, held.len()));
                        }
                        continue;
                    }
                    let passed = held.iter().chain(switching.as_ref().map(|s| &s.0));
                    count_skip(&mut table, passed);
                    return self.dispatch_reserved(&mut table, id, choice, need, expected);
                }
                Placement::Hold(backend, adds) => {
                    let h = outlooks.entry(backend).or_default();
                    h.busy_s += adds.busy_s;
                    if adds.checkpoint.is_some() {
                        h.checkpoint = adds.checkpoint;
                    }
                    held.push(id.clone());
                    if held.len() >= self.config.placement.affinity_window {
                        break;
                    }
                }
                Placement::Nowhere => {}
            }
        }
        let (id, choice, need, expected, held_ahead) = switching?;
        count_skip(&mut table, &held[..held_ahead]);
        self.dispatch_reserved(&mut table, &id, choice, need, expected)
    }

    fn dispatch_reserved(
        &self,
        table: &mut super::prompts::PromptTable,
        id: &str,
        choice: Choice,
        need: Need,
        expected: f64,
    ) -> Option<(String, usize)> {
        let r = table.get_mut(id)?;
        let backend = self.commit(r, choice, need, expected);
        table.unqueue(id);
        let r = table.get_mut(id)?;
        r.stage = Stage::Dispatching;
        r.owner = Some(backend);
        Some((id.to_string(), backend))
    }
}

/// The prompts `passed` were passed over once more (aging).
fn count_skip<'a>(
    table: &mut super::prompts::PromptTable,
    passed: impl IntoIterator<Item = &'a String>,
) {
    for id in passed {
        if let Some(r) = table.get_mut(id) {
            r.skips += 1;
        }
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

fn raw_json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(crate::http::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// Sends queued prompts while slots are free; sleeps until woken (or a short tick).
pub async fn dispatcher_loop(gate: Arc<Gate>) {
    loop {
        while let Some((id, backend)) = gate.take_next() {
            gate.persist(&[&id]);
            let gate = gate.clone();
            tokio::spawn(async move {
                match gate.forward(&id, backend).await {
                    Forwarded::Accepted(_) => {}
                    Forwarded::Rejected(body) => gate.report_rejected(&id, &body),
                    Forwarded::Failed => {
                        gate.lock_prompts().enqueue_front(std::slice::from_ref(&id));
                        gate.persist(&[&id]);
                        gate.wake.notify_one();
                    }
                }
            });
        }
        tokio::select! {
            _ = gate.stop.cancelled() => return,
            _ = gate.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
