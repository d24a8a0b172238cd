//! Issue 14, the access log and the edge's tower stack: one line per client request, in
//! nginx's `combined` format or as JSON, written when the answer has been sent; the file is
//! reopened by name on `SIGUSR1` (logrotate) and can be switched while the gate runs; JSON
//! answers are gzipped when the client asks, images never; every answer carries an
//! `x-request-id` that its line names.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_gate::config::{AccessLog, AccessLogFormat, FileConfig};
use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

/// The backend's configured name, as lines name it.
const BACKEND: &str = "gpu0";

/// The lines of the log at `path`, once it has `n` (within PATIENCE); exactly `n`.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            assert_eq!(lines.len(), n, "one line per request: {text}");
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} lines in {}: {text}",
            lines.len(),
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn json_lines(path: &Path, n: usize) -> Vec<Value> {
    let text = lines(path, n).await;
    text.iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn log_at(path: &Path, format: AccessLogFormat) -> AccessLog {
    AccessLog {
        path: Some(path.display().to_string()),
        format,
    }
}

/// A gate over one sim (named [`BACKEND`]) with its access log in a fresh folder in `format`,
/// `tweak` applied after; the gate, the log's path and the folder's guard.
async fn gate_logging(
    sim: &comfy_sim::SimHandle,
    format: AccessLogFormat,
    tweak: impl FnOnce(&mut FileConfig),
) -> (comfy_gate::GateHandle, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let config = log_at(&log, format);
    let gate = gate_with(&[sim], move |f| {
        f.access_log = config;
        f.backends[0].name = Some(BACKEND.into());
        tweak(f);
    })
    .await;
    (gate, log, dir)
}

/// What one request should have left in the log. Requests are told apart by their
/// `User-Agent` (`ua`).
#[derive(Debug)]
struct Expected {
    ua: String,
    method: &'static str,
    uri: &'static str,
    status: u16,
    /// The body bytes the client read.
    bytes: usize,
    user: Option<&'static str>,
    backend: Option<&'static str>,
    prompt_id: Option<&'static str>,
    /// The `x-request-id` the client got (none for the WebSocket: tungstenite keeps it).
    request_id: Option<String>,
}

/// A referer with a quote, which `combined` must escape.
const REFERER: &str = "http://studio.example/\"tab\"";

/// Drives a handful of different requests through a gate with auth on (user `alice`, an
/// admin), each with its own `User-Agent`; what each should log.
async fn drive(base: &str) -> Vec<Expected> {
    let mut expected = Vec::new();
    let requests: [(&str, &str, Option<Value>, bool); 5] = [
        ("GET", "/queue", None, true),
        (
            "POST",
            "/prompt",
            Some(json!({"prompt": blur_graph(1), "prompt_id": "al-1", "client_id": "c"})),
            true,
        ),
        // Not a route of the gate: proxied to the backend (its index page).
        ("GET", "/", None, true),
        ("GET", "/models/no_such_folder", None, true),
        // No token: 401.
        ("GET", "/history", None, false),
    ];
    for (i, (method, uri, body, with_token)) in requests.into_iter().enumerate() {
        let ua = format!("scenario-step-{i}");
        let mut req = http()
            .request(method.parse().unwrap(), format!("{base}{uri}"))
            .header("user-agent", &ua)
            .header("referer", REFERER);
        if with_token {
            req = req.bearer_auth("tok-alice");
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let bytes = resp.bytes().await.unwrap().len();
        let proxied = uri == "/";
        expected.push(Expected {
            ua,
            method: if method == "GET" { "GET" } else { "POST" },
            uri,
            status,
            bytes,
            user: with_token.then_some("alice"),
            backend: proxied.then_some(BACKEND),
            prompt_id: (uri == "/prompt").then_some("al-1"),
            request_id: Some(request_id),
        });
    }
    let statuses: Vec<u16> = expected.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [200, 200, 200, 404, 401]);
    // A WebSocket, token in the query (it must not reach the log).
    let mut ws_req = format!(
        "{}/ws?clientId=c&token=tok-alice",
        base.replacen("http", "ws", 1)
    )
    .into_client_request()
    .unwrap();
    ws_req
        .headers_mut()
        .insert("user-agent", "scenario-ws".parse().unwrap());
    ws_req
        .headers_mut()
        .insert("referer", REFERER.parse().unwrap());
    let (socket, answer) = tokio_tungstenite::connect_async(ws_req)
        .await
        .expect("ws connects");
    assert_eq!(answer.status(), 101);
    drop(socket);
    expected.push(Expected {
        ua: "scenario-ws".into(),
        method: "GET",
        uri: "/ws?clientId=c",
        status: 101,
        bytes: 0,
        user: Some("alice"),
        backend: None,
        prompt_id: None,
        request_id: None,
    });
    expected
}

fn with_alice(f: &mut FileConfig) {
    with_users(f, &[("alice", "admin = true")], "");
}

fn expected_for<'a>(all: &'a [Expected], ua: &str) -> &'a Expected {
    all.iter()
        .find(|e| e.ua == ua)
        .unwrap_or_else(|| panic!("a line of no request: {ua}"))
}

/// JSON: one object per request, with nginx's names and the gate's facts: the status and the
/// body bytes the client read, the method and URI (the WebSocket's token left out), the user,
/// the backend of the proxied request and its upstream time, the prompt id of `POST /prompt`,
/// the request id the client got.
#[tokio::test]
async fn json_has_one_line_per_request_with_its_facts() {
    let sim = sim().await;
    let (gate, log, _dir) = gate_logging(&sim, AccessLogFormat::Json, with_alice).await;
    let expected = drive(&gate.url()).await;
    let lines = json_lines(&log, expected.len()).await;
    for line in &lines {
        let e = expected_for(&expected, line["http_user_agent"].as_str().unwrap());
        let at = &e.ua;
        assert_eq!(line["request_method"], e.method, "{at}");
        assert_eq!(line["request_uri"], e.uri, "{at}");
        assert_eq!(line["server_protocol"], "HTTP/1.1", "{at}");
        assert_eq!(line["status"], e.status, "{at}");
        assert_eq!(line["body_bytes_sent"], e.bytes, "{at}");
        assert_eq!(line["remote_addr"], "127.0.0.1", "{at}");
        assert_eq!(line["remote_user"], json!(e.user), "{at}");
        assert_eq!(line["user"], json!(e.user), "{at}");
        assert_eq!(line["backend"], json!(e.backend), "{at}");
        assert_eq!(line["prompt_id"], json!(e.prompt_id), "{at}");
        assert_eq!(line["http_referer"], REFERER, "{at}");
        let took = line["request_time"].as_f64().expect("request_time");
        assert!((0.0..60.0).contains(&took), "{at}: {took}");
        let upstream = line["upstream_response_time"].as_f64();
        assert_eq!(upstream.is_some(), e.backend.is_some(), "{at}");
        assert!(upstream.is_none_or(|s| s >= 0.0 && s <= took), "{at}");
        let time = line["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z'), "{at}: {time}");
        let id = line["request_id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{at}: {id}");
        if let Some(sent) = &e.request_id {
            assert_eq!(id, sent, "{at}: the id the client got");
        }
    }
    gate.shutdown().await;
}

/// `combined`: the same requests, each line nginx's exact shape (parsed back with the regex
/// nginx log tools use), the referer's quotes escaped as `\x22`.
#[tokio::test]
async fn combined_has_one_nginx_line_per_request() {
    let sim = sim().await;
    let (gate, log, _dir) = gate_logging(&sim, AccessLogFormat::Combined, with_alice).await;
    let expected = drive(&gate.url()).await;
    let lines = lines(&log, expected.len()).await;
    let combined = regex::Regex::new(
        r#"^(\S+) - (\S+) \[(\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000)\] "(\S+) (\S+) (HTTP/1\.1)" (\d{3}) (\d+) "([^"]*)" "([^"]*)"$"#,
    )
    .unwrap();
    let escaped_referer = REFERER.replace('"', "\\x22");
    for line in &lines {
        let c = combined
            .captures(line)
            .unwrap_or_else(|| panic!("not combined: {line}"));
        let e = expected_for(&expected, &c[10]);
        assert_eq!(&c[1], "127.0.0.1", "{line}");
        assert_eq!(&c[2], e.user.unwrap_or("-"), "{line}");
        assert_eq!((&c[4], &c[5]), (e.method, e.uri), "{line}");
        assert_eq!(c[7].parse::<u16>().unwrap(), e.status, "{line}");
        assert_eq!(c[8].parse::<usize>().unwrap(), e.bytes, "{line}");
        assert_eq!(&c[9], escaped_referer, "{line}");
    }
    gate.shutdown().await;
}

/// A reopen (what `SIGUSR1` asks) after the file was renamed: later lines go to a new file at
/// the configured path, earlier ones stay in the renamed file, none is lost.
#[tokio::test]
async fn a_reopen_after_a_rename_starts_a_new_file_and_loses_nothing() {
    let sim = sim().await;
    let (gate, log, dir) = gate_logging(&sim, AccessLogFormat::Json, |_| {}).await;
    let base = gate.url();
    let get_as_ua = |ua: String| {
        let url = format!("{base}/queue");
        async move {
            let resp = http().get(url).header("user-agent", ua).send().await;
            assert_eq!(resp.expect("request").status(), 200);
        }
    };
    for i in 0..3 {
        get_as_ua(format!("before-{i}")).await;
    }
    json_lines(&log, 3).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gate.reopen_logs();
    for i in 0..3 {
        get_as_ua(format!("after-{i}")).await;
    }
    let agents = |lines: Vec<Value>| -> Vec<String> {
        lines
            .iter()
            .map(|l| l["http_user_agent"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        agents(json_lines(&log, 3).await),
        ["after-0", "after-1", "after-2"]
    );
    assert_eq!(
        agents(json_lines(&rotated, 3).await),
        ["before-0", "before-1", "before-2"]
    );
    gate.shutdown().await;
}

/// The log switched while the gate runs (what a reload will do): another path and format from
/// the next request on; a path that cannot be opened is refused and the log goes on; off
/// writes nothing.
#[tokio::test]
async fn the_log_can_be_switched_while_the_gate_runs() {
    let sim = sim().await;
    let (gate, log, dir) = gate_logging(&sim, AccessLogFormat::Combined, |_| {}).await;
    let base = gate.url();
    get_json(&base, "/queue").await;
    assert!(lines(&log, 1).await[0].contains("\"GET /queue HTTP/1.1\" 200 "));
    let other = dir.path().join("other.log");
    let access = gate.access_log();
    access
        .reconfigure(&log_at(&other, AccessLogFormat::Json))
        .unwrap();
    get_json(&base, "/prompt").await;
    assert_eq!(json_lines(&other, 1).await[0]["request_uri"], "/prompt");
    let refused = access.reconfigure(&log_at(dir.path(), AccessLogFormat::Combined));
    assert!(refused.is_err(), "a folder is no log file");
    get_json(&base, "/queue").await;
    assert_eq!(json_lines(&other, 2).await[1]["request_uri"], "/queue");
    access.reconfigure(&AccessLog::default()).unwrap();
    get_json(&base, "/queue").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lines(&other, 2).await.len(), 2, "off writes nothing");
    assert_eq!(lines(&log, 1).await.len(), 1);
    gate.shutdown().await;
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gzip");
    out
}

/// A JSON answer is gzip when the client asks (and only then), and its line counts the
/// compressed bytes sent; a PNG from `/view` is never compressed.
#[tokio::test]
async fn json_is_gzipped_when_asked_and_images_never() {
    let sim = sim().await;
    let (gate, log, _dir) = gate_logging(&sim, AccessLogFormat::Json, |_| {}).await;
    let base = gate.url();
    let plain = http()
        .get(format!("{base}/object_info"))
        .send()
        .await
        .unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    let plain = plain.bytes().await.unwrap();
    let zipped = http()
        .get(format!("{base}/object_info"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    let zipped = zipped.bytes().await.unwrap();
    assert!(
        zipped.len() * 3 < plain.len(),
        "{} of {}",
        zipped.len(),
        plain.len()
    );
    let unzipped: Value = serde_json::from_slice(&gunzip(&zipped)).unwrap();
    assert_eq!(unzipped, serde_json::from_slice::<Value>(&plain).unwrap());
    let sent: Vec<Value> = json_lines(&log, 2).await;
    assert_eq!(sent[0]["body_bytes_sent"], plain.len());
    assert_eq!(sent[1]["body_bytes_sent"], zipped.len(), "the bytes sent");

    let (code, _) = post_json(
        &base,
        "/prompt",
        &json!({"prompt": blur_graph(7), "prompt_id": "img"}),
    )
    .await;
    assert_eq!(code, 200);
    let entry = wait_history(&base, "img").await;
    let name = entry["outputs"]["3"]["images"][0]["filename"]
        .as_str()
        .expect("an image")
        .to_string();
    let image = http()
        .get(format!("{base}/view"))
        .query(&[("filename", name.as_str()), ("type", "output")])
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(image.status(), 200);
    assert!(image.headers().get("content-encoding").is_none());
    let png = image.bytes().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG as it is");
    gate.shutdown().await;
}

/// The real binary: `SIGUSR1` reopens the access log by name too.
#[cfg(unix)]
#[tokio::test]
async fn sigusr1_reopens_the_access_log_of_the_running_binary() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let config = dir.path().join("proxy.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n\
         [access_log]\npath = \"{}\"\nformat = \"json\"\n\n[[backend]]\nurl = \"{}\"\n",
        dir.path().join("state").display(),
        log.display(),
        sim.url()
    );
    std::fs::write(&config, text).unwrap();
    let mut child = gate_binary(BIN, &config).spawn().unwrap();
    let base = listening_urls(&mut child).await.remove(0);
    get_json(&base, "/queue").await;
    json_lines(&log, 1).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(&child, "USR1");
    // The signal is handled on the gate's runtime: ask until a line lands at the old path
    // (each line before that goes to the renamed file, none is lost).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut sent = 1;
    while !log.exists() {
        assert!(tokio::time::Instant::now() < deadline, "never reopened");
        get_json(&base, "/prompt").await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = json_lines(&log, 1).await;
    assert_eq!(new[0]["request_uri"], "/prompt");
    let old = json_lines(&rotated, sent - 1).await;
    assert_eq!(old[0]["request_uri"], "/queue");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGUSR1 does not stop it"
    );
    child.kill().await.unwrap();
}
