//! HTTPS on the client listener (issue 14): a prompt's whole flow over HTTPS and WSS, HTTP/2
//! chosen by ALPN, TLS 1.1 refused, a certificate replaced on disk served after a reload (a bad
//! one refuses the reload, the old kept), and the cleartext listener that redirects to HTTPS. Certificates
//! are made by each test (rcgen); clients are rustls with the same `ring` provider.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as `cert.pem` / `key.pem`
/// in `dir`; its DER.
fn make_cert(dir: &Path) -> Vec<u8> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), made.key_pair.serialize_pem()).expect("write key");
    made.cert.der().to_vec()
}

/// A `proxy.toml` in `dir` for a gate in front of `sim` that serves `dir`'s certificate (and
/// redirects from a cleartext port 0); the gate reads it again on each reload.
async fn tls_gate_from_file(sim: &comfy_sim::SimHandle, dir: &Path) -> comfy_gate::GateHandle {
    let path = dir.join("proxy.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\n\
         [health]\ninterval_ms = 100\n\n\
         [tls]\ncert = {:?}\nkey = {:?}\nredirect_listen = \"127.0.0.1:0\"\n\n\
         [[backend]]\nurl = \"{}\"\n",
        fresh_state_dir(),
        dir.join("cert.pem"),
        dir.join("key.pem"),
        sim.url()
    );
    std::fs::write(&path, text).expect("write proxy.toml");
    gate_from_file(&path).await
}

/// A gate whose client listener serves the certificate in `dir` (and redirects from a
/// cleartext port 0).
async fn tls_gate(sim: &comfy_sim::SimHandle, dir: &Path) -> comfy_gate::GateHandle {
    let text = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nredirect_listen = \"127.0.0.1:0\"\n",
        dir.join("cert.pem"),
        dir.join("key.pem")
    );
    let parsed: comfy_gate::config::FileConfig = toml::from_str(&text).expect("test toml");
    gate_with(&[sim], |f| f.tls = parsed.tls).await
}

/// A TLS connection to the gate trusting `trusted` (DER certificates), offering `alpn`.
async fn connect(
    gate: &comfy_gate::GateHandle,
    trusted: &[&[u8]],
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots
            .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
            .expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(gate.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// One HTTP/1.1 request over a new TLS connection: the status and the body as JSON.
async fn https(
    gate: &comfy_gate::GateHandle,
    trusted: &[u8],
    req: http::Request<Full<Bytes>>,
) -> (u16, Value) {
    let tls = connect(gate, &[trusted], &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1 handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn request(method: &str, path: &str, body: Option<&Value>) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .expect("request")
}

#[tokio::test]
async fn a_prompt_runs_over_https_and_its_events_arrive_over_wss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let der = make_cert(dir.path());
    let sim = sim().await;
    let gate = tls_gate(&sim, dir.path()).await;
    assert!(gate.url().starts_with("https://"), "{}", gate.url());

    let tls = connect(&gate, &[&der], &[b"http/1.1"]).await;
    let url = format!(
        "wss://localhost:{}/ws?clientId=tls-client",
        gate.addr.port()
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket over TLS");

    let body = json!({"prompt": blur_graph(3), "client_id": "tls-client"});
    let (s, answer) = https(&gate, &der, request("POST", "/prompt", Some(&body))).await;
    assert_eq!(s, 200, "{answer}");
    let id = answer["prompt_id"].as_str().expect("prompt id").to_string();

    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("an event in time")
            .expect("socket open")
            .expect("frame");
        let Ok(text) = msg.to_text() else { continue };
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        let kind = event["type"].as_str().unwrap_or("?").to_string();
        let done = kind == "executing"
            && event["data"]["node"].is_null()
            && event["data"]["prompt_id"] == id.as_str();
        seen.push(kind);
        if done {
            break;
        }
    }
    assert!(seen.iter().any(|k| k == "executed"), "{seen:?}");

    let path = format!("/history/{id}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (s, history) = https(&gate, &der, request("GET", &path, None)).await;
        assert_eq!(s, 200);
        if history[&id]["outputs"].is_object() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no history for {id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.shutdown().await;
}

#[tokio::test]
async fn an_alpn_h2_client_speaks_http2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let der = make_cert(dir.path());
    let sim = sim().await;
    let gate = tls_gate(&sim, dir.path()).await;
    let tls = connect(&gate, &[&der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let authority = format!("localhost:{}", gate.addr.port());
    for path in ["/queue", "/history"] {
        let req = http::Request::get(format!("https://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.version(), http::Version::HTTP_2, "{path}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let parsed: Value = serde_json::from_slice(&body).expect("JSON");
        assert!(parsed.is_object(), "{path}: {parsed}");
    }
    // The host comes from :authority, so ComfyUI's same-origin rule holds over HTTP/2 too: a
    // cross-site page cannot post to a loopback gate.
    let forged = http::Request::post(format!("https://127.0.0.1:{}/prompt", gate.addr.port()))
        .header("origin", "https://evil.example")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"prompt": blur_graph(1)}).to_string(),
        )))
        .expect("request");
    let resp = sender.send_request(forged).await.expect("response");
    assert_eq!(resp.status(), 403);
    gate.shutdown().await;
}

/// A TLS 1.1 ClientHello (rustls clients cannot send one): record version 1.0, client version
/// 1.1, four CBC suites of that era, no extensions.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02];
    hello.extend([7u8; 32]);
    hello.push(0);
    let suites: [u16; 4] = [0x002f, 0x0035, 0xc013, 0xc014];
    hello.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend(s.to_be_bytes());
    }
    hello.extend([1, 0]);
    let mut handshake = vec![0x01];
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_1_1_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_cert(dir.path());
    let sim = sim().await;
    let gate = tls_gate(&sim, dir.path()).await;
    let mut tcp = TcpStream::connect(gate.addr).await.expect("connect");
    tcp.write_all(&tls11_client_hello()).await.expect("hello");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer)).await;
    eprintln!(
        "TLS 1.1 hello answered with {:02x?}",
        &answer[..answer.len().min(16)]
    );
    assert_ne!(answer.first(), Some(&0x16), "never a ServerHello");
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "an alert record or a close: {answer:02x?}"
    );
    gate.shutdown().await;
}

/// The certificate the gate presents to a new connection.
async fn served(gate: &comfy_gate::GateHandle, trusted: &[&[u8]]) -> Vec<u8> {
    let tls = connect(gate, trusted, &[b"http/1.1"]).await;
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")[0]
        .to_vec()
}

#[tokio::test]
async fn a_replaced_certificate_is_served_after_reload_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = make_cert(dir.path());
    let sim = sim().await;
    let gate = tls_gate_from_file(&sim, dir.path()).await;
    assert_eq!(served(&gate, &[&first]).await, first);

    let second = make_cert(dir.path());
    assert_eq!(
        served(&gate, &[&first]).await,
        first,
        "files alone change nothing"
    );
    let report = gate.reload().await.expect("reload");
    assert!(report.kept_old.is_empty(), "{report:?}");
    assert_eq!(served(&gate, &[&first, &second]).await, second);

    let cert: PathBuf = dir.path().join("cert.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\ngarbage!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    // Like `nginx -t`, the reload loads the pair first: garbage PEM fails the whole reload,
    // which names the file, the line and the field, and changes nothing.
    let err = gate
        .reload()
        .await
        .expect_err("garbage PEM is refused")
        .to_string();
    let config = dir.path().join("proxy.toml").display().to_string();
    assert!(err.starts_with(&format!("{config}:")), "{err}");
    assert!(err.contains(": tls.cert: "), "{err}");
    assert!(err.contains(&cert.display().to_string()), "{err}");
    assert_eq!(
        served(&gate, &[&first, &second]).await,
        second,
        "the old one stays"
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn the_cleartext_listener_redirects_to_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_cert(dir.path());
    let sim = sim().await;
    let gate = tls_gate(&sim, dir.path()).await;
    let redirect = gate.redirect_addr.expect("redirect listener");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = client
        .post(format!("http://localhost:{}/prompt?x=1", redirect.port()))
        .send()
        .await
        .expect("response");
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://localhost:{}/prompt?x=1", gate.addr.port()).as_str()
    );
    gate.shutdown().await;
}
