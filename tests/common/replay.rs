//! Replays a flow recorded from a real ComfyUI (`tests/fixtures/comfyui-<version>/<flow>.json`,
//! step format in `tests/fixtures/record_comfyui.py`) against a running server, comparing what
//! it answers with the transcript: HTTP status, the headers that matter, body shapes, and the
//! order of WebSocket message types (with each message's data shape).
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Frame, PATIENCE, Ws, http, png};
use crate::shape::{Bindings, brief, compare};

/// The ComfyUI version whose transcripts the conformance tests hold comfy-sim and the gate to.
pub const COMFYUI_VERSION: &str = "0.8.0";

fn fixture_dir() -> String {
    format!(
        "{}/tests/fixtures/comfyui-{COMFYUI_VERSION}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The names of every recorded flow, sorted.
pub fn flows() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("fixture directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// The transcript of `flow`, checked to name the recorded version.
pub fn load(flow: &str) -> Value {
    let path = format!("{}/{flow}.json", fixture_dir());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: Value = serde_json::from_str(&text).expect("transcript is JSON");
    assert_eq!(doc["comfyui_version"], COMFYUI_VERSION, "{path}");
    assert_eq!(doc["flow"], flow, "{path}");
    doc
}

/// Replays `flow` against the server at `base` (http://…); every difference from the
/// transcript, each naming its step. Empty when the server answered as ComfyUI did.
pub async fn replay(flow: &str, base: &str) -> Vec<String> {
    let doc = load(flow);
    let mut r = Replay {
        base: base.to_string(),
        b: Bindings::default(),
        sockets: HashMap::new(),
        diffs: Vec::new(),
        flow_kinds: doc["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["messages"].as_array().into_iter().flatten())
            .map(message_kind)
            .collect(),
    };
    r.b.bind("CLIENT", &uuid::Uuid::new_v4().to_string());
    for (i, step) in doc["steps"].as_array().expect("steps").iter().enumerate() {
        r.step(i, step).await;
    }
    r.diffs
}

struct Replay {
    base: String,
    b: Bindings,
    sockets: HashMap<String, Ws>,
    diffs: Vec<String>,
    /// Every message type ComfyUI sent in the flow (what a read racing requests may hold).
    flow_kinds: Vec<String>,
}

impl Replay {
    async fn step(&mut self, i: usize, step: &Value) {
        if step.get("http").is_some() {
            self.http(i, step).await;
        } else if let Some(name) = step["ws_open"].as_str() {
            let client = self
                .b
                .fill(step["client_id"].as_str().unwrap_or("{CLIENT}"));
            let mut ws = Ws::connect(&self.base, Some(&client)).await;
            if let Some(flags) = step.get("feature_flags") {
                ws.send_json(json!({"type": "feature_flags", "data": flags}))
                    .await;
            }
            self.sockets.insert(name.to_string(), ws);
        } else if let Some(constants) = step["constant"].as_object() {
            for (name, value) in constants {
                self.b
                    .bind(name, value.as_str().expect("a string constant"));
            }
        } else if let Some(name) = step["ws_read"].as_str() {
            self.ws_read(i, name, step).await;
        } else if let Some(name) = step["ws_close"].as_str() {
            self.sockets.remove(name);
        } else if let Some(name) = step["wait_history"].as_str() {
            let id = self.b.fill(&format!("{{{name}}}"));
            self.poll(i, &format!("/history/{id}"), |v| {
                v.as_object().is_some_and(|o| !o.is_empty())
            })
            .await;
        } else if step.get("wait_idle").is_some() {
            self.poll(i, "/queue", |q| {
                q["queue_running"].as_array().is_some_and(Vec::is_empty)
                    && q["queue_pending"].as_array().is_some_and(Vec::is_empty)
            })
            .await;
        } else {
            panic!("step {i}: unknown step {step}");
        }
    }

    /// Polls `path` until `done` holds for its JSON answer (a difference after PATIENCE).
    async fn poll(&mut self, i: usize, path: &str, done: impl Fn(&Value) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Ok(resp) = http().get(format!("{}{path}", self.base)).send().await
                && let Ok(v) = resp.json::<Value>().await
                && done(&v)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.diffs
            .push(format!("step {i}: waited in vain for GET {path}"));
    }

    async fn http(&mut self, i: usize, step: &Value) {
        let req = &step["http"];
        let method = req["method"].as_str().expect("method");
        let path = self.b.fill(req["path"].as_str().expect("path"));
        let what = format!("step {i} ({method} {path})");
        let mut rb = http().request(
            reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
            format!("{}{path}", self.base),
        );
        for (k, v) in req["headers"].as_object().into_iter().flatten() {
            rb = rb.header(k, self.b.fill(v.as_str().unwrap_or_default()));
        }
        if let Some(body) = req.get("json") {
            rb = rb.body(self.b.fill_value(body).to_string());
        }
        if let Some(raw) = req["raw"].as_str() {
            rb = rb.body(raw.to_string());
        }
        if let Some(form) = req.get("form") {
            rb = rb.multipart(self.form(form));
        }
        let resp = rb.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers: HashMap<String, String> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let bytes = resp.bytes().await.unwrap_or_default();
        let ctype = headers.get("content-type").cloned().unwrap_or_default();
        let body = if method == "HEAD" {
            Value::Null
        } else if ctype.contains("json") {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        } else if ctype.starts_with("text/") {
            Value::String(String::from_utf8_lossy(&bytes).into())
        } else {
            json!({"binary_len": bytes.len()})
        };
        for (name, place) in step["bind"].as_object().into_iter().flatten() {
            let place = self.b.fill(place.as_str().unwrap_or_default());
            let found = match place.strip_prefix("header:") {
                Some(h) => headers.get(h).map(|v| Value::String(v.clone())),
                None => pick(&body, &place),
            };
            match found {
                Some(Value::String(v)) => self.b.bind(name, &v),
                _ => self
                    .diffs
                    .push(format!("{what}: no string at {place} to bind {name}")),
            }
        }
        let want = step["status"].as_u64().unwrap_or(0) as u16;
        if status != want {
            self.diffs.push(format!(
                "{what}: status {status}, ComfyUI answered {want}; body {}",
                brief(&body)
            ));
            return;
        }
        self.headers(&what, &step["headers"], &headers);
        let mut found = Vec::new();
        compare_body(&step["body"], &body, &self.b, want, &mut found);
        self.diffs
            .extend(found.into_iter().map(|d| format!("{what}: body{d}")));
    }

    fn form(&self, form: &Value) -> reqwest::multipart::Form {
        let mut f = reqwest::multipart::Form::new();
        for (k, v) in form["fields"].as_object().into_iter().flatten() {
            f = f.text(k.clone(), self.b.fill(v.as_str().unwrap_or_default()));
        }
        for (k, file) in form["files"].as_object().into_iter().flatten() {
            let content = file["content"].as_str().expect("content");
            let seed: u64 = content["png:".len()..].parse().expect("png:SEED");
            let part = reqwest::multipart::Part::bytes(png(16, 16, seed))
                .file_name(self.b.fill(file["filename"].as_str().expect("filename")))
                .mime_str("image/png")
                .expect("mime");
            f = f.part(k.clone(), part);
        }
        f
    }

    /// Each header ComfyUI sent must be there; media types, ranges, `Accept-Ranges`, exact
    /// lengths, the ETag's form and `Content-Disposition`'s form must agree.
    fn headers(&mut self, what: &str, want: &Value, got: &HashMap<String, String>) {
        for (name, w) in want.as_object().into_iter().flatten() {
            let w = w.as_str().unwrap_or_default();
            let Some(g) = got.get(name) else {
                self.diffs
                    .push(format!("{what}: no {name} header; ComfyUI sent {w:?}"));
                continue;
            };
            let same = match name.as_str() {
                "content-type" => essence(w) == essence(g),
                "content-range" => same_range_form(w, g),
                "accept-ranges" => w == g,
                // Exact for empty and short bodies (a 2-byte range); a longer one depends on
                // the size of the replay's own file.
                "content-length" => match w.parse::<u64>() {
                    Ok(n) if n <= 8 => w == g,
                    _ => g.parse::<u64>().is_ok(),
                },
                "etag" => g.starts_with("W/") == w.starts_with("W/") && g.ends_with('"'),
                "content-disposition" => {
                    g.starts_with("filename=\"") == w.starts_with("filename=\"")
                }
                _ => true,
            };
            if !same {
                self.diffs
                    .push(format!("{what}: {name} {g:?}, ComfyUI sent {w:?}"));
            }
        }
    }

    async fn ws_read(&mut self, i: usize, name: &str, step: &Value) {
        let until = self.b.fill_value(&step["until"]);
        let ws = self.sockets.get_mut(name).expect("socket opened");
        let mut frames = Vec::new();
        let mut arrived = false;
        while let Ok(Some(frame)) = ws.next_within(PATIENCE).await {
            let hit = matches!(&frame, Frame::Json(v) if v["type"] == until["type"]
                && until["data"].as_object().into_iter().flatten()
                    .all(|(k, want)| v["data"][k] == *want));
            frames.push(frame);
            if hit {
                arrived = true;
                break;
            }
        }
        let got: Vec<String> = frames.iter().map(frame_kind).collect();
        let recorded = step["messages"].as_array().expect("messages");
        let want: Vec<String> = recorded.iter().map(message_kind).collect();
        let what = format!("step {i} (ws {name} until {})", step["until"]);
        if !arrived {
            self.diffs
                .push(format!("{what}: never came; got [{}]", runs(&got)));
            return;
        }
        if step["loose"].as_bool() == Some(true) {
            let unexpected: Vec<&String> = got
                .iter()
                .filter(|k| !self.flow_kinds.contains(*k))
                .collect();
            if !unexpected.is_empty() {
                self.diffs.push(format!(
                    "{what}: message types {unexpected:?}, which ComfyUI never sent in this flow"
                ));
            }
            return;
        }
        if want != got {
            self.diffs.push(format!(
                "{what}: messages [{}], ComfyUI sent [{}]",
                runs(&got),
                runs(&want)
            ));
            return;
        }
        for (n, (m, f)) in recorded.iter().zip(&frames).enumerate() {
            if let Frame::Json(v) = f {
                let mut found = Vec::new();
                compare(&m["data"], &v["data"], &self.b, "", &mut found);
                let kind = &want[n];
                self.diffs.extend(
                    found
                        .into_iter()
                        .map(|d| format!("{what}: [{n}] {kind}{d}")),
                );
            }
        }
    }
}

/// Body shapes; a binary body's exact length counts only for a short range (206).
fn compare_body(want: &Value, got: &Value, b: &Bindings, status: u16, out: &mut Vec<String>) {
    if let (Some(w), Some(g)) = (want["binary_len"].as_u64(), got["binary_len"].as_u64()) {
        if status == 206 && w <= 8 && w != g {
            out.push(format!(" {g} bytes, ComfyUI sent {w}"));
        }
        return;
    }
    compare(want, got, b, "", out);
}

/// The value at a dotted path (`a.0.b`: numbers index arrays).
fn pick(v: &Value, path: &str) -> Option<Value> {
    let mut v = v;
    for part in path.split('.') {
        v = match v {
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            other => other.get(part)?,
        };
    }
    Some(v.clone())
}

/// `bytes A-B/N` or `bytes */N` alike; a range from 0 must name the same bytes.
fn same_range_form(want: &str, got: &str) -> bool {
    let range = |s: &str| {
        s.strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .map(|(r, _)| r.to_string())
    };
    match (range(want), range(got)) {
        (Some(w), Some(g)) if w == "*" || g == "*" => w == g,
        (Some(w), Some(g)) => {
            let numeric = g
                .split_once('-')
                .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok());
            numeric && (!w.starts_with("0-") || w == g)
        }
        _ => false,
    }
}

fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn frame_kind(f: &Frame) -> String {
    match f {
        Frame::Json(v) => v["type"].as_str().unwrap_or("?").to_string(),
        Frame::Binary(b) if b.len() >= 4 => {
            format!("binary:{}", u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        Frame::Binary(_) => "binary:?".to_string(),
    }
}

fn message_kind(m: &Value) -> String {
    match m.get("binary") {
        Some(t) => format!("binary:{t}"),
        None => m["type"].as_str().unwrap_or("?").to_string(),
    }
}

/// A message-type sequence with repeats folded: `progress_state×2, executing`.
fn runs(kinds: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < kinds.len() {
        let n = kinds[i..].iter().take_while(|k| **k == kinds[i]).count();
        out.push(if n > 1 {
            format!("{}×{n}", kinds[i])
        } else {
            kinds[i].clone()
        });
        i += n;
    }
    out.join(", ")
}
