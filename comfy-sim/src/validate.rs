//! `validate_prompt` of ComfyUI's execution.py, input by input, with its exact error items.
//!
//! Validation runs against this instance's node classes, model lists and input files, so the
//! same prompt can be valid on one backend and fail with `value_not_in_list` on another: that
//! is what the gate's capability routing has to reckon with.

use indexmap::IndexMap;
use serde_json::{Map, Value, json};

use super::nodes::{InputDef, InputType, NodeDef, find};
use comfy_wire::protocol::errors::{self, error_item, python_str};

/// What the validator needs to know about the instance.
pub struct ValidationContext<'a> {
    pub defs: &'a [NodeDef],
    /// Options of each combo input, by node class and input name.
    pub combo: &'a dyn Fn(&InputDef) -> Vec<String>,
    /// Whether an (annotated) input file exists, for LoadImage's `VALIDATE_INPUTS`.
    pub input_file_exists: &'a dyn Fn(&str) -> bool,
}

/// A successful validation: outputs to execute and the (possibly non-empty) node errors.
pub struct Validated {
    pub outputs: Vec<String>,
    pub node_errors: Value,
}

/// (valid, reasons) per validated node id, in validation order.
type Memo = IndexMap<String, (bool, Vec<Value>)>;

/// Python-style exception raised during validation.
struct PyException {
    kind: &'static str,
    message: String,
}

/// Validates `prompt` (normalising literal values in place, as ComfyUI does) and returns either
/// the outputs to run or the 400 body.
pub fn validate_prompt(
    prompt: &mut Map<String, Value>,
    partial_targets: Option<&[String]>,
    ctx: &ValidationContext,
) -> Result<Validated, Value> {
    let mut outputs = Vec::new();
    for (id, node) in prompt.iter() {
        let Some(class) = node.get("class_type") else {
            return Err(errors::missing_class_type(id));
        };
        let class = python_str(class);
        let Some(def) = find(ctx.defs, &class) else {
            return Err(errors::unknown_class(id, &class));
        };
        if def.output_node && partial_targets.is_none_or(|t| t.iter().any(|x| x == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(errors::no_outputs());
    }
    let mut memo = Memo::new();
    let mut good = Vec::new();
    let mut failures: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        let (valid, reasons) = match validate_inputs(prompt, o, &mut memo, ctx) {
            Ok(v) => v,
            Err(ex) => {
                let reasons = vec![error_item(
                    "exception_during_validation",
                    "Exception when validating node",
                    &ex.message,
                    json!({ "exception_type": ex.kind, "traceback": [] }),
                )];
                memo.insert(o.clone(), (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        failures.push((o.clone(), reasons));
        for (node_id, (ok, reasons)) in &memo {
            if *ok || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                let class = prompt
                    .get(node_id)
                    .and_then(|n| n.get("class_type"))
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({ "errors": reasons, "dependent_outputs": [], "class_type": class })
            });
            if let Some(deps) = entry["dependent_outputs"].as_array_mut() {
                deps.push(json!(o));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failures
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| {
                format!(
                    "{}: {}",
                    r["message"].as_str().unwrap_or(""),
                    r["details"].as_str().unwrap_or("")
                )
            })
            .collect();
        return Err(errors::outputs_failed(
            &details.join("\n"),
            Value::Object(node_errors),
        ));
    }
    Ok(Validated {
        outputs: good,
        node_errors: Value::Object(node_errors),
    })
}

fn validate_inputs(
    prompt: &mut Map<String, Value>,
    id: &str,
    memo: &mut Memo,
    ctx: &ValidationContext,
) -> Result<(bool, Vec<Value>), PyException> {
    if let Some(done) = memo.get(id) {
        return Ok(done.clone());
    }
    let class = python_str(&prompt[id]["class_type"]);
    let def = find(ctx.defs, &class).expect("classes were checked before");
    let mut errors = Vec::new();
    let mut valid = true;
    let mut custom_inputs: Vec<(&str, Value)> = Vec::new();

    for input in &def.inputs {
        let value = prompt[id]
            .get("inputs")
            .and_then(|i| i.get(input.name))
            .cloned();
        let Some(mut val) = value else {
            if input.required {
                errors.push(error_item(
                    "required_input_missing",
                    "Required input is missing",
                    input.name,
                    json!({ "input_name": input.name }),
                ));
            }
            continue;
        };
        let config = input_config(input, ctx);
        if let Value::Array(link) = &val {
            if link.len() != 2 {
                errors.push(error_item(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    input.name,
                    json!({ "input_name": input.name, "input_config": config, "received_value": val }),
                ));
                continue;
            }
            let from = python_str(&link[0]);
            let Some(from_node) = prompt.get(&from) else {
                return Err(PyException {
                    kind: "KeyError",
                    message: format!("'{from}'"),
                });
            };
            let from_class = python_str(&from_node["class_type"]);
            let from_def = find(ctx.defs, &from_class).expect("classes were checked before");
            let slot = link[1].as_i64().ok_or_else(|| PyException {
                kind: "TypeError",
                message: "tuple indices must be integers or slices, not str".into(),
            })?;
            let received = usize::try_from(slot)
                .ok()
                .and_then(|s| from_def.outputs.get(s))
                .ok_or_else(|| PyException {
                    kind: "IndexError",
                    message: "tuple index out of range".into(),
                })?;
            let expected = input.ty.name();
            if !types_match(received, expected, &input.ty) {
                errors.push(error_item(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    &format!(
                        "{}, received_type({received}) mismatch input_type({expected})",
                        input.name
                    ),
                    json!({ "input_name": input.name, "input_config": config, "received_type": received, "linked_node": val }),
                ));
                continue;
            }
            match validate_inputs(prompt, &from, memo, ctx) {
                Ok((false, _)) => valid = false,
                Ok(_) => {}
                Err(ex) => {
                    valid = false;
                    let reasons = vec![error_item(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        &ex.message,
                        json!({ "input_name": input.name, "input_config": config, "exception_message": ex.message, "exception_type": ex.kind, "traceback": [], "linked_node": val }),
                    )];
                    memo.insert(from.clone(), (false, reasons));
                }
            }
            continue;
        }
        if let Some(inner) = val.get("__value__").cloned() {
            val = inner;
        }
        match convert(&val, &input.ty) {
            Ok(converted) => val = converted,
            Err(msg) => {
                errors.push(error_item(
                    "invalid_input_type",
                    &format!("Failed to convert an input value to a {} value", input.ty.name()),
                    &format!("{}, {}, {msg}", input.name, python_str(&val)),
                    json!({ "input_name": input.name, "input_config": config, "received_value": val, "exception_message": msg }),
                ));
                continue;
            }
        }
        if let Some(inputs) = prompt
            .get_mut(id)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
        {
            inputs.insert(input.name.to_string(), val.clone());
        }
        if def.custom_validated.contains(&input.name) {
            custom_inputs.push((input.name, val));
            continue;
        }
        if let Some(n) = val.as_f64() {
            if let Some(min) = input.min().filter(|m| n < *m) {
                errors.push(error_item(
                    "value_smaller_than_min",
                    &format!("Value {} smaller than min of {}", python_str(&val), py_num(min, &input.ty)),
                    input.name,
                    json!({ "input_name": input.name, "input_config": config, "received_value": val }),
                ));
                continue;
            }
            if let Some(max) = input.max().filter(|m| n > *m) {
                errors.push(error_item(
                    "value_bigger_than_max",
                    &format!("Value {} bigger than max of {}", python_str(&val), py_num(max, &input.ty)),
                    input.name,
                    json!({ "input_name": input.name, "input_config": config, "received_value": val }),
                ));
                continue;
            }
        }
        if let InputType::Combo(_) = input.ty {
            let options = (ctx.combo)(input);
            if !val.as_str().is_some_and(|s| options.iter().any(|o| o == s)) {
                errors.push(errors::value_not_in_list(
                    input.name, &val, &options, config,
                ));
                continue;
            }
        }
    }

    // LoadImage's VALIDATE_INPUTS: the file must exist on this instance.
    for (name, val) in custom_inputs {
        let file = python_str(&val);
        if !(ctx.input_file_exists)(&file) {
            errors.push(error_item(
                "custom_validation_failed",
                "Custom validation failed for node",
                &format!("{name} - Invalid image file: {file}"),
                json!({ "input_name": name }),
            ));
        }
    }

    let result = (errors.is_empty() && valid, errors);
    memo.insert(id.to_string(), result.clone());
    Ok(result)
}

/// `input_config` as ComfyUI reports it: `(type, options)`.
fn input_config(input: &InputDef, ctx: &ValidationContext) -> Value {
    let ty = match input.ty {
        InputType::Combo(_) => json!((ctx.combo)(input)),
        other => json!(other.name()),
    };
    json!([ty, input.options.clone().unwrap_or_else(|| json!({}))])
}

/// ComfyUI's `validate_node_input`: equal type names or `*` on either side; a combo (whose
/// type is its list of options) accepts only `*`.
fn types_match(received: &str, expected: &str, ty: &InputType) -> bool {
    if received == "*" {
        return true;
    }
    !matches!(ty, InputType::Combo(_)) && (expected == "*" || received == expected)
}

fn py_num(v: f64, ty: &InputType) -> String {
    match ty {
        InputType::Int if v.fract() == 0.0 && v.abs() < 1e19 => format!("{}", v as i128),
        _ => {
            let s = format!("{v}");
            if s.contains('.') { s } else { format!("{s}.0") }
        }
    }
}

/// Python's `int()`, `float()`, `str()` and `bool()` conversions.
fn convert(val: &Value, ty: &InputType) -> Result<Value, String> {
    match ty {
        InputType::Int => match val {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(val.clone()),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                Ok(json!(f.trunc() as i64))
            }
            Value::Bool(b) => Ok(json!(i64::from(*b))),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map(|i| json!(i))
                .map_err(|_| format!("invalid literal for int() with base 10: '{s}'")),
            Value::Null => Err("int() argument must be a string, a bytes-like object or a real number, not 'NoneType'".into()),
            _ => Err("int() argument must be a string, a bytes-like object or a real number, not 'dict'".into()),
        },
        InputType::Float => match val {
            Value::Number(n) => Ok(json!(n.as_f64().unwrap_or(0.0))),
            Value::Bool(b) => Ok(json!(if *b { 1.0 } else { 0.0 })),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map(|f| json!(f))
                .map_err(|_| format!("could not convert string to float: '{s}'")),
            Value::Null => Err("float() argument must be a string or a real number, not 'NoneType'".into()),
            _ => Err("float() argument must be a string or a real number, not 'dict'".into()),
        },
        InputType::String => Ok(match val {
            Value::String(_) => val.clone(),
            other => json!(python_str(other)),
        }),
        InputType::Boolean => Ok(json!(match val {
            Value::Bool(b) => *b,
            Value::Null => false,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        })),
        InputType::Combo(_) | InputType::Link(_) => Ok(val.clone()),
    }
}
