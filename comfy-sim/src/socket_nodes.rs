//! Node classes whose results can be as large as a client asks, for tests of large WebSocket
//! messages without a model: `PreviewAny` shows a text of any length in its `executed` message,
//! `SaveImageWebsocket` sends each image it gets as a full-size PNG frame, and `ImageAddNoise`
//! makes those images incompressible, so an image's pixel count sizes its frame.
//!
//! Sources: `comfy_extras/nodes_preview_any.py`, `comfy_extras/nodes_images.py` and the example
//! custom node `custom_nodes/websocket_image_save.py` of ComfyUI.

use serde_json::{Value, json};

use super::nodes::{InputDef, InputType, NodeDef};

fn required(name: &'static str, ty: InputType, options: Value) -> InputDef {
    InputDef {
        name,
        ty,
        required: true,
        options: Some(options),
    }
}

/// The three classes, in the order `/object_info` lists them after the core ones.
pub fn defs() -> Vec<NodeDef> {
    use InputType::*;
    vec![
        NodeDef {
            class: "ImageAddNoise",
            display_name: "ImageAddNoise",
            category: "image",
            description: "",
            python_module: "comfy_extras.nodes_images",
            inputs: vec![
                required("image", Link("IMAGE"), json!({})),
                required(
                    "seed",
                    Int,
                    json!({"default": 0, "min": 0, "max": u64::MAX, "control_after_generate": true, "tooltip": "The random seed used for creating the noise."}),
                ),
                required(
                    "strength",
                    Float,
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
            class: "PreviewAny",
            display_name: "Preview Any",
            category: "utils",
            description: "",
            python_module: "comfy_extras.nodes_preview_any",
            inputs: vec![required("source", Link("*"), json!({}))],
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
            category: "api node/image",
            description: "",
            python_module: "custom_nodes.websocket_image_save",
            inputs: vec![required("images", Link("IMAGE"), json!({}))],
            hidden: vec![],
            outputs: vec![],
            output_tooltips: None,
            output_node: true,
            v3: false,
            custom_validated: &[],
        },
    ]
}

/// The text `PreviewAny.main` shows for a literal `source`: a string as it is, a number or a
/// boolean as Python's `str()`, anything else as JSON (Python's `json.dumps` puts a space after
/// `,` and `:`; this does not).
pub fn preview_any_text(source: &Value) -> String {
    comfy_wire::protocol::errors::python_str(source)
}
