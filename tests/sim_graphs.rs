//! Graphs that must not hurt comfy-sim: cycles, long chains and many output nodes get
//! ComfyUI 0.8.0's answers (recorded from a real ComfyUI, see each test) and the sim keeps
//! serving meanwhile and afterwards.

mod common;

use common::*;
use serde_json::{Map, Value, json};

fn empty_image() -> Value {
    json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}})
}

fn blur(from: &str) -> Value {
    json!({"class_type": "ImageBlur", "inputs": {"image": [from, 0], "blur_radius": 1, "sigma": 1.0}})
}

fn invert(from: &str) -> Value {
    json!({"class_type": "ImageInvert", "inputs": {"image": [from, 0]}})
}

fn save(from: &str) -> Value {
    json!({"class_type": "SaveImage", "inputs": {"images": [from, 0], "filename_prefix": "graphs"}})
}

async fn submit(base: &str, prompt: Value) -> (u16, Value) {
    post_json(
        base,
        "/prompt",
        &json!({"prompt": prompt, "client_id": "graphs"}),
    )
    .await
}

/// EmptyImage "0" → `n` nodes alternating ImageBlur / ImageInvert → SaveImage `n + 1`.
fn chain(n: usize) -> Value {
    let mut p = Map::new();
    p.insert("0".into(), empty_image());
    for i in 1..=n {
        let from = (i - 1).to_string();
        let node = if i % 2 == 1 {
            blur(&from)
        } else {
            invert(&from)
        };
        p.insert(i.to_string(), node);
    }
    p.insert((n + 1).to_string(), save(&n.to_string()));
    Value::Object(p)
}

/// One EmptyImage feeding `n` PreviewAny output nodes.
fn many_outputs(n: usize) -> Value {
    let mut p = Map::new();
    p.insert("0".into(), empty_image());
    for i in 1..=n {
        p.insert(
            i.to_string(),
            json!({"class_type": "PreviewAny", "inputs": {"source": ["0", 0]}}),
        );
    }
    Value::Object(p)
}

/// The sim still answers and still runs an ordinary prompt.
async fn still_serves(base: &str) {
    let (code, _) = get_json(base, "/queue").await;
    assert_eq!(code, 200);
    let (code, body) = submit(base, blur_graph(7)).await;
    assert_eq!(code, 200, "{body}");
    let entry = wait_history(base, body["prompt_id"].as_str().unwrap()).await;
    assert_eq!(entry["status"]["status_str"], "success");
}

/// What ComfyUI 0.8.0 answers for a cycle among the nodes an output depends on: its recursive
/// validation overflows Python's stack, and every node on the cycle ends up invalid with no
/// reason of its own, so nothing is named.
fn cycle_refusal() -> Value {
    json!({
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
        "node_errors": {}
    })
}

#[tokio::test]
async fn a_cycle_is_refused_as_comfyui_does_and_the_sim_keeps_serving() {
    let sim = sim().await;
    let base = sim.url();

    // Two ImageBlur nodes linked to each other, saved.
    let (code, body) = submit(
        &base,
        json!({"1": blur("2"), "2": blur("1"), "3": save("1")}),
    )
    .await;
    assert_eq!((code, body), (400, cycle_refusal()));

    // A self-loop.
    let (code, body) = submit(&base, json!({"1": invert("1"), "2": save("1")})).await;
    assert_eq!((code, body), (400, cycle_refusal()));

    // A longer cycle with a branch off it.
    let (code, body) = submit(
        &base,
        json!({"1": blur("3"), "2": invert("1"), "3": blur("2"), "4": save("2"), "5": save("3")}),
    )
    .await;
    assert_eq!((code, body), (400, cycle_refusal()));

    still_serves(&base).await;
}

#[tokio::test]
async fn a_cycle_no_valid_output_needs_is_accepted_and_the_rest_runs() {
    let sim = sim().await;
    let base = sim.url();

    // A cycle no output reaches: ComfyUI never looks at it, 200, and the save runs.
    let (code, body) = submit(
        &base,
        json!({"1": blur("2"), "2": blur("1"), "5": empty_image(), "3": save("5")}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node_errors"], json!({}));
    let entry = wait_history(&base, body["prompt_id"].as_str().unwrap()).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(
        entry["outputs"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["3"]
    );

    // One output on a cycle, one not: the cycle's output is dropped without a node error (no
    // node on it has a reason of its own), the other runs.
    let (code, body) = submit(
        &base,
        json!({"1": invert("2"), "2": invert("1"), "5": empty_image(), "3": save("5"), "4": save("2")}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node_errors"], json!({}));
    let entry = wait_history(&base, body["prompt_id"].as_str().unwrap()).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(
        entry["outputs"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["3"]
    );

    still_serves(&base).await;
}

#[tokio::test]
async fn a_3000_node_chain_is_refused_as_comfyui_does() {
    let sim = sim().await;
    let base = sim.url();
    let (code, body) = submit(&base, chain(2999)).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["error"],
        json!({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}})
    );
    // ComfyUI names the one node whose validation hit Python's recursion limit: "2028", 973
    // links from the output.
    let errors = body["node_errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{body}");
    let (id, entry) = errors.iter().next().unwrap();
    assert_eq!(id, "2028");
    assert_eq!(entry["dependent_outputs"], json!(["3000"]));
    assert_eq!(entry["class_type"], chain(2999)[id]["class_type"]);
    let error = &entry["errors"][0];
    assert_eq!(error["type"], "exception_during_inner_validation");
    assert_eq!(error["message"], "Exception when validating inner node");
    let recursion = "maximum recursion depth exceeded while calling a Python object";
    assert_eq!(error["details"], recursion);
    assert_eq!(error["extra_info"]["exception_type"], "RecursionError");
    assert_eq!(error["extra_info"]["exception_message"], recursion);
    assert_eq!(error["extra_info"]["input_name"], "image");
    assert_eq!(error["extra_info"]["linked_node"], json!([id, 0]));
    assert_eq!(error["extra_info"]["input_config"], json!(["IMAGE", {}]));

    still_serves(&base).await;
}

/// The longest such chain ComfyUI 0.8.0 accepted (on CPython 3.11) has 975 nodes between
/// EmptyImage and SaveImage, and it runs; with 976 it names node 5, with 1,500 node 529
/// (always the node 973 links from the output, as with 3,000).
#[tokio::test]
async fn the_longest_chain_comfyui_accepts_runs_and_one_more_is_refused() {
    let sim = sim().await;
    let base = sim.url();
    let (code, body) = submit(&base, chain(975)).await;
    assert_eq!(code, 200, "{body}");
    let entry = wait_history(&base, body["prompt_id"].as_str().unwrap()).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert!(entry["outputs"]["976"]["images"].is_array());

    for (n, named) in [(976, "5"), (1500, "529")] {
        let (code, body) = submit(&base, chain(n)).await;
        assert_eq!(code, 400, "{body}");
        let names: Vec<&String> = body["node_errors"].as_object().unwrap().keys().collect();
        assert_eq!(names, [named]);
    }
}

/// `n` output nodes validate and run, and the sim answers another request while they do.
async fn many_outputs_run(n: usize) {
    let sim = sim().await;
    let base = sim.url();
    let (code, body) = submit(&base, many_outputs(n)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["node_errors"], json!({}));
    let id = body["prompt_id"].as_str().unwrap().to_string();
    let (code, queue) = get_json(&base, "/queue").await;
    assert_eq!(code, 200);
    assert!(queue["queue_running"].is_array());
    let entry = wait_history(&base, &id).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["outputs"].as_object().unwrap().len(), n);
    still_serves(&base).await;
}

#[tokio::test]
async fn three_thousand_output_nodes_run() {
    many_outputs_run(3_000).await;
}

#[tokio::test]
async fn ten_thousand_output_nodes_run() {
    many_outputs_run(10_000).await;
}
