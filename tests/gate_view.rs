//! `/view` through the gate as a file server (issue 11, input 2; acceptance 3), over two
//! comfy-sim backends: ranges, validators and HEAD, for the gate's own uploads and for outputs
//! of either backend; and the names a backend's own history entry shows for the files `/view`
//! serves.

mod common;

use common::files::*;
use common::*;
use serde_json::json;

/// The headers a file answer carries, for comparing GET with HEAD.
fn file_headers(r: &reqwest::Response) -> Vec<(String, String)> {
    [
        "content-type",
        "content-length",
        "content-disposition",
        "accept-ranges",
        "etag",
        "last-modified",
    ]
    .iter()
    .map(|h| {
        let v = r.headers().get(*h).map(|v| v.to_str().unwrap().to_string());
        (h.to_string(), v.unwrap_or_else(|| panic!("{h} missing")))
    })
    .collect()
}

/// Input 2, acceptance 3: `/view` through the gate is a file server for its own uploads and for
/// outputs of either backend: 206 for a range, 416 for an unsatisfiable one, 304 for a matching
/// validator, HEAD with GET's headers and no body.
#[tokio::test]
async fn view_serves_ranges_validators_and_head_for_uploads_and_outputs() {
    use reqwest::Method;
    let f = Fleet::start().await;
    let base = f.base();
    let bytes = png(32, 32, 3);
    let (code, _) = upload(&base, "/upload/image", "clip.png", bytes.clone(), &[]).await;
    assert_eq!(code, 200);
    let on_a = f.run_on(&f.a, "on-a", blur_graph(0x123456)).await;
    let on_b = f.run_on(&f.b, "on-b", blur_graph(0x654321)).await;
    let mut cases = vec![(
        "upload".to_string(),
        vec![
            ("filename", "clip.png".to_string()),
            ("type", "input".into()),
        ],
    )];
    for (who, h) in [("a", &on_a), ("b", &on_b)] {
        let item = &h["outputs"]["3"]["images"][0];
        cases.push((
            format!("output of {who}"),
            vec![
                ("filename", item["filename"].as_str().unwrap().to_string()),
                ("type", "output".into()),
            ],
        ));
    }
    for (what, query) in cases {
        let q: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let whole = view(&base, Method::GET, &q, &[]).await;
        assert_eq!(whole.status(), 200, "{what}");
        let headers = file_headers(&whole);
        let etag = whole.headers()["etag"].to_str().unwrap().to_string();
        let modified = whole.headers()["last-modified"]
            .to_str()
            .unwrap()
            .to_string();
        let body = whole.bytes().await.unwrap();
        let size = body.len();
        assert_eq!(headers[1].1, size.to_string(), "{what}");

        let r = view(&base, Method::GET, &q, &[("range", "bytes=0-1")]).await;
        assert_eq!(r.status(), 206, "{what}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes 0-1/{size}").as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), body[..2], "{what}");
        let r = view(&base, Method::GET, &q, &[("range", "bytes=10-")]).await;
        assert_eq!(r.status(), 206, "{what}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes 10-{}/{size}", size - 1).as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), body[10..], "{what}");
        let past = format!("bytes={size}-");
        let r = view(&base, Method::GET, &q, &[("range", &past)]).await;
        assert_eq!(r.status(), 416, "{what}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes */{size}").as_str()
        );

        let r = view(&base, Method::GET, &q, &[("if-none-match", &etag)]).await;
        assert_eq!(r.status(), 304, "{what}");
        assert!(r.bytes().await.unwrap().is_empty());
        let r = view(&base, Method::GET, &q, &[("if-modified-since", &modified)]).await;
        assert_eq!(r.status(), 304, "{what}");
        let r = view(&base, Method::GET, &q, &[("if-none-match", "\"other\"")]).await;
        assert_eq!(r.status(), 200, "{what}");

        let head = view(&base, Method::HEAD, &q, &[]).await;
        assert_eq!(head.status(), 200, "{what}");
        assert_eq!(
            file_headers(&head),
            headers,
            "HEAD has GET's headers: {what}"
        );
        assert!(head.bytes().await.unwrap().is_empty(), "{what}");
        let head = view(&base, Method::HEAD, &q, &[("range", "bytes=0-1")]).await;
        assert_eq!(head.status(), 206, "{what}");
    }
}

/// A backslash is an ordinary character in a subfolder, never a separator: `..\..\..` names no
/// directory, so no file outside the gate's (or a sim's) store can be read through `/view`, a
/// mask's `original_ref` or a loader, at any depth and for every type.
#[tokio::test]
async fn a_backslash_subfolder_reads_nothing_outside_the_store() {
    let secret_name = format!("secret-{}.txt", uuid::Uuid::new_v4().simple());
    let secret = std::env::temp_dir().join(&secret_name);
    std::fs::write(&secret, b"not for clients").unwrap();
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    for base in [gate.url(), a.url()] {
        let mut subs: Vec<String> = (2..=8).map(|d| vec![".."; d].join("\\")).collect();
        subs.push("a\\..\\..\\..\\..".into());
        for sub in subs {
            for kind in ["output", "temp", "input"] {
                let query = [
                    ("filename", secret_name.as_str()),
                    ("subfolder", sub.as_str()),
                    ("type", kind),
                ];
                let r = http()
                    .get(format!("{base}/view"))
                    .query(&query)
                    .send()
                    .await
                    .unwrap();
                let code = r.status().as_u16();
                let body = r.bytes().await.unwrap();
                assert!(
                    code == 404 && body.is_empty(),
                    "{base} {kind} {sub}: {code} {body:?}"
                );
            }
            let original =
                serde_json::json!({"filename": secret_name, "subfolder": sub, "type": "output"});
            let form = reqwest::multipart::Form::new()
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(png(8, 8, 1)).file_name("m.png"),
                )
                .text("original_ref", original.to_string());
            let r = http()
                .post(format!("{base}/upload/mask"))
                .multipart(form)
                .send()
                .await
                .unwrap();
            let answer = r.text().await.unwrap();
            assert!(!answer.contains("not for clients"), "{answer}");
        }
    }
    std::fs::remove_file(secret).unwrap();
}

/// `GET /history/{id}` of a prompt the gate never placed is the backend's entry: as the backend
/// wrote it while no name changes; with an output whose name a file of the other backend holds,
/// the same entry with that output under its gate-wide name.
#[tokio::test]
async fn a_backends_own_history_passes_with_gate_wide_names() {
    let f = Fleet::start().await;
    let base = f.base();
    let mut ids = Vec::new();
    for (sim, color) in [(&f.a, 0x113355), (&f.b, 0x224466)] {
        let (code, r) =
            post_json(&sim.url(), "/prompt", &json!({"prompt": blur_graph(color)})).await;
        assert_eq!(code, 200, "{r}");
        let id = r["prompt_id"].as_str().unwrap().to_string();
        wait_history(&sim.url(), &id).await;
        ids.push(id);
    }
    let path = |id: &str| format!("/history/{id}");
    let (code, from_a) = get_bytes(&f.a.url(), &path(&ids[0])).await;
    assert_eq!(code, 200);
    assert_eq!(
        get_bytes(&base, &path(&ids[0])).await,
        (200, from_a),
        "the first name keeps its name: the backend's bytes"
    );
    let (_, mut from_b) = get_json(&f.b.url(), &path(&ids[1])).await;
    let image = &mut from_b[&ids[1]]["outputs"]["3"]["images"][0];
    assert_eq!(image["filename"], "ComfyUI_00001_.png", "b's own name");
    image["filename"] = json!("ComfyUI_00002_.png");
    assert_eq!(get_json(&base, &path(&ids[1])).await, (200, from_b));
}
