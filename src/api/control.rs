//! The routes that change prompts: `POST /interrupt`, `POST /queue` (delete, clear) and
//! `POST /history` (delete, clear), each scoped as ComfyUI scopes it, over a fleet: a prompt is
//! acted on where it is (the gate queue or its owner), and a call without ids touches only the
//! caller's own prompts (design §2 "Interrupt"). With auth on, an id of another user's prompt
//! (or of one the gate does not know) is passed over as ComfyUI passes over an unknown id;
//! admins may touch every prompt.

use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::Ctx;
use crate::error::GateError;
use crate::fleet::probe::queue_lists;
use crate::http::{Body, status};
use crate::protocol::errors::python_str;
use crate::sched::Outcome;
use crate::sched::prompts::{PromptRecord, Stage};
use crate::sched::recovery::fetch_history;
use crate::sched::tenant::Caller;

/// Parses a JSON body.
pub fn parse_json(body: &[u8]) -> Result<Value, GateError> {
    serde_json::from_slice(body).map_err(|e| GateError::BadJson(e.to_string()))
}

/// Python's truthiness, as ComfyUI's handlers test their fields.
pub fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// `POST /interrupt`. With `prompt_id`: the prompt is interrupted on its owner if it runs
/// there; one still waiting is left alone, as ComfyUI ignores an interrupt whose id is not the
/// running prompt (`server.py` `post_interrupt`). Without: the caller's running prompts, each
/// by id; the gate never sends a bare global interrupt.
pub async fn interrupt(
    ctx: &Ctx,
    caller: &Caller,
    body: &[u8],
) -> Result<Response<Body>, GateError> {
    // No body at all is the caller's running prompts (older clients post none); a body that is
    // not JSON is refused, never read as "interrupt everything I run".
    let data: Value = if body.trim_ascii().is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| GateError::BadJson(e.to_string()))?
    };
    let named = data
        .get("prompt_id")
        .filter(|v| truthy(Some(v)))
        .map(python_str);
    let ids = match named {
        Some(id) if ctx.sched.may_touch(caller, &id) => vec![id],
        Some(_) => Vec::new(),
        None => ctx.sched.prompts_of(&caller.identity, |r| {
            r.stage == Stage::OnBackend && r.started
        }),
    };
    let targets = ids
        .into_iter()
        .filter_map(|id| match ctx.sched.whereabouts(&id) {
            Some((Stage::OnBackend, _, Some(owner))) => Some((id, owner)),
            _ => None,
        });
    for (id, owner) in targets {
        let Some(i) = ctx.fleet.index_of(&owner) else {
            continue;
        };
        let b = ctx.fleet.get(i);
        if let Err(e) = ctx
            .fleet
            .upstream
            .post_json(&b.config, "/interrupt", &json!({ "prompt_id": id }))
            .await
        {
            ctx.fleet.record_health(i, false);
            return Err(e);
        }
    }
    Ok(status(StatusCode::OK))
}

/// The ids a `{"delete": [...], "clear": bool}` body names: the listed ids the caller may
/// touch (others' are passed over as unknown ids are), plus (with `clear`) the caller's own
/// prompts that `clearable` accepts.
fn targets(
    ctx: &Ctx,
    data: &Value,
    caller: &Caller,
    clearable: impl Fn(&PromptRecord) -> bool,
) -> Vec<String> {
    let mut ids: Vec<String> = data["delete"]
        .as_array()
        .into_iter()
        .flatten()
        .map(python_str)
        .filter(|id| ctx.sched.may_touch(caller, id))
        .collect();
    if truthy(data.get("clear")) {
        ids.extend(ctx.sched.prompts_of(&caller.identity, clearable));
    }
    ids
}

/// `POST /queue`: delete by id and clear (the caller's), of prompts that have not started:
/// from the gate queue at once, from an owner's queue once it confirms they are gone.
pub async fn post_queue(
    ctx: &Ctx,
    caller: &Caller,
    body: &[u8],
) -> Result<Response<Body>, GateError> {
    let data = parse_json(body)?;
    let ids = targets(ctx, &data, caller, |r| {
        !r.started && matches!(r.stage, Stage::Queued | Stage::OnBackend)
    });
    let mut on_backends: Vec<(String, usize)> = Vec::new();
    for id in &ids {
        match ctx.sched.whereabouts(id) {
            Some((Stage::Queued, _, _)) => ctx.sched.end(id, Outcome::Deleted { from: None }),
            Some((Stage::OnBackend, false, Some(owner))) => {
                if let Some(i) = ctx.fleet.index_of(&owner) {
                    on_backends.push((id.clone(), i));
                }
            }
            _ => {}
        }
    }
    for (id, owner) in on_backends {
        let b = ctx.fleet.get(owner).clone();
        let upstream = &ctx.fleet.upstream;
        let one = json!({ "delete": [id] });
        if let Err(e) = upstream.post_json(&b.config, "/queue", &one).await {
            tracing::warn!(backend = b.name(), error = %e, "could not delete a prompt there");
            continue;
        }
        // Gone from the owner's queue, and not because it ran (its history would have it): it
        // will never run there.
        if let Ok((_, q)) = upstream.get_json(&b.config, "/queue").await
            && !queue_lists(&q, &id)
            && fetch_history(&ctx.sched, owner, &id).await.is_none()
        {
            let from = Some(b.name().to_string());
            ctx.sched.end(&id, Outcome::Deleted { from });
        }
    }
    ctx.sched.broadcast_status();
    Ok(status(StatusCode::OK))
}

/// `POST /history`: delete by id on the owner (or everywhere), clear the caller's entries.
pub async fn post_history(
    ctx: &Ctx,
    caller: &Caller,
    body: &[u8],
) -> Result<Response<Body>, GateError> {
    let data = parse_json(body)?;
    let ids = targets(ctx, &data, caller, |r| r.stage == Stage::Done);
    for id in ids {
        let owner = ctx.sched.whereabouts(&id).and_then(|(_, _, owner)| owner);
        let targets: Vec<usize> = match owner.and_then(|o| ctx.fleet.index_of(&o)) {
            Some(o) => vec![o],
            None => ctx.fleet.up(),
        };
        for t in targets {
            let b = ctx.fleet.get(t).clone();
            let _ = ctx
                .fleet
                .upstream
                .post_json(&b.config, "/history", &json!({ "delete": [id] }))
                .await;
        }
        // After the backends' copies, so none of them shows as a stranger's entry meanwhile.
        ctx.sched.forget_history(&id);
    }
    Ok(status(StatusCode::OK))
}
