//! Workflows for the load generator: the built-in txt2img graph, reading a file in ComfyUI's API
//! format (the `prompt` object, or a whole `{"prompt": …}` body), and fresh seeds per prompt.

use std::path::Path;

use serde_json::{Map, Value};

use super::LoadTestError;

/// ComfyUI's default txt2img graph (script_examples), on `sd_xl_base_1.0.safetensors`.
pub const DEFAULT_WORKFLOW: &str = r#"{
  "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": 8566257, "steps": 20}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
  "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 512, "width": 512}},
  "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
  "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
  "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
  "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
}"#;

/// The built-in graph as JSON.
pub fn default_workflow() -> Value {
    serde_json::from_str(DEFAULT_WORKFLOW).expect("the built-in workflow is valid JSON")
}

/// Reads a workflow file: the API-format graph, or a `{"prompt": …}` body.
pub fn load_file(path: &Path) -> Result<Value, LoadTestError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LoadTestError::Workflow {
        name: name.clone(),
        reason: format!("cannot read it: {e}"),
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| LoadTestError::Workflow {
        name: name.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    parse(value, &name)
}

/// Accepts the graph or a `{"prompt": graph}` body and checks that it is an object of nodes.
pub fn parse(value: Value, name: &str) -> Result<Value, LoadTestError> {
    let graph = match value {
        Value::Object(mut top) => match top.get("prompt") {
            Some(Value::Object(p)) if !p.contains_key("class_type") => {
                top.remove("prompt").unwrap_or_default()
            }
            _ => Value::Object(top),
        },
        other => other,
    };
    check_graph(&graph).map_err(|reason| LoadTestError::Workflow {
        name: name.to_string(),
        reason,
    })?;
    Ok(graph)
}

/// An API-format graph: a non-empty object whose every value has a `class_type` and `inputs`.
pub fn check_graph(graph: &Value) -> Result<(), String> {
    let Some(nodes) = graph.as_object() else {
        return Err("not an object of nodes (expected ComfyUI's API format)".into());
    };
    if nodes.contains_key("nodes") && nodes.contains_key("links") {
        return Err(
            "this is a UI workflow; export it in API format (\"Export (API)\") instead".into(),
        );
    }
    if nodes.is_empty() {
        return Err("the workflow has no nodes".into());
    }
    for (id, node) in nodes {
        let ok = node.get("class_type").is_some_and(Value::is_string)
            && node.get("inputs").is_some_and(Value::is_object);
        if !ok {
            return Err(format!(
                "node {id:?} is not a node (needs \"class_type\" and \"inputs\")"
            ));
        }
    }
    Ok(())
}

/// Gives every literal `seed` / `noise_seed` input a fresh random value (below 2^53, so the
/// seed survives JavaScript clients reading the history).
pub fn vary_seeds(graph: &mut Value) {
    let Some(nodes) = graph.as_object_mut() else {
        return;
    };
    for node in nodes.values_mut() {
        if let Some(Value::Object(inputs)) = node.get_mut("inputs") {
            reseed(inputs);
        }
    }
}

fn reseed(inputs: &mut Map<String, Value>) {
    for key in ["seed", "noise_seed"] {
        if let Some(v) = inputs.get_mut(key)
            && v.is_number()
        {
            *v = Value::from(rand::random::<u64>() >> 11);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_graph_and_body() {
        let g = default_workflow();
        assert_eq!(parse(g.clone(), "x").unwrap(), g);
        assert_eq!(parse(json!({ "prompt": g.clone() }), "x").unwrap(), g);
        assert!(parse(json!([1, 2]), "x").is_err());
        assert!(parse(json!({ "1": 5 }), "x").is_err());
        assert!(parse(json!({}), "x").is_err());
    }

    #[test]
    fn varies_literal_seeds_only() {
        let mut g = json!({
            "1": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}},
            "2": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": ["9", 0]}}
        });
        vary_seeds(&mut g);
        assert!(g["1"]["inputs"]["seed"].is_u64());
        assert_eq!(g["1"]["inputs"]["steps"], 20);
        assert_eq!(g["2"]["inputs"]["noise_seed"], json!(["9", 0]));
    }
}
