//! The drop-in gateway, end to end: real gate, comfy-sim backends on port 0, real HTTP and
//! WebSocket clients. Each test is one acceptance scenario of the gateway issue.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn kinds(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(Frame::kind).collect()
}

/// Item 1: websockets_api_example.py through the gate with two backends: client prompt_id, ws
/// events, `/history/{id}` and `/view` bytes exactly as from one ComfyUI.
#[tokio::test]
async fn script_examples_websocket_flow_through_the_gate() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();

    // The same prompt straight to a third, lone ComfyUI, for the reference sequence.
    let lone = sim().await;
    let mut direct = Ws::connect(&lone.url(), Some("ref")).await;
    direct.next().await;
    post_json(
        &lone.url(),
        "/prompt",
        &json!({"prompt": txt2img(42, SDXL), "client_id": "ref", "prompt_id": "ref-1"}),
    )
    .await;
    let reference = direct.until_done("ref-1").await;

    let mut ws = Ws::connect(&base, Some("example")).await;
    let first = ws.next().await.unwrap();
    assert_eq!(first.kind(), "status");
    assert_eq!(first.data()["sid"], "example");
    assert_eq!(first.data()["status"]["exec_info"]["queue_remaining"], 0);
    let (code, resp) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": txt2img(42, SDXL), "client_id": "example", "prompt_id": "p-1"}),
    )
    .await;
    assert_eq!(code, 200, "{resp}");
    assert_eq!(
        resp,
        json!({"prompt_id": "p-1", "number": 0, "node_errors": {}})
    );
    let frames = ws.until_done("p-1").await;
    assert_eq!(
        kinds(&frames),
        kinds(&reference),
        "the same messages in the same order as one ComfyUI"
    );
    for (got, want) in frames.iter().zip(&reference) {
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("timestamp");
                o.remove("prompt_id");
            }
            if let Some(nodes) = v.get_mut("nodes").and_then(Value::as_object_mut) {
                for n in nodes.values_mut() {
                    n.as_object_mut().unwrap().remove("prompt_id");
                }
            }
            v
        };
        assert_eq!(strip(got.data()), strip(want.data()), "field by field");
    }

    let history = wait_history(&base, "p-1").await;
    assert_eq!(history["status"]["status_str"], "success");
    assert_eq!(history["prompt"][0], 0, "the gate's number");
    assert_eq!(
        history["prompt"][3]["client_id"], "example",
        "the client's own id, not the gate's"
    );
    let image = &history["outputs"]["9"]["images"][0];
    assert_eq!(image["filename"], "ComfyUI_00001_.png");
    let (code, png) = get_bytes(
        &base,
        "/view?filename=ComfyUI_00001_.png&subfolder=&type=output",
    )
    .await;
    assert_eq!(code, 200);
    let (_, direct_png) = get_bytes(
        &lone.url(),
        "/view?filename=ComfyUI_00001_.png&subfolder=&type=output",
    )
    .await;
    assert_eq!(png_seed(&png), Some(42));
    assert_eq!(
        comfy_wire::files::images::Image::from_png(&png).unwrap().0,
        comfy_wire::files::images::Image::from_png(&direct_png)
            .unwrap()
            .0,
        "same pixels as from one ComfyUI"
    );
    let (_, q) = get_json(&base, "/queue").await;
    assert_eq!(q, json!({"queue_running": [], "queue_pending": []}));
}

/// Item 1, second flow: basic_api_example.py (no client_id, poll `/history`).
#[tokio::test]
async fn polling_flow_without_client_id() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let (code, resp) =
        post_json(&gate.url(), "/prompt", &json!({"prompt": txt2img(7, SD15)})).await;
    assert_eq!(code, 200);
    let id = resp["prompt_id"].as_str().unwrap().to_string();
    let history = wait_history(&gate.url(), &id).await;
    assert_eq!(history["status"]["status_str"], "success");
    assert!(
        history["prompt"][3].get("client_id").is_none(),
        "no client id leaks: {}",
        history["prompt"][3]
    );
    let name = history["outputs"]["9"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    let (code, png) = get_bytes(&gate.url(), &format!("/view?filename={name}&type=output")).await;
    assert_eq!(code, 200);
    assert_eq!(png_seed(&png), Some(7));
}

/// Item 2: three concurrent clients × two prompts; each sees only its own events, all complete,
/// both backends work, and every `/view` returns that prompt's own image although the
/// backends' file names collide.
#[tokio::test]
async fn concurrent_clients_are_isolated_and_files_follow_prompts() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut tasks = Vec::new();
    for client in 0..3u64 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let cid = format!("client-{client}");
            let mut ws = Ws::connect(&base, Some(&cid)).await;
            ws.next().await;
            let mut mine = Vec::new();
            for k in 0..2u64 {
                let seed = 100 + client * 10 + k;
                let id = format!("{cid}-p{k}");
                let (code, _) = post_json(
                    &base,
                    "/prompt",
                    &json!({"prompt": txt2img(seed, SD15), "client_id": cid, "prompt_id": id}),
                )
                .await;
                assert_eq!(code, 200);
                mine.push((id, seed));
            }
            let mut done = 0;
            let mut seen_ids = std::collections::HashSet::new();
            while done < 2 {
                let f = ws.next().await.expect("open");
                if let Some(pid) = f.data().get("prompt_id").and_then(Value::as_str) {
                    seen_ids.insert(pid.to_string());
                }
                if f.kind() == "executing" && f.data()["node"].is_null() {
                    done += 1;
                }
            }
            (cid, mine, seen_ids)
        }));
    }
    let mut names = std::collections::HashSet::new();
    for t in tasks {
        let (cid, mine, seen) = t.await.unwrap();
        let own: std::collections::HashSet<String> =
            mine.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(seen, own, "{cid} saw exactly its own prompts' events");
        for (id, seed) in mine {
            let h = wait_history(&base, &id).await;
            assert_eq!(h["status"]["status_str"], "success");
            let img = &h["outputs"]["9"]["images"][0];
            let name = img["filename"].as_str().unwrap().to_string();
            assert!(
                names.insert(name.clone()),
                "gate-wide names are unique: {name}"
            );
            let (code, png) = get_bytes(
                &base,
                &format!("/view?filename={name}&subfolder=&type=output"),
            )
            .await;
            assert_eq!(code, 200);
            assert_eq!(png_seed(&png), Some(seed), "{id}'s own image");
        }
    }
    let (ca, cb) = (a.counters().prompts_finished, b.counters().prompts_finished);
    assert_eq!(ca + cb, 6);
    assert!(ca > 0 && cb > 0, "both backends did work: {ca} / {cb}");
    // Both backends wrote ComfyUI_00001_.png: the collision the gate had to resolve.
    assert!(a.base_dir().join("output/ComfyUI_00001_.png").exists());
    assert!(b.base_dir().join("output/ComfyUI_00001_.png").exists());
}

fn long(seed: u64) -> Value {
    let mut g = txt2img(seed, SD15);
    g["3"]["inputs"]["steps"] = json!(10000);
    g
}

fn short(seed: u64) -> Value {
    let mut g = txt2img(seed, SD15);
    g["3"]["inputs"]["steps"] = json!(2);
    g
}

/// Item 3: with `max_inflight = 1`, two backends and six prompts, each backend holds at most one
/// prompt and the gate's `/queue` lists all six in number order with 5-element items.
#[tokio::test]
async fn late_binding_keeps_backend_queues_short() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| f.scheduler.max_inflight = 1).await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("q")).await;
    ws.next().await;
    for i in 0..6 {
        let (code, r) = post_json(
            &base,
            "/prompt",
            &json!({"prompt": long(i), "client_id": "q", "prompt_id": format!("q{i}")}),
        )
        .await;
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["number"], i);
    }
    // Both backends start one prompt each.
    let mut started = 0;
    while started < 2 {
        if ws.next().await.unwrap().kind() == "execution_start" {
            started += 1;
        }
    }
    for s in [&a, &b] {
        let (_, q) = get_json(&s.url(), "/queue").await;
        let n = q["queue_running"].as_array().unwrap().len()
            + q["queue_pending"].as_array().unwrap().len();
        assert_eq!(n, 1, "a backend holds exactly one prompt: {q}");
    }
    let (_, q) = get_json(&base, "/queue").await;
    let running = q["queue_running"].as_array().unwrap();
    let pending = q["queue_pending"].as_array().unwrap();
    assert_eq!(running.len(), 2);
    assert_eq!(pending.len(), 4);
    let mut all: Vec<&Value> = running.iter().chain(pending.iter()).collect();
    assert!(all.iter().all(|i| i.as_array().unwrap().len() == 5));
    all.sort_by_key(|i| i[0].as_i64().unwrap());
    let ids: Vec<&str> = all.iter().map(|i| i[1].as_str().unwrap()).collect();
    assert_eq!(ids, ["q0", "q1", "q2", "q3", "q4", "q5"]);
    let numbers: Vec<i64> = pending.iter().map(|i| i[0].as_i64().unwrap()).collect();
    assert_eq!(numbers, [2, 3, 4, 5], "pending in number order");
    assert!(
        all.iter().all(|i| i[3]["client_id"] == "q"),
        "the client's own client_id"
    );
    assert_eq!(pending[0][4], json!(["9"]), "outputs to execute");
    let (_, p) = get_json(&base, "/prompt").await;
    assert_eq!(p["exec_info"]["queue_remaining"], 6);
    post_json(&base, "/queue", &json!({"clear": true})).await;
    post_json(&base, "/interrupt", &json!({})).await;
}

/// Item 4: delete of a gate-queued prompt (it never runs); interrupt by id reaches the client as
/// `execution_interrupted`; interrupt without id from A leaves B's running prompt alone.
#[tokio::test]
async fn delete_and_interrupt_are_scoped() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| f.scheduler.max_inflight = 1).await;
    let base = gate.url();
    let alice = http_from([127, 0, 0, 2]);
    let bob = http_from([127, 0, 0, 3]);
    let mut wa = Ws::connect(&base, Some("alice")).await;
    let mut wb = Ws::connect(&base, Some("bob")).await;
    wa.next().await;
    wb.next().await;
    let submit = |client: &reqwest::Client, body: Value| {
        let req = client.post(format!("{base}/prompt")).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        submit(
            &alice,
            json!({"prompt": long(1), "client_id": "alice", "prompt_id": "a-run"})
        )
        .await,
        200
    );
    assert_eq!(
        submit(
            &bob,
            json!({"prompt": long(2), "client_id": "bob", "prompt_id": "b-run"})
        )
        .await,
        200
    );
    assert_eq!(
        submit(
            &alice,
            json!({"prompt": short(3), "client_id": "alice", "prompt_id": "a-queued"})
        )
        .await,
        200
    );
    wa.until_kind("progress").await;
    wb.until_kind("progress").await;

    // Delete the gate-queued prompt: it never runs.
    let r = alice
        .post(format!("{base}/queue"))
        .json(&json!({"delete": ["a-queued"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, q) = get_json(&base, "/queue").await;
    assert!(!q.to_string().contains("a-queued"));

    // Alice's interrupt without id stops her prompt only.
    let r = alice
        .post(format!("{base}/interrupt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let frames = wa.until_done("a-run").await;
    assert!(frames.iter().any(|f| f.kind() == "execution_interrupted"));
    let h = wait_history(&base, "a-run").await;
    assert_eq!(h["status"]["status_str"], "error");
    // Bob is still sampling.
    let more = wb.until_kind("progress").await;
    assert!(more.iter().all(|f| f.kind() != "execution_interrupted"));

    // Interrupt by id reaches Bob as execution_interrupted.
    post_json(&base, "/interrupt", &json!({"prompt_id": "b-run"})).await;
    let frames = wb.until_done("b-run").await;
    let int = frames
        .iter()
        .find(|f| f.kind() == "execution_interrupted")
        .expect("interrupted");
    assert_eq!(int.data()["prompt_id"], "b-run");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, h) = get_json(&base, "/history/a-queued").await;
    assert_eq!(h, json!({}), "the deleted prompt never ran");
    assert_eq!(
        a.counters().prompts_finished + b.counters().prompts_finished,
        2
    );
}

/// Item 5: a validation error comes back as the backend's 400 when a slot is free; a prompt that
/// waited in the gate queue and is then refused reaches its client as `execution_error` and an
/// error history entry.
#[tokio::test]
async fn validation_errors_direct_and_after_waiting() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| f.scheduler.max_inflight = 1).await;
    let base = gate.url();
    let mut bad = txt2img(1, SD15);
    bad["3"]["inputs"]["steps"] = json!(99999);
    let (code, body) = post_json(&base, "/prompt", &json!({"prompt": bad})).await;
    assert_eq!(code, 400);
    let (_, direct) = post_json(&a.url(), "/prompt", &json!({"prompt": bad})).await;
    assert_eq!(body, direct, "the backend's 400, verbatim");

    let mut ws = Ws::connect(&base, Some("v")).await;
    ws.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": long(1), "client_id": "v", "prompt_id": "busy"}),
    )
    .await;
    ws.until_kind("progress").await;
    let (code, r) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": bad, "client_id": "v", "prompt_id": "bad"}),
    )
    .await;
    assert_eq!(code, 200, "it waits in the gate queue: {r}");
    assert_eq!(r["node_errors"], json!({}));
    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    let frames = ws.until_done("bad").await;
    let err = frames
        .iter()
        .find(|f| f.kind() == "execution_error" && f.data()["prompt_id"] == "bad")
        .expect("execution_error");
    assert_eq!(
        err.data()["exception_type"],
        "prompt_outputs_failed_validation"
    );
    assert!(
        err.data()["exception_message"]
            .as_str()
            .unwrap()
            .contains("bigger than max"),
        "{}",
        err.data()
    );
    assert_eq!(err.data()["node_id"], "3");
    let h = wait_history(&base, "bad").await;
    assert_eq!(h["status"]["status_str"], "error");
    assert_eq!(h["status"]["completed"], false);
    assert_eq!(h["status"]["messages"][0][0], "execution_error");
    assert!(h["status"]["messages"][0][1]["node_errors"]["3"].is_object());
}

/// Item 6: an upload through the gate is present on whichever backend runs a LoadImage prompt;
/// `/view?type=input` is served by the gate.
#[tokio::test]
async fn uploads_follow_prompts_to_every_backend() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| f.scheduler.max_inflight = 1).await;
    let base = gate.url();
    let bytes = png(16, 16, 5);
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(bytes.clone()).file_name("photo.png"),
    );
    let r = http()
        .post(format!("{base}/upload/image"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let up: Value = r.json().await.unwrap();
    assert_eq!(
        up,
        json!({"name": "photo.png", "subfolder": "", "type": "input"})
    );
    let (code, view) = get_bytes(&base, "/view?filename=photo.png&type=input").await;
    assert_eq!(code, 200);
    assert_eq!(view, bytes);
    let (_, info) = get_json(&base, "/object_info/LoadImage").await;
    assert!(
        info["LoadImage"]["input"]["required"]["image"][0]
            .as_array()
            .unwrap()
            .contains(&json!("photo.png"))
    );

    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
    });
    // With max_inflight 1, a prompt held on a stalled backend sends the next one to the other.
    a.inject(comfy_sim::Fault::Stall);
    let mut ids = Vec::new();
    for i in 0..2 {
        let mut g = graph.clone();
        g["3"]["inputs"]["filename_prefix"] = json!(format!("inv{i}"));
        let (code, r) = post_json(
            &base,
            "/prompt",
            &json!({"prompt": g, "prompt_id": format!("load{i}")}),
        )
        .await;
        assert_eq!(code, 200, "{r}");
        ids.push(format!("load{i}"));
    }
    a.inject(comfy_sim::Fault::Clear);
    for id in &ids {
        let h = wait_history(&base, id).await;
        assert_eq!(h["status"]["status_str"], "success", "{h}");
    }
    assert!(a.base_dir().join("input/photo.png").exists());
    assert!(b.base_dir().join("input/photo.png").exists());
    assert_eq!(a.counters().prompts_succeeded, 1);
    assert_eq!(b.counters().prompts_succeeded, 1);
}

/// Item 9: a backend that crashes before dispatch is marked down within the probe window and new
/// prompts complete on the others; with no healthy backend prompts wait and `/readyz` says not
/// ready, and they run once a backend is back.
#[tokio::test]
async fn crashed_backends_get_no_work_and_prompts_wait_for_a_healthy_one() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let admin = format!("http://{}", gate.admin_addr);
    let (code, _) = get_json(&admin, "/readyz").await;
    assert_eq!(code, 200);
    a.crash();
    // Probes every 100 ms, two failures to go down.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, r) = get_json(&admin, "/readyz").await;
        if r["backends"][0]["health"] == "down" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked down: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..4 {
        let (code, _) = post_json(
            &base,
            "/prompt",
            &json!({"prompt": short(i), "prompt_id": format!("c{i}")}),
        )
        .await;
        assert_eq!(code, 200);
    }
    for i in 0..4 {
        assert_eq!(
            wait_history(&base, &format!("c{i}")).await["status"]["status_str"],
            "success"
        );
    }
    assert_eq!(b.counters().prompts_succeeded, 4);

    b.crash();
    loop {
        let (code, _) = get_json(&admin, "/readyz").await;
        if code == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(9), "prompt_id": "waits"}),
    )
    .await;
    assert_eq!(code, 200);
    let (_, q) = get_json(&base, "/queue").await;
    assert_eq!(q["queue_pending"][0][1], "waits", "held in the gate queue");
    a.restart().await.unwrap();
    assert_eq!(
        wait_history(&base, "waits").await["status"]["status_str"],
        "success"
    );
    let (code, _) = get_json(&admin, "/readyz").await;
    assert_eq!(code, 200);
}

/// `front: true` and client numbers order the gate queue as ComfyUI orders its heap.
#[tokio::test]
async fn front_and_numbers_order_the_gate_queue() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| f.scheduler.max_inflight = 1).await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("f")).await;
    ws.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": long(1), "client_id": "f", "prompt_id": "busy"}),
    )
    .await;
    ws.until_kind("progress").await;
    let (_, x) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(2), "client_id": "f", "prompt_id": "x"}),
    )
    .await;
    let (_, y) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(3), "client_id": "f", "prompt_id": "y", "front": true}),
    )
    .await;
    let (_, z) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": short(4), "client_id": "f", "prompt_id": "z", "number": 1.5}),
    )
    .await;
    assert_eq!(
        (
            x["number"].clone(),
            y["number"].clone(),
            z["number"].clone()
        ),
        (json!(1), json!(-2), json!(1.5))
    );
    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    let mut order = Vec::new();
    while order.len() < 3 {
        let f = ws.next().await.unwrap();
        if f.kind() == "execution_start" && f.data()["prompt_id"] != "busy" {
            order.push(f.data()["prompt_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(order, ["y", "x", "z"]);
}
