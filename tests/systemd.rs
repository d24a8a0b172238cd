//! Issue 14, systemd: the shipped unit passes `systemd-analyze verify`, and the gate speaks the
//! notify protocol: `READY=1` once serving, `RELOADING=1` … `READY=1` around a `SIGHUP`
//! reload, `WATCHDOG=1` when the unit sets a watchdog, `STOPPING=1` on `SIGTERM`.

mod common;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

/// `systemd-analyze`, or `None` outside CI when it is missing (in CI, where `.ci/run` installs
/// it, a missing one fails the test).
fn systemd_analyze() -> Option<&'static str> {
    let install = "install Debian's `systemd` package";
    common::tools::find_tool(&[("systemd-analyze", &["--version"])], install)
}

/// The unit in `systemd/` as shipped, verified with its binary path pointing at this build
/// (`verify` checks that `ExecStart=` names an executable; the real path is
/// `/usr/local/bin/comfy-gate`, which a test machine does not have).
#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/comfy-gate.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/comfy-gate run"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("comfy-gate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/comfy-gate", BIN)).unwrap();
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("comfy-gate.service:"),
        "no warning about the unit: {said}"
    );
}

/// Reads notify datagrams until one holds `line`; returns every datagram read.
async fn until_notice(sock: &tokio::net::UnixDatagram, line: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {line} within patience; saw {seen:?}"))
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let hit = msg.lines().any(|l| l == line);
        seen.push(msg);
        if hit {
            return seen;
        }
    }
}

/// The real binary with `NOTIFY_SOCKET` set to a socket of the test's own, as systemd runs a
/// `Type=notify` unit.
#[cfg(unix)]
#[tokio::test]
async fn the_gate_notifies_ready_reloading_ready_and_stopping() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let config = dir.path().join("proxy.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n\
         [[backend]]\nurl = \"{}\"\n",
        dir.path().join("state").display(),
        sim.url()
    );
    std::fs::write(&config, text).unwrap();
    let mut child = gate_binary(BIN, &config)
        .env("NOTIFY_SOCKET", &notify_path)
        // systemd's watchdog of 2 s: a WATCHDOG=1 every second.
        .env("WATCHDOG_USEC", "2000000")
        .spawn()
        .unwrap();
    let ready = until_notice(&sock, "READY=1").await;
    assert!(ready.iter().all(|m| !m.contains("STOPPING=1")), "{ready:?}");
    // Ready means serving: the first stdout line (the addresses) is out, and they answer.
    let base = listening_urls(&mut child).await.remove(0);
    assert_eq!(get_json(&base, "/queue").await.0, 200);
    until_notice(&sock, "WATCHDOG=1").await;

    signal(&child, "HUP");
    let reloading = until_notice(&sock, "RELOADING=1").await;
    let notice = reloading.last().unwrap();
    assert!(
        notice.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 carries MONOTONIC_USEC: {notice:?}"
    );
    let after = until_notice(&sock, "READY=1").await;
    assert!(
        after
            .last()
            .unwrap()
            .contains("STATUS=serving; configuration reloaded"),
        "{after:?}"
    );

    signal(&child, "TERM");
    until_notice(&sock, "STOPPING=1").await;
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("it exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
