//! The `comfy-gate` binary: `check` reports config errors with file, line and field; `run`
//! works from the command line alone.

mod common;

use std::process::Stdio;

use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

#[test]
fn check_accepts_the_shipped_example() {
    let out = std::process::Command::new(BIN)
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 backends"));
}

#[test]
fn check_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[[backend]]\nurl = \"ftp://gpu\"\n",
            ":5: backend[0].url: ",
        ),
        ("[scheduler]\nmax_inflight = \"two\"\n", ":2: "),
        ("[health]\nintervall_ms = 5\n", ":2: "),
        (
            "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"http://a:1\"\n",
            ":4: backend[1].url: ",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("bad{i}.toml{expected}")),
            "case {i}: {err}"
        );
    }
}

#[tokio::test]
async fn run_needs_no_file() {
    let (a, b) = (sim().await, sim().await);
    let state = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backend",
            &a.url(),
            "--backend",
            &b.url(),
        ])
        .env("RUST_LOG", "warn")
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = listening_urls(&mut child).await.remove(0);
    let (code, _) = post_json(
        &url,
        "/prompt",
        &json!({"prompt": blur_graph(3), "prompt_id": "cli"}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        wait_history(&url, "cli").await["status"]["status_str"],
        "success"
    );
    child.kill().await.unwrap();
}

/// `docs/nginx-migration.md`'s `proxy.toml`, the nginx config translated field by field, is a
/// valid configuration (its certificate paths pointed at a pair made here).
#[test]
fn the_nginx_guides_proxy_toml_passes_check() {
    let guide = include_str!("../docs/nginx-migration.md");
    let start = guide
        .find("### The same in `proxy.toml`")
        .expect("the guide's section");
    let block = &guide[start..];
    let block = &block[block.find("```toml\n").expect("its toml block") + 8..];
    let toml = &block[..block.find("```").expect("the block's end")];
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("chain.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let text = toml
        .replace("/etc/ssl/comfy/chain.pem", cert.to_str().unwrap())
        .replace("/etc/ssl/comfy/key.pem", key.to_str().unwrap());
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
