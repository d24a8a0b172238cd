//! One upstream WebSocket per backend, under the gate's own clientId (design §2): every event of
//! every prompt the gate sent there arrives on it. The fleet does not know whose prompt an event
//! belongs to; it hands each frame, in order, to the scheduler through an [`UpstreamEvent`]
//! channel, and keeps only the facts about the backend itself: the socket is open, a frame
//! arrived (life, and pongs to the gate's pings keep a quiet socket provably open), and a prompt
//! moved (which clears a stall).
//!
//! The channel is bounded: a scheduler that falls behind slows the sockets (TCP backpressure
//! towards the backends) rather than growing memory without bound.
//!
//! An `https://` backend's socket is `wss://`: the TLS handshake is made here, with the HTTP
//! client's own configuration ([`super::Upstream::tls_config`]), so the socket trusts exactly what
//! the requests trust.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::Fleet;
use crate::config::Backend;
use crate::metrics::BackendLabel;

/// Frames waiting for the scheduler before the sockets stop reading.
pub const EVENTS_CAPACITY: usize = 4096;
/// A WebSocket handshake that takes longer fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Pings per `health.socket_silence_ms` (ComfyUI's aiohttp answers pings itself).
pub const PINGS_PER_SILENCE: u32 = 3;

/// The configuration of the gate's socket to a backend: no limit on what it receives. A
/// backend is the operator's own ComfyUI, trusted like the disk it writes outputs to, and it
/// sends whatever its nodes make: an `executed` message with a long text, a full-size PNG from
/// `SaveImageWebsocket`, hundreds of MB of video preview. Any cap here would close the socket
/// on such a message and lose it and every event after it (issue 11). The limit servers keep
/// ([`crate::http::MAX_CLIENT_MESSAGE_BYTES`]) is for what clients send. The buffers keep
/// tungstenite's defaults (128 KiB): there is one such socket per backend, and large reads
/// are common on it.
pub fn upstream_websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

/// What an upstream socket saw, in order per backend (`backend` is the fleet index).
#[derive(Debug)]
pub enum UpstreamEvent {
    /// The socket (re)opened. The socket reads nothing more until `reconciled` is answered (or
    /// dropped), so what the gate believes runs there is checked before new events arrive.
    Opened {
        backend: usize,
        reconciled: oneshot::Sender<()>,
    },
    /// A JSON message.
    Json { backend: usize, message: Value },
    /// A binary frame (previews).
    Binary { backend: usize, frame: Bytes },
    /// The socket closed.
    Closed { backend: usize },
}

/// Event kinds that show a prompt moving on the backend's GPU (evidence against a stall).
fn shows_progress(kind: &str) -> bool {
    matches!(
        kind,
        "execution_start"
            | "execution_cached"
            | "executing"
            | "progress"
            | "progress_state"
            | "executed"
            | "execution_success"
            | "execution_error"
            | "execution_interrupted"
    )
}

/// Keeps backend `i`'s upstream socket open until `stop`, reconnecting with backoff; a failed
/// connect counts against its health.
pub async fn socket_loop(
    fleet: Arc<Fleet>,
    i: usize,
    events: mpsc::Sender<UpstreamEvent>,
    stop: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut opened_before = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let b = fleet.get(i).clone();
        let client_id: String =
            form_urlencoded::byte_serialize(b.upstream_client_id.as_bytes()).collect();
        let target = format!("/ws?clientId={client_id}");
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT,
            open(&b.config, &target, fleet.upstream.tls_config()),
        );
        match connect.await {
            Ok(Ok(ws)) => {
                backoff = FIRST_BACKOFF;
                b.ws_connected.store(true, Ordering::SeqCst);
                if std::mem::replace(&mut opened_before, true)
                    && let Some(metrics) = fleet.metrics.on()
                {
                    let backend = b.name().to_string();
                    let label = BackendLabel { backend };
                    metrics.upstream_reconnects.get_or_create(&label).inc();
                }
                b.saw_frame();
                tracing::debug!(backend = b.name(), "upstream socket open");
                let (mut sink, mut stream) = ws.split();
                let flags =
                    json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
                let _ = sink.send(Message::text(flags.to_string())).await;
                let (tx, rx) = oneshot::channel();
                let opened = UpstreamEvent::Opened {
                    backend: i,
                    reconciled: tx,
                };
                if events.send(opened).await.is_err() {
                    return;
                }
                let _ = rx.await;
                if !pump(&fleet, i, (&mut sink, &mut stream), &events, &stop).await {
                    return;
                }
                b.ws_connected.store(false, Ordering::SeqCst);
                tracing::info!(backend = b.name(), "upstream socket closed");
                let _ = events.send(UpstreamEvent::Closed { backend: i }).await;
            }
            Ok(Err(why)) => {
                tracing::debug!(backend = b.name(), error = %why, "upstream socket did not open");
                fleet.record_health(i, false);
            }
            Err(_) => fleet.record_health(i, false),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The stream under an upstream socket: TCP, or TLS over TCP for an `https://` backend.
type Transport = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens the WebSocket at `target` (path and query) of `backend`: `ws://`, or `wss://` with
/// `tls` verifying the URL's host (SNI the same unless it is an address). The error is why, in
/// words (refused, certificate not trusted, handshake refused).
async fn open(
    backend: &Backend,
    target: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<WebSocketStream<Transport>, String> {
    let tcp = TcpStream::connect(&backend.authority)
        .await
        .map_err(|e| e.to_string())?;
    let (scheme, stream) = if backend.uses_tls() {
        let name = ServerName::try_from(backend.host().to_string()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        ("wss", Either::Right(stream))
    } else {
        ("ws", Either::Left(tcp))
    };
    let url = format!("{scheme}://{}{target}", backend.authority);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(upstream_websocket_config()))
            .await
            .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Hands the socket's frames to the scheduler, in order, until the socket ends (true) or the
/// gate stops or the scheduler is gone (false). Pings [`PINGS_PER_SILENCE`] times per
/// `health.socket_silence_ms`; a socket that delivers nothing (not even a pong) for that long,
/// with no prompt running there, is taken for dead and dropped: a
/// host that lost power leaves a half-open socket that would otherwise look connected for ever
/// (and its probe timeouts would pass for a busy backend).
async fn pump<K, S>(
    fleet: &Fleet,
    i: usize,
    (sink, stream): (&mut K, &mut S),
    events: &mpsc::Sender<UpstreamEvent>,
    stop: &CancellationToken,
) -> bool
where
    K: futures_util::Sink<Message> + Unpin,
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let b = fleet.get(i);
    let silence = Duration::from_millis(fleet.config.load().health.socket_silence_ms);
    let period = silence / PINGS_PER_SILENCE;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Reading starts now (the reconcile before it, however long, is not the socket's silence).
    b.saw_frame();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return false,
            _ = ping.tick() => {
                // While a prompt runs here, silence is the stall check's to judge.
                let running = b.runs_prompt.load(Ordering::SeqCst);
                if !running && b.since_last_frame().is_some_and(|s| s > silence) {
                    tracing::warn!(backend = b.name(), "upstream socket silent, even to pings; dropping it");
                    return true;
                }
                let _ = tokio::time::timeout(period, sink.send(Message::Ping(Default::default()))).await;
                continue;
            }
            msg = stream.next() => msg,
        };
        let event = match msg {
            Some(Ok(Message::Text(t))) => {
                b.saw_frame();
                let Ok(message) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                if shows_progress(message["type"].as_str().unwrap_or("")) {
                    fleet.clear_stalled(i, "a prompt moved");
                }
                UpstreamEvent::Json {
                    backend: i,
                    message,
                }
            }
            Some(Ok(Message::Binary(frame))) => {
                b.saw_frame();
                UpstreamEvent::Binary { backend: i, frame }
            }
            Some(Ok(_)) => {
                b.saw_frame();
                continue;
            }
            Some(Err(_)) | None => return true,
        };
        if events.send(event).await.is_err() {
            return false;
        }
        // Time spent waiting for the scheduler (backpressure) is not the backend's silence.
        b.saw_frame();
    }
}
