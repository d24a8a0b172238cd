//! File references through the gate over two comfy-sim backends, as one ComfyUI serves them
//! (issue 11, input 1; acceptance 2): uploads of every type with subfolders and `/view` of each,
//! loaders naming every annotated form on whichever backend runs them, outputs of one backend
//! loaded on the other, `/upload/mask` with an original of each type, and names that need
//! escaping. `/view` as a file server is `gate_view.rs`.

mod common;

use comfy_wire::files::images::Image;
use common::files::*;
use common::*;
use serde_json::{Value, json};

/// Input 1: a webcam capture (`type=temp`, `subfolder=webcam`) is stored, viewable, and a
/// LoadImage of `"webcam/<name> [temp]"` runs on either backend with the capture's pixels; the
/// history shows the prompt the client sent.
#[tokio::test]
async fn a_webcam_capture_uploaded_as_temp_loads_on_either_backend() {
    let f = Fleet::start().await;
    let base = f.base();
    let shot = png(24, 16, 7);
    let (code, up) = upload(
        &base,
        "/upload/image",
        "shot.png",
        shot.clone(),
        &[("type", "temp"), ("subfolder", "webcam")],
    )
    .await;
    assert_eq!(code, 200, "{up}");
    assert_eq!(
        up,
        json!({"name": "shot.png", "subfolder": "webcam", "type": "temp"})
    );
    let q = [
        ("filename", "shot.png"),
        ("subfolder", "webcam"),
        ("type", "temp"),
    ];
    assert_eq!(view_bytes(&base, &q).await, (200, shot.clone()));
    for (i, sim) in f.sims().into_iter().enumerate() {
        let id = format!("webcam{i}");
        let graph = load_and_save("webcam/shot.png [temp]", &format!("cam{i}"));
        let h = f.run_on(sim, &id, graph.clone()).await;
        assert_eq!(h["status"]["status_str"], "success", "{h}");
        assert_eq!(h["prompt"][2], graph, "history keeps the client's prompt");
        assert_eq!(output_pixels(&base, &h, "2").await, pixels(&shot));
    }
}

/// Acceptance 2: uploads of type input, temp and output, with and without subfolders, come back
/// from `/view` and load through every annotated spelling on both backends.
#[tokio::test]
async fn uploads_of_every_type_and_subfolder_view_and_load_everywhere() {
    let f = Fleet::start().await;
    let base = f.base();
    let mut n = 0;
    for kind in ["input", "temp", "output"] {
        for sub in ["", "a/b"] {
            n += 1;
            let bytes = png(8, 8, n);
            let name = format!("file{n}.png");
            let (code, up) = upload(
                &base,
                "/upload/image",
                &name,
                bytes.clone(),
                &[("type", kind), ("subfolder", sub)],
            )
            .await;
            assert_eq!(code, 200, "{up}");
            assert_eq!(up, json!({"name": name, "subfolder": sub, "type": kind}));
            let q = [
                ("filename", name.as_str()),
                ("subfolder", sub),
                ("type", kind),
            ];
            assert_eq!(
                view_bytes(&base, &q).await,
                (200, bytes.clone()),
                "{kind} {sub}"
            );
            let annotated = format!("{name} [{kind}]");
            let q = [("filename", annotated.as_str()), ("subfolder", sub)];
            assert_eq!(
                view_bytes(&base, &q).await.1,
                bytes,
                "annotation picks the type"
            );

            let rel = if sub.is_empty() {
                name.clone()
            } else {
                format!("{sub}/{name}")
            };
            let mut spellings = vec![format!("{rel} [{kind}]")];
            if kind == "input" {
                spellings.push(rel.clone());
            }
            for (j, value) in spellings.iter().enumerate() {
                for (i, sim) in f.sims().into_iter().enumerate() {
                    let id = format!("load-{n}-{j}-{i}");
                    let h = f.run_on(sim, &id, load_and_save(value, &id)).await;
                    assert_eq!(h["status"]["status_str"], "success", "{value}: {h}");
                    assert_eq!(output_pixels(&base, &h, "2").await, pixels(&bytes));
                }
            }
        }
    }
}

/// The gate's output upload keeps its name; a backend's output of the same name is shown under
/// the next counter, and each name serves its own bytes; an upload under a name shown for a
/// backend's output gets ComfyUI's ` (1)` name.
#[tokio::test]
async fn an_output_upload_reserves_its_name_against_backend_outputs() {
    let f = Fleet::start().await;
    let base = f.base();
    let mine = png(8, 8, 99);
    let (code, up) = upload(
        &base,
        "/upload/image",
        "ComfyUI_00001_.png",
        mine.clone(),
        &[("type", "output")],
    )
    .await;
    assert_eq!((code, &up["name"]), (200, &json!("ComfyUI_00001_.png")));
    let h = f.run_on(&f.a, "made", blur_graph(0x00ff00)).await;
    let item = &h["outputs"]["3"]["images"][0];
    assert_eq!(item["filename"], "ComfyUI_00002_.png", "{h}");
    let q = [("filename", "ComfyUI_00001_.png"), ("type", "output")];
    assert_eq!(view_bytes(&base, &q).await, (200, mine));
    let made = output_pixels(&base, &h, "3").await;
    assert_eq!(made.rgb[..3], [0, 255, 0], "the backend's own image");
    // And the other way: an upload under a name shown for a backend's file steps over it.
    let (code, up) = upload(
        &base,
        "/upload/image",
        "ComfyUI_00002_.png",
        png(8, 8, 98),
        &[("type", "output")],
    )
    .await;
    assert_eq!((code, &up["name"]), (200, &json!("ComfyUI_00002_ (1).png")));
    assert_eq!(
        output_pixels(&base, &h, "3").await,
        made,
        "still the backend's"
    );
}

/// Input 1's class: an output made on one backend (as the gate shows it, renamed when names
/// collide) loads wherever the prompt runs; the history keeps the client's reference.
#[tokio::test]
async fn an_output_made_on_one_backend_loads_on_the_other() {
    let f = Fleet::start().await;
    let base = f.base();
    let red = f.run_on(&f.a, "red", blur_graph(0xff0000)).await;
    let blue = f.run_on(&f.b, "blue", blur_graph(0x0000ff)).await;
    let red_name = red["outputs"]["3"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let blue_name = blue["outputs"]["3"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(red_name, "ComfyUI_00001_.png");
    assert_eq!(
        blue_name, "ComfyUI_00002_.png",
        "the gate renames b's collision"
    );
    let red_px = output_pixels(&base, &red, "3").await;
    let blue_px = output_pixels(&base, &blue, "3").await;
    for (name, px) in [(&red_name, &red_px), (&blue_name, &blue_px)] {
        for (i, sim) in f.sims().into_iter().enumerate() {
            let value = format!("{name} [output]");
            let id = format!("{name}-{i}");
            let graph = load_and_save(&value, "again");
            let h = f.run_on(sim, &id, graph.clone()).await;
            assert_eq!(h["status"]["status_str"], "success", "{value} on {i}: {h}");
            assert_eq!(h["prompt"][2], graph, "history keeps the client's prompt");
            assert_eq!(&output_pixels(&base, &h, "2").await, px, "{value} on {i}");
        }
    }
    // The copies made for the other backend, and the names, go with the history (issue 12).
    let admin = format!("http://{}", f.gate.admin_addr);
    let (_, held) = get_json(&admin, "/admin/records").await;
    assert_eq!(held["files"]["copies"], 2, "one copy each way: {held}");
    assert_eq!(
        post_json(&base, "/history", &json!({"clear": true}))
            .await
            .0,
        200
    );
    let (_, left) = get_json(&admin, "/admin/records").await;
    assert_eq!(left["files"]["copies"], 0, "{left}");
    assert_eq!(left["files"]["backend_aliases"], 0, "{left}");
    assert_eq!(left["store"]["aliases"], 0, "{left}");
}

/// Acceptance 2: `/upload/mask` composites onto an original of each type, wherever it lives:
/// the gate's input, temp and output uploads, and an output of either backend.
#[tokio::test]
async fn a_mask_composites_onto_an_original_of_every_type() {
    let f = Fleet::start().await;
    let base = f.base();
    let (w, h) = (8, 8);
    let input = png(w, h, 11);
    let temp = png(w, h, 12);
    assert_eq!(
        upload(&base, "/upload/image", "orig.png", input.clone(), &[])
            .await
            .0,
        200
    );
    let output = png(w, h, 13);
    let fields = [("type", "output")];
    assert_eq!(
        upload(&base, "/upload/image", "orig.png", output.clone(), &fields)
            .await
            .0,
        200
    );
    let fields = [("type", "temp"), ("subfolder", "clip")];
    assert_eq!(
        upload(&base, "/upload/image", "orig.png", temp.clone(), &fields)
            .await
            .0,
        200
    );
    let made_a = f.run_on(&f.a, "made-a", blur_graph(0xff8800)).await;
    let made_b = f.run_on(&f.b, "made-b", blur_graph(0x0088ff)).await;
    let name_of = |h: &Value| h["outputs"]["3"]["images"][0]["filename"].clone();
    let originals = [
        (
            json!({"filename": "orig.png", "subfolder": "", "type": "input"}),
            pixels(&input),
        ),
        (
            json!({"filename": "orig.png", "subfolder": "clip", "type": "temp"}),
            pixels(&temp),
        ),
        (json!({"filename": "orig.png"}), pixels(&output)),
        (
            json!({"filename": name_of(&made_a)}),
            output_pixels(&base, &made_a, "3").await,
        ),
        (
            json!({"filename": format!("{} [output]", name_of(&made_b).as_str().unwrap())}),
            output_pixels(&base, &made_b, "3").await,
        ),
    ];
    let (mw, mh) = (64, 64);
    let alpha: Vec<u8> = (0..mw * mh).map(|i| (i % 251) as u8).collect();
    let mask = {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, mw, mh);
        enc.set_color(png::ColorType::Rgba);
        let mut wr = enc.write_header().unwrap();
        let rgba: Vec<u8> = alpha.iter().flat_map(|a| [0, 0, 0, *a]).collect();
        wr.write_image_data(&rgba).unwrap();
        drop(wr);
        out
    };
    for (i, (reference, original)) in originals.into_iter().enumerate() {
        let name = format!("mask{i}.png");
        let (code, up) = upload(
            &base,
            "/upload/mask",
            &name,
            mask.clone(),
            &[("original_ref", &reference.to_string())],
        )
        .await;
        assert_eq!(code, 200, "{reference}: {up}");
        let (code, saved) = view_bytes(
            &base,
            &[
                ("filename", up["name"].as_str().unwrap()),
                ("type", "input"),
            ],
        )
        .await;
        assert_eq!(code, 200, "{reference}: the mask was written");
        let (img, a) = Image::from_png(&saved).unwrap();
        assert_eq!(img, original, "{reference}: the original's pixels");
        assert_eq!(a.unwrap()[..5], alpha[..5], "{reference}: the mask's alpha");
    }
}

/// Input 1's encoder: a file name with quotes and non-ASCII characters reaches
/// both backends intact (the gate's multipart to backends escapes it) and loads there.
#[tokio::test]
async fn an_upload_named_with_a_quote_and_unicode_loads_on_both_backends() {
    let f = Fleet::start().await;
    let base = f.base();
    let name = "it's \"cat\" \u{2603} ü.png";
    let bytes = png(8, 8, 21);
    let (code, up) = upload(&base, "/upload/image", name, bytes.clone(), &[]).await;
    assert_eq!((code, &up["name"]), (200, &json!(name)), "{up}");
    for (i, sim) in f.sims().into_iter().enumerate() {
        let id = format!("quoted{i}");
        let h = f.run_on(sim, &id, load_and_save(name, &id)).await;
        assert_eq!(h["status"]["status_str"], "success", "{h}");
        assert_eq!(
            std::fs::read(sim.base_dir().join("input").join(name)).unwrap(),
            bytes
        );
    }
    let r = view(
        &base,
        reqwest::Method::GET,
        &[("filename", name), ("type", "input")],
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let disposition = r.headers()["content-disposition"].as_bytes().to_vec();
    assert_eq!(
        disposition,
        format!("filename=\"{name}\"").into_bytes(),
        "as aiohttp writes it"
    );
    assert_eq!(r.bytes().await.unwrap(), bytes);
}

/// An output the gate never saw (made on a backend directly, or before the gate started) loads
/// on the other backend too: the gate finds the backend that has it and copies it.
#[tokio::test]
async fn an_output_made_behind_the_gates_back_loads_on_the_other_backend() {
    let f = Fleet::start().await;
    let base = f.base();
    let (code, r) = post_json(
        &f.a.url(),
        "/prompt",
        &json!({"prompt": blur_graph(0x44aa22)}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let direct = wait_history(&f.a.url(), r["prompt_id"].as_str().unwrap()).await;
    let name = direct["outputs"]["3"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, made) = view_bytes(&base, &[("filename", &name), ("type", "output")]).await;
    assert_eq!(
        code, 200,
        "the gate asks the backends for a file it does not know"
    );
    let value = format!("{name} [output]");
    let h = f
        .run_on(&f.b, "elsewhere", load_and_save(&value, "b"))
        .await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    assert_eq!(output_pixels(&base, &h, "2").await, pixels(&made));
}

/// The gate's output uploads and the names they hold outlive a restart of the gate; its temp
/// uploads do not (ComfyUI empties `temp/` at every start).
#[tokio::test]
async fn output_uploads_keep_their_names_across_a_gate_restart() {
    let (a, b) = (sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sims = [&a, &b];
    let start = || {
        let state = state.clone();
        gate_with(&sims, move |f| f.server.state_dir = Some(state))
    };
    let first = start().await;
    let kept = png(8, 8, 31);
    let up = |kind: &'static str, bytes: Vec<u8>, base: String| async move {
        let (code, v) = upload(
            &base,
            "/upload/image",
            "ComfyUI_00001_.png",
            bytes,
            &[("type", kind)],
        )
        .await;
        assert_eq!((code, &v["name"]), (200, &json!("ComfyUI_00001_.png")));
    };
    up("output", kept.clone(), first.url()).await;
    up("temp", png(8, 8, 32), first.url()).await;
    first.shutdown().await;

    let second = start().await;
    let base = second.url();
    let q = |kind| [("filename", "ComfyUI_00001_.png"), ("type", kind)];
    assert_eq!(view_bytes(&base, &q("output")).await, (200, kept));
    assert_eq!(view_bytes(&base, &q("temp")).await.0, 404);
    let (code, r) = post_json(&base, "/prompt", &json!({"prompt": blur_graph(0x101010)})).await;
    assert_eq!(code, 200, "{r}");
    let h = wait_history(&base, r["prompt_id"].as_str().unwrap()).await;
    assert_eq!(
        h["outputs"]["3"]["images"][0]["filename"], "ComfyUI_00002_.png",
        "the upload still holds its name"
    );
}

/// A backend that lost the files the gate placed there (restarted on an empty directory) gets
/// them again: an upload and a copy of another backend's output.
#[tokio::test]
async fn a_backend_that_lost_its_placed_files_gets_them_again() {
    let f = Fleet::start().await;
    let base = f.base();
    let bytes = png(8, 8, 41);
    assert_eq!(
        upload(&base, "/upload/image", "again.png", bytes.clone(), &[])
            .await
            .0,
        200
    );
    let made = f.run_on(&f.b, "made", blur_graph(0x336699)).await;
    let made_name = made["outputs"]["3"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let from_b = format!("{made_name} [output]");
    for round in 0..2 {
        for (i, value) in ["again.png", from_b.as_str()].into_iter().enumerate() {
            let id = format!("round{round}-{i}");
            let h = f.run_on(&f.a, &id, load_and_save(value, &id)).await;
            assert_eq!(h["status"]["status_str"], "success", "{value}: {h}");
        }
        std::fs::remove_dir_all(f.a.base_dir().join("input")).unwrap();
        std::fs::create_dir_all(f.a.base_dir().join("input")).unwrap();
    }
}

/// A file the gate cannot copy is never forwarded under its shown name: with b's output shown
/// as `ComfyUI_00002_.png` and a holding another file of that real name, a prompt loading it
/// while b is gone fails with a clear error instead of running on a's file.
#[tokio::test]
async fn an_output_whose_owner_is_gone_fails_instead_of_loading_another_file() {
    let f = Fleet::start().await;
    let base = f.base();
    f.run_on(&f.a, "red", blur_graph(0xff0000)).await;
    let blue = f.run_on(&f.b, "blue", blur_graph(0x0000ff)).await;
    let green = f.run_on(&f.a, "green", blur_graph(0x00ff00)).await;
    assert_eq!(
        blue["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00002_.png"
    );
    assert_eq!(
        green["outputs"]["3"]["images"][0]["filename"],
        "ComfyUI_00003_.png"
    );
    f.b.inject(comfy_sim::Fault::Crash {
        restart_after_ms: None,
    });
    let graph = load_and_save("ComfyUI_00002_.png [output]", "again");
    let (code, _) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": graph, "prompt_id": "lost"}),
    )
    .await;
    assert_eq!(code, 200);
    let h = wait_history(&base, "lost").await;
    assert_eq!(h["status"]["status_str"], "error", "{h}");
    let error = &h["status"]["messages"].as_array().unwrap().last().unwrap()[1];
    assert_eq!(
        error["exception_type"], "comfy_gate.FileNotPlaced",
        "{error}"
    );
    assert!(
        error["exception_message"]
            .as_str()
            .unwrap()
            .starts_with("ComfyUI_00002_.png [output] is not available"),
        "{error}"
    );
}

/// An input overwritten with new content and then back with the first reaches the backend each
/// time: the gate compares with what it placed there last, not with every version ever placed.
#[tokio::test]
async fn an_upload_overwritten_back_to_its_first_content_is_placed_again() {
    let f = Fleet::start().await;
    let base = f.base();
    let solid = |c: u8| Image {
        width: 8,
        height: 8,
        rgb: vec![c; 8 * 8 * 3],
    };
    // Two contents of the same size (a size check alone cannot tell them apart).
    let first = solid(40);
    let png_first = first.to_png(&[], true);
    let second = (41..=255)
        .map(solid)
        .find(|i| i.to_png(&[], true).len() == png_first.len())
        .expect("another colour with a PNG of the same size");
    let png_second = second.to_png(&[], true);
    for (round, (png, want)) in [
        (&png_first, &first),
        (&png_second, &second),
        (&png_first, &first),
    ]
    .into_iter()
    .enumerate()
    {
        let fields = [("overwrite", "true")];
        let (code, _) = upload(&base, "/upload/image", "same.png", png.clone(), &fields).await;
        assert_eq!(code, 200);
        let id = format!("round-{round}");
        let h = f.run_on(&f.a, &id, load_and_save("same.png", "same")).await;
        assert_eq!(h["status"]["status_str"], "success", "{h}");
        let got = output_pixels(&base, &h, "2").await;
        assert_eq!(
            got.rgb, want.rgb,
            "round {round} loaded the upload it had then"
        );
    }
}

/// An upload's subfolder is kept as loaders and `/view` spell it: `./webcam` is `webcam`.
#[tokio::test]
async fn an_upload_into_a_dotted_subfolder_loads_by_its_plain_path() {
    let f = Fleet::start().await;
    let base = f.base();
    let fields = [("subfolder", "./webcam")];
    let (code, _) = upload(&base, "/upload/image", "dot.png", png(8, 8, 5), &fields).await;
    assert_eq!(code, 200);
    for (i, sim) in f.sims().into_iter().enumerate() {
        let id = format!("dot-{i}");
        let h = f
            .run_on(sim, &id, load_and_save("webcam/dot.png", "dot"))
            .await;
        assert_eq!(h["status"]["status_str"], "success", "{h}");
    }
}
