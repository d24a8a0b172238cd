//! One simulated user: a client_id, its `/ws?clientId=` socket, and the prompts it submits.
//!
//! The socket task routes `execution_start`, `executing {node: null}`, `execution_error` and
//! `execution_interrupted` to the prompt they name. When the socket cannot be opened or drops,
//! every waiting prompt (and every later one) follows its prompt by polling `/history/{id}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::client::Target;
use super::report::{Outcome, Status};

/// How often a prompt without a socket polls `/history/{id}`.
const POLL: Duration = Duration::from_millis(200);
/// How often a prompt followed over the socket checks `/history/{id}` anyway (a safety net for
/// servers that never send its events).
const SAFETY_POLL: Duration = Duration::from_secs(2);
/// A user's WebSocket handshake that takes longer fails.
const WS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive transport failures while polling before the prompt counts as `connection`.
const POLL_FAILURES: u32 = 5;

enum Event {
    Started(Instant),
    Done,
    Error(String),
}

type Waiters = HashMap<String, mpsc::UnboundedSender<Event>>;

/// `None` once the socket is gone (or never opened): prompts then poll.
struct Routes(Mutex<Option<Waiters>>);

pub(crate) struct User {
    target: Arc<Target>,
    client_id: String,
    routes: Arc<Routes>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for User {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

impl User {
    /// A user with a fresh client_id; opens its socket (a failure leaves it polling).
    pub async fn connect(target: Arc<Target>) -> Self {
        let client_id = uuid::Uuid::new_v4().simple().to_string();
        let routes = Arc::new(Routes(Mutex::new(None)));
        let url = target.ws_url(&client_id);
        // Like ComfyUI's clients, it takes messages of any size (tungstenite's defaults refuse
        // frames over 16 MiB, which a SaveImageWebsocket image or a long text can pass).
        let any_size = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let opened = tokio::time::timeout(
            WS_CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url, Some(any_size), false),
        )
        .await;
        let reader = match opened {
            Ok(Ok((stream, _))) => {
                *routes.0.lock().unwrap() = Some(HashMap::new());
                let routes = routes.clone();
                Some(tokio::spawn(async move {
                    let (_sink, mut read) = stream.split();
                    while let Some(Ok(msg)) = read.next().await {
                        match msg {
                            Message::Text(t) => route(&routes, &t),
                            Message::Close(_) => break,
                            _ => {}
                        }
                    }
                    // Dropping every sender tells the waiting prompts to poll instead.
                    routes.0.lock().unwrap().take();
                }))
            }
            _ => None,
        };
        Self {
            target,
            client_id,
            routes,
            reader,
        }
    }

    /// Submits one prompt and follows it to its end (or `timeout`, counted from submission);
    /// its times are counted from `run_start`.
    pub async fn run_prompt(&self, graph: Value, timeout: Duration, run_start: Instant) -> Outcome {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let events = {
            let mut routes = self.routes.0.lock().unwrap();
            routes.as_mut().map(|w| {
                let (tx, rx) = mpsc::unbounded_channel();
                w.insert(prompt_id.clone(), tx);
                rx
            })
        };
        let submitted = Instant::now();
        let mut started = None;
        let body = json!({ "prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id });
        let clock = (submitted, SystemTime::now());
        let work = self.submit_and_follow(&prompt_id, &body, events, &mut started, clock);
        let status = match tokio::time::timeout(timeout, work).await {
            Ok(s) => s,
            Err(_) => Status::TimedOut,
        };
        if let Some(w) = self.routes.0.lock().unwrap().as_mut() {
            w.remove(&prompt_id);
        }
        let end = Instant::now();
        let ok = matches!(status, Status::Succeeded);
        Outcome {
            prompt_id,
            submitted_at: submitted.saturating_duration_since(run_start),
            ended_at: end.saturating_duration_since(run_start),
            backend: None,
            queue_wait: started.map(|s: Instant| s.saturating_duration_since(submitted)),
            run_time: started
                .filter(|_| ok)
                .map(|s| end.saturating_duration_since(s)),
            latency: ok.then(|| end.duration_since(submitted)),
            status,
        }
    }

    async fn submit_and_follow(
        &self,
        prompt_id: &str,
        body: &Value,
        events: Option<mpsc::UnboundedReceiver<Event>>,
        started: &mut Option<Instant>,
        submitted: (Instant, SystemTime),
    ) -> Status {
        match self.target.post_json("/prompt", body).await {
            Err(_) => return Status::Failed("connection".into()),
            Ok((200, _)) => {}
            Ok((code, bytes)) => return Status::Failed(http_error_kind(code, &bytes)),
        }
        if let Some(mut rx) = events {
            let mut safety = tokio::time::interval(SAFETY_POLL);
            safety.tick().await;
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(Event::Started(t)) => *started = Some(t),
                        Some(Event::Done) => return Status::Succeeded,
                        Some(Event::Error(kind)) => return Status::Failed(kind),
                        None => break, // the socket dropped: poll from here on
                    },
                    _ = safety.tick() => {
                        if let Ok(Some(s)) = self.history(prompt_id, started, submitted).await {
                            return s;
                        }
                    }
                }
            }
        }
        let mut failures = 0;
        loop {
            match self.history(prompt_id, started, submitted).await {
                Ok(Some(status)) => return status,
                Ok(None) => failures = 0,
                Err(()) => {
                    failures += 1;
                    if failures >= POLL_FAILURES {
                        return Status::Failed("connection".into());
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The prompt's end from `/history/{id}`, if it is there; fills in `started` from the
    /// history's `execution_start` timestamp when the socket did not report it.
    async fn history(
        &self,
        prompt_id: &str,
        started: &mut Option<Instant>,
        submitted: (Instant, SystemTime),
    ) -> Result<Option<Status>, ()> {
        let (code, bytes) = self
            .target
            .get(&format!("/history/{prompt_id}"))
            .await
            .map_err(|_| ())?;
        if code != 200 {
            return Ok(None);
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let Some(entry) = value.get(prompt_id) else {
            return Ok(None);
        };
        let status = &entry["status"];
        let messages = status["messages"].as_array().cloned().unwrap_or_default();
        let message = |kind: &str| messages.iter().find(|m| m[0] == kind).map(|m| m[1].clone());
        if started.is_none()
            && let Some(ts) = message("execution_start").and_then(|d| d["timestamp"].as_f64())
        {
            let submitted_ms = submitted.1.duration_since(UNIX_EPOCH).unwrap_or_default();
            let wait_ms = (ts - submitted_ms.as_secs_f64() * 1000.0).max(0.0);
            let wait = Duration::from_secs_f64(wait_ms / 1000.0).min(submitted.0.elapsed());
            *started = Some(submitted.0 + wait);
        }
        if status["status_str"] == "success" {
            return Ok(Some(Status::Succeeded));
        }
        if let Some(err) = message("execution_error") {
            return Ok(Some(Status::Failed(exception_kind(&err))));
        }
        if message("execution_interrupted").is_some() {
            return Ok(Some(Status::Failed("interrupted".into())));
        }
        Ok(Some(Status::Failed(
            status["status_str"].as_str().unwrap_or("error").to_string(),
        )))
    }
}

/// Routes one socket message to the prompt it names.
fn route(routes: &Routes, text: &str) {
    let Ok(msg) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let data = &msg["data"];
    let Some(prompt_id) = data["prompt_id"].as_str() else {
        return;
    };
    let event = match msg["type"].as_str() {
        Some("execution_start") => Event::Started(Instant::now()),
        Some("executing") if data["node"].is_null() => Event::Done,
        Some("execution_error") => Event::Error(exception_kind(data)),
        Some("execution_interrupted") => Event::Error("interrupted".into()),
        _ => return,
    };
    let terminal = !matches!(event, Event::Started(_));
    let mut guard = routes.0.lock().unwrap();
    let Some(waiters) = guard.as_mut() else {
        return;
    };
    if let Some(tx) = waiters.get(prompt_id) {
        let _ = tx.send(event);
        if terminal {
            waiters.remove(prompt_id);
        }
    }
}

fn exception_kind(data: &Value) -> String {
    data["exception_type"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("execution_error")
        .to_string()
}

/// A refused submission's kind: ComfyUI's `error.type`, else `http_<status>`.
fn http_error_kind(code: u16, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["type"].as_str().map(str::to_string))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("http_{code}"))
}
