//! The error shapes of `POST /prompt` (reference §4.2): a top-level `error` plus per-node
//! `node_errors`. Both the sim's validator and the gate's admission build them here.

use serde_json::{Value, json};

/// `{"type", "message", "details", "extra_info"}`, the shape of every error item.
pub fn error_item(kind: &str, message: &str, details: &str, extra_info: Value) -> Value {
    json!({ "type": kind, "message": message, "details": details, "extra_info": extra_info })
}

/// The 400 body: `{"error": …, "node_errors": …}`.
pub fn prompt_error_body(error: Value, node_errors: Value) -> Value {
    json!({ "error": error, "node_errors": node_errors })
}

/// `no_prompt`: the body has no `prompt` key.
pub fn no_prompt() -> Value {
    prompt_error_body(
        error_item(
            "no_prompt",
            "No prompt provided",
            "No prompt provided",
            json!({}),
        ),
        json!({}),
    )
}

/// `invalid_prompt` for a node whose class does not exist.
pub fn unknown_class(node_id: &str, class_type: &str) -> Value {
    prompt_error_body(
        error_item(
            "invalid_prompt",
            &format!("Cannot execute because node {class_type} does not exist."),
            &format!("Node ID '#{node_id}'"),
            json!({}),
        ),
        json!({}),
    )
}

/// `invalid_prompt` for a node without `class_type`.
pub fn missing_class_type(node_id: &str) -> Value {
    prompt_error_body(
        error_item(
            "invalid_prompt",
            "Cannot execute because a node is missing the class_type property.",
            &format!("Node ID '#{node_id}'"),
            json!({}),
        ),
        json!({}),
    )
}

/// `prompt_no_outputs`.
pub fn no_outputs() -> Value {
    prompt_error_body(
        error_item("prompt_no_outputs", "Prompt has no outputs", "", json!({})),
        json!({}),
    )
}

/// `prompt_outputs_failed_validation` with the per-output messages joined as ComfyUI does.
pub fn outputs_failed(details: &str, node_errors: Value) -> Value {
    prompt_error_body(
        error_item(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            details,
            json!({}),
        ),
        node_errors,
    )
}

/// `custom_validation_failed`: a node's `VALIDATE_INPUTS` returned `reason` for `input`
/// (ComfyUI's `execution.py::validate_inputs`: details `"{input} - {reason}"`), e.g. LoadImage's
/// `"Invalid image file: x.png"` (`nodes.py`).
pub fn custom_validation_failed(input: &str, reason: &str) -> Value {
    error_item(
        "custom_validation_failed",
        "Custom validation failed for node",
        &format!("{input} - {reason}"),
        json!({ "input_name": input }),
    )
}

/// `value_not_in_list` for a combo input; lists longer than 20 are summarised as ComfyUI does.
pub fn value_not_in_list(input: &str, value: &Value, options: &[String], config: Value) -> Value {
    let (list_info, input_config) = if options.len() > 20 {
        (format!("(list of length {})", options.len()), Value::Null)
    } else {
        (python_list_repr(options), config)
    };
    error_item(
        "value_not_in_list",
        "Value not in list",
        &format!("{input}: '{}' not in {list_info}", python_str(value)),
        json!({ "input_name": input, "input_config": input_config, "received_value": value }),
    )
}

/// Python's `str()` of a JSON value, as it appears in ComfyUI's messages.
pub fn python_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// Python's `str()` of a list of strings: `['a.safetensors', 'b.safetensors']`.
pub fn python_list_repr(items: &[String]) -> String {
    let inner: Vec<String> = items
        .iter()
        .map(|s| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    format!("[{}]", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_are_summarised() {
        let options: Vec<String> = (0..21).map(|i| format!("m{i}.safetensors")).collect();
        let item = value_not_in_list("ckpt_name", &json!("x"), &options, json!(["COMBO"]));
        assert_eq!(item["details"], "ckpt_name: 'x' not in (list of length 21)");
        assert_eq!(item["extra_info"]["input_config"], Value::Null);
    }

    #[test]
    fn short_lists_are_quoted_like_python() {
        let item = value_not_in_list(
            "ckpt_name",
            &json!("x"),
            &["a.safetensors".into()],
            json!("cfg"),
        );
        assert_eq!(item["details"], "ckpt_name: 'x' not in ['a.safetensors']");
        assert_eq!(item["extra_info"]["input_config"], "cfg");
    }
}
