//! ComfyUI's jobs API (`GET /api/jobs`, `GET /api/jobs/{id}`; reference §4.10,
//! comfy_execution/jobs.py): a view derived from the queue and the history.
//!
//! Because it is derived, the gate computes it from its merged queue and history with the same
//! code comfy-sim uses for its own, instead of trying to merge and re-page backends' pages.

use serde_json::{Map, Value, json};

pub const STATUSES: [&str; 4] = ["pending", "in_progress", "completed", "failed"];

/// Parsed query of `GET /api/jobs`.
#[derive(Clone, Debug, PartialEq)]
pub struct JobsQuery {
    pub statuses: Vec<String>,
    pub workflow_id: Option<String>,
    pub sort_by_duration: bool,
    pub descending: bool,
    pub limit: Option<usize>,
    pub offset: usize,
}

/// Parses the query, or gives ComfyUI's 400 `{"error": …}` message.
pub fn parse_query(query: &[(String, String)]) -> Result<JobsQuery, String> {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let statuses = match get("status").filter(|s| !s.is_empty()) {
        Some(s) => {
            let list: Vec<String> = s
                .split(',')
                .map(|x| x.trim().to_lowercase())
                .filter(|x| !x.is_empty())
                .collect();
            let invalid: Vec<&str> = list
                .iter()
                .filter(|x| !STATUSES.contains(&x.as_str()))
                .map(String::as_str)
                .collect();
            if !invalid.is_empty() {
                return Err(format!(
                    "Invalid status value(s): {}. Valid values: {}",
                    invalid.join(", "),
                    STATUSES.join(", ")
                ));
            }
            list
        }
        None => STATUSES.iter().map(|s| s.to_string()).collect(),
    };
    let sort_by = get("sort_by").unwrap_or("created_at").to_lowercase();
    if sort_by != "created_at" && sort_by != "execution_duration" {
        return Err("sort_by must be 'created_at' or 'execution_duration'".into());
    }
    let sort_order = get("sort_order").unwrap_or("desc").to_lowercase();
    if sort_order != "asc" && sort_order != "desc" {
        return Err("sort_order must be 'asc' or 'desc'".into());
    }
    let limit = match get("limit") {
        Some(l) => match l.trim().parse::<i64>() {
            Ok(n) if n > 0 => Some(n as usize),
            Ok(_) => return Err("limit must be a positive integer".into()),
            Err(_) => return Err("limit must be an integer".into()),
        },
        None => None,
    };
    let offset = match get("offset") {
        Some(o) => match o.trim().parse::<i64>() {
            Ok(n) => n.max(0) as usize,
            Err(_) => return Err("offset must be an integer".into()),
        },
        None => 0,
    };
    Ok(JobsQuery {
        statuses,
        workflow_id: get("workflow_id")
            .filter(|w| !w.is_empty())
            .map(str::to_string),
        sort_by_duration: sort_by == "execution_duration",
        descending: sort_order == "desc",
        limit,
        offset,
    })
}

fn prune(map: Map<String, Value>) -> Value {
    Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
}

fn workflow_id(extra: &Value) -> Value {
    extra["extra_pnginfo"]["workflow"]["id"].clone()
}

/// A queue item `[number, id, prompt, extra_data, outputs]` as a job.
pub fn queue_job(item: &Value, status: &str) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), item[1].clone());
    m.insert("status".into(), json!(status));
    m.insert("priority".into(), item[0].clone());
    m.insert("create_time".into(), item[3]["create_time"].clone());
    m.insert("outputs_count".into(), json!(0));
    m.insert("workflow_id".into(), workflow_id(&item[3]));
    prune(m)
}

fn outputs_summary(outputs: &Value) -> (usize, Value) {
    let mut count = 0;
    let (mut preview, mut fallback) = (Value::Null, Value::Null);
    for (node, node_outputs) in outputs.as_object().into_iter().flatten() {
        for (media, items) in node_outputs.as_object().into_iter().flatten() {
            if media == "animated" {
                continue;
            }
            for item in items
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i.is_object())
            {
                count += 1;
                let fmt = item["format"].as_str().unwrap_or("");
                let name = item["filename"].as_str().unwrap_or("").to_lowercase();
                let previewable = ["images", "video", "audio"].contains(&media.as_str())
                    || fmt.starts_with("video/")
                    || fmt.starts_with("audio/")
                    || [".obj", ".fbx", ".gltf", ".glb"]
                        .iter()
                        .any(|e| name.ends_with(e));
                if preview.is_null() && previewable {
                    let mut enriched = item.clone();
                    enriched["nodeId"] = json!(node);
                    enriched["mediaType"] = json!(media);
                    if item["type"] == "output" {
                        preview = enriched;
                    } else if fallback.is_null() {
                        fallback = enriched;
                    }
                }
            }
        }
    }
    (count, if preview.is_null() { fallback } else { preview })
}

/// A history entry as a job; `detail` adds outputs, status and workflow (`/api/jobs/{id}`).
pub fn history_job(id: &str, entry: &Value, detail: bool) -> Value {
    let item = &entry["prompt"];
    let status = if entry["status"]["status_str"] == "error" {
        "failed"
    } else {
        "completed"
    };
    let (count, preview) = outputs_summary(&entry["outputs"]);
    let (mut start, mut end, mut error) = (Value::Null, Value::Null, Value::Null);
    for m in entry["status"]["messages"].as_array().into_iter().flatten() {
        match m[0].as_str() {
            Some("execution_start") => start = m[1]["timestamp"].clone(),
            Some("execution_success") | Some("execution_interrupted") => {
                end = m[1]["timestamp"].clone()
            }
            Some("execution_error") => {
                end = m[1]["timestamp"].clone();
                error = m[1].clone();
            }
            _ => {}
        }
    }
    let mut m = Map::new();
    m.insert("id".into(), json!(id));
    m.insert("status".into(), json!(status));
    m.insert("priority".into(), item[0].clone());
    m.insert("create_time".into(), item[3]["create_time"].clone());
    m.insert("execution_start_time".into(), start);
    m.insert("execution_end_time".into(), end);
    m.insert("execution_error".into(), error);
    m.insert("outputs_count".into(), json!(count));
    m.insert("preview_output".into(), preview);
    m.insert("workflow_id".into(), workflow_id(&item[3]));
    let mut job = prune(m);
    if detail {
        job["outputs"] = entry["outputs"].clone();
        job["execution_status"] = entry["status"].clone();
        job["workflow"] = json!({ "prompt": item[2], "extra_data": item[3] });
    }
    job
}

/// `GET /api/jobs`: the page and its pagination block.
pub fn list(
    running: &[Value],
    pending: &[Value],
    history: &Map<String, Value>,
    q: &JobsQuery,
) -> Value {
    let wants = |s: &str| q.statuses.iter().any(|x| x == s);
    let mut jobs = Vec::new();
    if wants("in_progress") {
        jobs.extend(running.iter().map(|i| queue_job(i, "in_progress")));
    }
    if wants("pending") {
        jobs.extend(pending.iter().map(|i| queue_job(i, "pending")));
    }
    for (id, entry) in history {
        let failed = entry["status"]["status_str"] == "error";
        if (failed && wants("failed")) || (!failed && wants("completed")) {
            jobs.push(history_job(id, entry, false));
        }
    }
    if let Some(w) = &q.workflow_id {
        jobs.retain(|j| j["workflow_id"].as_str() == Some(w));
    }
    let key = |j: &Value| -> f64 {
        if q.sort_by_duration {
            match (
                j["execution_start_time"].as_f64(),
                j["execution_end_time"].as_f64(),
            ) {
                (Some(s), Some(e)) if s != 0.0 && e != 0.0 => e - s,
                _ => 0.0,
            }
        } else {
            j["create_time"].as_f64().unwrap_or(0.0)
        }
    };
    jobs.sort_by(|a, b| {
        let o = key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal);
        if q.descending { o.reverse() } else { o }
    });
    let total = jobs.len();
    let page: Vec<Value> = jobs
        .into_iter()
        .skip(q.offset)
        .take(q.limit.unwrap_or(usize::MAX))
        .collect();
    let has_more = q.offset + page.len() < total;
    json!({
        "jobs": page,
        "pagination": { "offset": q.offset, "limit": q.limit, "total": total, "has_more": has_more },
    })
}

/// `GET /api/jobs/{id}`.
pub fn one(
    id: &str,
    running: &[Value],
    pending: &[Value],
    history: &Map<String, Value>,
) -> Option<Value> {
    if let Some(entry) = history.get(id) {
        return Some(history_job(id, entry, true));
    }
    if let Some(i) = running.iter().find(|i| i[1] == id) {
        return Some(queue_job(i, "in_progress"));
    }
    pending
        .iter()
        .find(|i| i[1] == id)
        .map(|i| queue_job(i, "pending"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<JobsQuery, String> {
        parse_query(
            &pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn query_errors_match_comfyui() {
        assert!(
            q(&[("status", "done")])
                .unwrap_err()
                .starts_with("Invalid status value(s): done.")
        );
        assert_eq!(
            q(&[("limit", "0")]).unwrap_err(),
            "limit must be a positive integer"
        );
        assert_eq!(
            q(&[("limit", "x")]).unwrap_err(),
            "limit must be an integer"
        );
        assert_eq!(q(&[("offset", "-5")]).unwrap().offset, 0);
        assert_eq!(
            q(&[("sort_order", "up")]).unwrap_err(),
            "sort_order must be 'asc' or 'desc'"
        );
    }

    #[test]
    fn history_entries_become_jobs() {
        let entry = json!({
            "prompt": [3, "p", {}, {"create_time": 10}, ["9"]],
            "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
            "status": {"status_str": "success", "completed": true, "messages": [
                ["execution_start", {"prompt_id": "p", "timestamp": 11}],
                ["execution_success", {"prompt_id": "p", "timestamp": 15}]]},
            "meta": {}
        });
        let job = history_job("p", &entry, false);
        assert_eq!(job["status"], "completed");
        assert_eq!(job["outputs_count"], 1);
        assert_eq!(job["preview_output"]["nodeId"], "9");
        assert_eq!(job["execution_end_time"], 15);
        assert!(job.get("execution_error").is_none(), "nulls are pruned");
        let mut history = Map::new();
        history.insert("p".into(), entry);
        let pending = vec![json!([5, "q", {}, {"create_time": 20}, []])];
        let page = list(&[], &pending, &history, &q(&[("limit", "1")]).unwrap());
        assert_eq!(page["jobs"][0]["id"], "q", "newest first");
        assert_eq!(
            page["pagination"],
            json!({"offset": 0, "limit": 1, "total": 2, "has_more": true})
        );
    }
}
