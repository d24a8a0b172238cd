//! Client WebSockets: the gate issues each client its sid (honouring `?clientId=`), sends the
//! first `status`, answers `feature_flags` itself and delivers the events of the client's own
//! prompts. Unlike ComfyUI, a reconnecting socket with the same clientId replaces the old one
//! without orphaning itself when the old one closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::Gate;
use crate::http::{Body, serve_comfy_websocket};
use crate::protocol::frames;

struct Session {
    conn: u64,
    tx: UnboundedSender<Message>,
    preview_metadata: bool,
}

/// Connected client sockets by sid.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    next_conn: AtomicU64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, sid: &str) -> (u64, UnboundedReceiver<Message>) {
        let (tx, rx) = unbounded_channel();
        let conn = self.next_conn.fetch_add(1, Ordering::SeqCst);
        let old = self.lock().insert(
            sid.to_string(),
            Session {
                conn,
                tx,
                preview_metadata: false,
            },
        );
        if let Some(old) = old {
            // The replaced socket is closed, not orphaned.
            let _ = old.tx.send(Message::Close(None));
        }
        (conn, rx)
    }

    fn unregister(&self, sid: &str, conn: u64) {
        let mut map = self.lock();
        if map.get(sid).is_some_and(|s| s.conn == conn) {
            map.remove(sid);
        }
    }

    fn set_preview_metadata(&self, sid: &str, on: bool) {
        if let Some(s) = self.lock().get_mut(sid) {
            s.preview_metadata = on;
        }
    }

    /// Sends a JSON event to one client (dropped if it is not connected, as ComfyUI does).
    pub fn send_json(&self, sid: &str, kind: &str, data: Value) {
        let text = crate::protocol::event(kind, data).to_string();
        if let Some(s) = self.lock().get(sid) {
            let _ = s.tx.send(Message::text(text));
        }
    }

    /// Sends a preview frame, as type 4 or converted to type 1 per the client's flags.
    pub fn send_binary(&self, sid: &str, frame: &[u8]) {
        let map = self.lock();
        let Some(s) = map.get(sid) else { return };
        let out = match frames::frame_type(frame) {
            Some(frames::PREVIEW_IMAGE_WITH_METADATA) if !s.preview_metadata => {
                match frames::type4_to_type1(frame) {
                    Some(t1) => t1,
                    None => return,
                }
            }
            _ => frame.to_vec(),
        };
        let _ = s.tx.send(Message::binary(out));
    }

    pub fn broadcast_json(&self, kind: &str, data: Value) {
        let text = crate::protocol::event(kind, data).to_string();
        for s in self.lock().values() {
            let _ = s.tx.send(Message::text(text.clone()));
        }
    }

    /// Closes every socket with 1001 (going away), for shutdown.
    pub fn close_all(&self) {
        for s in self.lock().values() {
            let _ = s.tx.send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "comfy-gate is shutting down".into(),
            })));
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `GET /ws` on the gate.
pub fn handle(gate: Arc<Gate>, mut req: Request<Incoming>) -> Response<Body> {
    serve_comfy_websocket(&mut req, move |sid, ws| serve(gate, sid, ws))
}

async fn serve<S>(gate: Arc<Gate>, sid: String, ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (conn, mut rx) = gate.sessions.register(&sid);
    gate.sessions.send_json(
        &sid,
        "status",
        json!({ "status": gate.queue_info(), "sid": sid }),
    );
    if let Some(node) = gate.running_node_of(&sid) {
        gate.sessions
            .send_json(&sid, "executing", json!({ "node": node }));
    }
    let mut first_message = true;
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(msg) = out else { break };
                let closing = matches!(msg, Message::Close(_));
                if sink.send(msg).await.is_err() || closing {
                    break;
                }
            }
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let Ok(data) = serde_json::from_str::<Value>(&text) else { continue };
                    if first_message && data.get("type").and_then(Value::as_str) == Some("feature_flags") {
                        let on = data["data"]["supports_preview_metadata"].as_bool().unwrap_or(false);
                        gate.sessions.set_preview_metadata(&sid, on);
                        gate.sessions.send_json(&sid, "feature_flags", gate.features());
                    }
                    first_message = false;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    gate.sessions.unregister(&sid, conn);
}
