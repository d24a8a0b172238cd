//! `GET /ws` on the gate: issues the client its sid (honouring `?clientId=`), sends the first
//! `status` and the node its running prompt is on (the reconnect replay), answers
//! `feature_flags` itself, and writes the session's outbox ([`crate::sessions`]) to the socket:
//! what has queued up by the time the socket's task runs goes out in one write (a broadcast
//! and the event after it cost one system call, not two).

use std::sync::Arc;

use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{Request, Response};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::ClientBody;
use super::Ctx;
use crate::http::{Body, serve_comfy_websocket};
use crate::protocol::client_feature_flags;
use crate::sched::tenant::Caller;
use crate::sessions::{send_timeout, session_key};

/// Most frames written to a socket before one flush.
const MAX_BATCH: usize = 64;

/// Upgrades a `GET /ws` of `caller`; `held` (a connection slot of the per-address cap) is
/// released when the socket ends.
pub fn handle<H: Send + 'static>(
    ctx: Arc<Ctx>,
    mut req: Request<ClientBody>,
    caller: &Caller,
    held: H,
) -> Response<Body> {
    let user = caller.user_name().map(str::to_string);
    serve_comfy_websocket(&mut req, move |sid, ws| async move {
        let _held = held;
        let key = session_key(user.as_deref(), &sid);
        serve(ctx, key, sid, ws).await
    })
}

/// Serves one socket: `sid` is the client's, `key` its session (the sid in its user's
/// namespace).
async fn serve<S>(
    ctx: Arc<Ctx>,
    key: String,
    sid: String,
    ws: tokio_tungstenite::WebSocketStream<S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let sessions = &ctx.sessions;
    let mut reg = sessions.register(&key);
    ctx.sched.send_status_to(&key, &sid);
    // The endings it missed while away, then where its running prompt is (as ComfyUI does).
    sessions.replay_missed(&key);
    if let Some(node) = ctx.sched.running_node_of(&key) {
        sessions.send_json(&key, "executing", json!({ "node": node }));
    }
    let mut first_message = true;
    let dropped = reg.dropped.clone();
    // A panic in this socket's loop (a bug) ends this socket only, and never skips the
    // unregister below: a session left registered would collect its client's events forever.
    let session = std::panic::AssertUnwindSafe(async {
        loop {
            tokio::select! {
                _ = dropped.cancelled() => break,
                out = reg.next() => {
                    let Some(first) = out else { break };
                    // Frames already waiting go out with it: one flush, one write to the socket.
                    let mut batch = vec![first];
                    // A batch ends at a close, and at a terminal event: kept for the client's
                    // return if its write fails, it must be the batch's last frame, so one that
                    // did reach the client is never replayed.
                    let open = |b: &[Message]| match b.last() {
                        Some(Message::Close(_)) => false,
                        Some(Message::Text(t)) => !crate::sessions::is_terminal_text(t.as_str()),
                        _ => true,
                    };
                    while batch.len() < MAX_BATCH && open(&batch) {
                        let Some(msg) = reg.next_ready() else { break };
                        batch.push(msg);
                    }
                    let closing = matches!(batch.last(), Some(Message::Close(_)));
                    let size = batch.iter().map(Message::len).sum();
                    // Only the last frame can be a terminal event (see `open`).
                    let texts: Vec<_> = batch
                        .last()
                        .and_then(|m| match m {
                            Message::Text(t) => Some(t.clone()),
                            _ => None,
                        })
                        .into_iter()
                        .collect();
                    let write = async {
                        for msg in batch {
                            sink.feed(msg).await?;
                        }
                        sink.flush().await
                    };
                    let sent = tokio::time::timeout(send_timeout(size), write).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        // Not delivered: the endings in it are kept for the client's return.
                        for text in texts {
                            sessions.keep_if_terminal(&key, text.as_str());
                        }
                        break;
                    }
                    if closing {
                        break;
                    }
                }
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(flags) = client_feature_flags(&text, first_message) {
                            let on = flags["supports_preview_metadata"].as_bool().unwrap_or(false);
                            sessions.set_preview_metadata(&key, on);
                            sessions.send_json(&key, "feature_flags", ctx.features());
                        }
                        first_message = false;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    })
    .catch_unwind()
    .await;
    if let Err(payload) = session {
        let message = crate::http::panic_message(payload.as_ref());
        tracing::error!(sid, panic = %message, "client socket loop panicked; closing it");
    }
    sessions.unregister(&key, reg.conn);
    // What was queued and never written: endings in it wait for the client's return.
    while let Some(msg) = reg.try_next() {
        if let Message::Text(text) = msg {
            sessions.keep_if_terminal(&key, text.as_str());
        }
    }
}
