//! What each backend can run: its node classes and the values each combo input accepts (model
//! files above all), from its `/object_info`, plus model file sizes from
//! `/experiment/models/{folder}` where the backend has that route. A prompt goes only to a
//! backend that has every class and file it names; one that no healthy backend can run is refused
//! at submit with ComfyUI's own 400 shape.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::protocol::errors;
use comfy_wire::files::refs::{FileRef, Kind};

/// One backend's capabilities.
#[derive(Debug, Default)]
pub struct Capabilities {
    classes: HashSet<String>,
    /// Classes with `output_node: true`.
    output_classes: HashSet<String>,
    /// `(class, input)` → accepted values, for combo inputs.
    combos: HashMap<(String, String), HashSet<String>>,
    /// Combo inputs fed by uploads (LoadImage's `image`): the gate places those files itself.
    upload_inputs: HashSet<(String, String)>,
    /// `(class, input)` → the `input_config` to show in errors.
    configs: HashMap<(String, String), Value>,
    /// Model file name → size in bytes.
    pub model_bytes: HashMap<String, u64>,
}

/// Why a backend cannot run a prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Missing {
    /// A node without `class_type` (ComfyUI checks this before anything else).
    ClassType {
        node: String,
    },
    Class {
        node: String,
        class: String,
    },
    Value {
        node: String,
        class: String,
        input: String,
        value: String,
    },
}

impl Capabilities {
    pub fn from_object_info(info: &Value) -> Self {
        let mut caps = Capabilities::default();
        for (class, def) in info.as_object().into_iter().flatten() {
            caps.classes.insert(class.clone());
            if def["output_node"].as_bool().unwrap_or(false) {
                caps.output_classes.insert(class.clone());
            }
            for section in ["required", "optional"] {
                for (name, spec) in def["input"][section].as_object().into_iter().flatten() {
                    let Some(options) = spec[0].as_array() else {
                        continue;
                    };
                    let key = (class.clone(), name.clone());
                    caps.combos.insert(
                        key.clone(),
                        options
                            .iter()
                            .filter_map(|o| o.as_str().map(str::to_string))
                            .collect(),
                    );
                    let upload = ["image_upload", "audio_upload", "video_upload"]
                        .iter()
                        .any(|k| spec[1][*k].as_bool().unwrap_or(false));
                    if upload {
                        caps.upload_inputs.insert(key.clone());
                    }
                    caps.configs.insert(key, spec.clone());
                }
            }
        }
        caps
    }

    /// Whether `class` is an output node here (`output_node: true` in `/object_info`).
    pub fn is_output(&self, class: &str) -> bool {
        self.output_classes.contains(class)
    }

    /// Whether any file input lists `name` (a plain input file this backend holds).
    fn listed(&self, name: &str) -> bool {
        self.upload_inputs
            .iter()
            .any(|k| self.combos.get(k).is_some_and(|o| o.contains(name)))
    }

    /// Adds sizes from an `/experiment/models/{folder}` answer.
    pub fn add_model_sizes(&mut self, listing: &Value) {
        for m in listing.as_array().into_iter().flatten() {
            if let (Some(name), Some(size)) = (m["name"].as_str(), m["size"].as_u64()) {
                self.model_bytes.insert(name.to_string(), size);
            }
        }
    }

    /// The first thing this backend lacks for `prompt`; `uploaded` says whether the gate holds
    /// an input upload of that loader value (it will place it).
    ///
    /// A file input (`image_upload` and the like) takes any reference ComfyUI's loaders open
    /// (`folder_paths.get_annotated_filepath`; LoadImage's `VALIDATE_INPUTS` replaces the list
    /// check): only a plain top-level input name is checked against the list here. A subfolder
    /// or an ` [output]`/` [temp]` reference is the gate's to place when it knows the file
    /// (`files::place`), and else the backend's to judge.
    pub fn missing(&self, prompt: &Value, uploaded: &dyn Fn(&str) -> bool) -> Option<Missing> {
        let file_ok = |v: &str| match FileRef::from_loader(v) {
            Some(r) if r.kind == Kind::Input && r.subfolder.is_empty() => {
                uploaded(v) || self.listed(&r.name)
            }
            Some(_) => true,
            None => false,
        };
        let nodes = prompt.as_object().into_iter().flatten();
        if let Some((node, _)) = nodes.clone().find(|(_, d)| d.get("class_type").is_none()) {
            return Some(Missing::ClassType { node: node.clone() });
        }
        for (node, def) in nodes {
            let class = def["class_type"].as_str().unwrap_or("");
            if !self.classes.contains(class) {
                return Some(Missing::Class {
                    node: node.clone(),
                    class: class.to_string(),
                });
            }
            for (input, value) in def["inputs"].as_object().into_iter().flatten() {
                let Some(v) = value.as_str() else { continue };
                let key = (class.to_string(), input.clone());
                let Some(options) = self.combos.get(&key) else {
                    continue;
                };
                if options.contains(v) || (self.upload_inputs.contains(&key) && file_ok(v)) {
                    continue;
                }
                return Some(Missing::Value {
                    node: node.clone(),
                    class: class.to_string(),
                    input: input.clone(),
                    value: v.to_string(),
                });
            }
        }
        None
    }
}

/// At submit: if backends with known capabilities exist (`known`: those of the backends that
/// are up) and none can run the prompt, the 400 body ComfyUI would give, naming the node
/// (ComfyUI's `execution.py::validate_prompt` shapes, via [`errors`]).
pub fn refusal(
    known: &[Arc<Capabilities>],
    prompt: &Value,
    uploaded: &dyn Fn(&str) -> bool,
) -> Option<Value> {
    if known.is_empty() {
        return None;
    }
    let mut first = None;
    for caps in known {
        match caps.missing(prompt, uploaded) {
            None => return None,
            Some(m) => {
                first.get_or_insert(m);
            }
        }
    }
    match first? {
        Missing::ClassType { node } => Some(errors::missing_class_type(&node)),
        Missing::Class { node, class } => Some(errors::unknown_class(&node, &class)),
        Missing::Value {
            node,
            class,
            input,
            value,
        } => {
            let mut options: Vec<String> = Vec::new();
            let key = (class.clone(), input.clone());
            for caps in known {
                for o in caps.combos.get(&key).into_iter().flatten() {
                    if !options.contains(o) {
                        options.push(o.clone());
                    }
                }
            }
            options.sort();
            let config = known
                .iter()
                .find_map(|c| c.configs.get(&key))
                .cloned()
                .unwrap_or(Value::Null);
            let item = match upload_kind(&config) {
                // A loader's own `VALIDATE_INPUTS` judges its file (the list check is skipped).
                Some(kind) => errors::custom_validation_failed(
                    &input,
                    &format!("Invalid {kind} file: {value}"),
                ),
                None => errors::value_not_in_list(&input, &json!(value), &options, config),
            };
            let outputs: Vec<&String> = prompt
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, n)| {
                    let c = n["class_type"].as_str().unwrap_or("");
                    known.iter().any(|k| k.output_classes.contains(c))
                })
                .map(|(id, _)| id)
                .collect();
            // ComfyUI joins only the output nodes' own errors; a node upstream of every output
            // leaves the top-level details empty (`execution.py::validate_prompt`).
            let details = if outputs.contains(&&node) {
                format!(
                    "{}: {}",
                    item["message"].as_str().unwrap_or(""),
                    item["details"].as_str().unwrap_or("")
                )
            } else {
                String::new()
            };
            let node_errors = json!({ node: { "errors": [item], "dependent_outputs": outputs, "class_type": class } });
            Some(errors::outputs_failed(&details, node_errors))
        }
    }
}

/// The kind of file a loader input takes (`image`, `audio`, `video`), from its `input_config`
/// flags (`image_upload` …), as its `VALIDATE_INPUTS` names it (`nodes.py` LoadImage,
/// `comfy_extras/nodes_audio.py`, `comfy_extras/nodes_video.py`).
fn upload_kind(config: &Value) -> Option<&'static str> {
    [
        ("image_upload", "image"),
        ("audio_upload", "audio"),
        ("video_upload", "video"),
    ]
    .into_iter()
    .find(|(flag, _)| config[1][*flag].as_bool().unwrap_or(false))
    .map(|(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_missing_classes_and_files() {
        let info = json!({
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}}},
            "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": true}]}}},
            "SaveImage": {"input": {"required": {"images": ["IMAGE"]}}}
        });
        let caps = Capabilities::from_object_info(&info);
        let none = |_: &str| false;
        let ok = json!({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}}});
        assert_eq!(caps.missing(&ok, &none), None);
        let file = json!({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}}});
        assert!(matches!(
            caps.missing(&file, &none),
            Some(Missing::Value { .. })
        ));
        let class = json!({"7": {"class_type": "Nope", "inputs": {}}});
        assert_eq!(
            caps.missing(&class, &none),
            Some(Missing::Class {
                node: "7".into(),
                class: "Nope".into()
            })
        );
        let upload = json!({"2": {"class_type": "LoadImage", "inputs": {"image": "mine.png"}}});
        assert!(caps.missing(&upload, &none).is_some());
        assert_eq!(
            caps.missing(&upload, &|n| n == "mine.png"),
            None,
            "the gate places uploads"
        );
        for accepted in [
            "x.png [input]",
            "webcam/shot.png [temp]",
            "ComfyUI_00002_.png [output]",
            "sub/any.png",
        ] {
            let p = json!({"2": {"class_type": "LoadImage", "inputs": {"image": accepted}}});
            assert_eq!(caps.missing(&p, &none), None, "{accepted}");
        }
        let climbs = json!({"2": {"class_type": "LoadImage", "inputs": {"image": "../x.png"}}});
        assert!(caps.missing(&climbs, &none).is_some());
    }
}
