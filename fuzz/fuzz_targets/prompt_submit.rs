//! `POST /prompt` on the gate: the body rules (`sched::admission::parse`), the fleet's verdict
//! on the graph (the capabilities of a comfy-sim backend: classes, combo values, input files),
//! the resource profile read from the graph and the VRAM fit. None may panic, and a graph the
//! capabilities accept must have a profile.
#![no_main]

use std::sync::{Arc, LazyLock};

use comfy_gate::fleet::capabilities::{self, Capabilities};
use comfy_gate::fleet::picker::profile;
use comfy_gate::sched::{admission, fit};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// What a default comfy-sim backend advertises in `/object_info`.
static BACKEND: LazyLock<Vec<Arc<Capabilities>>> = LazyLock::new(|| {
    let config = comfy_sim::SimConfig::default();
    let images = vec!["example.png".to_string()];
    let info: Map<String, Value> = comfy_sim::node_catalogue()
        .iter()
        .map(|d| {
            let entry = comfy_sim::nodes::object_info(d, &config, &images);
            (d.class.to_string(), entry)
        })
        .collect();
    vec![Arc::new(Capabilities::from_object_info(&Value::Object(
        info,
    )))]
});

fuzz_target!(|body: &[u8]| {
    let refuse = |prompt: &Value| {
        let refusal = capabilities::refusal(&BACKEND, prompt, &|n| n == "uploaded.png");
        let p = profile::profile(prompt);
        let need = profile::vram_need(&p, Some(2 << 30), None);
        let _ = fit::vram_fit(need, &[24 << 30, 80 << 30], 1.5);
        refusal
    };
    if let Ok(Ok(sub)) = admission::parse(body, &refuse) {
        assert!(sub.body.get("prompt").is_some_and(Value::is_object));
        assert!(!sub.body.contains_key("prompt_id") && !sub.body.contains_key("client_id"));
    }
});
