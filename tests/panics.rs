//! Panic containment (issue 12, acceptance 4): a panic in one request's handling is answered
//! 500 and logged; the gate, the panicking client's connection, every other client and their
//! prompts go on. The panic is a test-only fault: `server.test_faults` (default off) makes the
//! gate panic on a request carrying `x-comfy-gate-test-fault: panic`.

mod common;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAULT: &str = "x-comfy-gate-test-fault";

/// Reads from `stream` until `n` complete responses (heads with a Content-Length body) arrived.
async fn read_responses(stream: &mut TcpStream, n: usize) -> Vec<(u16, String)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while out.len() < n {
        // Parse whatever complete responses the buffer holds.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                out.push((status, body));
                continue;
            }
        }
        let mut chunk = [0u8; 8192];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("responses within patience")
            .expect("read");
        assert!(read > 0, "connection closed after {} responses", out.len());
        buf.extend_from_slice(&chunk[..read]);
    }
    out
}

#[tokio::test]
async fn a_panicking_request_gets_500_while_another_clients_prompt_completes() {
    let sim = sim().await;
    let gate = gate_with(&[&sim], |f| f.server.test_faults = true).await;
    let base = gate.url();

    // The innocent client: a prompt long enough to be running while the panics happen,
    // followed over its socket.
    let mut ws = Ws::connect(&base, Some("innocent")).await;
    let (s, body) = post_json(
        &base,
        "/prompt",
        &json!({ "prompt": steps(7, 1500), "client_id": "innocent" }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let id = body["prompt_id"].as_str().expect("a prompt_id").to_string();

    // A panicking request gets the gate's 500 in ComfyUI's error shape, on every kind of route.
    for (method, path) in [
        ("POST", "/prompt"),
        ("GET", "/queue"),
        ("GET", "/history"),
        ("GET", "/object_info"),
    ] {
        let req = http().request(method.parse().unwrap(), format!("{base}{path}"));
        let req = req
            .header(FAULT, "panic")
            .json(&json!({ "prompt": blur_graph(1) }));
        let (s, body) = send_for_json(req).await;
        assert_eq!(s, 500, "{method} {path}: {body}");
        assert_eq!(body["error"]["type"], "internal_error", "{body}");
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("test fault"),
            "the panic message stays in the log: {body}"
        );
    }

    // The panicking client's own connection stays usable: a panic, then a good request on the
    // same keep-alive connection.
    let mut raw = TcpStream::connect(gate.addr).await.expect("connect");
    let host = gate.addr;
    raw.write_all(
        format!(
            "GET /queue HTTP/1.1\r\nHost: {host}\r\n{FAULT}: panic\r\n\r\n\
             GET /queue HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answers = read_responses(&mut raw, 2).await;
    assert_eq!(answers[0].0, 500, "{answers:?}");
    assert_eq!(answers[1].0, 200, "{answers:?}");
    let queue: Value = serde_json::from_str(&answers[1].1).expect("a queue");
    assert!(queue["queue_running"].is_array(), "{queue}");

    // The innocent prompt runs to its end, seen on its socket and in the history.
    let frames = ws.until_done(&id).await;
    assert!(
        frames
            .iter()
            .any(|f| f.kind() == "execution_success" && f.data()["prompt_id"] == id.as_str()),
        "no execution_success for {id}"
    );
    let entry = wait_history(&base, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");

    // And the gate keeps answering and running prompts afterwards.
    let (s, body) = post_json(&base, "/prompt", &json!({ "prompt": blur_graph(2) })).await;
    assert_eq!(s, 200, "{body}");
    let after = body["prompt_id"].as_str().unwrap().to_string();
    let entry = wait_history(&base, &after).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    gate.shutdown().await;
}

#[tokio::test]
async fn the_fault_header_does_nothing_unless_test_faults_is_on() {
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let req = http()
        .get(format!("{}/queue", gate.url()))
        .header(FAULT, "panic");
    let (s, body) = send_for_json(req).await;
    assert_eq!(s, 200, "{body}");
    gate.shutdown().await;
}
