//! comfy-sim's `POST /prompt` validation (ComfyUI's `execution.py::validate_prompt`) over any
//! graph, then the order the accepted graph would run in (`ExecutionList`). Neither may
//! panic or recurse without bound (a cycle, a 3,000-node chain); every output the validator
//! accepts must be in the run order unless it sits on a cycle.
#![no_main]

use std::sync::LazyLock;

use comfy_sim::nodes::{self, InputDef, InputType, NodeDef};
use comfy_sim::validate::{ValidationContext, validate_prompt};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

static DEFS: LazyLock<Vec<NodeDef>> = LazyLock::new(comfy_sim::node_catalogue);
static CONFIG: LazyLock<comfy_sim::SimConfig> = LazyLock::new(comfy_sim::SimConfig::default);

fuzz_target!(|body: &[u8]| {
    let Ok(Value::Object(mut prompt)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    // The route answers a node that is not an object before validation runs (routes.rs).
    if prompt.values().any(|n| !n.is_object()) {
        return;
    }
    let images = vec!["example.png".to_string()];
    let combo = |input: &InputDef| match input.ty {
        InputType::Combo(src) => nodes::combo_options(src, &CONFIG, &images),
        _ => Vec::new(),
    };
    let exists = |name: &str| name.trim_end_matches(" [input]") == "example.png";
    let ctx = ValidationContext {
        defs: &DEFS,
        combo: &combo,
        input_file_exists: &exists,
    };
    let Ok(valid) = validate_prompt(&mut prompt, None, &ctx) else {
        return;
    };
    let is_output = |c: &str| nodes::find(&DEFS, c).is_some_and(|d| d.output_node);
    let order =
        comfy_sim::execution_order(&prompt as &Map<String, Value>, &valid.outputs, &is_output);
    assert!(order.len() <= prompt.len());
});
