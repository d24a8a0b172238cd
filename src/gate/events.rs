//! One upstream WebSocket per backend, under the gate's clientId (design §2). Every event of
//! every prompt arrives here; each is routed to the client that owns its prompt_id. Events that
//! carry no prompt_id (type 1/3 binary frames, custom messages) belong to the prompt that
//! backend is executing. A prompt's `executing {node: null}` frees its slot.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::Gate;
use super::prompts::Stage;
use crate::protocol::frames;

pub async fn upstream_loop(gate: Arc<Gate>, backend: usize) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if gate.stop.is_cancelled() {
            return;
        }
        let b = gate.backend(backend).clone();
        let url = format!(
            "ws://{}/ws?clientId={}",
            b.config.authority, b.upstream_client_id
        );
        let connect = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async_with_config(
                url,
                Some(crate::http::websocket_config()),
                false,
            ),
        );
        match connect.await {
            Ok(Ok((ws, _))) => {
                backoff = Duration::from_millis(100);
                b.ws_connected.store(true, Ordering::SeqCst);
                tracing::debug!(backend = b.name(), "upstream socket open");
                let (mut sink, mut stream) = ws.split();
                let flags =
                    json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
                let _ = sink.send(Message::text(flags.to_string())).await;
                gate.reconcile(backend).await;
                loop {
                    tokio::select! {
                        _ = gate.stop.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(Ok(Message::Text(t))) => {
                                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                                    gate.route_json(backend, v);
                                }
                            }
                            Some(Ok(Message::Binary(bin))) => gate.route_binary(backend, &bin),
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        }
                    }
                }
                b.ws_connected.store(false, Ordering::SeqCst);
                tracing::info!(backend = b.name(), "upstream socket closed");
            }
            _ => {
                gate.record_health(backend, false);
            }
        }
        tokio::select! {
            _ = gate.stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl Gate {
    /// The client sid of a prompt owned by `backend` whose events the client should see:
    /// `None` if the prompt is not this backend's, `Some(None)` if nobody should see them.
    fn owner_client(&self, backend: usize, prompt_id: &str) -> Option<Option<String>> {
        let t = self.lock_prompts();
        let r = t.get(prompt_id)?;
        // Events can beat the backend's answer to `POST /prompt` (still `Dispatching`).
        let here = matches!(r.stage, Stage::Dispatching | Stage::OnBackend);
        (r.owner == Some(backend) && here)
            .then(|| r.client_id.clone().filter(|_| !r.retry_after_run))
    }

    fn running_client(&self, backend: usize) -> Option<String> {
        let running = self
            .backend(backend)
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        self.owner_client(backend, &running).flatten()
    }

    /// Whether an `execution_error` is an out-of-memory error that another, larger backend
    /// could avoid; if so the prompt is marked to run again there.
    fn oom_retry(&self, backend: usize, prompt_id: &str, data: &Value) -> bool {
        let text =
            format!("{} {}", data["exception_type"], data["exception_message"]).to_lowercase();
        if !(text.contains("outofmemory") || text.contains("out of memory")) {
            return false;
        }
        let total = self.vram(backend).0;
        let larger = self
            .backends
            .iter()
            .any(|b| b.id != backend && b.is_up() && self.vram(b.id).0 > total);
        let mut t = self.lock_prompts();
        let Some(r) = t.get_mut(prompt_id) else {
            return false;
        };
        if r.oom_retried || !larger {
            return false;
        }
        r.oom_retried = true;
        r.retry_after_run = true;
        r.min_vram_total = Some(total + 1);
        tracing::info!(
            prompt = prompt_id,
            backend = self.backend(backend).name(),
            "out of memory; retrying on a larger backend"
        );
        true
    }

    /// Routes one JSON event from `backend`.
    pub fn route_json(self: &Arc<Self>, backend: usize, mut v: Value) {
        let kind = v["type"].as_str().unwrap_or("").to_string();
        let b = self.backend(backend).clone();
        match kind.as_str() {
            "status" => {
                let n = v["data"]["status"]["exec_info"]["queue_remaining"]
                    .as_u64()
                    .unwrap_or(0);
                b.queue_remaining.store(n as usize, Ordering::SeqCst);
                // The handshake status (it carries the upstream sid) is no queue change.
                if v["data"].get("sid").is_none() {
                    self.broadcast_status();
                }
                return;
            }
            "feature_flags" => return,
            _ => {}
        }
        let mut data = v["data"].take();
        let Some(prompt_id) = data
            .get("prompt_id")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            // No prompt_id: the reconnect replay or a custom event; it belongs to whatever
            // this backend is running.
            if kind != "executing"
                && let Some(sid) = self.running_client(backend)
            {
                self.sessions.send_json(&sid, &kind, data);
            }
            return;
        };
        let Some(mut client) = self.owner_client(backend, &prompt_id) else {
            return;
        };
        // A backend that shows progress is not stalled.
        b.stalled.store(false, Ordering::SeqCst);
        if kind == "executed"
            && let Some(output) = data.get_mut("output")
        {
            self.files.alias_outputs(backend, output);
        }
        if kind == "execution_error" && self.oom_retry(backend, &prompt_id, &data) {
            client = None;
        }
        {
            let mut t = self.lock_prompts();
            if let Some(r) = t.get_mut(&prompt_id) {
                r.last_event = Some(std::time::Instant::now());
                super::recovery::log_event(r, &kind, &data);
                match kind.as_str() {
                    "execution_start" => {
                        r.started = true;
                        r.started_at = Some(std::time::Instant::now());
                        *b.running.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(prompt_id.clone());
                    }
                    "executing" => {
                        let now = std::time::Instant::now();
                        // The node that just finished: a checkpoint loader's time is a load time.
                        if let (Some(prev), Some(at)) = (r.last_node.clone(), r.last_node_at) {
                            let node = &r.body["prompt"][&prev];
                            let is_loader = node["class_type"]
                                .as_str()
                                .is_some_and(|c| c.contains("CheckpointLoader"));
                            if let (true, Some(ckpt)) =
                                (is_loader, node["inputs"]["ckpt_name"].as_str())
                            {
                                let secs = (now - at).as_secs_f64();
                                r.load_measured_s += secs;
                                self.learned
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .observe_load(backend, ckpt, secs);
                            }
                        }
                        r.last_node = data.get("node").and_then(Value::as_str).map(str::to_string);
                        r.last_node_at = Some(now);
                    }
                    _ => {}
                }
            }
        }
        if kind == "executing" && data.get("node").is_some_and(Value::is_null) {
            // History first, then the client hears it ended (see `completed`).
            self.completed(backend, &prompt_id);
            return;
        }
        if let Some(sid) = &client {
            self.sessions.send_json(sid, &kind, data);
        }
    }

    /// Routes one binary frame from `backend`.
    pub fn route_binary(&self, backend: usize, frame: &[u8]) {
        let client = match frames::decode_preview_with_metadata(frame) {
            Some((meta, _)) => meta
                .get("prompt_id")
                .and_then(Value::as_str)
                .and_then(|id| self.owner_client(backend, id))
                .flatten(),
            None => self.running_client(backend),
        };
        if let Some(sid) = client {
            self.sessions.send_binary(&sid, frame);
        }
    }

    /// A prompt ended on `backend`: free its slot and let the dispatcher fill it.
    pub fn finish(&self, backend: usize, prompt_id: &str) {
        let b = self.backend(backend);
        {
            let mut running = b.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.as_deref() == Some(prompt_id) {
                *running = None;
            }
        }
        let freed = {
            let mut t = self.lock_prompts();
            match t.get_mut(prompt_id) {
                Some(r) if r.owner == Some(backend) && r.stage != Stage::Done => {
                    r.stage = Stage::Done;
                    true
                }
                _ => false,
            }
        };
        if freed {
            b.release_slot();
            b.completed.fetch_add(1, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }
}
