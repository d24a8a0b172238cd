//! Client WebSocket sessions: who is connected under which sid, and the delivery of events to
//! them. The API layer serves the sockets ([`crate::api`]); the scheduler sends through here.
//!
//! Each session has a bounded outbox, so a client that does not read cannot make the gate hold
//! its events without limit, and never slows anyone else (sends never wait). A client that
//! falls behind loses previews first; one that stops reading is disconnected (its socket task
//! is told to close the connection at once, and a frame its connection does not take in time
//! ends it too): ComfyUI's clients reconnect and catch up from `/history` and `/queue`, which is
//! better than a socket that silently misses a terminal event. [`outbox`] has the rules; no
//! message is refused for its size.
//!
//! Messages from one backend reach a client in the order ComfyUI would send them to that
//! client. The one place that order differs by client is the preview of a progress step: the
//! gate's upstream socket negotiates metadata, so it gets `progress_state`, the type 4 preview,
//! then `progress`; ComfyUI sends a client without metadata `progress` and then the type 1
//! preview (`main.py::hijack_progress`). The converted preview is held until that prompt's
//! next message and goes out after it if it is the `progress`, before it otherwise.
//!
//! Unlike ComfyUI, a reconnecting socket with the same clientId replaces the old one, which is
//! closed with a close frame that says why (code [`REPLACED_CODE`]), not orphaned or dropped
//! silently. Sessions are keyed by [`session_key`]: with auth on, a user's sid lives in that
//! user's own namespace, so nobody can take over another user's socket or hear their events
//! by sending their clientId.

pub mod missed;
pub mod outbox;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc::{self, Receiver, Sender, error::TrySendError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

pub use outbox::{OUTBOX_BYTES, OUTBOX_CAPACITY, PREVIEW_HEADROOM, send_timeout};

use crate::protocol::frames;
use outbox::Verdict;

/// The close code sent to a socket whose clientId a newer socket took (RFC 6455 §7.4.2: 4000
/// to 4999 are the application's).
pub const REPLACED_CODE: u16 = 4000;

/// The key of a client's session: its sid, in the namespace of its user when auth is on (a
/// user name never holds a newline, see `config::valid_name`).
pub fn session_key(user: Option<&str>, sid: &str) -> String {
    match user {
        Some(u) => format!("{u}\n{sid}"),
        None => sid.to_string(),
    }
}

/// Previews held at once for one client without metadata (one per running prompt in
/// practice); past this the oldest goes out.
const MAX_HELD_PREVIEWS: usize = 8;

/// A type 1 preview waiting for its prompt's `progress` message.
struct HeldPreview {
    prompt_id: String,
    frame: Message,
}

struct Session {
    conn: u64,
    tx: Sender<Message>,
    /// Bytes in `tx` the socket task has not taken yet (shared with its [`Registration`]).
    waiting: Arc<AtomicUsize>,
    preview_metadata: bool,
    held: Vec<HeldPreview>,
    /// Cancelled when the gate drops the client (it stopped reading, or a newer socket took
    /// its sid): its socket task closes the connection.
    dropped: CancellationToken,
}

impl Session {
    fn take_held(&mut self, prompt_id: &str) -> Option<Message> {
        let at = self.held.iter().position(|h| h.prompt_id == prompt_id)?;
        Some(self.held.remove(at).frame)
    }
}

/// One registered socket: its connection number (to unregister only itself), its outbox, and
/// the signal that the gate has dropped it (close the connection at once).
pub struct Registration {
    pub conn: u64,
    pub outbox: Receiver<Message>,
    /// Bytes waiting in `outbox`; [`Registration::next`] takes each frame off the count.
    pub waiting: Arc<AtomicUsize>,
    pub dropped: CancellationToken,
}

impl Registration {
    /// A frame still queued, without waiting (what is left once the socket is gone).
    pub fn try_next(&mut self) -> Option<Message> {
        self.outbox.try_recv().ok()
    }

    /// The next frame to write to the socket (`None` once the session is gone).
    pub async fn next(&mut self) -> Option<Message> {
        let msg = self.outbox.recv().await?;
        Some(self.taken(msg))
    }

    /// The next frame if one is queued now, taken off the count as [`Registration::next`] does.
    pub fn next_ready(&mut self) -> Option<Message> {
        let msg = self.outbox.try_recv().ok()?;
        Some(self.taken(msg))
    }

    fn taken(&self, msg: Message) -> Message {
        let size = msg.len();
        // Saturating: close frames the gate adds on its own are not counted in.
        let _ = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_sub(size))
            });
        msg
    }
}

/// Whether a text frame is a prompt's terminal event ([`missed::is_terminal`]).
pub fn is_terminal_text(text: &str) -> bool {
    // Cheap first: every terminal event names its type.
    let may_be = [
        "execution_success",
        "execution_error",
        "execution_interrupted",
        "\"node\":null",
        "\"node\": null",
    ];
    if !may_be.iter().any(|k| text.contains(k)) {
        return false;
    }
    serde_json::from_str::<Value>(text)
        .is_ok_and(|v| missed::is_terminal(v["type"].as_str().unwrap_or(""), &v["data"]))
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
    /// Terminal events of clients that were not connected, for when they come back.
    missed: missed::Missed,
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
        let waiting = Arc::new(AtomicUsize::new(0));
        let old = self.lock().insert(
            sid.to_string(),
            Session {
                conn,
                tx,
                waiting: waiting.clone(),
                preview_metadata: false,
                held: Vec::new(),
                dropped: dropped.clone(),
            },
        );
        if let Some(old) = old {
            // The replaced socket is closed, not orphaned, and told why: a close frame after
            // what it has queued, or at once if its outbox is full.
            tracing::info!(
                sid = sid.rsplit('\n').next().unwrap_or(sid),
                "a newer socket took this clientId; closing the older one"
            );
            let frame = CloseFrame {
                code: CloseCode::from(REPLACED_CODE),
                reason: Utf8Bytes::from_static("clientId taken by a newer connection"),
            };
            if old.tx.try_send(Message::Close(Some(frame))).is_err() {
                old.dropped.cancel();
            }
        }
        Registration {
            conn,
            outbox,
            waiting,
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

    /// Sends a JSON event to one client, with the preview held for its prompt, if any, on the
    /// side ComfyUI puts it. A client that is not connected does not get it, as on ComfyUI,
    /// except a terminal event, kept for its return ([`missed`]).
    pub fn send_json(&self, sid: &str, kind: &str, data: Value) {
        let prompt_id = data
            .get("prompt_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let terminal = missed::is_terminal(kind, &data);
        let text = crate::protocol::event(kind, data).to_string();
        let mut map = self.lock();
        let Some(s) = map.get_mut(sid) else {
            drop(map);
            if terminal {
                self.missed.keep(sid, text);
            }
            return;
        };
        let event = Message::text(text);
        let frames = match prompt_id.and_then(|p| s.take_held(&p)) {
            Some(preview) if kind == "progress" => [Some(event), Some(preview)],
            Some(preview) => [Some(preview), Some(event)],
            None => [Some(event), None],
        };
        for msg in frames.into_iter().flatten() {
            if !self.offer(s, msg) {
                map.remove(sid);
                return;
            }
        }
    }

    /// Sends `sid` the terminal events it missed while it was away (see [`missed`]), in order.
    pub fn replay_missed(&self, sid: &str) {
        let texts = self.missed.take(sid);
        if texts.is_empty() {
            return;
        }
        let mut map = self.lock();
        let Some(s) = map.get_mut(sid) else { return };
        for text in texts {
            if !self.offer(s, Message::text(text)) {
                map.remove(sid);
                return;
            }
        }
    }

    /// Keeps `text` (an event message that was not delivered to `sid`) for the client's return
    /// if it is a terminal event.
    pub fn keep_if_terminal(&self, sid: &str, text: &str) {
        if is_terminal_text(text) {
            self.missed.keep(sid, text.to_string());
        }
    }

    /// Clients with terminal events kept for their return.
    pub fn missed_clients(&self) -> usize {
        self.missed.clients()
    }

    /// Sends a binary frame: a type 4 preview as it is to a client that negotiated metadata;
    /// converted to type 1 and held for its `progress` message (see the module docs) to one
    /// that did not; anything else as it is.
    pub fn send_binary(&self, sid: &str, frame: Bytes) {
        let Some(metadata) = self.lock().get(sid).map(|s| s.preview_metadata) else {
            return;
        };
        let is_type4 = frames::frame_type(&frame) == Some(frames::PREVIEW_IMAGE_WITH_METADATA);
        // The conversion copies the image: done outside the lock (a frame may be many MB).
        let converted = if is_type4 && !metadata {
            let Some((meta, _)) = frames::decode_preview_with_metadata(&frame) else {
                return;
            };
            let Some(t1) = frames::type4_to_type1(&frame) else {
                return;
            };
            let prompt_id = meta
                .get("prompt_id")
                .and_then(Value::as_str)
                .map(str::to_string);
            Some((prompt_id, Message::binary(t1)))
        } else {
            None
        };
        let mut map = self.lock();
        let Some(s) = map.get_mut(sid) else { return };
        let mut out = Vec::with_capacity(2);
        match converted {
            Some((Some(prompt_id), t1)) => {
                out.extend(s.take_held(&prompt_id));
                s.held.push(HeldPreview {
                    prompt_id,
                    frame: t1,
                });
                if s.held.len() > MAX_HELD_PREVIEWS {
                    out.push(s.held.remove(0).frame);
                }
            }
            Some((None, t1)) => out.push(t1),
            None => out.push(Message::binary(frame)),
        }
        for msg in out {
            if !self.offer(s, msg) {
                map.remove(sid);
                return;
            }
        }
    }

    /// Sends a JSON event to every client.
    pub fn broadcast_json(&self, kind: &str, data: Value) {
        // One buffer shared by every client's frame (a clone is a reference count).
        let text = Utf8Bytes::from(crate::protocol::event(kind, data).to_string());
        self.lock()
            .retain(|_, s| self.offer(s, Message::Text(text.clone())));
    }

    /// Queues one frame by the slow-client policy ([`outbox::verdict`]); false when the client
    /// must go (it is not reading, or its socket is gone).
    fn offer(&self, s: &Session, msg: Message) -> bool {
        let droppable = matches!(&msg, Message::Binary(b) if outbox::is_droppable(b));
        let size = msg.len();
        let waiting = s.waiting.load(Ordering::Relaxed);
        let verdict = outbox::verdict(droppable, s.tx.capacity(), waiting);
        if verdict == Verdict::Drop {
            self.dropped_previews.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let sent = match verdict {
            Verdict::Queue => s.tx.try_send(msg),
            _ => Err(TrySendError::Full(msg)),
        };
        match sent {
            Ok(()) => {
                s.waiting.fetch_add(size, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_)) => {
                self.dropped_clients.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    waiting,
                    "a client stopped reading its socket; disconnecting it"
                );
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
        let preview = Bytes::from_static(&[0u8, 0, 0, 1, 0, 0, 0, 1, 0xff]);
        for _ in 0..PREVIEW_HEADROOM {
            sessions.send_json("slow", "progress", serde_json::json!({}));
        }
        sessions.send_binary("slow", preview);
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

    #[test]
    fn a_legacy_client_gets_each_preview_after_its_progress() {
        let sessions = Sessions::default();
        let mut legacy = sessions.register("legacy");
        let mut modern = sessions.register("modern");
        sessions.set_preview_metadata("modern", true);
        let meta =
            serde_json::json!({"prompt_id": "p", "node_id": "3", "image_type": "image/jpeg"});
        let preview = Bytes::from(frames::encode_preview_with_metadata(&meta, b"\xff\xd8"));
        let step = serde_json::json!({"value": 1, "max": 2, "prompt_id": "p", "node": "3"});
        for sid in ["legacy", "modern"] {
            sessions.send_json(sid, "progress_state", serde_json::json!({"prompt_id": "p"}));
            sessions.send_binary(sid, preview.clone());
            sessions.send_json(sid, "progress", step.clone());
            // A preview not followed by its progress goes out before the prompt's next event.
            sessions.send_binary(sid, preview.clone());
            sessions.send_json(
                sid,
                "execution_interrupted",
                serde_json::json!({"prompt_id": "p"}),
            );
        }
        let kinds = |reg: &mut Registration| {
            let mut out = Vec::new();
            while let Ok(msg) = reg.outbox.try_recv() {
                out.push(match msg {
                    Message::Text(t) => serde_json::from_str::<Value>(&t).unwrap()["type"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    Message::Binary(b) => format!("binary:{}", b[3]),
                    other => format!("{other:?}"),
                });
            }
            out
        };
        let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            kinds(&mut legacy),
            want(&[
                "progress_state",
                "progress",
                "binary:1",
                "binary:1",
                "execution_interrupted"
            ])
        );
        assert_eq!(
            kinds(&mut modern),
            want(&[
                "progress_state",
                "binary:4",
                "progress",
                "binary:4",
                "execution_interrupted"
            ])
        );
    }

    #[test]
    fn a_saved_image_is_kept_for_a_client_that_falls_behind() {
        let sessions = Sessions::default();
        let mut slow = sessions.register("slow");
        for _ in 0..PREVIEW_HEADROOM {
            sessions.send_json("slow", "progress", serde_json::json!({}));
        }
        let latent = frames::encode_preview(frames::FORMAT_JPEG, b"\xff\xd8");
        let saved = frames::encode_preview(frames::FORMAT_PNG, &vec![7u8; 20 << 20]);
        sessions.send_binary("slow", Bytes::from(latent));
        sessions.send_binary("slow", Bytes::from(saved.clone()));
        assert_eq!(sessions.dropped(), (0, 1), "only the latent preview went");
        let last = std::iter::from_fn(|| slow.outbox.try_recv().ok()).last();
        assert_eq!(last, Some(Message::binary(saved)), "the 20 MB PNG, whole");
    }
}
