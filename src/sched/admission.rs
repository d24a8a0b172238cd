//! Admission (design §2 "Validation", "Late binding"): `POST /prompt` records the prompt
//! (durably, and before anyone can hear of it: WebSocket events can beat the HTTP answer), then
//! forwards it at once if a backend has a free slot and nothing waits ahead of it, returning the
//! backend's answer verbatim, or holds it in the gate queue and answers as ComfyUI does for a
//! queued prompt.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::dispatch::{Forwarded, forward};
use super::prompts::{PromptRecord, PromptTable};
use super::tenant::Caller;
use super::writer::Ticket;
use super::{Scheduler, cache, cached, fit, placing};
use crate::config::Config;
use crate::error::GateError;
use crate::error::QUEUE_FULL_RETRY_S;
use crate::fleet::picker::profile;
use crate::http::{Body, json as json_resp};
use crate::protocol::errors;
use std::time::Duration;

/// A parsed `POST /prompt` body: what the gate takes out of it, and the rest kept verbatim.
pub struct Submission {
    /// `prompt_id` (as Python's `str()` spells it), or a fresh uuid4.
    pub id: String,
    /// `client_id`, as Python's `str()` spells it.
    pub client_id: Option<String>,
    /// `front`, read with Python's truthiness for bools and null.
    pub front: bool,
    /// `number`, as sent.
    pub number: Option<Value>,
    /// The rest of the body (`prompt`, `extra_data`, …), unchanged.
    pub body: Map<String, Value>,
}

/// Parses and checks a `POST /prompt` body (ComfyUI's `server.py` `post_prompt` rules): `Ok(Err)`
/// is ComfyUI's own 400 answer, either for the body's shape or from `refuse`, the fleet's
/// verdict on the `prompt` object (a node class or file no backend has, a prompt no card
/// holds). `Err` is the gate's own 4xx for a body ComfyUI would fail on with a 500.
/// Client bytes reach it unchecked: it is a fuzz target (`fuzz/`).
pub fn parse(
    body: &[u8],
    refuse: &dyn Fn(&Value) -> Option<Value>,
) -> Result<Result<Submission, Value>, GateError> {
    let mut data: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(GateError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        }
        Err(e) => return Err(GateError::BadJson(e.to_string())),
    };
    if !data.contains_key("prompt") {
        return Ok(Err(errors::no_prompt()));
    }
    if !data["prompt"].is_object() {
        return Err(GateError::BadRequest(
            "`prompt` must be an object of nodes".into(),
        ));
    }
    if let Some(refusal) = refuse(&data["prompt"]) {
        return Ok(Err(refusal));
    }
    if data.get("extra_data").is_some_and(|e| !e.is_object()) {
        return Err(GateError::BadRequest(
            "`extra_data` must be an object".into(),
        ));
    }
    let id = match data.remove("prompt_id") {
        Some(v) => errors::python_str(&v),
        None => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Ok(Submission {
        id,
        client_id: data.remove("client_id").map(|v| errors::python_str(&v)),
        front: data
            .remove("front")
            .is_some_and(|v| v.as_bool().unwrap_or(!v.is_null())),
        number: data.remove("number"),
        body: data,
    }))
}

/// ComfyUI's 400 shape for a prompt no card can ever hold (see [`fit`]), when the fleet cannot
/// grow: every configured backend is up. With one down, the prompt waits, and the watchdog ends
/// it if nothing that is up can take it for `recovery.unplaceable_timeout_ms`.
fn never_fits(sched: &Scheduler, prompt: &Value) -> Option<Value> {
    let up = sched.fleet.up();
    let configured = sched
        .fleet
        .backends()
        .iter()
        .filter(|b| b.is_listed())
        .count();
    if up.len() < configured {
        return None;
    }
    let uploaded = |n: &str| sched.files.uploaded(n);
    let runnable: Vec<usize> = up
        .into_iter()
        .filter(|&b| sched.fleet.can_run(b, prompt, &uploaded))
        .collect();
    match fit::fleet_fit(sched, &profile::profile(prompt), &runnable) {
        fit::VramFit::Never { need, largest } => Some(fit::never_fits_body(need, largest)),
        _ => None,
    }
}

/// `POST /prompt` from `caller`.
pub async fn submit(
    sched: &Arc<Scheduler>,
    caller: &Caller,
    body: &[u8],
) -> Result<Response<Body>, GateError> {
    let refuse = |prompt: &Value| {
        sched
            .foreign_file_refusal(caller, prompt)
            .or_else(|| sched.fleet.refusal(prompt, &|n| sched.files.uploaded(n)))
            .or_else(|| never_fits(sched, prompt))
    };
    let mut sub = match parse(body, &refuse)? {
        Ok(sub) => sub,
        Err(answer) => return Ok(json_resp(StatusCode::BAD_REQUEST, &answer)),
    };
    within_daily_quota(sched, caller)?;
    // The result cache: an identical prompt that already ran is answered without a GPU.
    let cache_key = (sched.cache.enabled() && !cache::opted_out(&sub.body)).then(|| {
        let scope = sched
            .cache
            .scope(caller.user.as_ref().map(|u| u.name.as_str()));
        cache::key_of(&scope, &sub.body, &sched.files)
    });
    if let Some(run) = cache_key.as_ref().and_then(|k| sched.cache.get(k)) {
        // Served only while the backends holding its files are up (else it runs again).
        let up = |b: &String| {
            sched
                .fleet
                .index_of(b)
                .is_some_and(|i| sched.fleet.get(i).is_up())
        };
        if run.owners.iter().all(up) {
            let answer = cached::answer(sched, caller, sub, &run);
            sched.cache.release(&run);
            return answer;
        }
        sched.cache.release(&run);
    }
    let id = sub.id.clone();
    let (number, direct, band, stored) = {
        let mut s = sched.lock();
        if s.table.contains(&id) {
            return Err(GateError::DuplicatePromptId(id));
        }
        let number = number_of(sub.number.take(), &mut s.table, sub.front)?;
        admit_within_caps(&sched.config.load(), &s.table, caller)?;
        let nothing_waits = placing::nothing_waits(sched, &s);
        let mut rec = new_record(sched, caller, id.clone(), number.clone(), sub);
        rec.cache_key = cache_key;
        let band = rec.tenant.band.clone();
        s.table.admit(rec);
        s.table.enqueue(&id);
        let direct = if nothing_waits {
            placing::place_now(sched, &mut s, &id)
        } else {
            None
        };
        if direct.is_some() {
            s.table.await_first_answer(&id);
        }
        // Appended under the lock, in the order of the table's changes; committed (with
        // whatever else was appended meanwhile) after it is released.
        let stored = sched.stage(&s, &[&id]);
        (number, direct, band, stored)
    };
    // Counted once it is the gate's: a prompt its backend refused at once was never admitted.
    let count_submitted = move |sched: &Scheduler| {
        if let Some(metrics) = sched.fleet.metrics.on() {
            let submitted = crate::metrics::BandLabel { band };
            metrics.prompts_submitted.get_or_create(&submitted).inc();
        }
    };
    let queued_answer = || {
        json_resp(
            StatusCode::OK,
            &json!({ "prompt_id": id, "number": number, "node_errors": {} }),
        )
    };
    let Some(backend) = direct else {
        // Durable before anyone hears of it: a gate killed from here on still runs it. (A
        // client gone meanwhile leaves it waiting in the gate queue, as after a lost answer.)
        durably_admitted(sched, &id, stored).await?;
        count_submitted(sched);
        sched.broadcast_status();
        sched.wake();
        return Ok(queued_answer());
    };
    // The commit, the forward and what follows from its answer run on their own task: a client
    // that goes away mid-request must not leave the prompt reserved and never sent, holding its
    // slot.
    let settle = {
        let (sched, id) = (sched.clone(), id.clone());
        tokio::spawn(async move {
            durably_admitted(&sched, &id, stored).await?;
            let answer = forward(&sched, &id, backend).await;
            let settled = match &answer {
                Forwarded::Accepted(_) => Some(answer),
                Forwarded::Rejected(_) => sched.refused_at_submit(&id, backend).then_some(answer),
                Forwarded::Failed => {
                    sched.unreserve(&id, backend);
                    sched.broadcast_status();
                    Some(Forwarded::Failed)
                }
            };
            if !matches!(settled, Some(Forwarded::Rejected(_))) {
                count_submitted(&sched);
            }
            Ok::<_, GateError>(settled)
        })
    };
    // `None`: refused, but by a backend that had already lost the prompt to another: it waits.
    let settled = match settle.await {
        Ok(settled) => settled?,
        Err(_) => None,
    };
    match settled.unwrap_or(Forwarded::Failed) {
        Forwarded::Accepted(body) => {
            // The backend echoes the explicit number as a float; show the gate's own.
            let mut answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if answer.is_object() {
                answer["number"] = json!(number);
                return Ok(json_resp(StatusCode::OK, &answer));
            }
            Ok(raw_json(StatusCode::OK, body))
        }
        // Refused at once: the client hears the 400 itself, so nothing else remains of it.
        Forwarded::Rejected(body) => Ok(raw_json(StatusCode::BAD_REQUEST, body)),
        Forwarded::Failed => Ok(queued_answer()),
    }
}

/// Waits until prompt `id`'s admission (`stored`, appended when it was admitted) is durable.
/// If that batch failed, the prompt's current state is written once more (the dispatcher may
/// have moved it on, and written it, meanwhile); if that fails too, the prompt leaves as if
/// never submitted ([`Scheduler::unadmit`]).
///
/// Errors: [`GateError::Unavailable`] (503) naming the store's error, after the second failure.
async fn durably_admitted(sched: &Scheduler, id: &str, stored: Ticket) -> Result<(), GateError> {
    let Err(first) = stored.durable().await else {
        return Ok(());
    };
    tracing::warn!(error = %first, prompt = id, "a prompt's admission was not stored; writing it again");
    let again = {
        let s = sched.lock();
        sched.stage(&s, &[id])
    };
    if let Err(e) = again.durable().await {
        sched.unadmit(id);
        return Err(GateError::Unavailable(e.to_string()));
    }
    Ok(())
}

/// The record of a new prompt of `caller` numbered `number`: its body, client id and `front`
/// from `sub`, its identity and tenant from the caller; no timeline with `[metrics]
/// timelines = false`.
pub(super) fn new_record(
    sched: &Scheduler,
    caller: &Caller,
    id: String,
    number: serde_json::Number,
    sub: Submission,
) -> PromptRecord {
    let mut rec = PromptRecord::new(
        id,
        number,
        sub.body,
        sub.client_id,
        caller.identity.clone(),
        caller.tenant(&sched.config.load().auth),
    );
    rec.front = sub.front;
    if !sched.timelines {
        rec.timeline = super::timeline::Timeline::off();
    }
    rec
}

/// The gate number of a new prompt: the client's `number` (any JSON number, kept as a float as
/// ComfyUI's `float(number)` does), else the next one at the back (or front, with `front`).
/// 400 for a `number` that is not a finite number.
pub(super) fn number_of(
    number: Option<Value>,
    table: &mut PromptTable,
    front: bool,
) -> Result<serde_json::Number, GateError> {
    match number {
        Some(Value::Number(n)) => {
            let f = n.as_f64().unwrap_or(0.0);
            serde_json::Number::from_f64(f)
                .ok_or_else(|| GateError::BadRequest("`number` must be finite".into()))
        }
        Some(_) => Err(GateError::BadRequest("`number` must be a number".into())),
        None => Ok(table.next_number(front)),
    }
}

/// The caller's `gpu_seconds_per_day`: 429 until the next UTC midnight once the run time of
/// the prompts it finished today reaches it (prompts still running are charged when they end).
fn within_daily_quota(sched: &Scheduler, caller: &Caller) -> Result<(), GateError> {
    let quota = caller.limits(&sched.config.load().auth).gpu_seconds_per_day;
    if quota == 0 || sched.gpu_seconds_today(&caller.tenant_key()) < quota as f64 {
        return Ok(());
    }
    const DAY_MS: i64 = 86_400_000;
    let now = crate::protocol::now_ms();
    let to_midnight = DAY_MS - now.rem_euclid(DAY_MS);
    Err(GateError::RateLimited {
        limit: "gpu_seconds_per_day",
        retry_after: Duration::from_millis(to_midnight as u64),
    })
}

/// The caps checked as a prompt is admitted, under the scheduler's lock (so two submits cannot
/// both take the last place): the gate queue's global `scheduler.max_queued` (503), the
/// caller's `max_waiting` (429: prompts of theirs not started yet).
fn admit_within_caps(
    config: &Config,
    table: &PromptTable,
    caller: &Caller,
) -> Result<(), GateError> {
    let max_queued = config.scheduler.max_queued;
    if max_queued > 0 && table.queue_len() >= max_queued {
        return Err(GateError::QueueFull(table.queue_len()));
    }
    let max_waiting = caller.limits(&config.auth).max_waiting as usize;
    if max_waiting > 0 {
        let key = caller.tenant_key();
        let waiting = table
            .records()
            .filter(|r| r.tenant.key == key && r.is_waiting_to_start())
            .count();
        if waiting >= max_waiting {
            return Err(GateError::RateLimited {
                limit: "max_waiting",
                retry_after: Duration::from_secs(QUEUE_FULL_RETRY_S),
            });
        }
    }
    Ok(())
}

/// A backend's JSON answer, passed through as it came.
fn raw_json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(crate::http::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}
