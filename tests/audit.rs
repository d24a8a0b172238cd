//! Issue 13, the audit log and `/admin/usage`: one JSON line per prompt that ended, with who,
//! where, how long it waited and ran, what it cost and what it made; `GET /admin/usage` sums
//! the GPU-seconds of those lines per tenant; the file is reopened by name on `SIGUSR1`
//! (logrotate), and the usage survives a restart.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_sim::Fault;
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

/// Every field of a line, in order.
const FIELDS: [&str; 15] = [
    "time",
    "prompt_id",
    "user",
    "tenant",
    "client",
    "backend",
    "gpu",
    "gpus",
    "queue_wait_s",
    "run_s",
    "gpu_seconds",
    "outcome",
    "error",
    "outputs",
    "output_bytes",
];

/// The lines of the audit log at `path`, once it has `n` (within PATIENCE).
async fn lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        if lines.len() >= n {
            assert_eq!(lines.len(), n, "one line per prompt: {text}");
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

fn line_of<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    let mine: Vec<&Value> = lines.iter().filter(|l| l["prompt_id"] == id).collect();
    assert_eq!(mine.len(), 1, "one line for {id}: {lines:?}");
    mine[0]
}

/// Seconds from `execution_start` to the terminal message, by the backend's timestamps.
fn history_run_s(h: &Value) -> f64 {
    let messages = h["status"]["messages"].as_array().expect("messages");
    let at = |kinds: &[&str]| {
        messages
            .iter()
            .find(|m| kinds.contains(&m[0].as_str().unwrap_or("")))
            .and_then(|m| m[1]["timestamp"].as_i64())
            .unwrap_or_else(|| panic!("{kinds:?} in {h}"))
    };
    let start = at(&["execution_start"]);
    let end = at(&[
        "execution_success",
        "execution_error",
        "execution_interrupted",
    ]);
    (end - start) as f64 / 1000.0
}

async fn submit(base: &str, id: &str, graph: Value) {
    let body = json!({"prompt": graph, "prompt_id": id, "client_id": "c"});
    let (code, answer) = post_json(base, "/prompt", &body).await;
    assert_eq!(code, 200, "{id}: {answer}");
}

async fn usage(admin: &str, query: &str) -> (u16, Value) {
    get_json(admin, &format!("/admin/usage{query}")).await
}

fn audit_path(dir: &Path) -> PathBuf {
    dir.join("audit.log")
}

/// A gate over `sims` writing its audit log into a fresh folder (kept alive by the returned
/// guard), `tweak` applied after; the gate, the log's path and the guard.
async fn gate_with_audit(
    sims: &[&comfy_sim::SimHandle],
    tweak: impl FnOnce(&mut comfy_gate::config::FileConfig),
) -> (comfy_gate::GateHandle, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = audit_path(dir.path());
    let to = log.display().to_string();
    let gate = gate_with(sims, move |f| {
        f.audit.log = Some(to);
        tweak(f);
    })
    .await;
    (gate, log, dir)
}

/// A known workload on one backend with one slot: two successes, an error (out of memory, no
/// larger card), one interrupted, one deleted while it waited. One line each, with every field
/// and what the gate knows of it; `/admin/usage` sums their GPU-seconds, which are their run
/// times, which are the runs the history entries time.
#[tokio::test]
async fn one_line_per_prompt_that_ended_and_usage_sums_their_run_times() {
    let sim = sim().await;
    let (gate, log, _dir) =
        gate_with_audit(&[&sim], |f| f.backends[0].max_inflight = Some(1)).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let mut ws = Ws::connect(&base, Some("c")).await;

    submit(&base, "ok-1", steps(1, 500)).await;
    ws.until_done("ok-1").await;
    submit(&base, "ok-2", blur_graph(7)).await;
    ws.until_done("ok-2").await;
    sim.inject(Fault::OomNext);
    submit(&base, "oom", steps(3, 300)).await;
    ws.until_done("oom").await;
    submit(&base, "busy", steps(4, 10_000)).await;
    loop {
        let f = ws.next().await.expect("open");
        if f.kind() == "progress" && f.data()["prompt_id"] == "busy" {
            break;
        }
    }
    submit(&base, "gone", blur_graph(8)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, _) = post_json(&base, "/queue", &json!({"delete": ["gone"]})).await;
    assert_eq!(code, 200);
    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    ws.until_done("busy").await;

    let lines = lines(&log, 5).await;
    let device = get_json(&sim.url(), "/system_stats").await.1["devices"][0]["name"].clone();
    let backend = sim.addr().to_string();
    for l in &lines {
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, FIELDS, "{l}");
        let time = l["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.len() == 24, "{time}");
        assert_eq!(
            (&l["user"], &l["tenant"], &l["client"]),
            (&Value::Null, &json!("ip:127.0.0.1"), &json!("127.0.0.1")),
            "{l}"
        );
        let gpu_seconds = l["gpu_seconds"].as_f64().unwrap();
        let run_s = l["run_s"].as_f64().unwrap();
        assert_eq!(gpu_seconds, run_s * l["gpus"].as_f64().unwrap(), "{l}");
        assert!(l["queue_wait_s"].as_f64().unwrap() >= 0.0, "{l}");
    }
    let outcomes: Vec<(&str, &str)> = ["ok-1", "ok-2", "oom", "busy", "gone"]
        .iter()
        .map(|id| (*id, line_of(&lines, id)["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("ok-1", "success"),
            ("ok-2", "success"),
            ("oom", "error"),
            ("busy", "interrupted"),
            ("gone", "deleted"),
        ]
    );
    let oom = line_of(&lines, "oom");
    assert!(
        oom["error"].as_str().unwrap().contains("OutOfMemory"),
        "{oom}"
    );

    let mut history_sum = 0.0;
    for id in ["ok-1", "ok-2", "oom", "busy"] {
        let l = line_of(&lines, id);
        assert_eq!(l["backend"], json!(backend), "{l}");
        assert_eq!(l["gpu"], json!({"name": device, "uuid": null}), "{l}");
        assert_eq!(l["gpus"], 1, "{l}");
        let h = wait_history(&base, id).await;
        let seen = history_run_s(&h);
        history_sum += seen;
        let charged = l["run_s"].as_f64().unwrap();
        assert!(
            (charged - seen).abs() < 0.15,
            "{id}: the gate timed {charged} s, the backend {seen} s"
        );
        // Every output file is counted, with its size as `/view` serves it.
        let mut expected = (0, 0);
        for out in h["outputs"].as_object().unwrap().values() {
            for item in out["images"].as_array().into_iter().flatten() {
                let q = [
                    ("filename", item["filename"].as_str().unwrap()),
                    ("subfolder", item["subfolder"].as_str().unwrap_or("")),
                    ("type", item["type"].as_str().unwrap()),
                ];
                let (code, bytes) = common::files::view_bytes(&base, &q).await;
                assert_eq!(code, 200);
                expected = (expected.0 + 1, expected.1 + bytes.len() as u64);
            }
        }
        assert_eq!(
            (l["outputs"].as_u64().unwrap(), l["output_bytes"].as_u64()),
            (expected.0, Some(expected.1)),
            "{l}"
        );
    }
    assert!(line_of(&lines, "ok-1")["output_bytes"].as_u64().unwrap() > 0);
    assert!(line_of(&lines, "busy")["run_s"].as_f64().unwrap() > 0.0);
    let gone = line_of(&lines, "gone");
    assert_eq!(
        (
            &gone["backend"],
            &gone["gpu"],
            &gone["gpus"],
            &gone["run_s"],
            &gone["outputs"]
        ),
        (
            &Value::Null,
            &Value::Null,
            &json!(0),
            &json!(0.0),
            &json!(0)
        ),
        "{gone}"
    );
    assert!(gone["queue_wait_s"].as_f64().unwrap() >= 0.2, "{gone}");

    let lines_sum: f64 = lines
        .iter()
        .map(|l| l["gpu_seconds"].as_f64().unwrap())
        .sum();
    let (code, all) = usage(&admin, "").await;
    assert_eq!(code, 200, "{all}");
    let users = all["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{all}");
    let me = &users[0];
    assert_eq!(
        (&me["tenant"], &me["user"]),
        (&json!("ip:127.0.0.1"), &Value::Null)
    );
    let summed = me["gpu_seconds"].as_f64().unwrap();
    assert!((summed - lines_sum).abs() < 1e-6, "{summed} vs {lines_sum}");
    assert!(
        (summed - history_sum).abs() < 0.3,
        "{summed} vs the histories' {history_sum}"
    );
    assert_eq!(me["prompts"], 5);
    assert_eq!(
        me["outcomes"],
        json!({"deleted": 1, "error": 1, "interrupted": 1, "success": 2})
    );
    assert_eq!(all["total"]["gpu_seconds"], me["gpu_seconds"]);

    // Filters: the tenant key, an unknown user, `since` as RFC 3339 and unix seconds.
    let (_, mine) = usage(&admin, "?user=ip:127.0.0.1").await;
    assert_eq!(mine["users"], all["users"]);
    let (_, nobody) = usage(&admin, "?user=nobody").await;
    assert_eq!(nobody["users"], json!([]));
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (_, recent) = usage(&admin, &format!("?since={}", now_s - 7200)).await;
    assert_eq!(recent["users"], all["users"], "{recent}");
    let (_, later) = usage(&admin, &format!("?since={}", now_s + 7200)).await;
    assert_eq!(later["users"], json!([]), "{later}");
    let (_, rfc) = usage(&admin, "?since=2020-01-01T00:00:00%2B02:00").await;
    assert_eq!(rfc["users"], all["users"], "{rfc}");
    assert_eq!(rfc["from"], "2019-12-31T22:00:00.000Z", "{rfc}");
    let (code, bad) = usage(&admin, "?since=yesterday").await;
    assert_eq!(code, 400, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("since"), "{bad}");
    gate.shutdown().await;
}

/// A reopen (what `SIGUSR1` asks) after the file was renamed: the next line starts a new file
/// under the configured name; the renamed one keeps the lines before.
#[tokio::test]
async fn a_reopened_log_starts_a_new_file_after_a_rename() {
    let sim = sim().await;
    let (gate, log, dir) = gate_with_audit(&[&sim], |_| {}).await;
    let base = gate.url();
    submit(&base, "before", blur_graph(1)).await;
    wait_history(&base, "before").await;
    assert_eq!(lines(&log, 1).await[0]["prompt_id"], "before");
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gate.reopen_audit_log();
    submit(&base, "after", blur_graph(2)).await;
    wait_history(&base, "after").await;
    assert_eq!(lines(&log, 1).await[0]["prompt_id"], "after");
    assert_eq!(lines(&rotated, 1).await[0]["prompt_id"], "before");
    gate.shutdown().await;
}

/// The usage ledger is in the state store: a restart on the same state directory answers the
/// same sums.
#[tokio::test]
async fn usage_survives_a_restart() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let backends = [&sim];
    let start = || {
        let state = state.clone();
        gate_with(&backends, move |f| f.server.state_dir = Some(state))
    };
    let gate = start().await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("c")).await;
    // The client hears a prompt ended once it is charged.
    submit(&base, "one", steps(1, 200)).await;
    ws.until_done("one").await;
    submit(&base, "two", blur_graph(2)).await;
    ws.until_done("two").await;
    let admin = format!("http://{}", gate.admin_addr);
    let before = usage(&admin, "").await.1;
    assert_eq!(before["total"]["prompts"], 2, "{before}");
    assert!(before["total"]["gpu_seconds"].as_f64().unwrap() > 0.0);
    gate.shutdown().await;

    let gate = start().await;
    let admin = format!("http://{}", gate.admin_addr);
    let after = usage(&admin, "").await.1;
    assert_eq!(after["users"], before["users"]);
    gate.shutdown().await;
}

/// The real binary: `SIGUSR1` reopens the file by name (logrotate's `postrotate`).
#[cfg(unix)]
#[tokio::test]
async fn sigusr1_reopens_the_log_of_the_running_binary() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let log = audit_path(dir.path());
    let config = dir.path().join("proxy.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\n\
         [health]\ninterval_ms = 100\ntimeout_ms = 500\n\n[audit]\nlog = \"{}\"\n\n\
         [[backend]]\nurl = \"{}\"\n",
        dir.path().join("state").display(),
        log.display(),
        sim.url()
    );
    std::fs::write(&config, text).unwrap();
    let mut child = gate_binary(BIN, &config).spawn().unwrap();
    let base = listening_urls(&mut child).await.remove(0);
    submit(&base, "before", blur_graph(1)).await;
    wait_history(&base, "before").await;
    lines(&log, 1).await;
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(&child, "USR1");
    // The signal is handled on the gate's runtime: give it a moment before the next line.
    tokio::time::sleep(Duration::from_millis(200)).await;
    submit(&base, "after", blur_graph(2)).await;
    wait_history(&base, "after").await;
    assert_eq!(lines(&log, 1).await[0]["prompt_id"], "after");
    assert_eq!(lines(&rotated, 1).await[0]["prompt_id"], "before");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGUSR1 does not stop it"
    );
    child.kill().await.unwrap();
}

/// With auth on, each line names the user who submitted the prompt and `/admin/usage?user=`
/// sums that user's GPU-seconds alone, the sum of their lines' run times.
#[tokio::test]
async fn with_auth_each_line_and_sum_is_the_users() {
    let sim = sim().await;
    let (gate, log, _dir) = gate_with_audit(&[&sim], |f| {
        with_users(f, &[("alice", ""), ("bob", "")], "");
    })
    .await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    for (who, id, n) in [
        ("alice", "a1", 400),
        ("alice", "a2", 200),
        ("bob", "b1", 300),
    ] {
        let body = json!({"prompt": steps(1, n), "prompt_id": id});
        assert_eq!(post_as(who, &base, "/prompt", &body).await.0, 200);
    }
    for (who, id) in [("alice", "a1"), ("alice", "a2"), ("bob", "b1")] {
        history_as(who, &base, id).await;
    }
    let lines = lines(&log, 3).await;
    for (id, user) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")] {
        let l = line_of(&lines, id);
        assert_eq!(
            (&l["user"], &l["tenant"]),
            (&json!(user), &json!(format!("user:{user}")))
        );
        assert_eq!(l["client"], "127.0.0.1");
    }
    let run_s = |ids: &[&str]| {
        ids.iter()
            .map(|id| line_of(&lines, id)["run_s"].as_f64().unwrap())
            .sum::<f64>()
    };
    let (_, alice) = usage(&admin, "?user=alice").await;
    let (_, bob) = usage(&admin, "?user=bob").await;
    let gpu_s = |v: &Value| v["total"]["gpu_seconds"].as_f64().unwrap();
    assert!(
        (gpu_s(&alice) - run_s(&["a1", "a2"])).abs() < 0.0015,
        "{alice}"
    );
    assert!((gpu_s(&bob) - run_s(&["b1"])).abs() < 0.0015, "{bob}");
    assert_eq!(alice["users"][0]["prompts"], 2);
    gate.shutdown().await;
}

/// Behind a trusted proxy the line names the client the proxy names; from a peer that is not
/// trusted, the header changes nothing.
#[tokio::test]
async fn behind_a_trusted_proxy_the_line_names_the_real_client() {
    let sim = sim().await;
    let (gate, log, _dir) = gate_with_audit(&[&sim], |f| {
        f.edge.trusted_proxies = vec![toml::Spanned::new(0..0, "127.0.0.1".to_string())];
    })
    .await;
    let base = gate.url();
    for (client, id) in [
        (http(), "via-proxy"),
        (http_from([127, 0, 0, 5]), "spoofed"),
    ] {
        let body = json!({"prompt": blur_graph(1), "prompt_id": id});
        let resp = client
            .post(format!("{base}/prompt"))
            .header("x-forwarded-for", "203.0.113.7")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        wait_history(&base, id).await;
    }
    let lines = lines(&log, 2).await;
    let proxied = line_of(&lines, "via-proxy");
    assert_eq!(
        (&proxied["client"], &proxied["tenant"]),
        (&json!("203.0.113.7"), &json!("ip:203.0.113.7"))
    );
    let spoofed = line_of(&lines, "spoofed");
    assert_eq!(
        (&spoofed["client"], &spoofed["tenant"]),
        (&json!("127.0.0.5"), &json!("ip:127.0.0.5"))
    );
    gate.shutdown().await;
}
