//! Reads that span the fleet: `/queue`, `/prompt`, `/history`, `/system_stats`, `/object_info`,
//! `/models`, `/embeddings`, `/extensions`. Each fans out to healthy backends and merges, and
//! whatever comes back is shown as from one ComfyUI: the gate's clientId replaced by the
//! client's own, the gate's numbers, gate-wide file names.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::join_all;
use http::Method;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::Ctx;
use crate::protocol::paging::page;
use crate::sched::history::completion_time;
use crate::sched::recovery::{restore_entry, restore_item};
use crate::sched::tenant::Caller;
use crate::sched::views::{QueueView, by_number};

/// Node definitions merged across the fleet, cached per fleet generation.
#[derive(Default)]
pub struct Cache {
    object_info: Mutex<Option<(u64, Value)>>,
}

/// Union of two lists, keeping first-seen order.
fn union(into: &mut Vec<Value>, more: &[Value]) {
    for v in more {
        if !into.contains(v) {
            into.push(v.clone());
        }
    }
}

/// GET `path` on every healthy backend; answers that are not 200 JSON are skipped.
async fn fan_out(ctx: &Ctx, path: &str) -> Vec<(usize, Value)> {
    let ids = ctx.fleet.up();
    let calls = ids.iter().map(|&i| {
        let b = ctx.fleet.get(i).clone();
        async move { (i, ctx.fleet.upstream.get_json(&b.config, path).await) }
    });
    join_all(calls)
        .await
        .into_iter()
        .filter_map(|(i, r)| match r {
            Ok((code, v)) if code.is_success() && !v.is_null() => Some((i, v)),
            Ok(_) => None,
            Err(_) => {
                ctx.fleet.record_health(i, false);
                None
            }
        })
        .collect()
}

/// Which prompts a caller is shown: all (auth off, or an admin), or the ids of its user's own
/// prompts (with auth on; prompts sent to backends directly are nobody's).
enum Scope {
    All,
    Own { user: String, ids: HashSet<String> },
}

impl Scope {
    fn of(ctx: &Ctx, caller: &Caller) -> Self {
        match caller.user_name() {
            Some(name) if !caller.sees_all() => Scope::Own {
                user: name.to_string(),
                ids: ctx.sched.ids_of_user(name),
            },
            _ => Scope::All,
        }
    }

    /// The user whose prompts alone are shown, if any.
    fn user(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Own { user, .. } => Some(user),
        }
    }

    fn shows(&self, id: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Own { ids, .. } => ids.contains(id),
        }
    }

    fn strangers(&self) -> bool {
        matches!(self, Scope::All)
    }
}

/// `GET /queue`: the gate's prompts as they are at one moment (see `sched::views`), plus items
/// of prompts sent to a backend directly (not through the gate), each list in number order;
/// with auth on, a user's own only (admins: all).
pub async fn queue(ctx: &Ctx, caller: &Caller) -> Value {
    let scope = Scope::of(ctx, caller);
    let view = ctx.sched.queue_view(scope.user());
    queue_with_strangers(ctx, view, &scope).await
}

/// `view` with every backend's items for prompts the gate does not know (when `scope` shows
/// them).
async fn queue_with_strangers(ctx: &Ctx, view: QueueView, scope: &Scope) -> Value {
    let QueueView {
        mut running,
        mut pending,
    } = view;
    let strangers = if scope.strangers() {
        fan_out(ctx, "/queue").await
    } else {
        Vec::new()
    };
    for (i, mut q) in strangers {
        for (key, out) in [
            ("queue_running", &mut running),
            ("queue_pending", &mut pending),
        ] {
            let items = q.get_mut(key).and_then(Value::as_array_mut);
            for item in items.into_iter().flatten() {
                let known = item[1].as_str().is_some_and(|id| ctx.sched.knows(id));
                if !known {
                    restore_item(&ctx.sched, i, item);
                    out.push(item.take());
                }
            }
        }
    }
    running.sort_by(by_number);
    pending.sort_by(by_number);
    json!({ "queue_running": running, "queue_pending": pending })
}

/// `GET /history`: the entries the gate collected (every prompt it ran) plus backends'
/// entries for prompts it does not know (sent to a backend directly), ordered by completion
/// time, then paged with ComfyUI's rules; with auth on, a user's own only (admins: all).
pub async fn history(ctx: &Ctx, caller: &Caller, max_items: Option<i64>, offset: i64) -> Value {
    let scope = Scope::of(ctx, caller);
    let gate = ctx.sched.history.all();
    let ours: std::collections::HashSet<String> =
        gate.iter().map(|(_, id, _)| id.clone()).collect();
    let entries = with_stranger_history(ctx, gate, &scope).await;
    let mut page = page_history(entries, max_items, offset);
    whole_entries(ctx, &ours, &mut page);
    page
}

/// The gate's entries (`ours`) in a page of history made whole: memory keeps them slim, the
/// store whole (`sched::history`); one deleted or pruned since the page was taken leaves it, as
/// a later read would not show it. Backends' entries are whole already.
fn whole_entries(ctx: &Ctx, ours: &std::collections::HashSet<String>, page: &mut Value) {
    let Some(map) = page.as_object_mut() else {
        return;
    };
    map.retain(|id, entry| {
        if !ours.contains(id) {
            return true;
        }
        match ctx.sched.history.get(id) {
            Some(whole) => {
                *entry = whole;
                true
            }
            None => false,
        }
    });
}

/// `entries` (the gate's, those `scope` shows) with backends' entries for prompts the gate
/// does not know (when `scope` shows them), ordered by completion time.
async fn with_stranger_history(
    ctx: &Ctx,
    mut entries: Vec<(i64, String, Arc<Value>)>,
    scope: &Scope,
) -> Vec<(String, Arc<Value>)> {
    entries.retain(|(_, id, _)| scope.shows(id));
    let strangers = if scope.strangers() {
        fan_out(ctx, "/history").await
    } else {
        Vec::new()
    };
    for (i, h) in strangers {
        let Value::Object(map) = h else { continue };
        for (id, mut entry) in map {
            if ctx.sched.knows(&id) {
                continue;
            }
            restore_entry(&ctx.sched, i, &mut entry);
            let t = completion_time(&entry).unwrap_or(0);
            entries.push((t, id, Arc::new(entry)));
        }
    }
    entries.sort_by_key(|(t, _, _)| *t);
    entries.into_iter().map(|(_, id, e)| (id, e)).collect()
}

/// A page of `ordered` entries as `GET /history` answers it.
fn page_history(ordered: Vec<(String, Arc<Value>)>, max_items: Option<i64>, offset: i64) -> Value {
    Value::Object(page(
        ordered.iter().map(|(k, v)| (k, &**v)),
        ordered.len(),
        max_items,
        offset,
    ))
}

/// `GET /history/{id}`, serialized: the gate's entry for its prompts (`{}` until finished),
/// a backend's for prompts it does not know. The gate's own entries are sent as the store holds
/// them, unparsed (a hot path for clients that poll). Another user's prompt is `{}`, as an
/// unknown one.
pub async fn history_one(ctx: &Ctx, caller: &Caller, id: &str) -> Bytes {
    let empty = || Bytes::from_static(b"{}");
    if !ctx.sched.may_touch(caller, id) {
        return empty();
    }
    if let Some(entry) = ctx.sched.history.get_json(id) {
        // `{"<id>": <entry>}`, the entry as the store holds it (not parsed again).
        let key = serde_json::to_vec(id).unwrap_or_default();
        let mut out = Vec::with_capacity(entry.len() + key.len() + 3);
        out.push(b'{');
        out.extend_from_slice(&key);
        out.push(b':');
        out.extend_from_slice(&entry);
        out.push(b'}');
        return Bytes::from(out);
    }
    if ctx.sched.knows(id) {
        return empty();
    }
    let path = format!("/history/{}", crate::fleet::upstream::encode_segment(id));
    for i in ctx.fleet.up() {
        let b = ctx.fleet.get(i);
        if let Ok((code, _, body)) = ctx
            .fleet
            .upstream
            .call(&b.config, Method::GET, &path, None, None, None)
            .await
            && code.is_success()
            && let Some(answer) = backend_history(ctx, i, id, body)
        {
            return answer;
        }
    }
    empty()
}

/// A backend's `/history/{id}` answer `body` as the client sees it; `None` without an entry
/// for `id`. Of a prompt the gate never placed only the output file names may change (to their
/// gate-wide names), so only `outputs` is parsed: the answer is the backend's bytes as they
/// came when no name changes, else those bytes with the new `outputs` put in place. An answer
/// naming the gate's own clientId (a prompt the gate sent that it no longer knows) is read
/// whole and written out by [`restore_entry`].
fn backend_history(ctx: &Ctx, backend: usize, id: &str, body: Bytes) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Entry<'a> {
        #[serde(borrow)]
        outputs: Option<&'a RawValue>,
    }
    let b = ctx.fleet.get(backend);
    let text = std::str::from_utf8(&body).ok()?;
    if text.contains(b.upstream_client_id.as_str()) {
        let mut v: Value = serde_json::from_str(text).ok()?;
        restore_entry(&ctx.sched, backend, v.get_mut(id)?);
        return serde_json::to_vec(&v).ok().map(Bytes::from);
    }
    let answer: HashMap<String, &RawValue> = serde_json::from_str(text).ok()?;
    let entry: Entry = serde_json::from_str(answer.get(id)?.get()).ok()?;
    let Some(raw) = entry.outputs else {
        return Some(body);
    };
    let mut outputs: Value = serde_json::from_str(raw.get()).ok()?;
    let before = outputs.clone();
    ctx.files.alias_outputs(b.name(), &mut outputs);
    if outputs == before {
        return Some(body);
    }
    // `raw` borrows from `text`: its offset there is where the backend's `outputs` lie.
    let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
    let end = start + raw.get().len();
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(&body[..start]);
    serde_json::to_writer(&mut out, &outputs).ok()?;
    out.extend_from_slice(&body[end..]);
    Some(Bytes::from(out))
}

/// `GET /system_stats`: `system` from one backend, every backend's device.
pub async fn system_stats(ctx: &Ctx) -> Value {
    let answers = fan_out(ctx, "/system_stats").await;
    let system = answers
        .first()
        .map(|(_, v)| v["system"].clone())
        .unwrap_or(json!({}));
    let mut devices = Vec::new();
    for (i, v) in &answers {
        for d in v["devices"].as_array().into_iter().flatten() {
            let mut d = d.clone();
            d["comfy_gate_backend"] = json!(ctx.fleet.get(*i).name());
            devices.push(d);
        }
    }
    json!({ "system": system, "devices": devices })
}

/// The union of every healthy backend's `/object_info`, with combo lists merged and the
/// gate's uploads offered to LoadImage. Cached until the fleet changes.
pub async fn object_info(ctx: &Ctx) -> Value {
    let generation = ctx.fleet.generation();
    let uploads_changed = ctx.files.dirs.input_images();
    if let Some((g, v)) = &*ctx
        .merged
        .object_info
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        && *g == generation
    {
        let mut v = v.clone();
        add_uploads(&mut v, &uploads_changed);
        return v;
    }
    let mut merged = Map::new();
    for (_, info) in fan_out(ctx, "/object_info").await {
        let Value::Object(classes) = info else {
            continue;
        };
        for (class, def) in classes {
            match merged.get_mut(&class) {
                None => {
                    merged.insert(class, def);
                }
                Some(existing) => merge_combos(existing, &def),
            }
        }
    }
    let value = Value::Object(merged);
    if !ctx.fleet.up().is_empty() {
        *ctx.merged
            .object_info
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((generation, value.clone()));
    }
    let mut value = value;
    add_uploads(&mut value, &uploads_changed);
    value
}

/// Union of a list route (`/models`, `/models/{folder}`, `/embeddings`, `/extensions`);
/// `None` when no backend has it (404).
pub async fn list(ctx: &Ctx, path: &str) -> Option<Value> {
    let answers = fan_out(ctx, path).await;
    if answers.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (_, v) in answers {
        if let Value::Array(items) = v {
            union(&mut out, &items);
        }
    }
    Some(Value::Array(out))
}

/// `/api/jobs` (a page, with `query`) or `/api/jobs/{id}` (with `id`), derived from the
/// merged queue and history with ComfyUI's own rules.
pub async fn jobs(
    ctx: &Ctx,
    caller: &Caller,
    query: Option<&crate::protocol::jobs::JobsQuery>,
    id: Option<&str>,
) -> Value {
    // The gate's queue and history from one moment, so no job is listed twice or missed.
    let scope = Scope::of(ctx, caller);
    let (view, gate_history) = ctx.sched.queue_and_history(scope.user());
    let queue = queue_with_strangers(ctx, view, &scope).await;
    let entries = with_stranger_history(ctx, gate_history, &scope).await;
    let history = match page_history(entries, None, -1) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let items = |k: &str| queue[k].as_array().cloned().unwrap_or_default();
    let (running, pending) = (items("queue_running"), items("queue_pending"));
    let mut history = history;
    // One job's detail shows the prompt and its `extra_data`: the whole entry, if the caller
    // sees it at all (the map holds only what its scope shows).
    if let Some(id) = id
        && history.contains_key(id)
        && let Some(whole) = ctx.sched.history.get(id)
    {
        history.insert(id.to_string(), whole);
    }
    match (query, id) {
        (_, Some(id)) => {
            crate::protocol::jobs::one(id, &running, &pending, &history).unwrap_or(Value::Null)
        }
        (Some(q), None) => crate::protocol::jobs::list(&running, &pending, &history, q),
        (None, None) => Value::Null,
    }
}

/// Merges combo option lists of one class definition into another.
fn merge_combos(into: &mut Value, other: &Value) {
    for section in ["required", "optional"] {
        let Some(inputs) = into
            .pointer_mut(&format!("/input/{section}"))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for (name, spec) in inputs.iter_mut() {
            let theirs = &other["input"][section][name][0];
            if let (Some(mine), Some(theirs)) = (spec[0].as_array().cloned(), theirs.as_array()) {
                let mut merged = mine;
                union(&mut merged, theirs);
                spec[0] = Value::Array(merged);
            }
        }
    }
}

fn add_uploads(info: &mut Value, uploads: &[String]) {
    if let Some(list) = info
        .pointer_mut("/LoadImage/input/required/image/0")
        .and_then(Value::as_array_mut)
    {
        let extra: Vec<Value> = uploads.iter().map(|u| json!(u)).collect();
        union(list, &extra);
        list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
}
