//! The bad-input suite (issue 12): one test per class of malformed input a hostile or broken
//! client can send, against a real gate over comfy-sim. Each asserts the refusal (a 4xx, or the
//! connection closed) and that an innocent client, whose prompt is submitted over `/prompt` and
//! followed over `/ws` while the bad input arrives, sees its prompt to the end.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::files::upload;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// An innocent client: a prompt submitted with its clientId and followed over its socket to
/// `execution_success` and `executing {node: null}`, then found in the history.
async fn innocent(base: String, seed: u64) {
    let cid = format!("innocent-{}", uuid::Uuid::new_v4().simple());
    let mut ws = Ws::connect(&base, Some(&cid)).await;
    let (s, body) = post_json(
        &base,
        "/prompt",
        &json!({ "prompt": steps(seed, 600), "client_id": cid }),
    )
    .await;
    assert_eq!(s, 200, "the innocent prompt is accepted: {body}");
    let id = body["prompt_id"].as_str().expect("a prompt_id").to_string();
    let frames = ws.until_done(&id).await;
    assert!(
        frames
            .iter()
            .any(|f| f.kind() == "execution_success" && f.data()["prompt_id"] == id.as_str()),
        "the innocent prompt {id} succeeded on its socket"
    );
    let entry = wait_history(&base, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
}

/// Runs `bad` while an innocent client's prompt runs, and checks the innocent one ended well
/// and the gate still answers.
async fn beside_innocent<F: std::future::Future>(base: &str, bad: F) -> F::Output {
    let seed = rand_seed();
    let innocent = tokio::spawn(innocent(base.to_string(), seed));
    let out = bad.await;
    innocent.await.expect("the innocent client is unaffected");
    let (s, body) = get_json(base, "/queue").await;
    assert_eq!(s, 200, "the gate still answers: {body}");
    out
}

fn rand_seed() -> u64 {
    u64::from(uuid::Uuid::new_v4().as_fields().0)
}

/// Sends raw bytes on a fresh connection and reads until the gate closes it (or PATIENCE):
/// the status of the first response (`None` if closed without one) and everything read.
async fn raw(addr: SocketAddr, request: &[u8]) -> (Option<u16>, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    (first_status(&text), text)
}

fn first_status(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Every status line in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text[i + 9..].get(..3)?.parse().ok())
        .collect()
}

fn assert_4xx(what: &str, status: u16, body: &impl std::fmt::Display) {
    assert!(
        (400..500).contains(&status),
        "{what}: expected a 4xx, got {status}: {body}"
    );
}

/// Requests from another user than the innocent one (`comfy-user` names the caller), so that
/// what the gate rightly does for the caller (an `/interrupt` without an id stops the caller's
/// own running prompts) is not mistaken for harm to the innocent client.
const HOSTILE: &str = "mallory";

fn hostile() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("comfy-user", HOSTILE.parse().unwrap());
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .default_headers(headers)
        .build()
        .expect("client")
}

async fn post_raw_body(base: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    send_for_json(
        hostile()
            .post(format!("{base}{path}"))
            .header("Content-Type", "application/json")
            .body(body),
    )
    .await
}

#[tokio::test]
async fn malformed_json_bodies_get_400() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    beside_innocent(&base, async {
        let bodies: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"{".to_vec(),
            b"not json".to_vec(),
            b"[1, 2".to_vec(),
            b"{\"prompt\": {\"1\": ".to_vec(),
            b"\xff\xfe\x00{".to_vec(),
            b"{\"a\": \"\xc3\x28\"}".to_vec(),
            b"{\"a\": 1} trailing".to_vec(),
            b"{\"a\": NaN}".to_vec(),
        ];
        for path in ["/prompt", "/queue", "/history", "/interrupt"] {
            for body in &bodies {
                if path == "/interrupt" && body.is_empty() {
                    // Older clients post `/interrupt` without a body: the caller's own prompts.
                    continue;
                }
                let (s, answer) = post_raw_body(&base, path, body.clone()).await;
                eprintln!("{path} {:?} -> {s} {answer}", String::from_utf8_lossy(body));
                assert_4xx(&format!("{path} {body:?}"), s, &answer);
            }
        }
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_ignored_or_refused() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    beside_innocent(&base, async {
        for (path, body) in [
            ("/prompt", json!(null)),
            ("/prompt", json!([])),
            ("/prompt", json!("prompt")),
            ("/prompt", json!(7)),
            ("/queue", json!(null)),
            ("/queue", json!([1])),
            ("/queue", json!({"delete": "abc"})),
            ("/queue", json!({"delete": [1, {"a": 2}]})),
            ("/queue", json!({"clear": "yes"})),
            ("/history", json!(null)),
            ("/history", json!({"delete": 5})),
            ("/history", json!({"delete": [null]})),
            ("/interrupt", json!(null)),
            ("/interrupt", json!([])),
            ("/interrupt", json!({"prompt_id": 5})),
        ] {
            let (s, answer) =
                send_for_json(hostile().post(format!("{base}{path}")).json(&body)).await;
            eprintln!("{path} {body} -> {s} {answer}");
            assert!(
                s == 200 || (400..500).contains(&s),
                "{path} {body}: ignored (200, as ComfyUI) or refused, never {s}: {answer}"
            );
        }
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn graphs_of_the_wrong_types_get_400() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    beside_innocent(&base, async {
        let mut graphs = vec![
            ("prompt a string", json!("graph")),
            ("prompt a number", json!(1)),
            ("prompt an array", json!([blur_graph(1)])),
            ("prompt null", json!(null)),
            ("prompt empty", json!({})),
            ("node a number", json!({"1": 5})),
            ("node an array", json!({"1": ["EmptyImage"]})),
            ("node null", json!({"1": null})),
            ("no class_type", json!({"1": {"inputs": {}}})),
            (
                "class_type a number",
                json!({"1": {"class_type": 5, "inputs": {}}}),
            ),
            (
                "unknown class_type",
                json!({"1": {"class_type": "NoSuchNode", "inputs": {}}}),
            ),
        ];
        let mut g = blur_graph(1);
        g["2"]["inputs"] = json!([1, 2]);
        graphs.push(("inputs an array", g));
        let mut g = blur_graph(1);
        g["2"]["inputs"] = json!("image");
        graphs.push(("inputs a string", g));
        let mut g = blur_graph(1);
        g["2"]["inputs"]["image"] = json!(["99", 0]);
        graphs.push(("link to a missing node", g));
        for (what, link) in [
            ("slot a string", json!(["1", "x"])),
            ("slot negative", json!(["1", -1])),
            ("slot fractional", json!(["1", 0.5])),
            ("slot huge", json!(["1", u64::MAX])),
            ("slot out of range", json!(["1", 7])),
            ("link without slot", json!(["1"])),
            ("link with three items", json!(["1", 0, 0])),
        ] {
            let mut g = blur_graph(1);
            g["2"]["inputs"]["image"] = link;
            graphs.push((what, g));
        }
        for (what, graph) in graphs {
            let req = hostile().post(format!("{base}/prompt"));
            let (s, answer) = send_for_json(req.json(&json!({ "prompt": graph }))).await;
            eprintln!("{what} -> {s} {answer}");
            assert_eq!(s, 400, "{what}: {answer}");
            assert!(
                answer["error"]["type"].is_string(),
                "{what}: ComfyUI's shape: {answer}"
            );
        }
    })
    .await;
    gate.shutdown().await;
}

/// A GET with a raw (already encoded) query or path, from the hostile user.
async fn get_raw(base: &str, path_and_query: &str) -> (u16, Vec<u8>) {
    let resp = hostile()
        .get(format!("{base}{path_and_query}"))
        .send()
        .await
        .expect("an answer");
    let s = resp.status().as_u16();
    (s, resp.bytes().await.unwrap_or_default().to_vec())
}

/// Names that try to leave their folder or that no file system takes, as raw query values.
const BAD_NAMES: &[&str] = &[
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2E%2E/%2E%2E/etc/passwd",
    "..%5C..%5Cwin.ini",
    "%2Fetc%2Fpasswd",
    "C:%5Cwindows%5Cwin.ini",
    "a%00.png",
    "%00",
    "%ff%fe.png",
    "%c3%28.png",
    "....%2F%2F....%2F%2Fetc%2Fpasswd",
];

/// The names that do not leave their folder on a POSIX file system.
const ODD_NAMES: &[&str] = &[
    "..%5C..%5Cwin.ini",
    "C:%5Cwindows%5Cwin.ini",
    "%ff%fe.png",
    "%c3%28.png",
    "..%5Cevil.json",
    // `....` is a name, not `..`.
    "....%2F%2F....%2F%2Fetc%2Fpasswd",
];

fn overlong() -> String {
    "a".repeat(5000) + ".png"
}

#[tokio::test]
async fn file_names_with_traversal_or_odd_encodings_are_refused() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    let outside = sim.base_dir().parent().unwrap().to_path_buf();
    beside_innocent(&base, async {
        // /view: as filename, as subfolder, as type.
        let long = overlong();
        for name in BAD_NAMES.iter().copied().chain([long.as_str()]) {
            for query in [
                format!("filename={name}&type=input"),
                format!("filename={name}&type=output"),
                format!("filename=x.png&subfolder={name}&type=output"),
                format!("filename=x.png&type={name}"),
            ] {
                let (s, body) = get_raw(&base, &format!("/view?{query}")).await;
                let text = String::from_utf8_lossy(&body);
                eprintln!("/view?{} -> {s}", &query[..query.len().min(80)]);
                assert_4xx(&format!("/view?{query}"), s, &text);
                assert!(!text.contains("root:"), "nothing leaks: {text}");
            }
        }

        // /upload/image: names and subfolders that leave the input folder.
        let png = png(8, 8, 1);
        let abs = outside.join("evil-abs.png").to_string_lossy().into_owned();
        for (name, subfolder) in [
            ("../evil.png", ""),
            ("..\\evil.png", ""),
            (abs.as_str(), ""),
            ("evil.png", "../.."),
            ("evil.png", ".."),
            ("evil.png", abs.as_str()),
            ("a\u{0}b.png", ""),
            (long.as_str(), ""),
        ] {
            let client = hostile();
            let form = reqwest::multipart::Form::new()
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(png.clone()).file_name(name.to_string()),
                )
                .text("subfolder", subfolder.to_string());
            let (s, answer) =
                send_for_json(client.post(format!("{base}/upload/image")).multipart(form)).await;
            eprintln!("/upload/image {:?} {subfolder:?} -> {s} {answer}", &name[..name.len().min(40)]);
            if s == 200 {
                // Taken only under a name of its own inside the input folder.
                let saved = answer["name"].as_str().unwrap_or_default();
                let sub = answer["subfolder"].as_str().unwrap_or_default();
                // (A backslash is a plain character in a POSIX file name, as in ComfyUI.)
                assert!(
                    !saved.contains(['/', '\0']) && !sub.contains(".."),
                    "{name:?} {subfolder:?}: saved as {answer}"
                );
            } else {
                assert_4xx(&format!("/upload/image {name:?} {subfolder:?}"), s, &answer);
            }
        }
        for escaped in ["evil.png", "evil-abs.png"] {
            assert!(!outside.join(escaped).exists(), "{escaped} written outside");
        }

        // /upload/mask: an original_ref that points outside, or is not a reference at all.
        let (s, up) = upload(&base, "/upload/image", "original.png", png.clone(), &[]).await;
        assert_eq!(s, 200, "{up}");
        for reference in [
            json!({"filename": "../../../etc/passwd", "type": "input"}),
            json!({"filename": "original.png", "subfolder": "../..", "type": "input"}),
            json!({"filename": "original.png", "type": "../input"}),
            json!({"filename": "/etc/passwd", "type": "input"}),
            json!({"filename": "orig\u{0}inal.png", "type": "input"}),
            json!({"filename": 5, "type": "input"}),
            json!("original.png"),
        ]
        .map(|v| v.to_string())
        .into_iter()
        .chain(["{".to_string(), String::new()])
        {
            let form = reqwest::multipart::Form::new()
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(png.clone()).file_name("mask.png"),
                )
                .text("original_ref", reference.clone());
            let (s, answer) =
                send_for_json(hostile().post(format!("{base}/upload/mask")).multipart(form)).await;
            eprintln!("/upload/mask {reference} -> {s} {answer}");
            if reference.contains("\\u0000") && s == 200 {
                // A name no file can have: the original is missing, and the mask is stored
                // alone, as ComfyUI does (`os.path.isfile` is false for it).
                assert_eq!(answer["name"], "mask.png", "{answer}");
                continue;
            }
            assert_4xx(&format!("/upload/mask {reference}"), s, &answer);
        }

        // /userdata: the file name is one path segment, percent-encoded.
        for name in BAD_NAMES.iter().copied().chain(["..", "%2e%2e", "..%5Cevil.json"]) {
            let (s, text) = raw(
                gate.addr,
                format!("GET /userdata/{name} HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await;
            eprintln!("GET /userdata/{name} -> {s:?}");
            let s = s.expect("an answer");
            assert_4xx(&format!("GET /userdata/{name}"), s, &text);
            assert!(!text.contains("root:"), "nothing leaks: {text}");
            let (s, text) = raw(
                gate.addr,
                format!("POST /userdata/{name} HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").as_bytes(),
            )
            .await;
            eprintln!("POST /userdata/{name} -> {s:?}");
            let s = s.expect("an answer");
            if s == 200 && ODD_NAMES.contains(&name) {
                // Not a path out of the folder: a backslash, or bytes that are not UTF-8, are
                // plain characters in a POSIX file name (ComfyUI on Linux stores the same
                // file), written inside the user's folder, nowhere else.
                continue;
            }
            assert_4xx(&format!("POST /userdata/{name}"), s, &text);
        }
        assert!(!outside.join("win.ini").exists(), "nothing written outside");
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn huge_and_deeply_nested_bodies_are_refused() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.server.max_body_bytes = 1 << 20).await;
    let base = gate.url();
    beside_innocent(&base, async {
        // Over server.max_body_bytes: 413, with the length declared, or streamed in chunks.
        let big = json!({ "prompt": blur_graph(3), "extra_data": { "pad": "p".repeat(2 << 20) } });
        for path in ["/prompt", "/queue", "/history", "/interrupt", "/upload/image", "/userdata/big.json"] {
            let (s, answer) =
                send_for_json(hostile().post(format!("{base}{path}")).json(&big)).await;
            eprintln!("{path} 2 MiB -> {s}");
            assert_eq!(s, 413, "{path}: {answer}");
        }
        // A declared length far past the limit is refused before any of it is sent.
        let (s, _) = raw(
            gate.addr,
            format!("POST /prompt HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n{{").as_bytes(),
        )
        .await;
        assert_eq!(s, Some(413));

        // 100,000 nested arrays, as a body and inside a graph: serde_json's recursion limit
        // refuses them; nothing in the gate recurses on client JSON.
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let deep_obj = |n: usize| "{\"a\":".repeat(n) + "1" + &"}".repeat(n);
        for path in ["/prompt", "/queue", "/history", "/interrupt"] {
            for body in [deep(100_000), deep_obj(100_000)] {
                let (s, answer) = post_raw_body(&base, path, body.into_bytes()).await;
                eprintln!("{path} deep -> {s} {answer}");
                assert_eq!(s, 400, "{path}: {answer}");
            }
        }
        let in_graph = format!(
            r#"{{"prompt": {{"1": {{"class_type": "EmptyImage", "inputs": {{"width": {}}}}}}}}}"#,
            deep(100_000)
        );
        let (s, answer) = post_raw_body(&base, "/prompt", in_graph.into_bytes()).await;
        assert_eq!(s, 400, "{answer}");
        // Nesting within the limit is parsed, and refused as a graph.
        let in_graph = format!(
            r#"{{"prompt": {{"1": {{"class_type": "EmptyImage", "inputs": {{"width": {}}}}}}}}}"#,
            deep(100)
        );
        let (s, answer) = post_raw_body(&base, "/prompt", in_graph.into_bytes()).await;
        eprintln!("deep 100 in graph -> {s} {answer}");
        assert_eq!(s, 400, "{answer}");

        // The same nesting as a client's WebSocket message is ignored; the socket stays open.
        let mut ws = Ws::connect(&base, Some("deep-socket")).await;
        ws.send_raw(Message::text(deep(100_000))).await;
        ws.send_raw(Message::text(deep_obj(100_000))).await;
        loop {
            match ws.next_within(Duration::from_millis(500)).await {
                Err(()) => break,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the gate closed the socket"),
            }
        }
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn oversize_headers_get_431_or_a_closed_connection() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    beside_innocent(&base, async {
        let many: String = (0..500).map(|i| format!("x-h{i}: v\r\n")).collect();
        let huge_value = format!("x-big: {}\r\n", "v".repeat(1 << 20));
        let huge_uri = format!(
            "GET /queue?{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "q".repeat(1 << 20)
        );
        for (what, request) in [
            (
                "500 headers",
                format!("GET /queue HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
            ),
            (
                "a 1 MiB header",
                format!("GET /queue HTTP/1.1\r\nHost: x\r\n{huge_value}\r\n"),
            ),
            ("a 1 MiB target", huge_uri),
        ] {
            let (s, text) = raw(gate.addr, request.as_bytes()).await;
            eprintln!("{what} -> {s:?}");
            assert!(
                matches!(s, None | Some(431) | Some(414) | Some(400)),
                "{what}: refused or closed: {}",
                &text[..text.len().min(300)]
            );
        }
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_never_desyncs() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    beside_innocent(&base, async {
        // The body, read as chunked, is empty; read by its Content-Length, it would hold a
        // second request. The gate reads it as chunked (RFC 9112 §6.3) and closes the
        // connection after answering, so the smuggled request and the honest one written after
        // it are never answered on it.
        let smuggled = "0\r\n\r\nPOST /interrupt HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        for path in ["/prompt", "/queue", "/userdata/smuggle.json"] {
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}\
                 GET /queue HTTP/1.1\r\nHost: x\r\n\r\n",
                smuggled.len()
            );
            let (s, text) = raw(gate.addr, request.as_bytes()).await;
            eprintln!("CL+TE {path} -> {s:?} {:?}", statuses(&text));
            assert!(s.is_some_and(|s| (400..500).contains(&s) || s == 200), "{text}");
            assert_eq!(statuses(&text).len(), 1, "one answer, then closed: {text}");
        }
        // Obfuscated or conflicting framing is refused outright.
        for framing in [
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Content-Length: 2\r\nContent-Length: 3\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 2, 3\r\n",
            "Content-Length: +2\r\n",
        ] {
            let request = format!(
                "POST /queue HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\n{framing}\r\n{{}}\
                 GET /queue HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            let (s, text) = raw(gate.addr, request.as_bytes()).await;
            eprintln!("{framing:?} -> {s:?} {:?}", statuses(&text));
            assert!(matches!(s, None | Some(400) | Some(501)), "{framing:?}: {text}");
            assert!(statuses(&text).len() <= 1, "{framing:?}: nothing after: {text}");
        }
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let base = gate.url();
    beside_innocent(&base, async {
        let body = json!({ "prompt": blur_graph(9), "client_id": "piped" }).to_string();
        let request = format!(
            "GET /prompt HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\n\r\n\
             POST /prompt HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
             GET /nope-404 HTTP/1.1\r\nHost: x\r\n\r\n\
             POST /prompt HTTP/1.1\r\nHost: x\r\ncomfy-user: {HOSTILE}\r\nContent-Length: 1\r\n\r\n{{\
             GET /queue HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let (_, text) = raw(gate.addr, request.as_bytes()).await;
        let got = statuses(&text);
        eprintln!("pipelined -> {got:?}");
        assert_eq!(got.len(), 5, "{text}");
        assert_eq!(got[0], 200);
        assert_eq!(got[1], 200);
        assert_eq!(got[2], 404);
        assert_eq!(got[3], 400);
        assert_eq!(got[4], 200);
        let exec_info = text.find("exec_info").expect("GET /prompt answered");
        let prompt_id = text.find("prompt_id").expect("POST /prompt answered");
        let invalid = text.find("invalid_json").expect("the bad body answered");
        let queue = text.find("queue_running").expect("GET /queue answered");
        assert!(exec_info < prompt_id && prompt_id < invalid && invalid < queue, "{text}");
    })
    .await;
    gate.shutdown().await;
}

#[tokio::test]
async fn a_slowloris_is_closed_after_the_header_timeout() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.server.header_read_timeout_ms = 1000).await;
    let base = gate.url();
    let addr = gate.addr;
    beside_innocent(&base, async move {
        let slow = |head: &'static [u8]| async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut rd, mut wr) = stream.into_split();
            let start = tokio::time::Instant::now();
            let writer = async move {
                for b in head.iter().cycle() {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                std::future::pending::<()>().await
            };
            let reader = async move {
                let mut got = Vec::new();
                let _ = rd.read_to_end(&mut got).await;
                got
            };
            let got = tokio::select! {
                got = reader => got,
                _ = writer => unreachable!(),
                _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("never closed"),
            };
            (start.elapsed(), String::from_utf8_lossy(&got).into_owned())
        };
        // Byte by byte, a head that never ends (a header repeated forever), and a request
        // line alone, dribbled.
        let (a, b) = tokio::join!(
            slow(b"x-a: b\r\n"),
            slow(b"GET /queue?aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        );
        for (elapsed, text) in [a, b] {
            eprintln!("slowloris closed after {elapsed:?}: {text:?}");
            assert!(elapsed < Duration::from_secs(5), "closed after {elapsed:?}");
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 408"),
                "{text:?}"
            );
        }
    })
    .await;
    gate.shutdown().await;
}
