//! Client WebSocket sessions: who is connected under which sid, and the delivery of events to
//! them. The API layer serves the sockets ([`crate::api`]); the scheduler sends through here.
//!
//! Each session has a bounded outbox of [`OUTBOX_CAPACITY`] frames, so a client that does not
//! read cannot make the gate hold its events without limit, and never slows anyone else (sends
//! never wait). A client that falls behind loses previews first: once its outbox is half full,
//! preview frames for it are dropped (the next preview replaces them anyway). If it is full, the
//! client is disconnected (its socket task is told to close the connection at once, and a frame
//! its connection does not take within [`SEND_TIMEOUT`] ends it too): ComfyUI's clients reconnect and catch up from `/history` and
//! `/queue`, which is better than a socket that silently misses a terminal event.
//!
//! Unlike ComfyUI, a reconnecting socket with the same clientId replaces the old one, which is
//! closed, not orphaned.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::mpsc::{self, Receiver, Sender, error::TrySendError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::protocol::frames;

/// Frames queued for one client before it counts as not reading.
pub const OUTBOX_CAPACITY: usize = 1024;
/// Previews are dropped for a client whose outbox has fewer free places than this.
pub const PREVIEW_HEADROOM: usize = OUTBOX_CAPACITY / 2;
/// A frame the client's connection does not take within this long ends the connection.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct Session {
    conn: u64,
    tx: Sender<Message>,
    preview_metadata: bool,
    /// Cancelled when the gate drops the client (it stopped reading, or a newer socket took
    /// its sid): its socket task closes the connection.
    dropped: CancellationToken,
}

/// One registered socket: its connection number (to unregister only itself), its outbox, and
/// the signal that the gate has dropped it (close the connection at once).
pub struct Registration {
    pub conn: u64,
    pub outbox: Receiver<Message>,
    pub dropped: CancellationToken,
}

/// Connected client sockets by sid.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    next_conn: AtomicU64,
    /// Clients disconnected for not reading, since start.
    dropped_clients: AtomicU64,
    /// Preview frames dropped for clients that fell behind, since start.
    dropped_previews: AtomicU64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a socket under `sid`, replacing (and closing) an older one.
    pub fn register(&self, sid: &str) -> Registration {
        let (tx, outbox) = mpsc::channel(OUTBOX_CAPACITY);
        let conn = self.next_conn.fetch_add(1, Ordering::SeqCst);
        let dropped = CancellationToken::new();
        let old = self.lock().insert(
            sid.to_string(),
            Session {
                conn,
                tx,
                preview_metadata: false,
                dropped: dropped.clone(),
            },
        );
        if let Some(old) = old {
            // The replaced socket is closed, not orphaned: a close frame after what it has
            // queued, or at once if its outbox is full.
            if old.tx.try_send(Message::Close(None)).is_err() {
                old.dropped.cancel();
            }
        }
        Registration {
            conn,
            outbox,
            dropped,
        }
    }

    /// Forgets socket `conn` of `sid` (a newer socket under the same sid stays).
    pub fn unregister(&self, sid: &str, conn: u64) {
        let mut map = self.lock();
        if map.get(sid).is_some_and(|s| s.conn == conn) {
            map.remove(sid);
        }
    }

    /// Whether `sid` negotiated `supports_preview_metadata` (type-4 previews).
    pub fn set_preview_metadata(&self, sid: &str, on: bool) {
        if let Some(s) = self.lock().get_mut(sid) {
            s.preview_metadata = on;
        }
    }

    /// Sends a JSON event to one client (dropped if it is not connected, as ComfyUI does).
    pub fn send_json(&self, sid: &str, kind: &str, data: Value) {
        let text = crate::protocol::event(kind, data).to_string();
        let mut map = self.lock();
        if let Some(s) = map.get(sid)
            && !self.offer(s, Message::text(text), false)
        {
            map.remove(sid);
        }
    }

    /// Sends a preview frame, as type 4 or converted to type 1 per the client's flags.
    pub fn send_binary(&self, sid: &str, frame: &[u8]) {
        let mut map = self.lock();
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
        if !self.offer(s, Message::binary(out), true) {
            map.remove(sid);
        }
    }

    /// Sends a JSON event to every client.
    pub fn broadcast_json(&self, kind: &str, data: Value) {
        let text = crate::protocol::event(kind, data).to_string();
        self.lock()
            .retain(|_, s| self.offer(s, Message::text(text.clone()), false));
    }

    /// Queues one frame by the slow-client policy; false when the client must go (its outbox
    /// is full, or its socket is gone).
    fn offer(&self, s: &Session, msg: Message, is_preview: bool) -> bool {
        if is_preview && s.tx.capacity() <= PREVIEW_HEADROOM {
            self.dropped_previews.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        match s.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped_clients.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("a client stopped reading its socket; disconnecting it");
                s.dropped.cancel();
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Closes every socket with 1001 (going away), for shutdown.
    pub fn close_all(&self) {
        for s in self.lock().values() {
            let _ = s.tx.try_send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "comfy-gate is shutting down".into(),
            })));
        }
    }

    /// Connected sockets.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(clients disconnected for not reading, previews dropped)` since start.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.dropped_clients.load(Ordering::Relaxed),
            self.dropped_previews.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_does_not_read_loses_previews_first_then_its_socket() {
        let sessions = Sessions::default();
        let mut slow = sessions.register("slow");
        let mut fast = sessions.register("fast");
        let preview = [0u8, 0, 0, 1, 0, 0, 0, 1, 0xff];
        for _ in 0..PREVIEW_HEADROOM {
            sessions.send_json("slow", "progress", serde_json::json!({}));
        }
        sessions.send_binary("slow", &preview);
        assert_eq!(sessions.dropped(), (0, 1), "the preview went first");
        for _ in PREVIEW_HEADROOM..OUTBOX_CAPACITY {
            sessions.send_json("slow", "progress", serde_json::json!({}));
        }
        assert_eq!(sessions.len(), 2, "full, not over");
        sessions.send_json("slow", "executing", serde_json::json!({"node": null}));
        assert_eq!(sessions.dropped().0, 1);
        assert_eq!(sessions.len(), 1, "the slow client is disconnected");
        assert!(
            slow.dropped.is_cancelled(),
            "its connection is told to close"
        );
        assert!(!fast.dropped.is_cancelled());
        sessions.send_json("fast", "status", serde_json::json!({}));
        assert!(fast.outbox.try_recv().is_ok(), "others are not slowed");
        let mut n = 0;
        while slow.outbox.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, OUTBOX_CAPACITY, "what was queued is still delivered");
    }
}
