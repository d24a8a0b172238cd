//! Execution of the utility nodes of [`crate::utility_nodes`]: text concatenation, the text
//! preview, and images sent as binary WebSocket frames.

use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::{Value, json};

use super::{NodeError, NodeResult, Run, Val, linked, literal, missing};
use crate::cost;
use comfy_wire::protocol::frames;

/// Runs one utility node (`class` is one of [`crate::utility_nodes::defs`]).
pub(super) async fn run_node(
    run: &mut Run<'_>,
    id: &str,
    class: &str,
    inputs: &IndexMap<String, Result<Val, Value>>,
) -> NodeResult {
    let inst = run.inst;
    let sleep = |secs: f64| async move {
        if inst.sim_sleep(secs).await {
            Ok(())
        } else {
            Err(NodeError::Died)
        }
    };
    match class {
        "StringConcatenate" => {
            let text = |name: &str| match linked(inputs, name) {
                Some(Val::Text(t)) => t.to_string(),
                Some(other) => other.python_repr(),
                None => literal(inputs, name)
                    .map(comfy_wire::protocol::errors::python_str)
                    .unwrap_or_default(),
            };
            sleep(cost::TRIVIAL_NODE_SECONDS).await?;
            let joined = [text("string_a"), text("string_b")].join(&text("delimiter"));
            Ok((vec![Val::Text(Arc::new(joined))], None))
        }
        "PreviewAny" => {
            let shown = match linked(inputs, "source") {
                Some(val) => val.python_repr(),
                None => literal(inputs, "source")
                    .map(comfy_wire::protocol::errors::python_str)
                    .unwrap_or_default(),
            };
            sleep(cost::TRIVIAL_NODE_SECONDS).await?;
            Ok((vec![], Some(json!({ "text": [shown] }))))
        }
        "SaveImageWebsocket" => {
            let Some(Val::Image(images)) = linked(inputs, "images").cloned() else {
                return Err(missing("images"));
            };
            // ComfyUI's ProgressBar.update_absolute(step, total, ("PNG", image, None)).
            for (step, image) in images.iter().enumerate() {
                if inst.interrupted() {
                    return Err(NodeError::Interrupted);
                }
                sleep(cost::TRIVIAL_NODE_SECONDS).await?;
                run.set_progress(id, "running", json!(step), json!(images.len()));
                let png = image.to_png(&[], true);
                let preview = Some((frames::FORMAT_PNG, "image/png", png));
                run.send_progress(id, step as u32, images.len() as u32, preview);
            }
            Ok((vec![], None))
        }
        other => unreachable!("{other} is not a utility node"),
    }
}
