//! `validate_prompt` of ComfyUI's execution.py, input by input, with its exact error items.
//!
//! Validation runs against this instance's node classes, model lists and input files, so the
//! same prompt can be valid on one backend and fail with `value_not_in_list` on another: that
//! is what the gate's capability routing has to reckon with.

use std::collections::BTreeSet;

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

/// ComfyUI's `validated`: (valid, reasons) per validated node id, in validation order, with
/// the positions of the entries that have reasons (what `node_errors` reports), so that each
/// failed output costs what it reports, not a pass over every validated node.
#[derive(Default)]
struct Memo {
    entries: IndexMap<String, (bool, Vec<Value>)>,
    with_reasons: BTreeSet<usize>,
}

impl Memo {
    fn get(&self, id: &str) -> Option<&(bool, Vec<Value>)> {
        self.entries.get(id)
    }

    /// `validated[id] = result`: a new id goes last, a known one keeps its place.
    fn insert(&mut self, id: String, result: (bool, Vec<Value>)) {
        let reported = !result.0 && !result.1.is_empty();
        let (at, _) = self.entries.insert_full(id, result);
        if reported {
            self.with_reasons.insert(at);
        } else {
            self.with_reasons.remove(&at);
        }
    }

    /// The entries `node_errors` reports (invalid, with reasons), in validation order.
    fn reported(&self) -> impl Iterator<Item = (&String, &Vec<Value>)> {
        self.with_reasons.iter().filter_map(|&at| {
            self.entries
                .get_index(at)
                .map(|(id, (_, reasons))| (id, reasons))
        })
    }
}

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
    let mut memo = Memo::default();
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
        for (node_id, reasons) in memo.reported() {
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

/// Python's recursion limit, in `validate_inputs` frames (the output's frame is 1), as ComfyUI
/// 0.8.0 on CPython 3.11 showed it on chains of ImageBlur / ImageInvert ending in a SaveImage:
/// a frame at depth 978 cannot start (the longest chain accepted has its first node at depth
/// 977), and the `RecursionError` climbs back up while each handler, calling
/// `traceback.format_tb`, raises again, until the frame at depth 972 records it against the
/// node it links to (always the node at depth 973, whatever the chain's length). On
/// ImageInvert alone both depths are 7 deeper; the exact frame depends on what each node's
/// validation calls, so one calibration stands for all.
const RAISE_DEPTH: usize = 978;
const CATCH_DEPTH: usize = 972;

/// What CPython says when the limit is hit.
const RECURSION: &str = "maximum recursion depth exceeded while calling a Python object";

/// One `validate_inputs` call of ComfyUI's recursion, kept on an explicit stack so that no
/// graph (a cycle, a chain of any length) can overflow the sim's own stack.
struct Frame<'d> {
    id: String,
    def: &'d NodeDef,
    /// The next input of `def.inputs` to look at.
    next: usize,
    errors: Vec<Value>,
    valid: bool,
    custom_inputs: Vec<(&'static str, Value)>,
    /// The linked input whose source is being validated: (input name, input_config, link).
    waiting: Option<(&'static str, Value, Value)>,
}

/// Where a frame stopped.
enum Step {
    /// It links to `from`, which has to be validated first.
    Call(String),
    /// It returned (or raised).
    Done(Result<(bool, Vec<Value>), PyException>),
}

/// `validate_inputs(prompt, id, validated)`: ComfyUI's depth-first recursion, emulated
/// iteratively, with its answers at Python's recursion limit: the call that would go deeper
/// raises `RecursionError`, which the frame at [`CATCH_DEPTH`] records against the node it was
/// linking to; the frames it unwinds through then overwrite the entries of every node still on the stack, so
/// a cycle ends with every node on it invalid and no reason of its own.
fn validate_inputs(
    prompt: &mut Map<String, Value>,
    id: &str,
    memo: &mut Memo,
    ctx: &ValidationContext,
) -> Result<(bool, Vec<Value>), PyException> {
    if let Some(done) = memo.get(id) {
        return Ok(done.clone());
    }
    let mut stack = vec![Frame::new(prompt, id, ctx)];
    let mut returned: Option<Result<(bool, Vec<Value>), PyException>> = None;
    loop {
        let top = stack.last_mut().expect("the stack ends only by returning");
        if let Some(result) = returned.take() {
            let (name, config, link) = top.waiting.take().expect("a call was made");
            match result {
                Ok((false, _)) => top.valid = false,
                Ok(_) => {}
                Err(ex) => {
                    top.valid = false;
                    let reasons = vec![error_item(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        &ex.message,
                        json!({ "input_name": name, "input_config": config, "exception_message": ex.message, "exception_type": ex.kind, "traceback": [], "linked_node": link }),
                    )];
                    memo.insert(python_str(&link[0]), (false, reasons));
                }
            }
        }
        match step(prompt, top, ctx) {
            Step::Call(_) if stack.len() + 1 >= RAISE_DEPTH => {
                // The frames whose handlers raise again end without an entry.
                stack.truncate(CATCH_DEPTH);
                returned = Some(Err(PyException {
                    kind: "RecursionError",
                    message: RECURSION.into(),
                }));
            }
            Step::Call(from) => match memo.get(&from) {
                Some(done) => returned = Some(Ok(done.clone())),
                None => stack.push(Frame::new(prompt, &from, ctx)),
            },
            Step::Done(result) => {
                let frame = stack.pop().expect("a frame ran");
                if let Ok(r) = &result {
                    memo.insert(frame.id, r.clone());
                }
                if stack.is_empty() {
                    return result;
                }
                returned = Some(result);
            }
        }
    }
}

impl<'d> Frame<'d> {
    fn new(prompt: &Map<String, Value>, id: &str, ctx: &ValidationContext<'d>) -> Self {
        let class = python_str(&prompt[id]["class_type"]);
        Frame {
            id: id.to_string(),
            def: find(ctx.defs, &class).expect("classes were checked before"),
            next: 0,
            errors: Vec::new(),
            valid: true,
            custom_inputs: Vec::new(),
            waiting: None,
        }
    }
}

/// Runs one frame of `validate_inputs` from its next input until it links to another node
/// (the caller validates that one and resumes the frame) or returns.
fn step(prompt: &mut Map<String, Value>, frame: &mut Frame, ctx: &ValidationContext) -> Step {
    let def = frame.def;
    let id = frame.id.clone();
    let errors = &mut frame.errors;
    while let Some(input) = def.inputs.get(frame.next) {
        frame.next += 1;
        let value = prompt[&id]
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
            // The prompt's keys are strings: `prompt[5]` or `prompt[None]` is a KeyError, as is
            // an id no node has (`str(KeyError(5))` is `5`, of a string `'5'`).
            let from = python_str(&link[0]);
            let Some(from_node) = link[0].as_str().and_then(|id| prompt.get(id)) else {
                let message = if link[0].is_string() {
                    format!("'{from}'")
                } else {
                    from
                };
                return Step::Done(Err(PyException {
                    kind: "KeyError",
                    message,
                }));
            };
            let from_class = python_str(&from_node["class_type"]);
            let from_def = find(ctx.defs, &from_class).expect("classes were checked before");
            let Some(slot) = link[1].as_i64() else {
                return Step::Done(Err(PyException {
                    kind: "TypeError",
                    message: "tuple indices must be integers or slices, not str".into(),
                }));
            };
            let Some(received) = usize::try_from(slot)
                .ok()
                .and_then(|s| from_def.outputs.get(s))
            else {
                return Step::Done(Err(PyException {
                    kind: "IndexError",
                    message: "tuple index out of range".into(),
                }));
            };
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
            frame.waiting = Some((input.name, config, val));
            return Step::Call(from);
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
            .get_mut(&id)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
        {
            inputs.insert(input.name.to_string(), val.clone());
        }
        if def.custom_validated.contains(&input.name) {
            frame.custom_inputs.push((input.name, val));
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
    for (name, val) in std::mem::take(&mut frame.custom_inputs) {
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
    let errors = std::mem::take(errors);
    Step::Done(Ok((errors.is_empty() && frame.valid, errors)))
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
