//! The live dashboard at the admin listener's `/` (issue 15): one HTML page served from the
//! binary (`dashboard.html`, no CDN, nothing to build), fed over a WebSocket at
//! `/dashboard/ws`.
//!
//! Why pushed and not polled: every open dashboard would otherwise take the scheduler's lock
//! on its own clock; here one sampler takes one [`FleetView`] per [`SAMPLE_INTERVAL`], keeps it
//! in a ring for replay, and hands the same serialised frame to every socket.
//!
//! History replay: the ring holds the last [`REPLAY_SPAN`] of frames (3,600 at one a second).
//! A socket gets the whole ring when it opens, then each new frame as it is taken. The page's
//! time slider shows any frame of the ring: the fleet as it was at that moment.
//!
//! The socket protocol (JSON text messages):
//! - server → page, once: `{"type": "replay", "interval_ms": N, "frames": [FRAME, …]}`, oldest
//!   first;
//! - server → page, once after it: `{"type": "decisions", "decisions": [...]}` (as below);
//! - server → page, per sample: `{"type": "frame", "frame": FRAME, "decisions": [{at,
//!   prompt_id, chosen, reason}, …], "timeline": TIMELINE | null}`, where `TIMELINE` is that
//!   of the prompt the page watches (see `GET /admin/prompts/{id}/timeline`);
//! - page → server: `{"watch": "PROMPT_ID"}` (or `null`) picks the prompt whose timeline
//!   comes with each frame.
//!
//! `FRAME` is a [`FleetView`] as JSON.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::Request;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::view::FleetView;
use crate::http::{Body, ConnectionStats};
use crate::sched::Scheduler;

/// The page, served as is.
pub const PAGE: &str = include_str!("dashboard.html");

/// How often the sampler takes a frame: 1 s.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How far back the replay ring reaches: 1 hour.
pub const REPLAY_SPAN: Duration = Duration::from_secs(3600);
/// The most the replay ring holds, in bytes of JSON: 64 MiB. Three backends take about 5 MB
/// for the hour; a large fleet keeps less than an hour rather than growing without bound.
pub const REPLAY_MAX_BYTES: usize = 64 << 20;
/// Placement decisions sent with each live frame (the newest).
const DECISIONS_SHOWN: usize = 20;

/// The replay ring: frames oldest first, and their total size.
#[derive(Default)]
struct Ring {
    frames: VecDeque<Arc<str>>,
    bytes: usize,
}

/// Dashboards open at once, at most (each holds the replay while it is sent).
pub const MAX_SOCKETS: usize = 16;

/// A sample as the open sockets get it: the frame and the decisions then, as JSON.
pub struct Live {
    frame: Arc<str>,
    decisions: String,
}

/// The frames kept for replay and the channel that carries new ones to open sockets.
pub struct Dashboard {
    ring: Mutex<Ring>,
    keep: usize,
    max_bytes: usize,
    live: broadcast::Sender<Arc<Live>>,
    sockets: AtomicUsize,
    /// The gate's stop: open sockets close with it.
    stop: CancellationToken,
}

impl Dashboard {
    /// A dashboard keeping the last [`REPLAY_SPAN`] of frames (at most [`REPLAY_MAX_BYTES`]),
    /// whose sockets close at `stop`.
    pub fn new(stop: CancellationToken) -> Self {
        let keep = (REPLAY_SPAN.as_millis() / SAMPLE_INTERVAL.as_millis()) as usize;
        Self::with_bounds(keep, REPLAY_MAX_BYTES, stop)
    }

    /// A dashboard keeping at most `keep` frames and `max_bytes` of them.
    pub fn with_bounds(keep: usize, max_bytes: usize, stop: CancellationToken) -> Self {
        Self {
            ring: Mutex::new(Ring::default()),
            keep,
            max_bytes,
            live: broadcast::channel(16).0,
            sockets: AtomicUsize::new(0),
            stop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `view` as the newest frame (the oldest go past [`REPLAY_SPAN`] or
    /// [`REPLAY_MAX_BYTES`]) and sends it, with `decisions`, to every open socket.
    pub fn record(&self, view: &FleetView, decisions: Value) {
        let frame: Arc<str> = serde_json::to_string(view).unwrap_or_default().into();
        {
            let mut ring = self.lock();
            ring.bytes += frame.len();
            ring.frames.push_back(frame.clone());
            while ring.frames.len() > self.keep || ring.bytes > self.max_bytes {
                match ring.frames.pop_front() {
                    Some(old) => ring.bytes -= old.len(),
                    None => break,
                }
            }
        }
        // No socket open is not an error.
        let decisions = decisions.to_string();
        let _ = self.live.send(Arc::new(Live { frame, decisions }));
    }

    /// The replay message: every kept frame, oldest first.
    pub fn replay_message(&self) -> String {
        let ring = self.lock();
        let mut out = String::with_capacity(ring.bytes + ring.frames.len() + 64);
        out.push_str(&format!(
            "{{\"type\":\"replay\",\"interval_ms\":{},\"frames\":[",
            SAMPLE_INTERVAL.as_millis()
        ));
        for (i, f) in ring.frames.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(f);
        }
        out.push_str("]}");
        out
    }

    /// How many frames are kept, and their bytes.
    pub fn kept(&self) -> (usize, usize) {
        let ring = self.lock();
        (ring.frames.len(), ring.bytes)
    }
}

/// Takes a frame every [`SAMPLE_INTERVAL`] until `stop`.
pub async fn sample_loop(
    dashboard: Arc<Dashboard>,
    sched: Arc<Scheduler>,
    connections: ConnectionStats,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let view = FleetView::now(&sched, &connections);
                dashboard.record(&view, recent_decisions(&sched));
            }
        }
    }
}

/// Whether a WebSocket upgrade comes from a page of the admin listener itself: no `Origin`
/// (not a browser), one whose host and port are the request's `Host`, or one of
/// `server.allowed_origins` (a reverse proxy in front of the admin listener that rewrites
/// `Host`). Any web page the operator visits could otherwise read the fleet, users and
/// timelines from a loopback admin listener (cross-site WebSocket hijacking; browsers do not
/// apply the same-origin policy to WebSocket handshakes, RFC 6455 §10.2).
fn same_origin<B>(req: &Request<B>, allowed: &[String]) -> bool {
    let header = |name: http::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    let Some(origin) = header(http::header::ORIGIN) else {
        return true;
    };
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(&origin))
    {
        return true;
    }
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    header(http::header::HOST).is_some_and(|host| host == authority)
}

/// How long one message to a dashboard may take to send before the page counts as gone (a
/// tab that stopped reading must not hold its seat and the scheduler forever).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `text` unless the gate stops first or it takes longer than [`SEND_TIMEOUT`]: `false`
/// when the socket is done.
async fn send<S>(tx: &mut S, stop: &CancellationToken, text: String) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    tokio::select! {
        _ = stop.cancelled() => false,
        sent = tokio::time::timeout(SEND_TIMEOUT, tx.send(Message::text(text))) => {
            matches!(sent, Ok(Ok(())))
        }
    }
}

/// `GET /dashboard/ws`: the upgrade, then the replay and the live frames (module docs). 403
/// for a page of another origin; 503 past [`MAX_SOCKETS`] open at once. The socket closes when
/// the gate stops.
pub fn socket<B>(
    req: &mut Request<B>,
    dashboard: Arc<Dashboard>,
    sched: Arc<Scheduler>,
) -> http::Response<Body> {
    if !same_origin(req, &sched.config.load().server.allowed_origins) {
        let error =
            json!({ "error": "the dashboard's socket is for the admin listener's own page" });
        return crate::http::json(http::StatusCode::FORBIDDEN, &error);
    }
    let Some(seat) = Seat::take(&dashboard) else {
        let error = json!({ "error": format!("{MAX_SOCKETS} dashboards are open; close one") });
        return crate::http::json(http::StatusCode::SERVICE_UNAVAILABLE, &error);
    };
    crate::http::serve_comfy_websocket(req, move |_sid, ws| async move {
        let _seat = seat;
        let (mut tx, mut rx) = ws.split();
        let mut frames = dashboard.live.subscribe();
        // The replay, then the decisions so far at once rather than a sample later.
        let decisions = json!({ "type": "decisions", "decisions": recent_decisions(&sched) });
        let stop = dashboard.stop.clone();
        for message in [dashboard.replay_message(), decisions.to_string()] {
            if !send(&mut tx, &stop, message).await {
                return;
            }
        }
        let mut watched: Option<String> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let close = tx.send(Message::Close(None));
                    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                    return;
                }
                got = frames.recv() => {
                    let live = match got {
                        Ok(live) => live,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let message = live_message(&sched, &live, watched.as_deref());
                    if !send(&mut tx, &stop, message).await {
                        return;
                    }
                }
                msg = rx.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(v) = serde_json::from_str::<Value>(&text)
                            && let Some(w) = v.get("watch")
                        {
                            watched = w.as_str().map(str::to_string);
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    })
}

/// One of the [`MAX_SOCKETS`] places for an open dashboard, given back when dropped.
struct Seat(Arc<Dashboard>);

impl Seat {
    fn take(dashboard: &Arc<Dashboard>) -> Option<Seat> {
        let taken = dashboard.sockets.fetch_add(1, Ordering::SeqCst);
        if taken >= MAX_SOCKETS {
            dashboard.sockets.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Seat(dashboard.clone()))
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The newest placement decisions, newest first, as the page shows them (JSON).
fn recent_decisions(sched: &Scheduler) -> Value {
    let decisions: Vec<Value> = sched
        .recent_decisions_newest(DECISIONS_SHOWN)
        .into_iter()
        .map(|d| {
            json!({
                "at": d["at"], "prompt_id": d["prompt_id"], "chosen": d["chosen"],
                "runner_up": d["runner_up"], "reason": d["reason"],
            })
        })
        .collect();
    Value::Array(decisions)
}

/// One live message: the frame and the decisions as sampled, and the watched prompt's
/// timeline.
fn live_message(sched: &Scheduler, live: &Live, watched: Option<&str>) -> String {
    let timeline = watched
        .and_then(|id| sched.timeline(id))
        .unwrap_or(Value::Null);
    format!(
        "{{\"type\":\"frame\",\"frame\":{},\"decisions\":{},\"timeline\":{}}}",
        live.frame, live.decisions, timeline
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::activity::Activity;

    fn view(at: i64) -> FleetView {
        FleetView {
            at,
            backends: Vec::new(),
            activity: Activity::default(),
            queue_depth: 0,
            websocket_clients: 0,
            connections_open: 0,
            connections_accepted: 0,
            alerts: Vec::new(),
        }
    }

    #[test]
    fn a_socket_from_another_origin_is_refused() {
        let req = |origin: Option<&str>| {
            let mut b = Request::builder()
                .uri("/dashboard/ws")
                .header("host", "127.0.0.1:8189");
            if let Some(o) = origin {
                b = b.header("origin", o);
            }
            b.body(()).unwrap()
        };
        let none: &[String] = &[];
        assert!(same_origin(&req(None), none), "not a browser");
        assert!(same_origin(&req(Some("http://127.0.0.1:8189")), none));
        assert!(!same_origin(&req(Some("https://evil.example")), none));
        assert!(!same_origin(&req(Some("http://127.0.0.1:8188")), none));
        assert!(!same_origin(&req(Some("null")), none));
        let proxied = ["https://dash.example/".to_string()];
        assert!(same_origin(&req(Some("https://dash.example")), &proxied));
    }

    #[test]
    fn the_ring_keeps_the_newest_frames_within_its_count_and_bytes() {
        let d = Dashboard::with_bounds(3, 1 << 20, CancellationToken::new());
        for at in 0..5 {
            d.record(&view(at), Value::Null);
        }
        let replay: Value = serde_json::from_str(&d.replay_message()).unwrap();
        let ats: Vec<i64> = replay["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["at"].as_i64().unwrap())
            .collect();
        assert_eq!(ats, [2, 3, 4], "the oldest went first");
        let one = d.kept().1 / 3;
        let d = Dashboard::with_bounds(100, one * 2, CancellationToken::new());
        for at in 100..110 {
            d.record(&view(at), Value::Null);
        }
        assert!(d.kept().0 <= 2 && d.kept().1 <= one * 2, "{:?}", d.kept());
    }
}
