//! Every `POST /prompt` error shape of reference §4.2, as comfy-sim returns them.

mod common;

use common::*;
use serde_json::{Value, json};

async fn submit(base: &str, body: Value) -> (u16, Value) {
    post_json(base, "/prompt", &body).await
}

fn node_error<'a>(resp: &'a Value, node: &str) -> &'a Value {
    &resp["node_errors"][node]["errors"][0]
}

#[tokio::test]
async fn no_prompt() {
    let sim = sim().await;
    let (code, body) = submit(&sim.url(), json!({"client_id": "x"})).await;
    assert_eq!(code, 400);
    assert_eq!(
        body,
        json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}})
    );
}

#[tokio::test]
async fn invalid_prompt_for_unknown_class_and_missing_class_type() {
    let sim = sim().await;
    let (code, body) = submit(
        &sim.url(),
        json!({"prompt": {"5": {"class_type": "NopeNode", "inputs": {}}}}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["type"], "invalid_prompt");
    assert_eq!(
        body["error"]["message"],
        "Cannot execute because node NopeNode does not exist."
    );
    assert_eq!(body["error"]["details"], "Node ID '#5'");
    assert_eq!(body["node_errors"], json!({}));

    let (code, body) = submit(&sim.url(), json!({"prompt": {"5": {"inputs": {}}}})).await;
    assert_eq!(code, 400);
    assert_eq!(
        body["error"]["message"],
        "Cannot execute because a node is missing the class_type property."
    );
}

#[tokio::test]
async fn prompt_no_outputs() {
    let sim = sim().await;
    let (code, body) = submit(
        &sim.url(),
        json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        body["error"],
        json!({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}})
    );
}

#[tokio::test]
async fn required_input_missing() {
    let sim = sim().await;
    let mut g = blur_graph(0);
    g["3"]["inputs"].as_object_mut().unwrap().remove("images");
    let (code, body) = submit(&sim.url(), json!({"prompt": g})).await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(body["error"]["message"], "Prompt outputs failed validation");
    assert_eq!(
        body["error"]["details"],
        "Required input is missing: images"
    );
    assert_eq!(
        body["node_errors"]["3"],
        json!({"errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "images", "extra_info": {"input_name": "images"}}],
               "dependent_outputs": ["3"], "class_type": "SaveImage"})
    );
}

#[tokio::test]
async fn value_bigger_than_max_and_smaller_than_min() {
    let sim = sim().await;
    let mut g = blur_graph(0);
    g["2"]["inputs"]["blur_radius"] = json!(999);
    let (code, body) = submit(&sim.url(), json!({"prompt": g})).await;
    assert_eq!(code, 400);
    let e = node_error(&body, "2");
    assert_eq!(e["type"], "value_bigger_than_max");
    assert_eq!(e["message"], "Value 999 bigger than max of 31");
    assert_eq!(e["details"], "blur_radius");
    assert_eq!(e["extra_info"]["received_value"], 999);
    assert_eq!(e["extra_info"]["input_config"][0], "INT");
    assert_eq!(body["node_errors"]["2"]["dependent_outputs"], json!(["3"]));
    assert_eq!(body["node_errors"]["2"]["class_type"], "ImageBlur");
    assert!(
        body["node_errors"].get("3").is_none(),
        "downstream nodes carry no errors of their own"
    );

    let mut g = blur_graph(0);
    g["2"]["inputs"]["sigma"] = json!(0.01);
    let (_, body) = submit(&sim.url(), json!({"prompt": g})).await;
    let e = node_error(&body, "2");
    assert_eq!(e["type"], "value_smaller_than_min");
    assert_eq!(e["message"], "Value 0.01 smaller than min of 0.1");
}

#[tokio::test]
async fn value_not_in_list_names_this_instances_files() {
    let sim = sim().await;
    let (code, body) = submit(
        &sim.url(),
        json!({"prompt": txt2img(1, "missing.safetensors")}),
    )
    .await;
    assert_eq!(code, 400);
    let e = node_error(&body, "4");
    assert_eq!(e["type"], "value_not_in_list");
    assert_eq!(e["message"], "Value not in list");
    assert_eq!(
        e["details"],
        format!("ckpt_name: 'missing.safetensors' not in ['{SDXL}', '{SD15}']")
    );
    assert_eq!(e["extra_info"]["received_value"], "missing.safetensors");
    assert_eq!(
        body["node_errors"]["4"]["class_type"],
        "CheckpointLoaderSimple"
    );
    assert_eq!(body["node_errors"]["4"]["dependent_outputs"], json!(["9"]));

    // Long lists (samplers) are summarised and input_config becomes null.
    let mut g = txt2img(1, SDXL);
    g["3"]["inputs"]["sampler_name"] = json!("warp_drive");
    let (_, body) = submit(&sim.url(), json!({"prompt": g})).await;
    let e = node_error(&body, "3");
    assert_eq!(
        e["details"],
        "sampler_name: 'warp_drive' not in (list of length 44)"
    );
    assert_eq!(e["extra_info"]["input_config"], Value::Null);
}

#[tokio::test]
async fn link_errors_and_type_conversion() {
    let sim = sim().await;
    // A link of the wrong type.
    let mut g = blur_graph(0);
    g["3"]["inputs"]["images"] = json!(["1", 5]);
    let (code, body) = submit(&sim.url(), json!({"prompt": g})).await;
    assert_eq!(code, 400);
    assert_eq!(
        node_error(&body, "3")["type"],
        "exception_during_validation"
    );

    // A link whose node id is not a string: ComfyUI's prompt keys are strings, so
    // `prompt[1]` and `prompt[None]` raise KeyError, even when a node "1" exists.
    for (from, shown) in [(json!(1), "1"), (json!(null), "None")] {
        let mut g = blur_graph(0);
        g["2"]["inputs"]["image"] = json!([from, 0]);
        let (code, body) = submit(&sim.url(), json!({"prompt": g})).await;
        assert_eq!(code, 400, "{body}");
        // Raised while SaveImage's input validated ImageBlur: charged to ImageBlur.
        let e = node_error(&body, "2");
        assert_eq!(e["type"], "exception_during_inner_validation", "{body}");
        assert_eq!(e["extra_info"]["exception_message"], shown);
        assert_eq!(e["extra_info"]["exception_type"], "KeyError");
    }

    let mut g = txt2img(1, SDXL);
    g["8"]["inputs"]["samples"] = json!(["4", 0]);
    let (_, body) = submit(&sim.url(), json!({"prompt": g})).await;
    let e = node_error(&body, "8");
    assert_eq!(e["type"], "return_type_mismatch");
    assert_eq!(
        e["details"],
        "samples, received_type(MODEL) mismatch input_type(LATENT)"
    );

    let mut g = blur_graph(0);
    g["2"]["inputs"]["image"] = json!(["1", 0, 2]);
    let (_, body) = submit(&sim.url(), json!({"prompt": g})).await;
    assert_eq!(node_error(&body, "2")["type"], "bad_linked_input");

    let mut g = blur_graph(0);
    g["1"]["inputs"]["width"] = json!("wide");
    let (_, body) = submit(&sim.url(), json!({"prompt": g})).await;
    let e = node_error(&body, "1");
    assert_eq!(e["type"], "invalid_input_type");
    assert_eq!(
        e["message"],
        "Failed to convert an input value to a INT value"
    );

    // Convertible strings are accepted and stored converted, as ComfyUI does.
    let mut g = blur_graph(0);
    g["1"]["inputs"]["width"] = json!("32");
    let (code, body) = submit(&sim.url(), json!({"prompt": g, "prompt_id": "conv"})).await;
    assert_eq!(code, 200, "{body}");
    let h = wait_history(&sim.url(), "conv").await;
    assert_eq!(h["prompt"][2]["1"]["inputs"]["width"], 32);
}

#[tokio::test]
async fn partially_valid_prompts_run_the_valid_outputs() {
    let sim = sim().await;
    let mut g = blur_graph(0);
    g["4"] = json!({"class_type": "SaveImage", "inputs": {"filename_prefix": "bad"}});
    let (code, body) = submit(&sim.url(), json!({"prompt": g})).await;
    assert_eq!(code, 200);
    assert_eq!(
        body["node_errors"]["4"]["errors"][0]["type"],
        "required_input_missing"
    );
}

#[tokio::test]
async fn malformed_json_is_an_aiohttp_500() {
    let sim = sim().await;
    let resp = http()
        .post(format!("{}/prompt", sim.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(
        resp.text().await.unwrap(),
        "500 Internal Server Error\n\nServer got itself in trouble"
    );
    // The instance keeps serving.
    let (code, _) = get_json(&sim.url(), "/prompt").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let sim = sim_with(comfy_sim::SimConfig {
        max_upload_size: 1024,
        ..Default::default()
    })
    .await;
    let resp = http()
        .post(format!("{}/prompt", sim.url()))
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
}
