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
    /// The client sid of a prompt owned by `backend`, if any.
    fn owner_client(&self, backend: usize, prompt_id: &str) -> Option<(bool, Option<String>)> {
        let t = self.lock_prompts();
        let r = t.get(prompt_id)?;
        (r.owner == Some(backend)).then(|| (true, r.client_id.clone()))
    }

    fn running_client(&self, backend: usize) -> Option<String> {
        let running = self
            .backend(backend)
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        self.lock_prompts().get(&running)?.client_id.clone()
    }

    /// Routes one JSON event from `backend`.
    pub fn route_json(&self, backend: usize, mut v: Value) {
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
        let data = v["data"].take();
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
        let Some((_, client)) = self.owner_client(backend, &prompt_id) else {
            return;
        };
        let mut data = data;
        match kind.as_str() {
            "execution_start" => {
                *b.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(prompt_id.clone());
                if let Some(r) = self.lock_prompts().get_mut(&prompt_id) {
                    r.started = true;
                }
            }
            "executing" => {
                if let Some(node) = data.get("node").and_then(Value::as_str)
                    && let Some(r) = self.lock_prompts().get_mut(&prompt_id)
                {
                    r.last_node = Some(node.to_string());
                }
            }
            "executed" => {
                if let Some(output) = data.get_mut("output") {
                    self.files.alias_outputs(backend, output);
                }
            }
            _ => {}
        }
        let done = kind == "executing" && data.get("node").is_some_and(Value::is_null);
        if let Some(sid) = &client {
            self.sessions.send_json(sid, &kind, data);
        }
        if done {
            self.finish(backend, &prompt_id);
        }
    }

    /// Routes one binary frame from `backend`.
    pub fn route_binary(&self, backend: usize, frame: &[u8]) {
        let client = match frames::decode_preview_with_metadata(frame) {
            Some((meta, _)) => meta
                .get("prompt_id")
                .and_then(Value::as_str)
                .and_then(|id| self.owner_client(backend, id))
                .and_then(|(_, c)| c),
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

    /// After the upstream socket (re)opens: prompts the gate believes are on this backend but
    /// that finished (or vanished) while the socket was down are settled from `/history` and
    /// `/queue`, so no slot stays taken forever.
    pub async fn reconcile(&self, backend: usize) {
        let ids: Vec<String> = self
            .lock_prompts()
            .records()
            .filter(|r| r.owner == Some(backend) && r.stage == Stage::OnBackend)
            .map(|r| r.id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let b = self.backend(backend).clone();
        let Ok((_, queue)) = self.upstream.get_json(&b.config, "/queue").await else {
            return;
        };
        for id in ids {
            if super::prompts::queue_lists(&queue, &id) {
                continue;
            }
            // Finished (history) or lost: either way the slot is free again.
            self.finish(backend, &id);
        }
    }
}
