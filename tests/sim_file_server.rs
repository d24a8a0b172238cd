//! comfy-sim's `/view` as the file server aiohttp's `FileResponse` is (ComfyUI's `/view` of a
//! stored file): ranges, validators, HEAD; and its loaders reading every annotated reference
//! (issue 11, inputs 1 and 2, on one simulated ComfyUI). The expected answers were checked side
//! by side with aiohttp 3.14 serving the same file with the same mtime.

mod common;

use common::files::view;
use common::*;
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

async fn upload(base: &str, name: &str, bytes: Vec<u8>, fields: &[(&str, &str)]) -> Value {
    let mut form = Form::new().part("image", Part::bytes(bytes).file_name(name.to_string()));
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    let (code, v) =
        send_for_json(http().post(format!("{base}/upload/image")).multipart(form)).await;
    assert_eq!(code, 200, "{v}");
    v
}

#[tokio::test]
async fn view_answers_ranges_validators_and_head_as_aiohttp_does() {
    let s = sim().await;
    let base = s.url();
    let bytes = png(20, 20, 4);
    let size = bytes.len();
    upload(&base, "v.png", bytes.clone(), &[]).await;
    let q = [("filename", "v.png"), ("type", "input")];

    let whole = view(&base, Method::GET, &q, &[]).await;
    assert_eq!(whole.status(), 200);
    let h = whole.headers().clone();
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-disposition"], "filename=\"v.png\"");
    assert_eq!(h["content-type"], "image/png");
    let etag = h["etag"].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with(&format!("-{size:x}\"")),
        "{etag}"
    );
    let modified = h["last-modified"].to_str().unwrap().to_string();
    assert_eq!(whole.bytes().await.unwrap(), bytes);

    let r = view(&base, Method::GET, &q, &[("range", "bytes=0-1")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-1/{size}").as_str()
    );
    assert_eq!(r.headers()["content-length"], "2");
    assert_eq!(r.bytes().await.unwrap(), bytes[..2]);
    let r = view(&base, Method::GET, &q, &[("range", "bytes=-4")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), bytes[size - 4..]);
    let r = view(&base, Method::GET, &q, &[("range", "bytes=-0")]).await;
    assert_eq!(r.status(), 206, "aiohttp reads -0 as the whole file");
    assert_eq!(r.bytes().await.unwrap(), bytes);
    let r = view(&base, Method::GET, &q, &[("range", "bytes=99999-")]).await;
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );

    let r = view(&base, Method::GET, &q, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.headers()["content-disposition"], "filename=\"v.png\"");
    let r = view(&base, Method::GET, &q, &[("if-modified-since", &modified)]).await;
    assert_eq!(r.status(), 304);
    let r = view(&base, Method::GET, &q, &[("if-match", "\"nope\"")]).await;
    assert_eq!(r.status(), 412);

    let head = view(&base, Method::HEAD, &q, &[]).await;
    assert_eq!(head.status(), 200);
    for name in ["etag", "last-modified", "content-length", "accept-ranges"] {
        assert_eq!(head.headers()[name], h[name], "{name}");
    }
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn load_image_reads_temp_and_output_references_in_subfolders() {
    let s = sim().await;
    let base = s.url();
    let bytes = png(8, 8, 9);
    for kind in ["temp", "output", "input"] {
        let up = upload(
            &base,
            "cap.png",
            bytes.clone(),
            &[("type", kind), ("subfolder", "webcam")],
        )
        .await;
        assert_eq!(up["subfolder"], "webcam");
        let graph = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": format!("webcam/cap.png [{kind}]")}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": kind}}
        });
        let (code, r) = post_json(&base, "/prompt", &json!({ "prompt": graph })).await;
        assert_eq!(code, 200, "{kind}: {r}");
        let h = wait_history(&base, r["prompt_id"].as_str().unwrap()).await;
        assert_eq!(h["status"]["status_str"], "success", "{kind}: {h}");
    }
}
