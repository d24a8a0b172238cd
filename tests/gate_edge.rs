//! The gate's edges, driven with real comfy-sim backends, a real gate and real HTTP/WebSocket
//! clients: `/history` paging over the merged set, `/system_stats` over the fleet, the `/api`
//! aliases, user data on the home backend, the origin policy, bad input of every kind (the gate
//! keeps serving after each), and a smoke test of `comfy-gate demo`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use comfy_sim::SimConfig;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Submits `graph` under a client-chosen `prompt_id`.
async fn submit(base: &str, prompt_id: &str, graph: Value) -> (u16, Value) {
    post_json(
        base,
        "/prompt",
        &json!({ "prompt": graph, "prompt_id": prompt_id }),
    )
    .await
}

/// Waits for a prompt's history through `base` and checks it succeeded.
async fn wait_success(base: &str, prompt_id: &str) -> Value {
    let entry = wait_history(base, prompt_id).await;
    assert_eq!(
        entry["status"]["status_str"], "success",
        "{prompt_id}: {entry}"
    );
    entry
}

/// The completion time of a history entry (timestamp of its last status message).
fn completion_ms(entry: &Value) -> i64 {
    entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m[1]["timestamp"].as_i64())
        .expect("a timestamped last status message")
}

/// The keys of a `/history` answer, in order.
fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Runs one blur prompt through the gate and waits for it: the gate still serves.
async fn prompt_completes(base: &str, prompt_id: &str, color: u32) {
    let (s, body) = submit(base, prompt_id, blur_graph(color)).await;
    assert_eq!(s, 200, "{body}");
    wait_success(base, prompt_id).await;
}

async fn get_prompt_ok(base: &str) {
    let (s, body) = get_json(base, "/prompt").await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body["exec_info"]["queue_remaining"].is_u64(),
        "GET /prompt: {body}"
    );
}

/// Slow sims (blur prompts take tens of ms) so that prompts submitted together spread over both.
async fn slow_sim(name: &str) -> comfy_sim::SimHandle {
    sim_with(SimConfig {
        name: name.into(),
        speed: 0.001,
        ..Default::default()
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// A. History paging over the merged set, system_stats, /api aliases, user data (item 7)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn history_paging_over_the_merged_set() {
    let s1 = slow_sim("sim-a").await;
    let s2 = slow_sim("sim-b").await;
    let gate = gate(&[&s1, &s2]).await;
    let base = gate.url();

    // Five prompts at once: the gate spreads them over both backends.
    let ids: Vec<String> = (0..5).map(|i| format!("page-{i}")).collect();
    let answers = futures_util::future::join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| submit(&base, id, blur_graph(0x10_10_10 * (i as u32 + 1)))),
    )
    .await;
    for (id, (s, body)) in ids.iter().zip(&answers) {
        assert_eq!(*s, 200, "{id}: {body}");
        assert_eq!(body["prompt_id"], id.as_str(), "{body}");
    }
    let mut completed = Vec::new();
    for id in &ids {
        completed.push((completion_ms(&wait_success(&base, id).await), id.clone()));
    }

    // Both backends ran some of them, so the history really is merged.
    for sim in [&s1, &s2] {
        let (_, own) = get_json(&sim.url(), "/history").await;
        assert!(
            keys(&own).iter().any(|k| ids.contains(k)),
            "{} ran none of the prompts: {own}",
            sim.url()
        );
    }

    // All five, ordered by completion (oldest first).
    let (s, all) = get_json(&base, "/history").await;
    assert_eq!(s, 200, "{all}");
    let full = keys(&all);
    assert_eq!(
        full.iter().cloned().collect::<HashSet<_>>(),
        ids.iter().cloned().collect::<HashSet<_>>(),
        "{all}"
    );
    let times: Vec<i64> = full.iter().map(|k| completion_ms(&all[k])).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "ordered by completion: {full:?} at {times:?}"
    );
    completed.sort();
    let by_time: Vec<i64> = completed.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, by_time, "the same completion times as each entry");

    // The last two.
    let (s, last2) = get_json(&base, "/history?max_items=2").await;
    assert_eq!(s, 200, "{last2}");
    assert_eq!(keys(&last2), full[3..5].to_vec(), "max_items=2");
    assert_eq!(last2[&full[4]], all[&full[4]], "whole entries");

    // Index 1..3 of the merged order.
    let (s, mid) = get_json(&base, "/history?max_items=2&offset=1").await;
    assert_eq!(s, 200, "{mid}");
    assert_eq!(keys(&mid), full[1..3].to_vec(), "max_items=2&offset=1");

    // The tail from index 3.
    let (s, tail) = get_json(&base, "/history?offset=3").await;
    assert_eq!(s, 200, "{tail}");
    assert_eq!(keys(&tail), full[3..].to_vec(), "offset=3");

    // A non-integer max_items is refused.
    let (s, body) = get_json(&base, "/history?max_items=two").await;
    assert_eq!(s, 400, "non-integer max_items: {body}");

    get_prompt_ok(&base).await;
    gate.shutdown().await;
}

#[tokio::test]
async fn system_stats_lists_every_device_and_api_aliases_answer() {
    let s1 = sim().await;
    let s2 = sim().await;
    let gate = gate(&[&s1, &s2]).await;
    let base = gate.url();

    let (s, stats) = get_json(&base, "/system_stats").await;
    assert_eq!(s, 200, "{stats}");
    let devices = stats["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2, "one device per backend: {stats}");
    let names: HashSet<String> = devices
        .iter()
        .map(|d| {
            d["comfy_gate_backend"]
                .as_str()
                .unwrap_or_else(|| panic!("comfy_gate_backend on {d}"))
                .to_string()
        })
        .collect();
    let expected: HashSet<String> = [s1.addr().to_string(), s2.addr().to_string()].into();
    assert_eq!(names, expected, "each device names its own backend");
    assert!(stats["system"].is_object() && !stats["system"].as_object().unwrap().is_empty());

    // A prompt to look up under both spellings.
    prompt_completes(&base, "alias-1", 0x224466).await;

    let (s, api_stats) = get_json(&base, "/api/system_stats").await;
    assert_eq!(s, 200, "{api_stats}");
    assert_eq!(
        api_stats["devices"].as_array().map(Vec::len),
        Some(2),
        "{api_stats}"
    );

    let (s, q) = get_json(&base, "/api/queue").await;
    assert_eq!(s, 200, "{q}");
    assert!(
        q["queue_running"].is_array() && q["queue_pending"].is_array(),
        "{q}"
    );

    let (s, p) = get_json(&base, "/api/prompt").await;
    assert_eq!(s, 200, "{p}");
    assert!(p["exec_info"]["queue_remaining"].is_u64(), "{p}");

    let (s, h) = get_json(&base, "/api/history/alias-1").await;
    assert_eq!(s, 200, "{h}");
    let (_, plain) = get_json(&base, "/history/alias-1").await;
    assert!(h.get("alias-1").is_some(), "{h}");
    assert_eq!(h, plain, "/api/history/{{id}} = /history/{{id}}");

    let (s, k) = get_json(&base, "/api/object_info/KSampler").await;
    assert_eq!(s, 200);
    assert!(k.get("KSampler").is_some(), "{k}");
    let (_, plain) = get_json(&base, "/object_info/KSampler").await;
    assert_eq!(k, plain);

    let (s, ckpts) = get_json(&base, "/api/models/checkpoints").await;
    assert_eq!(s, 200, "{ckpts}");
    let list = ckpts.as_array().expect("a list");
    assert!(
        list.contains(&json!(SDXL)) && list.contains(&json!(SD15)),
        "{ckpts}"
    );
    let (_, plain) = get_json(&base, "/models/checkpoints").await;
    assert_eq!(ckpts, plain);

    let (s, emb) = get_json(&base, "/api/embeddings").await;
    assert_eq!(s, 200, "{emb}");
    assert!(emb.is_array(), "{emb}");
    let (_, plain) = get_json(&base, "/embeddings").await;
    assert_eq!(emb, plain);

    // A POST under /api as well.
    let (s, body) = post_json(
        &base,
        "/api/prompt",
        &json!({ "prompt": blur_graph(0x113355), "prompt_id": "alias-2" }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    wait_success(&base, "alias-2").await;

    gate.shutdown().await;
}

#[tokio::test]
async fn user_data_lives_on_the_home_backend() {
    let home = sim().await;
    let other = sim().await;
    let gate = gate(&[&home, &other]).await;
    let base = gate.url();
    let client = http();

    // `%2F` stays encoded on its way to the backend.
    let file_url = format!("{base}/userdata/workflows%2Fa.json");
    let resp = client
        .post(&file_url)
        .body(r#"{"x":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!("workflows/a.json")
    );

    let resp = client.get(&file_url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"x":1}"#);
    let resp = client
        .get(format!("{base}/api/userdata/workflows%2Fa.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "under /api too");
    assert_eq!(resp.text().await.unwrap(), r#"{"x":1}"#);

    let (s, list) = get_json(&base, "/userdata?dir=workflows").await;
    assert_eq!((s, list), (200, json!(["a.json"])));

    assert!(
        home.base_dir()
            .join("user/default/workflows/a.json")
            .is_file(),
        "written on the home backend"
    );
    assert!(
        !other
            .base_dir()
            .join("user/default/workflows/a.json")
            .exists(),
        "and nowhere else"
    );

    // Settings round-trip, on the home backend only.
    let (s, _) = post_json(&base, "/settings", &json!({"Comfy.GateTest": 7})).await;
    assert_eq!(s, 200);
    let (s, all) = get_json(&base, "/settings").await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(all["Comfy.GateTest"], 7, "{all}");
    let (s, one) = get_json(&base, "/settings/Comfy.GateTest").await;
    assert_eq!((s, one), (200, json!(7)));
    let (_, elsewhere) = get_json(&other.url(), "/settings").await;
    assert!(elsewhere.get("Comfy.GateTest").is_none(), "{elsewhere}");

    gate.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// B. Origin (item 8)
// ---------------------------------------------------------------------------------------------

/// A POST to the gate carrying `Host: <gate addr>` and the given Origin.
async fn post_with_origin(gate_addr: &str, path: &str, origin: &str, body: &Value) -> (u16, Value) {
    let req = http()
        .post(format!("http://{gate_addr}{path}"))
        .header("Host", gate_addr)
        .header("Origin", origin)
        .json(body);
    send_for_json(req).await
}

/// Opens `/ws` on the gate with an Origin header.
async fn ws_with_origin(
    gate_addr: &str,
    origin: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    tungstenite::Error,
> {
    let mut req = format!("ws://{gate_addr}/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", origin.parse().expect("header value"));
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("the upgrade is answered")
        .map(|(ws, _)| ws)
}

/// The first frame of a socket, as JSON.
async fn first_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let first = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a frame within patience")
        .expect("socket open")
        .expect("a good frame");
    serde_json::from_str(first.to_text().expect("a text frame")).expect("json")
}

fn assert_ws_refused(
    result: Result<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
        tungstenite::Error,
    >,
) {
    match result {
        Ok(_) => panic!("a cross-site WebSocket upgrade must be refused"),
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        Err(other) => panic!("expected an HTTP 403 refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn same_origin_browser_requests_pass_and_cross_site_ones_are_refused() {
    let s1 = sim().await;
    let gate = gate(&[&s1]).await;
    let addr = gate.addr.to_string();
    let own_origin = format!("http://{addr}");

    // Same origin: the gate does not hand the browser's Origin to the loopback sim (which
    // would refuse it, as ComfyUI does).
    let (s, body) = post_with_origin(
        &addr,
        "/prompt",
        &own_origin,
        &json!({ "prompt": blur_graph(0x102030), "prompt_id": "origin-ok" }),
    )
    .await;
    assert_eq!(s, 200, "same-origin POST /prompt: {body}");
    wait_success(&gate.url(), "origin-ok").await;

    // User data is passed through raw: the Origin must not reach the sim either.
    let (s, body) = post_with_origin(&addr, "/settings", &own_origin, &json!({"Comfy.O": 1})).await;
    assert_eq!(s, 200, "same-origin POST /settings: {body}");

    let mut ws = ws_with_origin(&addr, &own_origin)
        .await
        .expect("a same-origin WebSocket is accepted");
    let first = first_json(&mut ws).await;
    assert_eq!(first["type"], "status", "{first}");
    assert!(first["data"]["sid"].is_string(), "{first}");

    // Cross-site: refused by the gate itself, nothing reaches the backend.
    let accepted = s1.counters().prompts_accepted;
    let (s, _) = post_with_origin(
        &addr,
        "/prompt",
        "https://evil.example",
        &json!({ "prompt": blur_graph(0x405060), "prompt_id": "origin-evil" }),
    )
    .await;
    assert_eq!(s, 403, "cross-site POST /prompt");
    assert_eq!(s1.counters().prompts_accepted, accepted, "never forwarded");
    let (_, h) = get_json(&gate.url(), "/history/origin-evil").await;
    assert_eq!(h, json!({}), "no history for a refused prompt");
    let (s, _) =
        post_with_origin(&addr, "/settings", "https://evil.example", &json!({"X": 1})).await;
    assert_eq!(s, 403, "cross-site POST /settings");

    assert_ws_refused(ws_with_origin(&addr, "https://evil.example").await);

    // Still serving.
    get_prompt_ok(&gate.url()).await;
    gate.shutdown().await;
}

#[tokio::test]
async fn a_configured_allowed_origin_is_accepted() {
    let s1 = sim().await;
    let gate = gate_with(&[&s1], |f| {
        f.server.allowed_origins = vec!["https://studio.example".into()];
    })
    .await;
    let addr = gate.addr.to_string();

    let (s, body) = post_with_origin(
        &addr,
        "/prompt",
        "https://studio.example",
        &json!({ "prompt": blur_graph(0x203040), "prompt_id": "studio-1" }),
    )
    .await;
    assert_eq!(s, 200, "allowed origin POST /prompt: {body}");
    wait_success(&gate.url(), "studio-1").await;

    let mut ws = ws_with_origin(&addr, "https://studio.example")
        .await
        .expect("an allowed origin's WebSocket is accepted");
    let first = first_json(&mut ws).await;
    assert_eq!(first["type"], "status", "{first}");

    // Other sites are still refused.
    let (s, _) = post_with_origin(
        &addr,
        "/prompt",
        "https://evil.example",
        &json!({ "prompt": blur_graph(0x203041) }),
    )
    .await;
    assert_eq!(s, 403);
    assert_ws_refused(ws_with_origin(&addr, "https://evil.example").await);

    gate.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// C. Bad input; the gate keeps serving after each (item 10)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_unknown_ids_and_duplicate_ids() {
    let s1 = sim().await;
    let gate = gate(&[&s1]).await;
    let base = gate.url();

    // Malformed JSON.
    let resp = http()
        .post(format!("{base}/prompt"))
        .header("Content-Type", "application/json")
        .body(r#"{"prompt": {"1": "#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["type"], "invalid_json", "{body}");
    get_prompt_ok(&base).await;

    // Unknown prompt ids.
    let (s, h) = get_json(&base, "/history/unknown").await;
    assert_eq!((s, h), (200, json!({})));
    let (s, body) = post_json(&base, "/interrupt", &json!({"prompt_id": "unknown"})).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post_json(&base, "/queue", &json!({"delete": ["unknown"]})).await;
    assert_eq!(s, 200, "{body}");
    get_prompt_ok(&base).await;

    // A duplicate client prompt_id, while it is known and after it finished.
    let (s, body) = submit(&base, "dup-1", blur_graph(0x010203)).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = submit(&base, "dup-1", blur_graph(0x040506)).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["type"], "duplicate_prompt_id", "{body}");
    let first = wait_success(&base, "dup-1").await;
    assert_eq!(
        first["prompt"][2]["1"]["inputs"]["color"], 0x010203,
        "the first one ran"
    );
    let (s, body) = submit(&base, "dup-1", blur_graph(0x070809)).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["type"], "duplicate_prompt_id", "{body}");

    prompt_completes(&base, "after-bad-input", 0x0a0b0c).await;
    get_prompt_ok(&base).await;
    gate.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let s1 = sim().await;
    let gate = gate_with(&[&s1], |f| f.server.max_body_bytes = 4096).await;
    let base = gate.url();

    // A valid prompt padded past the limit.
    let big = json!({
        "prompt": blur_graph(0),
        "extra_data": { "padding": "p".repeat(5000) },
    });
    let (s, body) = post_json(&base, "/prompt", &big).await;
    assert_eq!(s, 413, "{body}");
    get_prompt_ok(&base).await;

    // Passed-through routes have the same limit.
    let resp = http()
        .post(format!("{base}/userdata/big.json"))
        .body("u".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert!(
        !s1.base_dir().join("user/default/big.json").exists(),
        "nothing written"
    );

    // Under the limit all is well.
    prompt_completes(&base, "small-enough", 0x111111).await;
    get_prompt_ok(&base).await;
    gate.shutdown().await;
}

#[tokio::test]
async fn garbage_websocket_frames_do_not_hurt_the_gate() {
    let s1 = sim().await;
    let gate = gate(&[&s1]).await;
    let base = gate.url();

    let mut junk = Ws::connect(&base, Some("junk-client")).await;
    let first = junk.next().await.expect("first frame");
    assert_eq!(first.kind(), "status");

    // Random binary frames.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in [1usize, 7, 64, 4096, 65536] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        junk.send_raw(Message::binary(bytes)).await;
    }
    // Junk text: not JSON, JSON of the wrong shape, an unknown type, feature flags of the
    // wrong type.
    for text in [
        "not json {{{",
        "[1,2,3]",
        "null",
        r#"{"type": 5, "data": []}"#,
        r#"{"type": "no_such_message", "data": {"x": 1}}"#,
        r#"{"type": "feature_flags", "data": "yes"}"#,
        "\u{0}\u{1}\u{7f}\u{fffd}",
    ] {
        junk.send_raw(Message::text(text)).await;
    }
    // A 1 MB text frame.
    junk.send_raw(Message::text("x".repeat(1 << 20))).await;
    junk.send_raw(Message::Ping(vec![1, 2, 3].into())).await;

    // A fresh socket still gets its first status, and a prompt still runs to completion with
    // its events delivered.
    let mut ws = Ws::connect(&base, Some("fresh-client")).await;
    let first = ws.next().await.expect("first frame");
    assert_eq!(first.kind(), "status", "{:?}", first);
    assert_eq!(first.data()["sid"], "fresh-client");
    let (s, body) = post_json(
        &base,
        "/prompt",
        &json!({ "prompt": blur_graph(0x223344), "prompt_id": "after-junk", "client_id": "fresh-client" }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let frames = ws.until_done("after-junk").await;
    assert!(
        frames
            .iter()
            .any(|f| f.kind() == "execution_success" && f.data()["prompt_id"] == "after-junk"),
        "{frames:?}"
    );
    wait_success(&base, "after-junk").await;
    get_prompt_ok(&base).await;
    drop(junk);
    gate.shutdown().await;
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_while_others_are_served() {
    let s1 = sim().await;
    let gate = gate_with(&[&s1], |f| f.server.header_read_timeout_ms = 1000).await;
    let base = gate.url();
    let addr = gate.addr;

    let slow = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        let start = tokio::time::Instant::now();
        let writer = async move {
            for b in b"GET /prompt HTTP/1.1\r\nHost: x\r\n" {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            // The head is never finished; keep the write half open.
            std::future::pending::<()>().await;
        };
        let reader = async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        let outcome = tokio::select! {
            got = reader => Some(got),
            _ = writer => None,
            _ = tokio::time::sleep(Duration::from_secs(15)) => None,
        };
        (outcome, start.elapsed())
    });

    // Meanwhile, ordinary requests are served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    get_prompt_ok(&base).await;
    prompt_completes(&base, "during-slowloris", 0x556677).await;

    let (outcome, elapsed) = slow.await.expect("slow client task");
    let got = outcome.expect("the slow connection is closed by the gate");
    assert!(
        elapsed < Duration::from_secs(10),
        "closed after {elapsed:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 408"),
        "closed without an answer, or with 408: {text:?}"
    );

    get_prompt_ok(&base).await;
    gate.shutdown().await;
}

/// `true` when the gate's admin `/readyz` says some backend can take work.
async fn ready(gate: &comfy_gate::GateHandle) -> bool {
    let (_, r) = get_json(&format!("http://{}", gate.admin_addr), "/readyz").await;
    r["ready"] == true
}

/// Writes a raw HTTP/1.1 request and reads the answer until the gate closes the connection.
async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]

async fn chunked_bodies_over_the_limit_on_passed_through_routes_get_413() {
    let s1 = sim().await;
    // Probes far apart, so only requests can change the backend's health during the test.
    let gate = gate_with(&[&s1], |f| {
        f.server.max_body_bytes = 4096;
        f.health.interval_ms = 60_000;
    })
    .await;
    let base = gate.url();
    let mut request = format!(
        "POST /userdata/big.json HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        gate.addr
    )
    .into_bytes();
    for _ in 0..5 {
        request.extend_from_slice(b"400\r\n");
        request.extend_from_slice(&[b'u'; 0x400]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    for round in 0..3 {
        let answer = raw_request(gate.addr, &request).await;
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "round {round}: a chunked body over the limit gets 413: {answer}"
        );
        assert!(ready(&gate).await, "round {round}: the backend is still up");
    }
    assert!(!s1.base_dir().join("user/default/big.json").exists());
    let (s, body) = get_json(&base, "/settings").await;
    assert_eq!(s, 200, "the home backend still serves user data: {body}");
    prompt_completes(&base, "after-chunked", 0x123123).await;
    gate.shutdown().await;
}

#[tokio::test]

async fn a_client_aborting_its_upload_does_not_mark_the_backend_down() {
    let s1 = sim().await;
    let gate = gate_with(&[&s1], |f| f.health.interval_ms = 60_000).await;
    let base = gate.url();
    for round in 0..3 {
        let mut stream = TcpStream::connect(gate.addr).await.expect("connect");
        let head = format!(
            "POST /userdata/half.json HTTP/1.1\r\nHost: {}\r\nContent-Length: 1000\r\n\r\n0123456789",
            gate.addr
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stream);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            ready(&gate).await,
            "round {round}: a client's aborted upload is no backend failure"
        );
    }
    let (s, body) = get_json(&base, "/settings").await;
    assert_eq!(s, 200, "the home backend still serves user data: {body}");
    prompt_completes(&base, "after-abort", 0x321321).await;
    gate.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// D. `comfy-gate demo` smoke test (item 11)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn demo_runs_a_prompt_end_to_end() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfy-gate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--time-scale",
            "0.01",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("comfy-gate demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let prefix = "comfy-gate demo listening on ";
    let base = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix(prefix) {
                return url.trim().to_string();
            }
        }
        panic!("the demo's stdout ended before it said where it listens");
    })
    .await
    .expect("the demo says where it listens");
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    // Keep draining stdout so the child never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let (s, body) = post_json(
        &base,
        "/prompt",
        &json!({ "prompt": txt2img(1, SDXL), "prompt_id": "demo-smoke-1" }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["prompt_id"], "demo-smoke-1");
    let entry = wait_success(&base, "demo-smoke-1").await;
    let image = &entry["outputs"]["9"]["images"][0];
    let filename = image["filename"].as_str().expect("an output image");
    let resp = http()
        .get(format!("{base}/view"))
        .query(&[
            ("filename", filename),
            ("subfolder", image["subfolder"].as_str().unwrap_or("")),
            ("type", image["type"].as_str().unwrap_or("output")),
        ])
        .send()
        .await
        .expect("view");
    assert_eq!(resp.status().as_u16(), 200);
    let bytes = resp.bytes().await.expect("image bytes");
    assert!(bytes.starts_with(PNG_MAGIC), "a PNG");
    assert_eq!(png_seed(&bytes), Some(1), "the image of this prompt");

    child.kill().await.expect("kill the demo");
    drain.abort();
}
