//! `https://` backends (issue 14, nginx's `proxy_pass https://…` with
//! `proxy_ssl_trusted_certificate` and `proxy_ssl_verify on`): a ComfyUI behind its own TLS
//! terminator, signed by a private CA. Trusted through `[tls] backend_ca`, it comes up and a
//! prompt's whole flow runs through it (probes, `/prompt`, the upstream socket over `wss`,
//! `/history`, `/view`); without the bundle its certificate is refused, it never comes up and
//! no prompt goes there; a bundle that does not parse is a config error naming the line.
//!
//! The terminator is this file's own: a rustls acceptor in front of a comfy-sim, forwarding
//! bytes both ways, counting the handshakes it completed and those the client broke off.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// A TLS terminator in front of a sim, for `localhost`, its certificate signed by a private CA.
struct TlsFront {
    port: u16,
    /// The private CA's certificate, PEM, in the test's folder.
    ca_pem: PathBuf,
    /// Handshakes completed (each one a connection the client went on to use).
    handshakes: Arc<AtomicUsize>,
    /// Handshakes that failed (the client refused the certificate).
    refused: Arc<AtomicUsize>,
}

impl TlsFront {
    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

/// Makes a private CA (written to `dir/ca.pem`) and a `localhost` certificate it signs, and
/// serves that certificate on a port of its own, forwarding each connection to `backend`.
async fn tls_front(backend: SocketAddr, dir: &Path) -> TlsFront {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "comfy-gate test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).expect("write ca.pem");

    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (handshakes, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (done, failed) = (handshakes.clone(), refused.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, done, failed) = (acceptor.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                done.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut plain) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    TlsFront {
        port,
        ca_pem,
        handshakes,
        refused,
    }
}

/// `proxy.toml` text for a gate whose only backend is `front`, trusting `backend_ca` if given.
fn config_text(front: &TlsFront, backend_ca: Option<&Path>) -> String {
    let ca = backend_ca
        .map(|p| format!("[tls]\nbackend_ca = {:?}\n\n", p))
        .unwrap_or_default();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\n\
         [health]\ninterval_ms = 100\ntimeout_ms = 500\n\n{ca}\
         [[backend]]\nurl = \"{}\"\n",
        fresh_state_dir(),
        front.url()
    )
}

/// The gate's one backend as `/admin/backends` shows it.
async fn the_backend(gate: &comfy_gate::GateHandle) -> Value {
    let (_, v) = get_json(&format!("http://{}", gate.admin_addr), "/admin/backends").await;
    v["backends"][0].clone()
}

#[tokio::test]
async fn a_backend_behind_tls_with_a_private_ca_runs_a_prompts_whole_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim().await;
    let front = tls_front(sim.addr(), dir.path()).await;
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config_text(&front, Some(&front.ca_pem))).expect("write");
    let gate = gate_from_file(&path).await;

    // Probes and the upstream socket, both over TLS, bring it up.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let b = the_backend(&gate).await;
        if b["health"] == "up" && b["ws_connected"] == true {
            assert_eq!(b["url"], front.url().as_str(), "{b}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never up: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("tls-backend-client")).await;
    let body = json!({"prompt": txt2img(7, SD15), "client_id": "tls-backend-client"});
    let (code, answer) = post_json(&base, "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");
    let id = answer["prompt_id"].as_str().expect("prompt id").to_string();
    // The backend's events reach the client only over the gate's wss:// socket.
    let kinds: Vec<String> = ws.until_done(&id).await.iter().map(|f| f.kind()).collect();
    assert!(kinds.iter().any(|k| k == "executed"), "{kinds:?}");

    let history = wait_history(&base, &id).await;
    assert_eq!(history["status"]["status_str"], "success", "{history}");
    let name = history["outputs"]["9"]["images"][0]["filename"]
        .as_str()
        .expect("an output image")
        .to_string();
    let (code, png) = get_bytes(&base, &format!("/view?filename={name}&type=output")).await;
    assert_eq!(code, 200);
    assert_eq!(png_seed(&png), Some(7), "the prompt's own image");

    let (done, refused) = (
        front.handshakes.load(Ordering::SeqCst),
        front.refused.load(Ordering::SeqCst),
    );
    eprintln!("TLS handshakes at the backend: {done} completed, {refused} refused");
    assert!(done >= 2, "requests and the socket each over TLS: {done}");
    assert_eq!(refused, 0);

    // The bundle is read at start: a reload naming another one says a restart applies it,
    // and the backend keeps the trust it started with.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = tls_front(sim.addr(), other_dir.path()).await;
    std::fs::write(&path, config_text(&front, Some(&other.ca_pem))).expect("write");
    let report = gate.reload().await.expect("reload");
    assert!(
        report.restart_needed.contains(&"tls.backend_ca"),
        "{report:?}"
    );
    let (code, png) = get_bytes(&base, &format!("/view?filename={name}&type=output")).await;
    assert_eq!((code, png_seed(&png)), (200, Some(7)), "still trusted");
    assert_eq!(the_backend(&gate).await["health"], "up");
    gate.shutdown().await;
}

#[tokio::test]
async fn without_backend_ca_the_private_certificate_is_refused_and_no_prompt_goes_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim().await;
    let front = tls_front(sim.addr(), dir.path()).await;
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config_text(&front, None)).expect("write");
    let gate = gate_from_file(&path).await;

    let body = json!({"prompt": txt2img(3, SD15)});
    let (code, answer) = post_json(&gate.url(), "/prompt", &body).await;
    eprintln!("POST /prompt with the only backend untrusted: {code} {answer}");

    // Probes and socket attempts reach the backend and refuse its certificate, again and again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while front.refused.load(Ordering::SeqCst) < 10 {
        assert!(tokio::time::Instant::now() < deadline, "no TLS attempts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = the_backend(&gate).await;
    let (done, refused) = (
        front.handshakes.load(Ordering::SeqCst),
        front.refused.load(Ordering::SeqCst),
    );
    eprintln!("TLS handshakes at the backend: {done} completed, {refused} refused; {b}");
    assert_eq!(done, 0, "Mozilla's roots do not include a private CA");
    assert_ne!(b["health"], "up", "{b}");
    assert_eq!(b["ws_connected"], false, "{b}");
    let (_, sim_queue) = get_json(&sim.url(), "/queue").await;
    let (_, sim_history) = get_json(&sim.url(), "/history").await;
    assert_eq!(
        sim_queue,
        json!({"queue_running": [], "queue_pending": []}),
        "nothing was placed on the untrusted backend"
    );
    assert_eq!(sim_history, json!({}));
    if code == 200 {
        let id = answer["prompt_id"].as_str().expect("prompt id");
        assert!(
            queued(&gate.url()).await.iter().any(|q| q == id),
            "an accepted prompt waits in the gate queue"
        );
    }
    gate.shutdown().await;
}

#[tokio::test]
async fn a_backend_ca_that_is_not_pem_is_a_config_error_naming_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let ca = dir.path().join("ca.pem");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[tls]\nbackend_ca = {ca:?}\n\n\
         [[backend]]\nurl = \"https://localhost:8443\"\n"
    );
    std::fs::write(&path, &text).expect("write");
    let cases: [(&str, Option<&str>); 3] = [
        ("missing", None),
        ("garbage", Some("this is not a certificate\n")),
        (
            "a broken PEM block",
            Some("-----BEGIN CERTIFICATE-----\ngarbage!\n-----END CERTIFICATE-----\n"),
        ),
    ];
    for (case, contents) in cases {
        match contents {
            Some(c) => std::fs::write(&ca, c).expect("write ca.pem"),
            None => {
                let _ = std::fs::remove_file(&ca);
            }
        }
        let e = comfy_gate::config::load(&path).expect_err(case);
        eprintln!("{case}: {e}");
        assert_eq!(e.file, path.display().to_string(), "{case}");
        assert_eq!((e.line, e.field.as_str()), (5, "tls.backend_ca"), "{case}");
        assert!(e.message.contains(&ca.display().to_string()), "{case}: {e}");
    }
}
