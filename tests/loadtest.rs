//! `comfy-gate loadtest`: the engine against the gate and a sim, its error kinds, the socket
//! fallback to `/history` polling, and the CLI's JSON output and start-up errors. Counts only,
//! never timings.

mod common;

use std::time::Duration;

use comfy_gate::loadtest::{LoadTest, Options, Percentiles, Report};
use comfy_sim::faults::Fault;
use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

fn options(url: &str, users: usize, requests: u64) -> Options {
    Options {
        users,
        requests_per_user: Some(requests),
        vary_seed: true,
        timeout: Duration::from_secs(60),
        ..Options::new(url)
    }
}

async fn run(options: Options) -> Report {
    tokio::time::timeout(Duration::from_secs(120), LoadTest::new(options).run())
        .await
        .expect("the load test ends")
        .expect("the load test runs")
}

fn ordered(p: &Option<Percentiles>) {
    let p = p.as_ref().expect("percentiles present");
    assert!(p.p50 <= p.p95 && p.p95 <= p.p99, "{p:?}");
}

#[tokio::test]
async fn all_prompts_succeed_through_the_gate() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let report = run(options(&format!("http://{}", gate.addr), 4, 3)).await;
    assert_eq!(report.total, 12, "{report}");
    assert_eq!(report.succeeded, 12, "{report}");
    assert_eq!((report.failed, report.timed_out), (0, 0), "{report}");
    assert!(report.errors.is_empty(), "{report}");
    ordered(&report.queue_wait_s);
    ordered(&report.run_time_s);
    ordered(&report.latency_s);
    assert_eq!(report.latency_s.as_ref().unwrap().samples, 12);
}

#[tokio::test]
async fn open_loop_arrivals_through_the_gate() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let url = format!("http://{}", gate.addr);
    // A fixed number of arrivals at a Poisson rate, shared by two client sockets.
    let report = run(Options {
        rate: Some(40.0),
        ..options(&url, 2, 3)
    })
    .await;
    assert_eq!((report.total, report.succeeded), (6, 6), "{report}");
    // Arrivals until the duration is over: however many came, every one ends well.
    let report = run(Options {
        rate: Some(20.0),
        requests_per_user: None,
        duration: Some(Duration::from_millis(800)),
        ..options(&url, 2, 1)
    })
    .await;
    assert!(report.total > 0, "{report}");
    assert_eq!(report.succeeded, report.total, "{report}");
    assert_eq!((report.failed, report.timed_out), (0, 0), "{report}");
}

#[tokio::test]
async fn validation_failures_are_counted_by_kind() {
    let sim = sim().await;
    let mut graph = txt2img(1, "no-such-checkpoint.safetensors");
    graph["3"]["inputs"]["seed"] = 1.into();
    let report = run(Options {
        workflow: graph,
        ..options(&sim.url(), 2, 2)
    })
    .await;
    assert_eq!(report.total, 4, "{report}");
    assert_eq!(report.failed, report.total, "{report}");
    assert_eq!(
        report.errors.get("prompt_outputs_failed_validation"),
        Some(&4),
        "{report}"
    );
    assert!(report.latency_s.is_none());
}

#[tokio::test]
async fn execution_errors_are_counted_by_exception_type() {
    let sim = sim().await;
    sim.inject(Fault::OomNext);
    let report = run(options(&sim.url(), 1, 2)).await;
    assert_eq!((report.total, report.succeeded, report.failed), (2, 1, 1));
    assert_eq!(
        report.errors.get("torch.OutOfMemoryError"),
        Some(&1),
        "{report}"
    );
}

#[tokio::test]
async fn dropped_sockets_fall_back_to_polling_history() {
    let sim = sim().await;
    let opts = options(&sim.url(), 2, 4);
    let load = tokio::spawn(LoadTest::new(opts).run());
    tokio::time::sleep(Duration::from_millis(150)).await;
    sim.inject(Fault::DropWebsockets);
    let report = tokio::time::timeout(Duration::from_secs(120), load)
        .await
        .expect("the load test ends")
        .unwrap()
        .expect("the load test runs");
    assert_eq!((report.total, report.succeeded), (8, 8), "{report}");
}

#[test]
fn cli_prints_json() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(sim());
    let out = std::process::Command::new(BIN)
        .args(["loadtest", "--url", &sim.url(), "--users", "3"])
        .args(["--requests-per-user", "2", "--vary", "seed", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["total"], 6);
    assert_eq!(report["succeeded"], 6);
    assert_eq!(report["failed"], 0);
    assert!(report["latency_s"]["p99"].is_number());
}

fn assert_one_line_failure(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn cli_rejects_a_refused_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(BIN)
        .args(["loadtest", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_one_line_failure(&out, "cannot reach");
}

#[test]
fn cli_rejects_invalid_workflows() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(sim());
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("missing.json", None),
        ("broken.json", Some("{\"3\": ")),
        ("list.json", Some("[1, 2, 3]")),
        ("notnodes.json", Some("{\"3\": 5}")),
    ];
    for (name, text) in cases {
        let path = dir.path().join(name);
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        let out = std::process::Command::new(BIN)
            .args(["loadtest", "--url", &sim.url(), "--workflow"])
            .arg(&path)
            .output()
            .unwrap();
        assert_one_line_failure(&out, name);
    }
    // Nothing reached the sim's queue.
    assert_eq!(sim.counters().prompts_accepted, 0);
}

#[test]
fn cli_accepts_a_prompt_body_file() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(sim());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body.json");
    let body = serde_json::json!({ "prompt": blur_graph(0xff0000), "client_id": "x" });
    std::fs::write(&path, body.to_string()).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["loadtest", "--url", &sim.url(), "--json", "--workflow"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["total"].as_u64(), report["succeeded"].as_u64()),
        (Some(1), Some(1))
    );
}
