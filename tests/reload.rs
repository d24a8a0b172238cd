//! Issue 14, hot reload: `SIGHUP`, `comfy-gate reload` and `POST /admin/reload` put a new
//! configuration in force without dropping a client, a WebSocket, or a queued or running
//! prompt; a file that fails validation changes nothing and says file, line and field.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

/// A `proxy.toml` with listeners on port 0, fast probes, `state` under `dir`, `more` verbatim,
/// and one `[[backend]]` per `(name, url)`.
fn config_text(dir: &Path, more: &str, backends: &[(&str, String)]) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n\
         [health]\ninterval_ms = 100\ntimeout_ms = 500\n\n{more}\n",
        dir.join("state").display(),
    );
    for (name, url) in backends {
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\nurl = \"{url}\"\n\n"
        ));
    }
    text
}

async fn post_reload(admin: &str) -> (u16, Value) {
    send_for_json(http().post(format!("{admin}/admin/reload"))).await
}

/// The backends the admin API lists, by name, with their state word.
async fn listed(admin: &str) -> Vec<(String, String)> {
    let (_, v) = get_json(admin, "/admin/backends").await;
    v["backends"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("?").to_string(),
                b["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// Prompt ids a sim has in its history (ran there, any outcome).
async fn ran_on(sim: &comfy_sim::SimHandle) -> HashSet<String> {
    let (_, h) = get_json(&sim.url(), "/history").await;
    h.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Prompt ids a sim holds in its queue (running or pending).
async fn held_by(sim: &comfy_sim::SimHandle) -> HashSet<String> {
    let (_, q) = get_json(&sim.url(), "/queue").await;
    queue_ids(&q).into_iter().collect()
}

/// Waits until `check` holds, polling (never a timing assertion: PATIENCE bounds a hang).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The scenario of the issue: 100 WebSocket clients connected and 50 prompts waiting; a
/// `SIGHUP` to the real binary swaps backend `b` for `c`. Every client stays connected, all 50
/// prompts complete, `b` finishes the prompt it was running, gives back the one waiting in its
/// queue and gets nothing new, `c` takes work, and `b` leaves the admin listing once it holds
/// nothing. (`b` is five times slower, so its running prompt is still running when the signal
/// lands, and the one behind it cannot have started.)
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_adds_a_backend_and_retires_another_dropping_nothing() {
    let (a, b, c) = (sim().await, sim().await, sim().await);
    b.inject(comfy_sim::Fault::Slow { factor: 5.0 });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let fleet_ab = [("a", a.url()), ("b", b.url())];
    std::fs::write(&path, config_text(dir.path(), "", &fleet_ab)).unwrap();
    let mut child = gate_binary(BIN, &path).spawn().unwrap();
    let urls = listening_urls(&mut child).await;
    let (base, admin) = (urls[0].clone(), urls[1].clone());
    until("both backends up", || async {
        listed(&admin)
            .await
            .iter()
            .filter(|(_, s)| s == "up")
            .count()
            == 2
    })
    .await;

    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(Ws::connect(&base, Some(&format!("client-{i}"))).await);
    }
    let mut ids = Vec::new();
    for i in 0..50u64 {
        let body = json!({ "prompt": steps(i, 1000), "client_id": format!("client-{i}") });
        let (code, v) = post_json(&base, "/prompt", &body).await;
        assert_eq!(code, 200, "{v}");
        ids.push(v["prompt_id"].as_str().unwrap().to_string());
    }
    // `b` runs one of them, and holds one more in its queue, when the reload comes.
    until("b runs one prompt and holds another", || async {
        let (_, q) = get_json(&b.url(), "/queue").await;
        q["queue_running"].as_array().is_some_and(|r| r.len() == 1)
            && q["queue_pending"].as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    let (_, queue) = get_json(&b.url(), "/queue").await;
    let pending_then = queue_ids(&json!({ "queue_pending": queue["queue_pending"] }));
    let waiting_at_gate = queued(&base).await.len();
    assert!(
        waiting_at_gate >= 10,
        "a backlog waits at the gate: {waiting_at_gate}"
    );

    let fleet_ac = [("a", a.url()), ("c", c.url())];
    std::fs::write(&path, config_text(dir.path(), "", &fleet_ac)).unwrap();
    signal(&child, "HUP");
    until("b retires", || async {
        !listed(&admin)
            .await
            .iter()
            .any(|(n, s)| n == "b" && s != "retiring")
    })
    .await;
    // Everything b ever got is in its history or its queue now.
    let (_, queue) = get_json(&b.url(), "/queue").await;
    let running_then: HashSet<String> =
        queue_ids(&json!({ "queue_running": queue["queue_running"] }))
            .into_iter()
            .collect();
    let mut b_then = ran_on(&b).await;
    b_then.extend(held_by(&b).await);

    for (i, id) in ids.iter().enumerate() {
        let entry = wait_history(&base, id).await;
        assert_eq!(
            entry["status"]["status_str"], "success",
            "prompt {i}: {entry}"
        );
    }
    let on_b = ran_on(&b).await;
    assert!(
        pending_then.iter().all(|id| !on_b.contains(id)),
        "the prompt waiting in b's queue went back to the gate and ran elsewhere"
    );
    assert!(
        running_then.is_subset(&on_b),
        "b finished what it was running: {running_then:?} in {on_b:?}"
    );
    assert!(
        on_b.is_subset(&b_then),
        "b got nothing new after the reload: {:?}",
        on_b.difference(&b_then).collect::<Vec<_>>()
    );
    assert!(!ran_on(&c).await.is_empty(), "the added backend took work");
    until("b leaves the listing", || async {
        let names: Vec<String> = listed(&admin).await.into_iter().map(|(n, _)| n).collect();
        names == ["a", "c"]
    })
    .await;

    for (i, ws) in clients.iter_mut().enumerate() {
        loop {
            match ws.next_within(Duration::from_millis(20)).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("client {i} was disconnected"),
                Err(()) => break,
            }
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop it"
    );
    child.kill().await.unwrap();
}

/// The line of `text` that holds `needle` (1-based).
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("in the text")
        + 1
}

/// A file that fails validation changes nothing: the backends stay as they were, and
/// `POST /admin/reload` and `comfy-gate reload` say file, line and field.
#[tokio::test]
async fn a_broken_file_changes_nothing_and_says_file_line_and_field() {
    let (a, b) = (sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let good = config_text(dir.path(), "", &[("a", a.url()), ("b", b.url())]);
    std::fs::write(&path, &good).unwrap();
    let gate = gate_from_file(&path).await;
    let admin = format!("http://{}", gate.admin_addr);
    // Drops `b` (that would retire it) and has a bad value further down.
    let broken = config_text(
        dir.path(),
        "[scheduler]\nmax_inflight = \"two\"\n",
        &[("a", a.url())],
    );
    std::fs::write(&path, &broken).unwrap();
    let line = line_of(&broken, "max_inflight");

    let (code, v) = post_reload(&admin).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["reloaded"], false);
    let error = v["error"].as_str().unwrap();
    let place = format!("{}:{line}: max_inflight: ", path.display());
    assert!(error.contains(&place), "{error} names {place}");

    let out = tokio::process::Command::new(BIN)
        .args(["reload", "--admin", &admin])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&place), "{said}");

    let names: Vec<String> = listed(&admin).await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a", "b"], "nothing changed");
    assert_eq!(gate.config().scheduler.max_inflight, 2);

    // Mended, the same command reloads, and says what changed.
    std::fs::write(
        &path,
        good.replace("interval_ms = 100", "interval_ms = 150"),
    )
    .unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["reload", "--admin", &admin])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("reloaded: "));
    assert_eq!(gate.config().health.interval_ms, 150);
    gate.shutdown().await;
}

/// Users, tokens and limits are in force from the reload on: a user added can sign in, one
/// removed cannot, and a smaller `max_body_bytes` is enforced.
#[tokio::test]
async fn a_reload_puts_new_users_and_limits_in_force() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let users = |names: &[&str], max_body: u64| {
        let mut more = "[auth]\nmode = \"token\"\n\n".to_string();
        for n in names {
            more.push_str(&format!(
                "[[users]]\nname = \"{n}\"\ntoken_sha256 = \"{}\"\n\n",
                token_sha256(&format!("token-of-{n}"))
            ));
        }
        let text = config_text(dir.path(), &more, &[("a", sim.url())]);
        text.replace(
            "[health]",
            &format!("max_body_bytes = {max_body}\n\n[health]"),
        )
    };
    std::fs::write(&path, users(&["alice"], 1 << 20)).unwrap();
    let gate = gate_from_file(&path).await;
    let base = gate.url();
    let as_user = |name: &str| {
        http()
            .get(format!("{base}/queue"))
            .bearer_auth(format!("token-of-{name}"))
    };
    assert_eq!(as_user("alice").send().await.unwrap().status(), 200);
    assert_eq!(as_user("bob").send().await.unwrap().status(), 401);

    std::fs::write(&path, users(&["bob"], 1000)).unwrap();
    let report = gate.reload().await.expect("reloads");
    assert!(
        report.added.is_empty() && report.removed.is_empty(),
        "{report:?}"
    );
    assert_eq!(as_user("alice").send().await.unwrap().status(), 401);
    assert_eq!(as_user("bob").send().await.unwrap().status(), 200);
    let big = http()
        .post(format!("{base}/prompt"))
        .bearer_auth("token-of-bob")
        .body(vec![b' '; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413, "the new max_body_bytes holds");
    gate.shutdown().await;
}

/// A backend keeps its URL while the gate runs: a file giving a known name another URL is
/// refused and changes nothing; a backend retired and named again before it was gone comes
/// back; fields read only at start are reported as needing a restart.
#[tokio::test]
async fn a_known_name_keeps_its_url_and_a_retired_backend_can_come_back() {
    let (a, b, c) = (sim().await, sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        config_text(dir.path(), "", &[("a", a.url()), ("b", b.url())]),
    )
    .unwrap();
    let gate = gate_from_file(&path).await;
    let admin = format!("http://{}", gate.admin_addr);

    let moved = config_text(dir.path(), "", &[("a", a.url()), ("b", c.url())]);
    std::fs::write(&path, &moved).unwrap();
    let err = gate.reload().await.expect_err("refused").to_string();
    let line = line_of(&moved, &c.url());
    let place = format!(
        "{}:{line}: backend[1].url: backend `b` was {}",
        path.display(),
        b.url()
    );
    assert!(err.starts_with(&place), "{err} starts with {place}");
    assert_eq!(gate.config().backends[1].base, b.url());

    // b runs a long prompt (a drained, so it cannot take it), then leaves and comes back.
    let (code, _) = send_for_json(http().post(format!("{admin}/admin/backends/a/drain"))).await;
    assert_eq!(code, 200);
    let (code, v) = post_json(&gate.url(), "/prompt", &json!({ "prompt": steps(1, 5000) })).await;
    assert_eq!(code, 200, "{v}");
    let held = v["prompt_id"].as_str().unwrap().to_string();
    until("b runs it", || async { held_by(&b).await.contains(&held) }).await;
    std::fs::write(&path, config_text(dir.path(), "", &[("a", a.url())])).unwrap();
    let report = gate.reload().await.expect("reloads");
    assert_eq!(report.removed, ["b"]);
    assert!(
        listed(&admin)
            .await
            .contains(&("b".into(), "retiring".into()))
    );
    let more = "[telemetry]\nnvml = false\n";
    std::fs::write(
        &path,
        config_text(dir.path(), more, &[("a", a.url()), ("b", b.url())]),
    )
    .unwrap();
    let report = gate.reload().await.expect("reloads");
    assert_eq!(report.changed, ["b"]);
    assert_eq!(report.restart_needed, ["telemetry"]);
    until("b serves again", || async {
        listed(&admin).await.contains(&("b".into(), "up".into()))
    })
    .await;
    let entry = wait_history(&gate.url(), &held).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert!(ran_on(&b).await.contains(&held), "it ran to its end on b");
    gate.shutdown().await;
}

/// A backend removed while it was down, then started again and named again, comes back in its
/// old entry with new loops: it is probed, takes work and runs it (a stale "down" of the
/// retired entry must not evacuate what the new one runs).
#[tokio::test]
async fn a_backend_removed_while_down_comes_back_when_named_again() {
    let (a, b) = (sim().await, sim().await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let both = config_text(dir.path(), "", &[("a", a.url()), ("b", b.url())]);
    std::fs::write(&path, &both).unwrap();
    let gate = gate_from_file(&path).await;
    let admin = format!("http://{}", gate.admin_addr);
    until("b up", || async {
        listed(&admin).await.contains(&("b".into(), "up".into()))
    })
    .await;

    b.inject(comfy_sim::Fault::Crash {
        restart_after_ms: None,
    });
    until("b down", || async {
        listed(&admin).await.contains(&("b".into(), "down".into()))
    })
    .await;
    let only_a = config_text(dir.path(), "", &[("a", a.url())]);
    std::fs::write(&path, &only_a).unwrap();
    assert_eq!(gate.reload().await.expect("reloads").removed, ["b"]);
    until("b gone", || async {
        listed(&admin).await.iter().all(|(n, _)| n != "b")
    })
    .await;

    b.restart().await.expect("b restarts");
    std::fs::write(&path, &both).unwrap();
    assert_eq!(gate.reload().await.expect("reloads").changed, ["b"]);
    until("b up again", || async {
        listed(&admin).await.contains(&("b".into(), "up".into()))
    })
    .await;
    let (code, _) = send_for_json(http().post(format!("{admin}/admin/backends/a/drain"))).await;
    assert_eq!(code, 200);
    let (code, v) = post_json(&gate.url(), "/prompt", &json!({ "prompt": steps(2, 2000) })).await;
    assert_eq!(code, 200, "{v}");
    let id = v["prompt_id"].as_str().unwrap().to_string();
    let entry = wait_history(&gate.url(), &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert!(ran_on(&b).await.contains(&id), "it ran on b");
    gate.shutdown().await;
}

/// Log settings follow a reload: an access log switched on starts with the next request; a
/// path that cannot be opened keeps the log as it was and is reported (`kept_old`), the rest
/// of the reload in force.
#[tokio::test]
async fn a_reload_switches_the_access_log_and_a_bad_path_keeps_the_old_one() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let backends = [("a", sim.url())];
    std::fs::write(&path, config_text(dir.path(), "", &backends)).unwrap();
    let gate = gate_from_file(&path).await;
    let base = gate.url();
    assert_eq!(get_json(&base, "/queue").await.0, 200);

    let log = dir.path().join("access.log");
    let on = format!(
        "[access_log]\npath = \"{}\"\nformat = \"json\"\n",
        log.display()
    );
    std::fs::write(&path, config_text(dir.path(), &on, &backends)).unwrap();
    let report = gate.reload().await.expect("reloads");
    assert!(report.kept_old.is_empty(), "{report:?}");
    assert_eq!(get_json(&base, "/queue?after=on").await.0, 200);
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("a json line"))
            .collect::<Vec<_>>()
    };
    until("the request is logged", || async { !lines().is_empty() }).await;
    assert_eq!(lines()[0]["request_uri"], "/queue?after=on");

    // A directory is no log file: the old log stays, the reload says so, the rest applies.
    let bad = format!("[access_log]\npath = \"{}\"\n", dir.path().display());
    let text =
        config_text(dir.path(), &bad, &backends).replace("interval_ms = 100", "interval_ms = 120");
    std::fs::write(&path, text).unwrap();
    let report = gate.reload().await.expect("reloads");
    assert_eq!(report.kept_old.len(), 1, "{report:?}");
    assert!(report.kept_old[0].contains("access_log.path"), "{report:?}");
    assert_eq!(gate.config().health.interval_ms, 120);
    assert_eq!(get_json(&base, "/queue?after=bad").await.0, 200);
    until("still logged to the old file", || async {
        lines().len() == 2
    })
    .await;
    gate.shutdown().await;
}
