//! Shapes of recorded ComfyUI answers: placeholders (`{NAME}`) bound during a replay, the
//! normalisation `tests/fixtures/record_comfyui.py` applies, and a recursive comparison of a
//! recorded JSON value with an actual one (key sets, value types, lengths, and the few string
//! values that are part of the protocol).
#![allow(dead_code)]

use std::collections::HashMap;

use serde_json::Value;

/// Keys whose string values are protocol vocabulary (message, file, error and job types) and
/// are compared exactly, not only as strings.
const VOCABULARY: &[&str] = &["type", "status", "status_str", "mediaType"];

/// Values that depend on the machine, not the protocol: ComfyUI's command line, and the device
/// kind (the transcripts come from a CPU; a GPU reports `cuda` and an index). Only their
/// presence is compared. (A Python traceback's length depends on code paths, and a gate lists
/// one device per backend: see [`compare`].)
fn machine_dependent(path: &str) -> bool {
    path.ends_with(".system.argv")
        || (path.contains(".devices[") && (path.ends_with(".type") || path.ends_with(".index")))
}

/// The prefix of keys the gate adds to ComfyUI's answers (documented in docs/gate.md, e.g.
/// the backend of each `/system_stats` device); clients ignore keys they do not know.
const GATE_EXTENSION: &str = "comfy_gate_";

/// Counts a client acts on, compared exactly: the recorded flows make them deterministic (a
/// `status` says how many prompts wait or run at that point of the flow).
const COUNTS: &[&str] = &["queue_remaining"];

/// Values bound during one replay: placeholder name → the value this run saw.
#[derive(Default)]
pub struct Bindings {
    values: HashMap<String, String>,
}

impl Bindings {
    /// Binds `{name}` to `value`.
    pub fn bind(&mut self, name: &str, value: &str) {
        self.values.insert(name.to_string(), value.to_string());
    }

    /// The value bound to `{name}`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// `s` with every `{NAME}` placeholder (capital letters, digits, `_`) filled in.
    pub fn fill(&self, s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let tail = &rest[open + 1..];
            let name_len = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..name_len];
            match (tail[name_len..].starts_with('}'), self.values.get(name)) {
                (true, Some(v)) if !name.is_empty() => {
                    out.push_str(v);
                    rest = &tail[name_len + 1..];
                }
                _ => {
                    out.push('{');
                    rest = tail;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// `v` with placeholders filled in every string and key.
    pub fn fill_value(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.fill(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.fill_value(x)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (self.fill(k), self.fill_value(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// A string as the recorder writes it: a bound value becomes its placeholder (also inside
    /// longer strings), any other uuid `<uuid>`, a temp file prefix `_temp_xxxxx_`.
    pub fn normalise(&self, s: &str) -> String {
        if let Some((name, _)) = self.values.iter().find(|(_, v)| v.as_str() == s) {
            return format!("{{{name}}}");
        }
        let mut out = s.to_string();
        let mut bound: Vec<(&String, &String)> = self.values.iter().collect();
        bound.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        for (name, v) in bound {
            if v.len() >= 8 {
                out = out.replace(v.as_str(), &format!("{{{name}}}"));
            }
        }
        replace_uuids(&out)
    }
}

/// `s` with every uuid (8-4-4-4-12 lowercase hex) replaced by `<uuid>`.
fn replace_uuids(s: &str) -> String {
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let bytes = s.as_bytes();
    let is_uuid_at = |i: usize| {
        let mut j = i;
        for (n, len) in SHAPE.iter().enumerate() {
            for _ in 0..*len {
                match bytes.get(j) {
                    Some(b) if b.is_ascii_digit() || (b'a'..=b'f').contains(b) => j += 1,
                    _ => return false,
                }
            }
            if n < 4 {
                if bytes.get(j) != Some(&b'-') {
                    return false;
                }
                j += 1;
            }
        }
        true
    };
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        if s.is_char_boundary(i) && is_uuid_at(i) {
            out.push_str("<uuid>");
            i += 36;
        } else {
            let c = s[i..].chars().next().expect("char at boundary");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The JSON type of `v`, telling integers from floats as Python's `json` does.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences between the recorded value `want` and the actual `got`, each naming its JSON
/// path: types, key sets (actual keys normalised with `b`; the gate's `comfy_gate_*` additions
/// allowed), array lengths (an empty recorded array says nothing of its elements and accepts
/// any; a traceback or device list may have any length, each item shaped like the first
/// recorded), placeholders, vocabulary strings and counts.
pub fn compare(want: &Value, got: &Value, b: &Bindings, path: &str, out: &mut Vec<String>) {
    let key = path.rsplit('.').next().unwrap_or("");
    if machine_dependent(path) {
        return;
    }
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let got_keys: HashMap<String, &Value> =
                g.iter().map(|(k, v)| (b.normalise(k), v)).collect();
            let mut missing: Vec<&String> =
                w.keys().filter(|k| !got_keys.contains_key(*k)).collect();
            let mut extra: Vec<&String> = got_keys
                .keys()
                .filter(|k| !w.contains_key(*k) && !k.starts_with(GATE_EXTENSION))
                .collect();
            missing.sort();
            extra.sort();
            if !missing.is_empty() || !extra.is_empty() {
                out.push(format!(
                    "{path}: keys missing {missing:?}, unexpected {extra:?}"
                ));
            }
            for (k, wv) in w {
                if let Some(gv) = got_keys.get(k) {
                    compare(wv, gv, b, &format!("{path}.{k}"), out);
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if w.is_empty() {
                return;
            }
            if key == "traceback" || key == "devices" {
                for (i, gv) in g.iter().enumerate() {
                    compare(&w[0], gv, b, &format!("{path}[{i}]"), out);
                }
                return;
            }
            if w.len() != g.len() {
                out.push(format!(
                    "{path}: {} items, ComfyUI had {}",
                    g.len(),
                    w.len()
                ));
            }
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                compare(wv, gv, b, &format!("{path}[{i}]"), out);
            }
        }
        (Value::String(w), Value::String(g)) => {
            let g = b.normalise(g);
            let placeholder = w.starts_with('{') && w.ends_with('}');
            if (placeholder || VOCABULARY.contains(&key)) && *w != g {
                out.push(format!("{path}: {g:?}, ComfyUI had {w:?}"));
            }
        }
        (Value::Number(w), Value::Number(g)) if COUNTS.contains(&key) && w != g => {
            out.push(format!("{path}: {g}, ComfyUI had {w}"));
        }
        _ if kind(want) != kind(got) => out.push(format!(
            "{path}: {} {}, ComfyUI had {} {}",
            kind(got),
            brief(got),
            kind(want),
            brief(want)
        )),
        _ => {}
    }
}

/// A value shortened for a difference report.
pub fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}
