//! A prompt answered from the result cache ([`super::cache`]): it is admitted like any other
//! (its own id, number, record and history entry), then ends at once, with the events one
//! ComfyUI sends for a run whose every node is in its cache (`execution.py`,
//! `PromptExecutor.execute_async`): `execution_start`, `execution_cached` listing every node the
//! outputs need (what the earlier run executed, so what ComfyUI's cache would hold), then for
//! each output node, in the prompt's order, `executed` with its cached UI output and
//! `progress_state` marking it finished; then `execution_success`, `status`, `executing {node:
//! null}` ([`Scheduler::end`]). Upstream nodes of cached outputs are never staged there, so they
//! get no `executed`. No backend hears of the prompt. It is admitted straight to `Finishing`
//! (listed as running until its entry is kept), so no delete or dispatch touches it meanwhile.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::admission::Submission;
use super::cache::CachedRun;
use super::tenant::Caller;
use super::timeline::Happened;
use super::{Outcome, Scheduler};
use crate::error::GateError;
use crate::http::{Body, json as json_resp};
use crate::protocol::now_ms;

/// Answers `sub` from `run`: records it, sends its events, ends it with its own history entry
/// (durable before the answer), and answers as ComfyUI does for an accepted prompt. The errors
/// of any submit: a duplicate id (400), a `number` that is not a finite number (400).
pub(super) fn answer(
    sched: &Arc<Scheduler>,
    caller: &Caller,
    mut sub: Submission,
    run: &CachedRun,
) -> Result<Response<Body>, GateError> {
    let id = sub.id.clone();
    let (number, session, nodes) = {
        let mut s = sched.lock();
        if s.table.contains(&id) {
            return Err(GateError::DuplicatePromptId(id));
        }
        let number = super::admission::number_of(sub.number.take(), &mut s.table, sub.front)?;
        let mut rec = super::admission::new_record(sched, caller, id.clone(), number.clone(), sub);
        let graph = rec.graph().0.clone();
        let nodes = upstream_of(&graph, &run.outputs_to_execute);
        let classes = nodes.iter().map(|n| rec.class_of(n).to_string()).collect();
        rec.timeline.mark(
            now_ms(),
            Happened::Cached {
                nodes: nodes.clone(),
                classes,
            },
        );
        let session = rec.session();
        s.table.admit_answered(rec);
        (number, session, nodes)
    };
    if let Some(metrics) = sched.fleet.metrics.on() {
        let band = sched
            .lock()
            .table
            .get(&id)
            .map(|r| r.tenant.band.clone())
            .unwrap_or_default();
        metrics
            .prompts_submitted
            .get_or_create(&crate::metrics::BandLabel { band })
            .inc();
        metrics.cache_hits.inc();
    }
    sched.broadcast_status();
    // The output nodes in the order this prompt lists them.
    let outputs: Vec<String> = nodes
        .iter()
        .filter(|n| run.outputs_to_execute.contains(n))
        .cloned()
        .collect();
    let start = now_ms();
    let started = json!({ "prompt_id": id, "timestamp": start });
    let cached = json!({ "nodes": nodes, "prompt_id": id, "timestamp": start });
    if let Some(sid) = &session {
        sched
            .sessions
            .send_json(sid, "execution_start", started.clone());
        sched
            .sessions
            .send_json(sid, "execution_cached", cached.clone());
        let mut finished = Map::new();
        for node in &outputs {
            let display = run.meta[node]["display_node"]
                .as_str()
                .unwrap_or(node)
                .to_string();
            let output = run.outputs.get(node).cloned().unwrap_or(Value::Null);
            sched.sessions.send_json(
                sid,
                "executed",
                json!({ "node": node, "display_node": display, "output": output, "prompt_id": id }),
            );
            finished.insert(node.clone(), finished_state(&id, node, &display));
            sched.sessions.send_json(
                sid,
                "progress_state",
                json!({ "prompt_id": id, "nodes": finished.clone() }),
            );
        }
    }
    let mut item = {
        let s = sched.lock();
        s.table
            .get(&id)
            .map(|r| r.queue_item(outputs.clone()))
            .unwrap_or(Value::Null)
    };
    if item.is_null() {
        item = json!([number, id, {}, {}, outputs]);
    }
    let success = json!({ "prompt_id": id, "timestamp": now_ms() });
    let entry = json!({
        "prompt": item,
        "outputs": run.outputs,
        "status": {
            "status_str": "success",
            "completed": true,
            "messages": [
                ["execution_start", started],
                ["execution_cached", cached],
                ["execution_success", success],
            ],
        },
        "meta": run.meta,
    });
    // Its history entry is kept (and written) before the answer; `end` sends
    // `execution_success` from it, `status` and `executing {node: null}`.
    sched.end(&id, Outcome::Ran(entry));
    // A `200` means it survives a restart: its entry must be in the store, not only in memory.
    if !sched.history.is_written(&id) {
        return Err(GateError::Unavailable(
            "the answer from the result cache could not be stored".into(),
        ));
    }
    tracing::debug!(prompt = %id, from = %run.from, "answered from the result cache");
    Ok(json_resp(
        StatusCode::OK,
        &json!({ "prompt_id": id, "number": number, "node_errors": {} }),
    ))
}

/// The nodes of `graph` that `outputs` need (themselves and every node a link leads back to),
/// in the graph's order: what ComfyUI's executor ran, so what its cache holds for a repeat
/// (`execution_cached` lists them).
fn upstream_of(graph: &Value, outputs: &[String]) -> Vec<String> {
    let mut needed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut todo: Vec<String> = outputs.to_vec();
    while let Some(node) = todo.pop() {
        if graph.get(&node).is_none() || !needed.insert(node.clone()) {
            continue;
        }
        for v in graph[&node]["inputs"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, v)| v)
        {
            if let Some([Value::String(from), Value::Number(_)]) = v.as_array().map(Vec::as_slice) {
                todo.push(from.clone());
            }
        }
    }
    graph
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| needed.contains(*k))
        .cloned()
        .collect()
}

/// A node's entry in `progress_state` once finished, as ComfyUI's registry reports a node that
/// never started (a cache hit): `value` = `max` = 1 (`comfy_execution/progress.py`).
fn finished_state(prompt_id: &str, node: &str, display: &str) -> Value {
    json!({
        "value": 1, "max": 1, "state": "finished", "node_id": node,
        "prompt_id": prompt_id, "display_node_id": display,
        "parent_node_id": null, "real_node_id": node,
    })
}
