//! Model-free utility nodes of ComfyUI 0.8 that clients use without any model file: noise
//! (`ImageAddNoise`), text (`StringConcatenate`, `PreviewAny`) and images sent over the WebSocket
//! (`SaveImageWebsocket`, ComfyUI's `custom_nodes/websocket_image_save.py`, used by
//! `script_examples/websockets_api_example_ws_images.py`). Their `/object_info` entries are
//! ComfyUI's; [`crate::exec`] runs them.

use serde_json::json;

use super::nodes::{InputDef, InputType, NodeDef};

fn required(name: &'static str, ty: InputType, options: serde_json::Value) -> InputDef {
    InputDef {
        name,
        ty,
        required: true,
        options: Some(options),
    }
}

fn string_input(name: &'static str, options: serde_json::Value) -> InputDef {
    InputDef {
        name,
        ty: InputType::String,
        required: true,
        options: Some(options),
    }
}

/// The utility node classes, in `/object_info` order after the core ones.
pub fn defs() -> Vec<NodeDef> {
    vec![
        // Uniform noise in the sim (ComfyUI's is Gaussian): at strength 1 an image does not
        // compress, so its pixel count sizes a `SaveImageWebsocket` frame.
        NodeDef {
            class: "ImageAddNoise",
            display_name: "ImageAddNoise",
            category: "image",
            description: "",
            python_module: "comfy_extras.nodes_images",
            inputs: vec![
                required("image", InputType::Link("IMAGE"), json!({})),
                required(
                    "seed",
                    InputType::Int,
                    json!({"default": 0, "min": 0, "max": u64::MAX, "control_after_generate": true, "tooltip": "The random seed used for creating the noise."}),
                ),
                required(
                    "strength",
                    InputType::Float,
                    json!({"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                ),
            ],
            hidden: vec![],
            outputs: vec!["IMAGE"],
            output_tooltips: None,
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "StringConcatenate",
            display_name: "Concatenate",
            category: "utils/string",
            description: "",
            python_module: "comfy_extras.nodes_string",
            inputs: vec![
                string_input("string_a", json!({"multiline": true})),
                string_input("string_b", json!({"multiline": true})),
                string_input("delimiter", json!({"default": "", "multiline": false})),
            ],
            hidden: vec![],
            outputs: vec!["STRING"],
            output_tooltips: None,
            output_node: false,
            v3: true,
            custom_validated: &[],
        },
        NodeDef {
            class: "PreviewAny",
            display_name: "Preview as Text",
            category: "utils",
            description: "",
            python_module: "comfy_extras.nodes_preview_any",
            inputs: vec![InputDef {
                name: "source",
                ty: InputType::Link("*"),
                required: true,
                options: Some(json!({})),
            }],
            hidden: vec![],
            outputs: vec![],
            output_tooltips: None,
            output_node: true,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "SaveImageWebsocket",
            display_name: "SaveImageWebsocket",
            category: "api/image",
            description: "",
            python_module: "custom_nodes.websocket_image_save",
            inputs: vec![InputDef {
                name: "images",
                ty: InputType::Link("IMAGE"),
                required: true,
                options: None,
            }],
            hidden: vec![],
            outputs: vec![],
            output_tooltips: None,
            output_node: true,
            v3: false,
            custom_validated: &[],
        },
    ]
}

/// Nodes whose `IS_CHANGED` returns the time, so ComfyUI never serves them from its cache.
pub const NEVER_CACHED: &[&str] = &["SaveImageWebsocket"];
