//! Upstream events (design §2 "One upstream socket per backend"): every event of every prompt
//! arrives on the backend's one socket under the gate's clientId. Each is routed to the client
//! that owns its `prompt_id`; events without one (binary previews of type 1, custom events)
//! belong to the prompt that backend is running. A prompt's `executing {node: null}` is its
//! end there: the slot frees at once, and the client hears it only after the history entry is
//! kept ([`completed`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::prompts::PromptRecord;
use super::timeline::Happened;
use super::{Outcome, Scheduler, recovery};
use crate::fleet::picker::profile;
use crate::fleet::socket::UpstreamEvent;
use crate::metrics::BackendLabel;
use crate::protocol::{frames, now_ms};

/// Routes upstream events until the fleet's sockets are gone.
pub async fn event_loop(sched: Arc<Scheduler>, events: &mut mpsc::Receiver<UpstreamEvent>) {
    while let Some(event) = events.recv().await {
        match event {
            UpstreamEvent::Opened {
                backend,
                reconciled,
            } => {
                let sched = sched.clone();
                tokio::spawn(async move {
                    recovery::reconcile(&sched, backend).await;
                    let _ = reconciled.send(());
                });
            }
            UpstreamEvent::Json { backend, message } => route_json(&sched, backend, message),
            UpstreamEvent::Binary { backend, frame } => route_binary(&sched, backend, frame),
            UpstreamEvent::Closed { .. } => {}
        }
    }
}

/// The client sid of a prompt in flight on `backend` whose events the client should see:
/// `None` if the prompt is not in flight there, `Some(None)` if nobody should see them.
fn owner_client(r: Option<&PromptRecord>, backend: &str) -> Option<Option<String>> {
    let r = r?;
    r.in_flight_on(backend)
        .then(|| r.session().filter(|_| !r.retry_after_run))
}

/// The client of the prompt `backend` is running (see [`owner_client`]); a `preview` is
/// counted on its timeline.
fn running_client(sched: &Scheduler, backend: &str, preview: bool) -> Option<String> {
    let mut s = sched.lock();
    let running = s.table.running_on(backend)?.to_string();
    let r = s.table.get_mut(&running)?;
    if preview {
        let node = r.last_node.clone();
        r.timeline.preview(now_ms(), node.as_deref());
    }
    owner_client(Some(r), backend).flatten()
}

/// Whether an event of `r` from `backend` belongs to the run the gate is waiting for. Every run
/// starts with `execution_start` (ComfyUI's `execution.py`); before it, events from a backend
/// the prompt was moved away from earlier (its `tried`) are the tail of that earlier copy, which
/// the gate asked it to drop. From any other backend an event before the start the gate saw
/// only means it started while nobody listened.
fn is_fresh(r: &PromptRecord, backend: &str, kind: &str) -> bool {
    r.started || kind == "execution_start" || !r.tried.iter().any(|t| t == backend)
}

/// Whether an `execution_error` is an out-of-memory error that another, larger backend could
/// avoid; if so the prompt is marked to run again there.
fn oom_retry(sched: &Scheduler, backend: usize, prompt_id: &str, data: &Value) -> bool {
    let text = format!("{} {}", data["exception_type"], data["exception_message"]).to_lowercase();
    if !(text.contains("outofmemory") || text.contains("out of memory")) {
        return false;
    }
    let fleet = &sched.fleet;
    let total = fleet.vram(backend).0;
    let larger = fleet
        .backends()
        .iter()
        .any(|b| b.index != backend && b.is_up() && b.is_listed() && fleet.vram(b.index).0 > total);
    let mut s = sched.lock();
    let Some(r) = s.table.get_mut(prompt_id) else {
        return false;
    };
    if r.oom_retried || !larger {
        return false;
    }
    r.oom_retried = true;
    r.retry_after_run = true;
    r.retry_reason = Some("out_of_memory");
    r.min_vram_total = Some(total + 1);
    tracing::info!(
        prompt = prompt_id,
        backend = fleet.get(backend).name(),
        "out of memory; retrying on a larger backend"
    );
    true
}

/// Routes one JSON event from `backend`.
pub fn route_json(sched: &Arc<Scheduler>, backend: usize, mut v: Value) {
    let kind = v["type"].as_str().unwrap_or("").to_string();
    let b = sched.fleet.get(backend).clone();
    match kind.as_str() {
        // The gate's own `status` is sent on its own transitions (see `views`).
        "status" => return,
        "feature_flags" => return,
        _ => {}
    }
    let mut data = v["data"].take();
    let Some(prompt_id) = data
        .get("prompt_id")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        // No prompt_id: the reconnect replay or a custom event; it belongs to whatever this
        // backend is running.
        if kind != "executing"
            && let Some(sid) = running_client(sched, b.name(), false)
        {
            sched.sessions.send_json(&sid, &kind, data);
        }
        return;
    };
    let (owner, fresh) = {
        let s = sched.lock();
        let r = s.table.get(&prompt_id);
        (
            owner_client(r, b.name()),
            r.is_some_and(|r| is_fresh(r, b.name(), &kind)),
        )
    };
    let Some(mut client) = owner else {
        return;
    };
    if !fresh {
        tracing::debug!(prompt = %prompt_id, kind, "an earlier run's event, dropped");
        return;
    }
    if kind == "executed"
        && let Some(output) = data.get_mut("output")
    {
        sched.files.alias_outputs(b.name(), output);
    }
    if kind == "execution_error" && oom_retry(sched, backend, &prompt_id, &data) {
        client = None;
    }
    // A prompt forwarded at submit may start before its backend's answer arrives: then it was
    // not yet counted, and its `PromptQueue.put` status is due first.
    let put_unsent = sched.lock().table.is_unanswered(&prompt_id);
    note_event(sched, backend, &prompt_id, &kind, &data);
    if kind == "executing" && data.get("node").is_some_and(Value::is_null) {
        // History first, then the client hears it ended (see `completed`).
        completed(sched, backend, &prompt_id);
        return;
    }
    if put_unsent {
        sched.broadcast_status();
    }
    if kind == "execution_start" {
        // ComfyUI's `PromptQueue.get` sends `status` as the prompt starts running.
        sched.broadcast_status();
    }
    if let Some(sid) = &client {
        if crate::sessions::missed::is_terminal(&kind, &data)
            && let Some(r) = sched.lock().table.get_mut(&prompt_id)
        {
            r.terminal_sent = true;
        }
        sched.sessions.send_json(sid, &kind, data);
    }
}

/// Updates a prompt's run state from one of its events: liveness, the run log, the start, the
/// node now executing and checkpoint load times (a loader node's time is a load time); its
/// timeline and the per-node metrics ([`super::timeline`], [`crate::metrics`]).
fn note_event(sched: &Scheduler, backend: usize, prompt_id: &str, kind: &str, data: &Value) {
    let name = sched.fleet.get(backend).name().to_string();
    let metrics = sched.fleet.metrics.on();
    let mut s = sched.lock();
    let state = &mut *s;
    if kind == "execution_start" {
        state.table.started(prompt_id, &name);
    } else if state.table.get(prompt_id).is_some_and(|r| !r.started) {
        state.table.started_unseen(prompt_id, &name);
    }
    let Some(r) = state.table.get_mut(prompt_id) else {
        return;
    };
    let now = Instant::now();
    let at = now_ms();
    r.last_event = Some(now);
    r.reports_progress = kind == "progress";
    recovery::log_event(r, kind, data);
    match kind {
        "execution_start" => r.timeline.mark(at, Happened::Started { backend: name }),
        "execution_cached" => {
            let nodes: Vec<String> = data["nodes"]
                .as_array()
                .map(|n| {
                    n.iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let classes: Vec<String> = nodes.iter().map(|n| r.class_of(n).to_string()).collect();
            if let Some(m) = metrics {
                for class in &classes {
                    m.nodes_cached.get_or_create(&m.class_label(class)).inc();
                }
            }
            r.timeline.mark(at, Happened::Cached { nodes, classes });
        }
        "progress" => {
            let (value, max) = (data["value"].as_f64(), data["max"].as_f64());
            r.progress = value.zip(max).filter(|(_, max)| *max > 0.0);
            return;
        }
        "executing" => r.progress = None,
        _ => return,
    }
    if let (Some(prev), Some(since)) = (r.last_node.clone(), r.last_node_at) {
        let secs = (now - since).as_secs_f64();
        let class = r.class_of(&prev);
        if let Some(m) = metrics {
            m.node_time
                .get_or_create(&m.class_label(class))
                .observe(secs);
        }
        let node = &r.body["prompt"][&prev];
        let is_loader = class.contains("CheckpointLoader");
        if let (true, Some(ckpt)) = (is_loader, node["inputs"]["ckpt_name"].as_str()) {
            r.load_measured_s += secs;
            state.learned.observe_load(backend, ckpt, secs);
            if let Some(m) = metrics {
                let backend = BackendLabel {
                    backend: sched.fleet.get(backend).name().to_string(),
                };
                m.checkpoint_loads.get_or_create(&backend).inc();
                m.checkpoint_load_time.get_or_create(&backend).observe(secs);
            }
        }
    }
    r.last_node = data.get("node").and_then(Value::as_str).map(str::to_string);
    r.last_node_at = Some(now);
    match &r.last_node {
        Some(node) => {
            let class = r.class_of(node).to_string();
            r.timeline.mark(
                at,
                Happened::Node {
                    node: node.clone(),
                    class,
                },
            );
        }
        None => r.timeline.mark(at, Happened::Ran),
    }
}

/// Routes one binary frame from `backend`.
pub fn route_binary(sched: &Scheduler, backend: usize, frame: Bytes) {
    let b = sched.fleet.get(backend);
    let name = b.name();
    let client = match frames::decode_preview_with_metadata(&frame) {
        Some((meta, _)) => meta
            .get("prompt_id")
            .and_then(Value::as_str)
            .and_then(|id| {
                let mut s = sched.lock();
                let r = s
                    .table
                    .get_mut(id)
                    .filter(|r| is_fresh(r, name, "preview"))?;
                let node = meta.get("node_id").and_then(Value::as_str);
                r.timeline
                    .preview(now_ms(), node.or(r.last_node.as_deref()));
                owner_client(Some(r), name)
            })
            .flatten(),
        None => running_client(sched, name, true),
    };
    if let Some(sid) = client {
        sched.sessions.send_binary(&sid, frame);
    }
}

/// The prompt's final `executing {node: null}` arrived from `backend`: its slot frees now;
/// then, in the background, its history entry is collected and it ends ([`Scheduler::end`]).
/// A run marked for retry (out of memory, `max_run_time` with `retry`) goes back to the queue.
pub fn completed(sched: &Arc<Scheduler>, backend: usize, id: &str) {
    let b = sched.fleet.get(backend).clone();
    let (retry, learned_from) = {
        let mut s = sched.lock();
        let Some(r) = s.table.get(id).filter(|r| r.holds_slot(Some(b.name()))) else {
            return;
        };
        let retry = r
            .retry_after_run
            .then(|| r.retry_reason.unwrap_or("max_run_time"));
        let started_at = r.started_at.filter(|_| !r.start_unseen);
        let run = (r.body["prompt"].clone(), started_at, r.load_measured_s);
        s.table.ran(id, b.name());
        // Its user is charged the GPU seconds it took, not the estimate (see `fair`).
        s.fair
            .settle(id, started_at.map(|at| at.elapsed().as_secs_f64()));
        (retry, run)
    };
    sched.wake();
    if let Some(reason) = retry {
        sched.requeue(&[id.to_string()], false, reason);
        return;
    }
    b.completed.fetch_add(1, Ordering::SeqCst);
    if let (prompt, Some(at), load) = learned_from {
        let prof = profile::profile(&prompt);
        sched
            .lock()
            .learned
            .observe_run(backend, &prof, at.elapsed().as_secs_f64(), load);
    }
    let sched = sched.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let entry = match recovery::fetch_history(&sched, backend, &id).await {
            Some(e) => e,
            None => recovery::history_from_events(&sched, &id),
        };
        sched.end(&id, Outcome::Ran(entry));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_copys_tail_is_stale_only_where_the_prompt_was_before() {
        let mut r = PromptRecord::new(
            "p".into(),
            1.into(),
            Default::default(),
            None,
            "x".into(),
            Default::default(),
        );
        r.tried = vec!["a".into()];
        assert!(
            !is_fresh(&r, "a", "execution_interrupted"),
            "a ran the old copy"
        );
        assert!(
            is_fresh(&r, "a", "execution_start"),
            "a new run starts with it"
        );
        assert!(
            is_fresh(&r, "b", "executing"),
            "b never had it: it started unobserved"
        );
        r.started = true;
        assert!(is_fresh(&r, "a", "executing"));
    }
}
