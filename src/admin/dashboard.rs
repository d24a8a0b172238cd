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
//! - server → page, per sample: `{"type": "frame", "frame": FRAME, "decisions": [{at,
//!   prompt_id, chosen, reason}, …], "timeline": TIMELINE | null}`, where `TIMELINE` is that
//!   of the prompt the page watches (see `GET /admin/prompts/{id}/timeline`);
//! - page → server: `{"watch": "PROMPT_ID"}` (or `null`) picks the prompt whose timeline
//!   comes with each frame.
//!
//! `FRAME` is a [`FleetView`] as JSON.

use std::collections::VecDeque;
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
/// Placement decisions sent with each live frame (the newest).
const DECISIONS_SHOWN: usize = 20;

/// The frames kept for replay and the channel that carries new ones to open sockets.
pub struct Dashboard {
    ring: Mutex<VecDeque<Arc<str>>>,
    keep: usize,
    live: broadcast::Sender<Arc<str>>,
}

impl Default for Dashboard {
    fn default() -> Self {
        let keep = (REPLAY_SPAN.as_millis() / SAMPLE_INTERVAL.as_millis()) as usize;
        Self {
            ring: Mutex::new(VecDeque::with_capacity(keep)),
            keep,
            live: broadcast::channel(16).0,
        }
    }
}

impl Dashboard {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<str>>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `view` as the newest frame (the oldest goes past [`REPLAY_SPAN`]) and sends it to
    /// every open socket.
    pub fn record(&self, view: &FleetView) {
        let frame: Arc<str> = serde_json::to_string(view).unwrap_or_default().into();
        {
            let mut ring = self.lock();
            if ring.len() == self.keep {
                ring.pop_front();
            }
            ring.push_back(frame.clone());
        }
        // No socket open is not an error.
        let _ = self.live.send(frame);
    }

    /// The replay message: every kept frame, oldest first.
    pub fn replay_message(&self) -> String {
        let ring = self.lock();
        let mut out = String::with_capacity(ring.iter().map(|f| f.len() + 1).sum::<usize>() + 64);
        out.push_str(&format!(
            "{{\"type\":\"replay\",\"interval_ms\":{},\"frames\":[",
            SAMPLE_INTERVAL.as_millis()
        ));
        for (i, f) in ring.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(f);
        }
        out.push_str("]}");
        out
    }

    /// How many frames are kept.
    pub fn frames(&self) -> usize {
        self.lock().len()
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
            _ = tick.tick() => dashboard.record(&FleetView::now(&sched, &connections)),
        }
    }
}

/// `GET /dashboard/ws`: the upgrade, then the replay and the live frames (module docs).
pub fn socket<B>(
    req: &mut Request<B>,
    dashboard: Arc<Dashboard>,
    sched: Arc<Scheduler>,
) -> http::Response<Body> {
    crate::http::serve_comfy_websocket(req, move |_sid, ws| async move {
        let (mut tx, mut rx) = ws.split();
        let mut frames = dashboard.live.subscribe();
        if tx
            .send(Message::text(dashboard.replay_message()))
            .await
            .is_err()
        {
            return;
        }
        let mut watched: Option<String> = None;
        loop {
            tokio::select! {
                got = frames.recv() => {
                    let frame = match got {
                        Ok(frame) => frame,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let message = live_message(&sched, &frame, watched.as_deref());
                    if tx.send(Message::text(message)).await.is_err() {
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

/// One live message: the frame, the newest decisions, the watched prompt's timeline.
fn live_message(sched: &Scheduler, frame: &str, watched: Option<&str>) -> String {
    let decisions: Vec<Value> = sched
        .recent_decisions()
        .into_iter()
        .rev()
        .take(DECISIONS_SHOWN)
        .map(|d| {
            json!({
                "at": d["at"], "prompt_id": d["prompt_id"], "chosen": d["chosen"],
                "runner_up": d["runner_up"], "reason": d["reason"],
            })
        })
        .collect();
    let timeline = watched.and_then(|id| sched.timeline(id));
    let rest = json!({ "decisions": decisions, "timeline": timeline }).to_string();
    // `{"decisions": …}` with the frame spliced in front, without parsing it again.
    format!("{{\"type\":\"frame\",\"frame\":{frame},{}", &rest[1..])
}
