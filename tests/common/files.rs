//! Helpers for the file tests through the gate (`gate_files.rs`, `gate_view.rs`): a gate over
//! two sims that can run a prompt on a chosen backend, uploads, `/view` with headers, and
//! reading an output's pixels back.

use comfy_sim::SimHandle;
use comfy_wire::files::images::Image;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use super::*;

/// A gate over two sims, with the admin URL for drains.
pub struct Fleet {
    pub a: SimHandle,
    pub b: SimHandle,
    pub gate: comfy_gate::GateHandle,
}

impl Fleet {
    pub async fn start() -> Fleet {
        let (a, b) = (sim().await, sim().await);
        let gate = gate(&[&a, &b]).await;
        Fleet { a, b, gate }
    }

    pub fn base(&self) -> String {
        self.gate.url()
    }

    pub fn sims(&self) -> [&SimHandle; 2] {
        [&self.a, &self.b]
    }

    /// Runs `graph` on `on` alone (the other backend drained meanwhile); its history entry.
    pub async fn run_on(&self, on: &SimHandle, id: &str, graph: Value) -> Value {
        let admin = format!("http://{}", self.gate.admin_addr);
        let other = self
            .sims()
            .into_iter()
            .find(|s| s.addr() != on.addr())
            .unwrap();
        let verb = |v: &str| format!("/admin/backends/{}/{v}", other.addr());
        assert_eq!(post_json(&admin, &verb("drain"), &json!({})).await.0, 200);
        let before = on.counters().prompts_finished;
        let (code, r) = post_json(
            &self.base(),
            "/prompt",
            &json!({"prompt": graph, "prompt_id": id}),
        )
        .await;
        assert_eq!(code, 200, "{r}");
        let h = wait_history(&self.base(), id).await;
        assert_eq!(post_json(&admin, &verb("undrain"), &json!({})).await.0, 200);
        let after = on.counters().prompts_finished;
        assert_eq!(after, before + 1, "{id} ran on the backend chosen for it");
        h
    }
}

/// Uploads `bytes` as `name` with text `fields`; the status and answer.
pub async fn upload(
    base: &str,
    path: &str,
    name: &str,
    bytes: Vec<u8>,
    fields: &[(&str, &str)],
) -> (u16, Value) {
    let mut form = Form::new().part("image", Part::bytes(bytes).file_name(name.to_string()));
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    send_for_json(http().post(format!("{base}{path}")).multipart(form)).await
}

/// `method /view` with a query and request headers.
pub async fn view(
    base: &str,
    method: reqwest::Method,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http().request(method, format!("{base}/view")).query(query);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("view answers")
}

pub async fn view_bytes(base: &str, query: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let r = view(base, reqwest::Method::GET, query, &[]).await;
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// LoadImage of `value` saved as-is under `prefix`.
pub fn load_and_save(value: &str, prefix: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": value}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    })
}

/// The pixels of the first image a history entry's node `node` shows, read through the gate.
pub async fn output_pixels(base: &str, h: &Value, node: &str) -> Image {
    let item = &h["outputs"][node]["images"][0];
    let query = [
        ("filename", item["filename"].as_str().unwrap()),
        ("subfolder", item["subfolder"].as_str().unwrap()),
        ("type", item["type"].as_str().unwrap()),
    ];
    let (code, bytes) = view_bytes(base, &query).await;
    assert_eq!(code, 200, "{item}");
    Image::from_png(&bytes).expect("a png").0
}

pub fn pixels(png: &[u8]) -> Image {
    Image::from_png(png).expect("a png").0
}
