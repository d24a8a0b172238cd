//! Reads that span the fleet: `/queue`, `/prompt`, `/history`, `/system_stats`, `/object_info`,
//! `/models`, `/embeddings`, `/extensions`. Each fans out to healthy backends and merges, and
//! whatever comes back is shown as from one ComfyUI: the gate's clientId replaced by the
//! client's own, the gate's numbers, gate-wide file names.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::join_all;
use serde_json::{Map, Value, json};

use super::Gate;
use super::prompts::Stage;
use crate::protocol::paging::page;

/// Node definitions and lists, cached per fleet generation.
#[derive(Default)]
pub struct Cache {
    object_info: Option<(u64, Value)>,
}

/// Union of two lists, keeping first-seen order.
fn union(into: &mut Vec<Value>, more: &[Value]) {
    for v in more {
        if !into.contains(v) {
            into.push(v.clone());
        }
    }
}

impl Gate {
    fn up_backends(&self) -> Vec<usize> {
        self.backends
            .iter()
            .filter(|b| b.is_up())
            .map(|b| b.id)
            .collect()
    }

    /// GET `path` on every healthy backend; answers that are not 200 JSON are skipped.
    async fn fan_out(&self, path: &str) -> Vec<(usize, Value)> {
        let ids = self.up_backends();
        let calls = ids.iter().map(|&i| {
            let b = self.backend(i).clone();
            async move { (i, self.upstream.get_json(&b.config, path).await) }
        });
        join_all(calls)
            .await
            .into_iter()
            .filter_map(|(i, r)| match r {
                Ok((code, v)) if code.is_success() && !v.is_null() => Some((i, v)),
                Ok(_) => None,
                Err(_) => {
                    self.record_health(i, false);
                    None
                }
            })
            .collect()
    }

    /// Rewrites a backend's queue item or history `prompt` tuple to the client's view.
    fn restore_item(&self, backend: usize, item: &mut Value) {
        let Some(id) = item.get(1).and_then(Value::as_str).map(str::to_string) else {
            return;
        };
        let t = self.lock_prompts();
        let rec = t.get(&id).filter(|r| r.owner == Some(backend));
        if let Some(extra) = item.get_mut(3).and_then(Value::as_object_mut) {
            let ours = extra.get("client_id").and_then(Value::as_str)
                == Some(self.backend(backend).upstream_client_id.as_str());
            if ours {
                extra.remove("client_id");
                if let Some(cid) = rec.and_then(|r| r.client_id.clone()) {
                    extra.insert("client_id".into(), json!(cid));
                }
            }
            if let Some(r) = rec {
                extra.insert("create_time".into(), json!(r.create_time));
            }
        }
        if let (Some(r), Some(slot)) = (rec, item.get_mut(0)) {
            *slot = json!(r.number);
        }
    }

    /// A backend's history entry as the client sees it.
    pub fn restore_entry(&self, backend: usize, entry: &mut Value) {
        if let Some(item) = entry.get_mut("prompt") {
            self.restore_item(backend, item);
        }
        if let Some(outputs) = entry.get_mut("outputs") {
            self.files.alias_outputs(backend, outputs);
        }
    }

    /// Output node ids of a prompt, from the merged node definitions.
    pub(super) fn output_nodes_of(&self, prompt: &Value) -> Vec<String> {
        let cache = self.merged_cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, info)) = &cache.object_info else {
            return Vec::new();
        };
        prompt
            .as_object()
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, n)| {
                n["class_type"]
                    .as_str()
                    .is_some_and(|c| info[c]["output_node"].as_bool().unwrap_or(false))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// `GET /queue`: the gate queue and every backend's queue, pending sorted by number.
    pub async fn merged_queue(&self) -> Value {
        if self.lock_prompts().queue_len() > 0 {
            // Outputs of gate-queued prompts come from the node definitions.
            self.merged_object_info().await;
        }
        let answers = self.fan_out("/queue").await;
        let mut running = Vec::new();
        let mut pending = Vec::new();
        for (i, mut q) in answers {
            for (key, out) in [
                ("queue_running", &mut running),
                ("queue_pending", &mut pending),
            ] {
                if let Some(items) = q.get_mut(key).and_then(Value::as_array_mut) {
                    for item in items.iter_mut() {
                        self.restore_item(i, item);
                        out.push(item.take());
                    }
                }
            }
        }
        let gate_queued: Vec<(Value, Value)> = {
            let t = self.lock_prompts();
            t.queued()
                .map(|r| (r.body["prompt"].clone(), r.queue_item(Vec::new())))
                .collect()
        };
        for (prompt, mut item) in gate_queued {
            item[4] = json!(self.output_nodes_of(&prompt));
            pending.push(item);
        }
        pending.sort_by(|a, b| {
            let (x, y) = (a[0].as_f64().unwrap_or(0.0), b[0].as_f64().unwrap_or(0.0));
            x.partial_cmp(&y)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a[1].as_str().cmp(&b[1].as_str()))
        });
        json!({ "queue_running": running, "queue_pending": pending })
    }

    /// `GET /history`: the entries the gate collected (every prompt it ran) plus backends'
    /// entries for prompts it does not know (sent to a backend directly), ordered by completion
    /// time, then paged with ComfyUI's rules.
    pub async fn merged_history(&self, max_items: Option<i64>, offset: i64) -> Value {
        let mut entries: Vec<(i64, String, Arc<Value>)> = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, (t, e))| (*t, id.clone(), e.clone()))
            .collect();
        for (i, h) in self.fan_out("/history").await {
            let Value::Object(map) = h else { continue };
            for (id, mut entry) in map {
                if self.lock_prompts().contains(&id) {
                    continue;
                }
                self.restore_entry(i, &mut entry);
                let t = super::recovery::completion_time(&entry).unwrap_or(0);
                entries.push((t, id, Arc::new(entry)));
            }
        }
        entries.sort_by_key(|(t, _, _)| *t);
        let ordered: Vec<(String, Arc<Value>)> =
            entries.into_iter().map(|(_, id, e)| (id, e)).collect();
        Value::Object(page(
            ordered.iter().map(|(k, v)| (k, &**v)),
            ordered.len(),
            max_items,
            offset,
        ))
    }

    /// `GET /history/{id}`, serialized: the gate's entry for its prompts (`{}` until finished),
    /// a backend's for prompts it does not know. The gate's own entries are written out from the
    /// shared entry (a hot path for clients that poll).
    pub async fn history_one(&self, id: &str) -> Vec<u8> {
        if let Some(entry) = self.gate_history(id) {
            let one: std::collections::BTreeMap<&str, &Value> = [(id, &*entry)].into();
            return serde_json::to_vec(&one).unwrap_or_else(|_| b"{}".to_vec());
        }
        if self.lock_prompts().contains(id) {
            return b"{}".to_vec();
        }
        let path = format!("/history/{}", crate::gate::routes::encode_segment(id));
        for i in self.up_backends() {
            if let Ok((code, mut v)) = self.upstream.get_json(&self.backend(i).config, &path).await
                && code.is_success()
                && let Some(entry) = v.get_mut(id)
            {
                self.restore_entry(i, entry);
                return serde_json::to_vec(&v).unwrap_or_else(|_| b"{}".to_vec());
            }
        }
        b"{}".to_vec()
    }

    /// `GET /system_stats`: `system` from one backend, every backend's device.
    pub async fn merged_system_stats(&self) -> Value {
        let answers = self.fan_out("/system_stats").await;
        let system = answers
            .first()
            .map(|(_, v)| v["system"].clone())
            .unwrap_or(json!({}));
        let mut devices = Vec::new();
        for (i, v) in &answers {
            for d in v["devices"].as_array().into_iter().flatten() {
                let mut d = d.clone();
                d["comfy_gate_backend"] = json!(self.backend(*i).name());
                devices.push(d);
            }
        }
        json!({ "system": system, "devices": devices })
    }

    /// The union of every healthy backend's `/object_info`, with combo lists merged and the
    /// gate's uploads offered to LoadImage. Cached until the fleet changes.
    pub async fn merged_object_info(&self) -> Value {
        let generation = self.fleet_generation.load(Ordering::SeqCst);
        let uploads_changed = self.files.dirs.input_images();
        if let Some((g, v)) = &self
            .merged_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .object_info
            && *g == generation
        {
            let mut v = v.clone();
            add_uploads(&mut v, &uploads_changed);
            return v;
        }
        let mut merged = Map::new();
        for (_, info) in self.fan_out("/object_info").await {
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
        if !self.up_backends().is_empty() {
            self.merged_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .object_info = Some((generation, value.clone()));
        }
        let mut value = value;
        add_uploads(&mut value, &uploads_changed);
        value
    }

    /// Union of a list route (`/models`, `/models/{folder}`, `/embeddings`, `/extensions`);
    /// `None` when no backend has it (404).
    pub async fn merged_list(&self, path: &str) -> Option<Value> {
        let answers = self.fan_out(path).await;
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
        &self,
        query: Option<&crate::protocol::jobs::JobsQuery>,
        id: Option<&str>,
    ) -> Value {
        let queue = self.merged_queue().await;
        let history = match self.merged_history(None, -1).await {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let items = |k: &str| queue[k].as_array().cloned().unwrap_or_default();
        let (running, pending) = (items("queue_running"), items("queue_pending"));
        match (query, id) {
            (_, Some(id)) => {
                crate::protocol::jobs::one(id, &running, &pending, &history).unwrap_or(Value::Null)
            }
            (Some(q), None) => crate::protocol::jobs::list(&running, &pending, &history, q),
            (None, None) => Value::Null,
        }
    }

    /// `queue_remaining` for `GET /prompt`: gate queue plus prompts on backends.
    pub fn prompt_info(&self) -> Value {
        let t = self.lock_prompts();
        let n = t.queue_len()
            + t.records()
                .filter(|r| matches!(r.stage, Stage::Dispatching | Stage::OnBackend))
                .count();
        json!({ "exec_info": { "queue_remaining": n } })
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
