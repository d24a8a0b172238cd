//! The script_examples flow against comfy-sim, and the message sequence of one prompt compared
//! type by type and field by field with reference §6.4 ("Typical sequence").

mod common;

use comfy_wire::protocol::frames;
use common::*;
use serde_json::{Value, json};

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

/// websockets_api_example.py: connect with a clientId, queue with a client-chosen prompt_id,
/// follow `executing` until `node: null`, read `/history/{id}`, fetch each image with `/view`.
#[tokio::test]
async fn script_examples_websocket_flow() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = Ws::connect(&base, Some("example-client")).await;
    let first = ws.next().await.unwrap();
    assert_eq!(first.kind(), "status");
    assert_eq!(first.data()["sid"], "example-client");
    assert_eq!(first.data()["status"]["exec_info"]["queue_remaining"], 0);

    let prompt_id = "6f1ab2c4-0000-4000-8000-000000000001";
    let (code, resp) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": txt2img(5, SDXL), "client_id": "example-client", "prompt_id": prompt_id}),
    )
    .await;
    assert_eq!(code, 200, "{resp}");
    assert_eq!(resp["prompt_id"], prompt_id);
    assert_eq!(resp["number"], 0);
    assert_eq!(resp["node_errors"], json!({}));

    let frames = ws.until_done(prompt_id).await;
    let executing: Vec<Value> = frames
        .iter()
        .filter(|f| f.kind() == "executing")
        .map(|f| f.data()["node"].clone())
        .collect();
    assert_eq!(
        executing,
        vec![
            json!("4"),
            json!("6"),
            json!("7"),
            json!("5"),
            json!("3"),
            json!("8"),
            json!("9"),
            Value::Null
        ]
    );
    let progress: Vec<&Frame> = frames.iter().filter(|f| f.kind() == "progress").collect();
    assert_eq!(progress.len(), 20, "one progress per KSampler step");
    assert_eq!(
        progress[19].data(),
        &json!({"value": 20, "max": 20, "prompt_id": prompt_id, "node": "3"})
    );

    let history = wait_history(&base, prompt_id).await;
    assert_eq!(history["status"]["status_str"], "success");
    assert_eq!(history["status"]["completed"], true);
    let item = &history["prompt"];
    assert_eq!(item.as_array().unwrap().len(), 5);
    assert_eq!(item[1], prompt_id);
    assert_eq!(item[3]["client_id"], "example-client");
    assert!(item[3]["create_time"].is_i64());
    assert_eq!(item[4], json!(["9"]));
    let images = history["outputs"]["9"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[0],
        json!({"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"})
    );
    let (code, png) = get_bytes(
        &base,
        "/view?filename=ComfyUI_00001_.png&subfolder=&type=output",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (img, _) = comfy_wire::files::images::Image::from_png(&png).unwrap();
    assert_eq!((img.width, img.height), (512, 512));
    let text = comfy_wire::files::images::png_text_chunks(&png);
    let embedded: Value =
        serde_json::from_str(&text.iter().find(|(k, _)| k == "prompt").unwrap().1).unwrap();
    assert_eq!(
        embedded["3"]["inputs"]["seed"], 5,
        "the PNG carries its prompt like ComfyUI's"
    );
}

/// basic_api_example.py: no client_id, poll `/history/{id}` until it appears.
#[tokio::test]
async fn script_examples_polling_flow_without_client_id() {
    let sim = sim().await;
    let base = sim.url();
    let (code, resp) = post_json(&base, "/prompt", &json!({"prompt": blur_graph(0x112233)})).await;
    assert_eq!(code, 200);
    let id = resp["prompt_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a uuid4 with dashes is minted");
    let history = wait_history(&base, &id).await;
    assert_eq!(history["status"]["status_str"], "success");
    assert_eq!(
        history["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );
    assert!(history["prompt"][3].get("client_id").is_none());
}

/// Reference §6.4, "Typical sequence for a prompt sent with client_id = C to an idle instance",
/// refined by execution.py: per node `progress_state` (running), `executing`, `executed` for
/// output nodes, `progress_state` (finished).
#[tokio::test]
async fn message_sequence_matches_reference_section_6() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = Ws::connect(&base, Some("C")).await;
    assert_eq!(ws.next().await.unwrap().kind(), "status");
    let (code, _) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(0xff0000), "client_id": "C", "prompt_id": "P"}),
    )
    .await;
    assert_eq!(code, 200);
    let frames = ws.until_done("P").await;
    let kinds: Vec<String> = frames.iter().map(Frame::kind).collect();
    let expected = [
        "status",
        "status",
        "execution_start",
        "execution_cached",
        "progress_state",
        "executing",
        "progress_state",
        "progress_state",
        "executing",
        "progress_state",
        "progress_state",
        "executing",
        "executed",
        "progress_state",
        "execution_success",
        "status",
        "executing",
    ];
    assert_eq!(kinds, expected);

    let d = |i: usize| frames[i].data().clone();
    assert_eq!(
        d(0),
        json!({"status": {"exec_info": {"queue_remaining": 1}}})
    );
    assert_eq!(
        d(1),
        json!({"status": {"exec_info": {"queue_remaining": 1}}})
    );
    assert_eq!(keys(&d(2)), ["prompt_id", "timestamp"]);
    assert_eq!(d(2)["prompt_id"], "P");
    assert_eq!(keys(&d(3)), ["nodes", "prompt_id", "timestamp"]);
    assert_eq!(d(3)["nodes"], json!([]));
    // Node "1" (EmptyImage) starts: progress_state lists only non-pending nodes.
    assert_eq!(
        d(4),
        json!({"prompt_id": "P", "nodes": {"1": {"value": 0.0, "max": 1.0, "state": "running", "node_id": "1",
            "prompt_id": "P", "display_node_id": "1", "parent_node_id": null, "real_node_id": "1"}}})
    );
    assert_eq!(
        d(5),
        json!({"node": "1", "display_node": "1", "prompt_id": "P"})
    );
    assert_eq!(d(6)["nodes"]["1"]["state"], "finished");
    assert_eq!(d(6)["nodes"]["1"]["value"], 1.0);
    assert_eq!(
        d(8),
        json!({"node": "2", "display_node": "2", "prompt_id": "P"})
    );
    assert_eq!(keys(&d(9)["nodes"]), ["1", "2"]);
    assert_eq!(
        d(11),
        json!({"node": "3", "display_node": "3", "prompt_id": "P"})
    );
    assert_eq!(
        d(12),
        json!({"node": "3", "display_node": "3", "prompt_id": "P",
               "output": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}})
    );
    assert_eq!(d(13)["nodes"]["3"]["state"], "finished");
    assert_eq!(keys(&d(14)), ["prompt_id", "timestamp"]);
    assert_eq!(
        d(15),
        json!({"status": {"exec_info": {"queue_remaining": 0}}})
    );
    assert_eq!(d(16), json!({"node": null, "prompt_id": "P"}));

    // History's status messages are exactly the add_message events, timestamps included.
    let history = wait_history(&base, "P").await;
    let messages = history["status"]["messages"].as_array().unwrap();
    let names: Vec<&str> = messages.iter().map(|m| m[0].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["execution_start", "execution_cached", "execution_success"]
    );
    assert_eq!(messages[2][1], d(14));
    assert_eq!(
        history["meta"]["3"],
        json!({"node_id": "3", "display_node": "3", "parent_node": null, "real_node_id": "3"})
    );
    assert_eq!(keys(&history), ["meta", "outputs", "prompt", "status"]);
}

/// The same prompt twice: every node is cached; only the output node reports `executed`
/// with its cached UI output, and no new file is written.
#[tokio::test]
async fn identical_prompt_is_served_from_cache() {
    let sim = sim().await;
    let base = sim.url();
    let mut ws = Ws::connect(&base, Some("C")).await;
    ws.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(7), "client_id": "C", "prompt_id": "a"}),
    )
    .await;
    ws.until_done("a").await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(7), "client_id": "C", "prompt_id": "b"}),
    )
    .await;
    let frames = ws.until_done("b").await;
    let kinds: Vec<String> = frames.iter().map(Frame::kind).collect();
    assert_eq!(
        kinds,
        [
            "status",
            "status",
            "execution_start",
            "execution_cached",
            "executed",
            "progress_state",
            "execution_success",
            "status",
            "executing"
        ]
    );
    assert_eq!(frames[3].data()["nodes"], json!(["1", "2", "3"]));
    assert_eq!(
        frames[4].data()["output"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );
    let history = wait_history(&base, "b").await;
    assert_eq!(
        history["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );
    // A changed input re-runs the changed node and its dependents only.
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(8), "client_id": "C", "prompt_id": "c"}),
    )
    .await;
    let frames = ws.until_done("c").await;
    let executing: Vec<Value> = frames
        .iter()
        .filter(|f| f.kind() == "executing")
        .map(|f| f.data()["node"].clone())
        .collect();
    assert_eq!(executing, [json!("1"), json!("2"), json!("3"), Value::Null]);
}

/// Previews: type 4 for a socket that negotiated `supports_preview_metadata`, type 1 otherwise;
/// the `feature_flags` reply carries the server's flags.
#[tokio::test]
async fn previews_follow_negotiated_feature_flags() {
    let sim = sim().await;
    let base = sim.url();
    let mut modern = Ws::connect(&base, Some("modern")).await;
    modern.next().await;
    modern
        .send_json(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    let reply = modern.next().await.unwrap();
    assert_eq!(reply.kind(), "feature_flags");
    assert_eq!(reply.data()["supports_preview_metadata"], true);
    assert_eq!(reply.data()["max_upload_size"], 100 * 1024 * 1024);

    let mut g = txt2img(1, SD15);
    g["3"]["inputs"]["steps"] = json!(3);
    post_json(&base, "/prompt", &json!({"prompt": g, "client_id": "modern", "prompt_id": "m", "extra_data": {"preview_method": "auto"}})).await;
    let frames = modern.until_done("m").await;
    let previews: Vec<&Vec<u8>> = frames
        .iter()
        .filter_map(|f| {
            if let Frame::Binary(b) = f {
                Some(b)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(previews.len(), 3);
    let (meta, image) = frames::decode_preview_with_metadata(previews[0]).expect("type 4");
    assert_eq!(meta["prompt_id"], "m");
    assert_eq!(meta["node_id"], "3");
    assert_eq!(meta["image_type"], "image/jpeg");
    assert_eq!(&image[..2], &[0xFF, 0xD8], "a JPEG");
    // Order within a step: progress_state, preview (type 4), progress.
    let pos = frames
        .iter()
        .position(|f| matches!(f, Frame::Binary(_)))
        .unwrap();
    assert_eq!(frames[pos - 1].kind(), "progress_state");
    assert_eq!(frames[pos + 1].kind(), "progress");

    let mut legacy = Ws::connect(&base, Some("legacy")).await;
    legacy.next().await;
    let mut g = txt2img(2, SD15);
    g["3"]["inputs"]["steps"] = json!(2);
    post_json(&base, "/prompt", &json!({"prompt": g, "client_id": "legacy", "prompt_id": "l", "extra_data": {"preview_method": "auto"}})).await;
    let frames = legacy.until_done("l").await;
    let previews: Vec<&Vec<u8>> = frames
        .iter()
        .filter_map(|f| {
            if let Frame::Binary(b) = f {
                Some(b)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(previews.len(), 2);
    assert_eq!(frames::frame_type(previews[0]), Some(frames::PREVIEW_IMAGE));
    assert_eq!(&previews[0][4..8], &frames::FORMAT_JPEG.to_be_bytes());
    let pos = frames
        .iter()
        .position(|f| matches!(f, Frame::Binary(_)))
        .unwrap();
    assert_eq!(
        frames[pos - 1].kind(),
        "progress",
        "type 1 follows progress"
    );
}

/// Targeting: a prompt's events go only to its client; a prompt without client_id broadcasts
/// `progress`/`progress_state` but sends no execution_* or executing events.
#[tokio::test]
async fn events_are_targeted_or_broadcast_like_comfyui() {
    let sim = sim().await;
    let base = sim.url();
    let mut a = Ws::connect(&base, Some("A")).await;
    let mut b = Ws::connect(&base, Some("B")).await;
    a.next().await;
    b.next().await;
    let mut g = txt2img(3, SD15);
    g["3"]["inputs"]["steps"] = json!(2);
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": g, "client_id": "A", "prompt_id": "pa"}),
    )
    .await;
    a.until_done("pa").await;
    // B saw only status broadcasts.
    let mut seen_b = Vec::new();
    while let Ok(Some(f)) = b.next_within(std::time::Duration::from_millis(200)).await {
        seen_b.push(f.kind());
    }
    assert!(seen_b.iter().all(|k| k == "status"), "{seen_b:?}");

    // No client_id: progress broadcasts, no execution_start / executing.
    let mut g = txt2img(4, SD15);
    g["3"]["inputs"]["steps"] = json!(2);
    let (_, r) = post_json(&base, "/prompt", &json!({"prompt": g})).await;
    let id = r["prompt_id"].as_str().unwrap().to_string();
    wait_history(&base, &id).await;
    let mut kinds = Vec::new();
    while let Ok(Some(f)) = b.next_within(std::time::Duration::from_millis(200)).await {
        kinds.push(f.kind());
    }
    assert!(kinds.contains(&"progress".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"progress_state".to_string()));
    assert!(
        !kinds
            .iter()
            .any(|k| k.starts_with("execution") || k == "executing" || k == "executed"),
        "{kinds:?}"
    );
}

/// A socket that connects while its prompt runs gets `executing {node}` without prompt_id;
/// a socket without clientId gets a 32-hex sid.
#[tokio::test]
async fn reconnect_replays_current_node_and_sids_are_minted() {
    let sim = sim().await;
    let base = sim.url();
    let mut anon = Ws::connect(&base, None).await;
    let first = anon.next().await.unwrap();
    let sid = first.data()["sid"].as_str().unwrap();
    assert_eq!(sid.len(), 32);
    assert!(sid.chars().all(|c| c.is_ascii_hexdigit()));

    let mut ws = Ws::connect(&base, Some("R")).await;
    ws.next().await;
    let mut g = txt2img(9, SD15);
    g["3"]["inputs"]["steps"] = json!(10000);
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": g, "client_id": "R", "prompt_id": "r"}),
    )
    .await;
    ws.until_kind("progress").await;
    drop(ws);
    let mut again = Ws::connect(&base, Some("R")).await;
    let status = again.next().await.unwrap();
    assert_eq!(status.kind(), "status");
    assert_eq!(status.data()["sid"], "R");
    let replay = again.next().await.unwrap();
    assert_eq!(replay.kind(), "executing");
    assert_eq!(replay.data(), &json!({"node": "3"}));
    post_json(&base, "/interrupt", &json!({"prompt_id": "r"})).await;
    let frames = again.until_done("r").await;
    assert!(frames.iter().any(|f| f.kind() == "execution_interrupted"));
}
