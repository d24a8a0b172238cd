//! comfy-sim's files, user data and cross-cutting HTTP behaviour, driven with real HTTP and
//! WebSocket clients: uploads and their collision rules, LoadImage, `/view`, `/upload/mask`,
//! `/userdata`, `/settings`, the same-origin check, the `/api` aliases and `/object_info`.

mod common;

use comfy_sim::SimConfig;
use comfy_wire::files::images::{Image, png_text_chunks};
use common::*;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A file part named `image`.
fn image_part(file_name: &str, bytes: Vec<u8>) -> Part {
    Part::bytes(bytes)
        .file_name(file_name.to_string())
        .mime_str("image/png")
        .expect("mime")
}

/// Posts a multipart form; returns the status and the body (JSON when it parses).
async fn post_form(base: &str, path: &str, form: Form) -> (u16, Value) {
    send_for_json(http().post(format!("{base}{path}")).multipart(form)).await
}

/// Uploads `bytes` as `file_name` to `/upload/image` with extra text fields.
async fn upload(
    base: &str,
    file_name: &str,
    bytes: Vec<u8>,
    fields: &[(&str, &str)],
) -> (u16, Value) {
    let mut form = Form::new().part("image", image_part(file_name, bytes));
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    post_form(base, "/upload/image", form).await
}

/// GET with query parameters (encoded by reqwest); returns the whole response.
async fn get_query(base: &str, path: &str, query: &[(&str, &str)]) -> reqwest::Response {
    http()
        .get(format!("{base}{path}"))
        .query(query)
        .send()
        .await
        .expect("request")
}

/// Posts a prompt, expects acceptance, and returns the prompt id.
async fn queue(base: &str, prompt: Value) -> String {
    let (status, body) = post_json(base, "/prompt", &json!({ "prompt": prompt })).await;
    assert_eq!(status, 200, "prompt refused: {body}");
    body["prompt_id"].as_str().expect("prompt_id").to_string()
}

/// Waits for a prompt and asserts it succeeded; returns its history entry.
async fn run_ok(base: &str, prompt: Value) -> Value {
    let id = queue(base, prompt).await;
    let h = wait_history(base, &id).await;
    assert_eq!(h["status"]["status_str"], "success", "history: {h}");
    h
}

fn rgba_png(width: u32, height: u32, rgba: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("png header");
        w.write_image_data(rgba).expect("png data");
    }
    out
}

#[tokio::test]
async fn upload_then_load_image_inverts_the_upload() {
    let sim = sim().await;
    let base = sim.url();
    let original = png(48, 32, 11);
    let (status, body) = upload(&base, "source.png", original.clone(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"name": "source.png", "subfolder": "", "type": "input"})
    );
    assert_eq!(
        std::fs::read(sim.base_dir().join("input/source.png")).expect("stored"),
        original
    );

    let name = body["name"].as_str().unwrap();
    let h = run_ok(
        &base,
        json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
        }),
    )
    .await;
    let item = &h["outputs"]["3"]["images"][0];
    assert_eq!(item["type"], "output");
    let file = item["filename"].as_str().expect("filename");
    let resp = get_query(&base, "/view", &[("filename", file), ("type", "output")]).await;
    assert_eq!(resp.status().as_u16(), 200);
    let saved = resp.bytes().await.expect("body");
    let (saved_img, _) = Image::from_png(&saved).expect("saved png decodes");
    let (up_img, _) = Image::from_png(&original).expect("upload decodes");
    assert_eq!((saved_img.width, saved_img.height), (48, 32));
    assert_ne!(
        saved_img, up_img,
        "the output must not be the upload itself"
    );
    assert_eq!(saved_img, up_img.invert(), "output is the inverted upload");
}

#[tokio::test]
async fn upload_collision_rules() {
    let sim = sim().await;
    let base = sim.url();
    let first = png(16, 16, 1);
    let second = png(16, 16, 2);
    assert_ne!(first, second);

    let (s, b) = upload(&base, "a.png", first.clone(), &[]).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("a.png")));

    // Same name, other content: a numbered name, the original untouched.
    let (s, b) = upload(&base, "a.png", second.clone(), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"name": "a (1).png", "subfolder": "", "type": "input"})
    );
    let input = sim.base_dir().join("input");
    assert_eq!(std::fs::read(input.join("a.png")).unwrap(), first);
    assert_eq!(std::fs::read(input.join("a (1).png")).unwrap(), second);

    // Same name, same content: the existing name is reused, nothing new written.
    let (s, b) = upload(&base, "a.png", first.clone(), &[]).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("a.png")));
    // Content equal to the numbered copy: walks to it and reuses it.
    let (s, b) = upload(&base, "a.png", second.clone(), &[]).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("a (1).png")));
    let count = std::fs::read_dir(&input).unwrap().count();
    assert_eq!(count, 2, "no extra files for duplicates");

    // overwrite=true keeps the name and replaces the content.
    let (s, b) = upload(&base, "a.png", second.clone(), &[("overwrite", "true")]).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("a.png")));
    assert_eq!(std::fs::read(input.join("a.png")).unwrap(), second);

    // Missing image field, or an empty file name: 400.
    let (s, _) = post_form(&base, "/upload/image", Form::new().text("type", "input")).await;
    assert_eq!(s, 400);
    let (s, _) = upload(&base, "", first.clone(), &[]).await;
    assert_eq!(s, 400);

    // A subfolder that leaves input/: 400.
    let (s, _) = upload(&base, "esc.png", first.clone(), &[("subfolder", "../x")]).await;
    assert_eq!(s, 400);
    assert!(!sim.base_dir().join("x").exists());

    // A subfolder inside input/ is created and echoed.
    let (s, b) = upload(&base, "in.png", first.clone(), &[("subfolder", "sub")]).await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"name": "in.png", "subfolder": "sub", "type": "input"})
    );

    // type=input uploads are viewable with type=input.
    let resp = get_query(&base, "/view", &[("filename", "a.png"), ("type", "input")]).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), second);
    let resp = get_query(
        &base,
        "/view",
        &[
            ("filename", "in.png"),
            ("type", "input"),
            ("subfolder", "sub"),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), first);
    // Not in output/.
    let resp = get_query(&base, "/view", &[("filename", "a.png")]).await;
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn load_image_of_missing_file_fails_validation() {
    let sim = sim().await;
    let base = sim.url();
    let (status, body) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        }}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["type"], "prompt_outputs_failed_validation",
        "{body}"
    );
    let err = &body["node_errors"]["1"]["errors"][0];
    assert_eq!(err["type"], "custom_validation_failed", "{body}");
    assert_eq!(
        err["details"], "image - Invalid image file: nope.png",
        "{body}"
    );
    assert_eq!(body["node_errors"]["1"]["class_type"], "LoadImage");
    assert_eq!(body["node_errors"]["1"]["dependent_outputs"], json!(["3"]));
    assert_eq!(sim.counters().prompts_accepted, 0);
}

#[tokio::test]
async fn view_rules() {
    let sim = sim().await;
    let base = sim.url();
    let h = run_ok(&base, blur_graph(0x336699)).await;
    assert_eq!(
        h["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );

    let code = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        code(get_query(&base, "/view", &[("filename", "../ComfyUI_00001_.png")]).await),
        400
    );
    assert_eq!(
        code(get_query(&base, "/view", &[("filename", "a..b.png")]).await),
        400
    );
    assert_eq!(
        code(get_query(&base, "/view", &[("filename", "/etc/passwd")]).await),
        400
    );
    assert_eq!(
        code(
            get_query(
                &base,
                "/view",
                &[("filename", "ComfyUI_00001_.png"), ("type", "bogus")]
            )
            .await
        ),
        400
    );
    assert_eq!(
        code(
            get_query(
                &base,
                "/view",
                &[("filename", "ComfyUI_00001_.png"), ("subfolder", "../..")]
            )
            .await
        ),
        403
    );
    let missing = get_query(&base, "/view", &[("filename", "ComfyUI_09999_.png")]).await;
    assert_eq!(missing.status().as_u16(), 404);
    assert!(
        missing.bytes().await.unwrap().is_empty(),
        "404 has an empty body"
    );
    assert_eq!(code(get_query(&base, "/view", &[]).await), 404);
    assert_eq!(
        code(get_query(&base, "/view", &[("type", "output")]).await),
        404
    );

    let resp = get_query(
        &base,
        "/view",
        &[("filename", "ComfyUI_00001_.png"), ("type", "output")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert_eq!(
        resp.headers()["content-disposition"],
        "filename=\"ComfyUI_00001_.png\""
    );
    let body = resp.bytes().await.unwrap();
    assert!(body.starts_with(b"\x89PNG\r\n\x1a\n"), "PNG magic");
    let (img, _) = Image::from_png(&body).unwrap();
    assert_eq!(
        &img.rgb[..3],
        &[0x33, 0x66, 0x99],
        "the blurred solid colour"
    );

    // Default type is output.
    let resp = get_query(&base, "/view", &[("filename", "ComfyUI_00001_.png")]).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap(), body);

    // The annotation overrides `type`.
    let resp = get_query(
        &base,
        "/view",
        &[
            ("filename", "ComfyUI_00001_.png [output]"),
            ("type", "input"),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap(), body);
    let resp = get_query(
        &base,
        "/view",
        &[("filename", "ComfyUI_00001_.png [input]")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn two_instances_produce_colliding_names_with_different_bytes() {
    let (a, b) = (sim().await, sim().await);
    let (url_a, url_b) = (a.url(), b.url());
    let (ha, hb) = tokio::join!(
        run_ok(&url_a, blur_graph(0xff0000)),
        run_ok(&url_b, blur_graph(0x00ff00))
    );
    let item_a = &ha["outputs"]["3"]["images"][0];
    let item_b = &hb["outputs"]["3"]["images"][0];
    assert_eq!(item_a["filename"], "ComfyUI_00001_.png");
    assert_eq!(item_b["filename"], "ComfyUI_00001_.png");
    assert_eq!(item_a, item_b, "identical file references");

    let (sa, bytes_a) = get_bytes(&a.url(), "/view?filename=ComfyUI_00001_.png&type=output").await;
    let (sb, bytes_b) = get_bytes(&b.url(), "/view?filename=ComfyUI_00001_.png&type=output").await;
    assert_eq!((sa, sb), (200, 200));
    assert_ne!(bytes_a, bytes_b, "each instance serves its own file");
    let (img_a, _) = Image::from_png(&bytes_a).unwrap();
    let (img_b, _) = Image::from_png(&bytes_b).unwrap();
    assert_eq!(&img_a.rgb[..3], &[0xff, 0, 0]);
    assert_eq!(&img_b.rgb[..3], &[0, 0xff, 0]);
}

#[tokio::test]
async fn upload_mask_keeps_original_rgb_with_mask_alpha() {
    let sim = sim().await;
    let base = sim.url();
    let (w, h) = (24u32, 16u32);
    let original = png(w, h, 5);
    let (s, b) = upload(&base, "orig.png", original.clone(), &[("type", "input")]).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("orig.png")));

    let mut rgba = Vec::new();
    let mut alpha = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let a = ((x * 10 + y * 3) % 256) as u8;
            rgba.extend_from_slice(&[9, 9, 9, a]);
            alpha.push(a);
        }
    }
    let mask = rgba_png(w, h, &rgba);
    let form = Form::new()
        .part("image", image_part("mask.png", mask.clone()))
        .text("type", "input")
        .text(
            "original_ref",
            json!({"filename": "orig.png", "type": "input"}).to_string(),
        );
    let (s, b) = post_form(&base, "/upload/mask", form).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!({"name": "mask.png", "subfolder": "", "type": "input"})
    );
    let stored = std::fs::read(sim.base_dir().join("input/mask.png")).expect("mask stored");
    assert_ne!(stored, mask, "the upload is composited, not stored as is");
    let (img, stored_alpha) = Image::from_png(&stored).unwrap();
    let (orig_img, _) = Image::from_png(&original).unwrap();
    assert_eq!(img, orig_img, "the original's RGB");
    assert_eq!(stored_alpha, Some(alpha.clone()), "the mask's alpha");

    // An original in output/ (the default type of original_ref) keeps its text chunks.
    let hist = run_ok(&base, blur_graph(0x102030)).await;
    assert_eq!(
        hist["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );
    let blur_w = 64;
    let mut rgba = Vec::new();
    for i in 0..blur_w * blur_w {
        rgba.extend_from_slice(&[0, 0, 0, (i % 7 * 30) as u8]);
    }
    let form = Form::new()
        .part(
            "image",
            image_part("m2.png", rgba_png(blur_w, blur_w, &rgba)),
        )
        .text(
            "original_ref",
            json!({"filename": "ComfyUI_00001_.png"}).to_string(),
        );
    let (s, b) = post_form(&base, "/upload/mask", form).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("m2.png")), "{b}");
    let stored = std::fs::read(sim.base_dir().join("input/m2.png")).expect("stored");
    let (img, a) = Image::from_png(&stored).unwrap();
    assert_eq!(&img.rgb[..3], &[0x10, 0x20, 0x30]);
    assert_eq!(a.expect("alpha")[..7], [0, 30, 60, 90, 120, 150, 180]);
    assert!(
        png_text_chunks(&stored).iter().any(|(k, _)| k == "prompt"),
        "the original's prompt chunk survives"
    );

    // A missing original: 200 with the name, nothing written.
    let form = Form::new().part("image", image_part("m3.png", mask)).text(
        "original_ref",
        json!({"filename": "gone.png", "type": "input"}).to_string(),
    );
    let (s, b) = post_form(&base, "/upload/mask", form).await;
    assert_eq!((s, b["name"].as_str()), (200, Some("m3.png")));
    assert!(!sim.base_dir().join("input/m3.png").exists());
}

#[tokio::test]
async fn userdata_settings_and_users() {
    let sim = sim().await;
    let base = sim.url();
    let client = http();
    for prefix in ["", "/api"] {
        let file_url = format!("{base}{prefix}/userdata/workflows%2Fa.json");
        let resp = client
            .post(&file_url)
            .body(r#"{"x":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{prefix}");
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!("workflows/a.json")
        );

        let resp = client.get(&file_url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.text().await.unwrap(), r#"{"x":1}"#);
        assert!(
            sim.base_dir()
                .join("user/default/workflows/a.json")
                .is_file()
        );

        let (s, list) = get_json(&base, &format!("{prefix}/userdata?dir=workflows")).await;
        assert_eq!((s, list), (200, json!(["a.json"])));
        let (s, v2) = get_json(&base, &format!("{prefix}/v2/userdata?path=workflows")).await;
        assert_eq!(s, 200, "{v2}");
        let entries = v2.as_array().expect("array");
        assert_eq!(entries.len(), 1, "{v2}");
        assert_eq!(entries[0]["name"], "a.json");
        assert_eq!(entries[0]["path"], "workflows/a.json");
        assert_eq!(entries[0]["type"], "file");
        assert_eq!(entries[0]["size"], 7);

        let resp = client
            .post(format!("{file_url}?overwrite=false"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 409);
        let resp = client.get(&file_url).send().await.unwrap();
        assert_eq!(
            resp.text().await.unwrap(),
            r#"{"x":1}"#,
            "409 left the file alone"
        );

        let resp = client.delete(&file_url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 204);
        let resp = client.get(&file_url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 404);
        let resp = client.delete(&file_url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 404);

        // A literal slash is a second path segment: no such route.
        let resp = client
            .get(format!("{base}{prefix}/userdata/workflows/a.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404);
    }

    let (s, _) = post_json(&base, "/settings", &json!({"Comfy.X": 1})).await;
    assert_eq!(s, 200);
    let (s, all) = get_json(&base, "/settings").await;
    assert_eq!(s, 200);
    assert_eq!(all["Comfy.X"], 1, "{all}");
    let (s, one) = get_json(&base, "/settings/Comfy.X").await;
    assert_eq!((s, one), (200, json!(1)));
    let (s, one) = get_json(&base, "/api/settings/Comfy.Missing").await;
    assert_eq!((s, one), (200, Value::Null));
    let (s, _) = post_json(&base, "/settings", &json!({"Comfy.Y": "y"})).await;
    assert_eq!(s, 200);
    let (_, all) = get_json(&base, "/api/settings").await;
    assert_eq!(all, json!({"Comfy.X": 1, "Comfy.Y": "y"}), "shallow merge");

    let (s, users) = get_json(&base, "/users").await;
    assert_eq!(s, 200);
    assert_eq!(users["storage"], "server", "{users}");
    assert_eq!(
        users["migrated"], true,
        "the default user dir exists by now: {users}"
    );
    assert_eq!(users.as_object().unwrap().len(), 2, "{users}");
}

#[tokio::test]
async fn origin_check() {
    let sim = sim().await;
    let base = sim.url();
    let port = sim.addr().port();
    let host = format!("127.0.0.1:{port}");
    let prompt = json!({ "prompt": blur_graph(0) });

    let send = |method: reqwest::Method, path: &str, origin: Option<String>| {
        let mut req = http()
            .request(method, format!("{base}{path}"))
            .header("Host", host.clone());
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        req
    };

    let bad = format!("http://localhost:{port}");
    let good = format!("http://127.0.0.1:{port}");

    let resp = send(reqwest::Method::POST, "/prompt", Some(bad.clone()))
        .json(&prompt)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(
        resp.bytes().await.unwrap().is_empty(),
        "403 with an empty body"
    );
    assert_eq!(
        sim.counters().prompts_accepted,
        0,
        "refused before the handler"
    );

    let resp = send(reqwest::Method::POST, "/prompt", Some(good.clone()))
        .json(&prompt)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(sim.counters().prompts_accepted, 1);

    // A different port is a different origin; no port on the Origin drops the Host's port.
    let resp = send(
        reqwest::Method::GET,
        "/queue",
        Some("http://127.0.0.1:1".into()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let resp = send(
        reqwest::Method::GET,
        "/queue",
        Some("http://127.0.0.1".into()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = send(reqwest::Method::GET, "/api/queue", Some(bad.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403, "also under /api");

    // OPTIONS: 403 with a bad origin, empty 200 with a good one.
    let resp = send(reqwest::Method::OPTIONS, "/prompt", Some(bad.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let resp = send(reqwest::Method::OPTIONS, "/prompt", Some(good.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.bytes().await.unwrap().is_empty());

    // The WebSocket upgrade is checked as well.
    let ws_url = format!("ws://{host}/ws");
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", bad.parse().expect("header value"));
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => panic!("a WebSocket with a mismatching Origin must be refused"),
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        Err(other) => panic!("expected an HTTP 403 refusal, got {other:?}"),
    }
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", good.parse().expect("header value"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("a matching Origin is accepted");
    use futures_util::StreamExt;
    let first = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a frame")
        .expect("open")
        .expect("ok");
    let v: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(v["type"], "status");
}

#[tokio::test]
async fn routes_answer_under_api_prefix() {
    let sim = sim().await;
    let base = sim.url();
    for path in [
        "/system_stats",
        "/object_info/KSampler",
        "/queue",
        "/prompt",
        "/history",
        "/models/checkpoints",
        "/embeddings",
        "/features",
        "/extensions",
        "/models",
    ] {
        let (plain_status, plain) = get_json(&base, path).await;
        let (api_status, api) = get_json(&base, &format!("/api{path}")).await;
        assert_eq!(plain_status, 200, "{path}");
        assert_eq!(api_status, 200, "/api{path}");
        assert!(
            api.is_object() || api.is_array(),
            "/api{path} is JSON: {api}"
        );
        if path != "/system_stats" {
            assert_eq!(plain, api, "{path} and /api{path} agree");
        } else {
            assert_eq!(plain["devices"], api["devices"]);
        }
    }
    let (_, ks) = get_json(&base, "/api/object_info/KSampler").await;
    assert!(ks.get("KSampler").is_some(), "{ks}");
    let (_, emb) = get_json(&base, "/api/embeddings").await;
    assert_eq!(emb, json!(["easynegative"]));

    // POST /api/prompt queues, and /api/ws streams the prompt.
    let mut ws = Ws::connect(&format!("{base}/api"), Some("api-client")).await;
    let first = ws.next().await.expect("status frame");
    assert_eq!(first.kind(), "status");
    assert_eq!(first.data()["sid"], "api-client");
    let (s, body) = post_json(
        &base,
        "/api/prompt",
        &json!({"prompt": blur_graph(0x010203), "client_id": "api-client"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let id = body["prompt_id"].as_str().unwrap().to_string();
    let frames = ws.until_done(&id).await;
    assert!(frames.iter().any(|f| f.kind() == "execution_success"));
    let (s, h) = get_json(&base, &format!("/api/history/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(h[&id]["status"]["status_str"], "success");
    // Unknown paths are 404 under both.
    assert_eq!(get_json(&base, "/nope").await.0, 404);
    assert_eq!(get_json(&base, "/api/nope").await.0, 404);
}

#[tokio::test]
async fn object_info_and_models() {
    let sim =
        sim_with(SimConfig::default().with_model("checkpoints", "only.safetensors", 2.0)).await;
    let base = sim.url();
    let (s, info) = get_json(&base, "/object_info").await;
    assert_eq!(s, 200);
    let mut classes: Vec<&str> = info
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    classes.sort_unstable();
    let mut expected = vec![
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
        "SaveImage",
        "PreviewImage",
        "LoadImage",
        "EmptyImage",
        "ImageBlur",
        "ImageInvert",
        "LoraLoader",
        "ImageAddNoise",
        "StringConcatenate",
        "PreviewAny",
        "SaveImageWebsocket",
    ];
    expected.sort_unstable();
    assert_eq!(classes, expected);

    let ckpts = &info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0];
    assert_eq!(
        ckpts,
        &json!(["only.safetensors", SDXL, SD15]),
        "this instance's checkpoints, sorted"
    );
    let images = &info["LoadImage"]["input"]["required"]["image"][0];
    assert_eq!(images, &json!([]), "no uploads yet");

    let (s, b) = upload(&base, "pic.png", png(8, 8, 3), &[]).await;
    assert_eq!(s, 200, "{b}");
    let (_, info) = get_json(&base, "/object_info").await;
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["pic.png"])
    );
    let (_, one) = get_json(&base, "/object_info/LoadImage").await;
    assert_eq!(
        one["LoadImage"]["input"]["required"]["image"][0],
        json!(["pic.png"])
    );
    assert_eq!(one.as_object().unwrap().len(), 1);

    let (s, list) = get_json(&base, "/models/checkpoints").await;
    assert_eq!((s, list), (200, json!(["only.safetensors", SDXL, SD15])));
    let (s, list) = get_json(&base, "/models/loras").await;
    assert_eq!((s, list), (200, json!(["add_detail.safetensors"])));
    let (s, list) = get_json(&base, "/models/controlnet").await;
    assert_eq!((s, list), (200, json!([])), "a known folder without files");
    assert_eq!(get_json(&base, "/models/unknown").await.0, 404);
    let (s, none) = get_json(&base, "/object_info/Nope").await;
    assert_eq!((s, none), (200, json!({})));

    // A default instance does not list the extra checkpoint.
    let other = sim_with(SimConfig::default()).await;
    let (_, list) = get_json(&other.url(), "/models/checkpoints").await;
    assert_eq!(list, json!([SDXL, SD15]));
}
