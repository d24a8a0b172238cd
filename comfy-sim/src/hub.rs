//! WebSocket sessions of one instance and ComfyUI's targeting rules (reference §6).
//!
//! A message goes to one sid or to everyone; a sid that is not connected loses it. The session
//! table keeps ComfyUI's quirk: a second socket with the same clientId replaces the first in the
//! table, and when either closes the sid is removed, silencing the survivor.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

struct Session {
    tx: UnboundedSender<Message>,
    feature_flags: Value,
}

/// The session table.
pub struct Hub {
    sessions: Mutex<HashMap<String, Session>>,
    /// Cancelled to drop every connection (the `drop_websockets` fault); replaced afterwards.
    drop_all: Mutex<CancellationToken>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            drop_all: Mutex::new(CancellationToken::new()),
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a socket under `sid`, replacing (not closing) any earlier one.
    pub fn register(&self, sid: &str) -> (UnboundedReceiver<Message>, CancellationToken) {
        let (tx, rx) = unbounded_channel();
        self.lock().insert(
            sid.to_string(),
            Session {
                tx,
                feature_flags: Value::Object(Default::default()),
            },
        );
        let drop_token = self
            .drop_all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (rx, drop_token)
    }

    /// Removes `sid`, whichever socket registered it last (ComfyUI's quirk).
    pub fn unregister(&self, sid: &str) {
        self.lock().remove(sid);
    }

    pub fn set_feature_flags(&self, sid: &str, flags: Value) {
        if let Some(s) = self.lock().get_mut(sid) {
            s.feature_flags = flags;
        }
    }

    /// Whether `sid` negotiated `supports_preview_metadata: true`.
    pub fn supports_preview_metadata(&self, sid: Option<&str>) -> bool {
        let Some(sid) = sid else { return false };
        self.lock()
            .get(sid)
            .and_then(|s| s.feature_flags.get("supports_preview_metadata"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// ComfyUI's `send_json`: to `sid`, or to everyone when `sid` is `None`.
    /// Whether a message to `sid` (`None`: every socket) would reach anyone.
    pub fn has_listener(&self, sid: Option<&str>) -> bool {
        let sessions = self.lock();
        match sid {
            None => !sessions.is_empty(),
            Some(sid) => sessions.contains_key(sid),
        }
    }

    pub fn send_json(&self, kind: &str, data: Value, sid: Option<&str>) {
        let text = comfy_wire::protocol::event(kind, data).to_string();
        self.send(Message::text(text), sid);
    }

    /// ComfyUI's `send_bytes`.
    pub fn send_bytes(&self, frame: Vec<u8>, sid: Option<&str>) {
        self.send(Message::binary(frame), sid);
    }

    fn send(&self, msg: Message, sid: Option<&str>) {
        let sessions = self.lock();
        match sid {
            None => {
                for s in sessions.values() {
                    let _ = s.tx.send(msg.clone());
                }
            }
            Some(sid) => {
                if let Some(s) = sessions.get(sid) {
                    let _ = s.tx.send(msg);
                }
            }
        }
    }

    /// Closes every WebSocket connection (server side).
    pub fn drop_all(&self) {
        let mut token = self.drop_all.lock().unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = CancellationToken::new();
    }

    pub fn connected(&self) -> usize {
        self.lock().len()
    }
}
