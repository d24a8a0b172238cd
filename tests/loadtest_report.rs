//! `comfy-gate loadtest --report FILE.html`: a real run through the gate over three sims, its
//! page checked as text (self-contained: nothing to fetch) and as a browser shows it (each
//! chart drawn with one mark per non-empty bucket or backend, the per-backend share equal to what
//! each sim says it ran). The browser part skips where Chromium is missing (fails on CI).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::browser::Browser;
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_comfy-gate");

/// Each chart as the browser sees it: marks in its svg, its title, axis labels and table rows.
const CHARTS_JS: &str = r#"
const out = {};
for (const id of ["latency", "throughput", "backends"]) {
  const s = document.getElementById(id);
  const svg = s && s.querySelector("svg");
  if (!svg) { out[id] = null; continue; }
  out[id] = {
    bars: svg.querySelectorAll("rect.bar").length,
    counted: [...svg.querySelectorAll("rect.bar")].reduce((n, r) => n + Number(r.dataset.count), 0),
    cdf: svg.querySelectorAll("path.cdf").length,
    markers: svg.querySelectorAll(".marker").length,
    labels: svg.querySelectorAll("text.label").length,
    title: (s.querySelector("h2") || {}).textContent || "",
    rows: [...s.querySelectorAll("tbody tr")].map(tr => [...tr.cells].map(c => c.textContent)),
    width: svg.getBoundingClientRect().width,
  };
}
return out;
"#;

/// Whether the page could load anything from elsewhere (a script, style, image or frame).
fn outside_references(page: &str) -> Vec<String> {
    let patterns = [
        r#"(?i)<script[^>]*\bsrc\s*="#,
        r#"(?i)\b(src|href|action|srcset)\s*=\s*["']?\s*(https?:)?//"#,
        r#"(?i)<link\b"#,
        r#"(?i)@import"#,
        r#"(?i)url\(\s*["']?\s*(https?:)?//"#,
        r#"(?i)<(iframe|img|object|embed)\b"#,
    ];
    patterns
        .iter()
        .flat_map(|p| {
            regex::Regex::new(p)
                .unwrap()
                .find_iter(page)
                .collect::<Vec<_>>()
        })
        .map(|m| m.as_str().to_string())
        .collect()
}

/// Column `col` of `rows` as numbers.
fn column(rows: &Value, col: usize) -> Vec<u64> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r[col].as_str().unwrap().trim().parse().unwrap())
        .collect()
}

/// The backends' names and how many prompts each sim finished, by name (from the gate's
/// `/admin/backends`, matched to the sims by URL).
async fn ran_per_backend(admin: &str, sims: &[&comfy_sim::SimHandle]) -> BTreeMap<String, u64> {
    let (_, b) = get_json(admin, "/admin/backends").await;
    let mut out = BTreeMap::new();
    for backend in b["backends"].as_array().expect("backends") {
        let url = backend["url"].as_str().unwrap().trim_end_matches('/');
        let sim = sims
            .iter()
            .find(|s| s.url().trim_end_matches('/') == url)
            .unwrap_or_else(|| panic!("no sim at {url}"));
        let finished = sim.counters().prompts_finished;
        if finished > 0 {
            let name = backend["name"].as_str().unwrap().to_string();
            out.insert(name, finished);
        }
    }
    out
}

#[test]
fn html_report_of_a_run_through_the_gate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b, c) = rt.block_on(async { (sim().await, sim().await, sim().await) });
    let gate = rt.block_on(gate(&[&a, &b, &c]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.html");
    let out = std::process::Command::new(BIN)
        .args(["loadtest", "--url", &format!("http://{}", gate.addr)])
        .args(["--admin-url", &format!("http://{}", gate.admin_addr)])
        .args(["--users", "6", "--requests-per-user", "5", "--vary", "seed"])
        .args(["--json", "--report"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let counts = (summary["total"].as_u64(), summary["succeeded"].as_u64());
    assert_eq!(counts, (Some(30), Some(30)), "{summary}");

    // What each sim ran is what the JSON and the page say each backend ran.
    let admin = format!("http://{}", gate.admin_addr);
    let ran = rt.block_on(ran_per_backend(&admin, &[&a, &b, &c]));
    assert_eq!(ran.values().sum::<u64>(), 30, "{ran:?}");
    let reported: BTreeMap<String, u64> =
        serde_json::from_value(summary["backends"].clone()).expect("backends in the JSON");
    assert_eq!(reported, ran);

    let page = std::fs::read_to_string(&path).expect("the report file");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert_eq!(outside_references(&page), Vec::<String>::new());
    for id in ["latency", "throughput", "backends"] {
        assert!(page.contains(&format!("id=\"{id}\"")), "no #{id}");
    }

    let Some(browser) = rt.block_on(Browser::start()) else {
        return;
    };
    let charts = rt.block_on(async {
        browser.goto(&format!("file://{}", path.display())).await;
        browser.wait_for("#backends svg", PATIENCE).await;
        let charts = browser.execute(CHARTS_JS, vec![]).await;
        browser.screenshot(&dir.path().join("report.png")).await;
        browser.close().await;
        charts
    });
    let png = std::fs::read(dir.path().join("report.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    check_charts(&charts, &ran);
}

/// The three charts drawn from the data: each a titled, labelled svg laid out on the page, with
/// one bar per non-empty row of its table.
fn check_charts(charts: &Value, ran: &BTreeMap<String, u64>) {
    for id in ["latency", "throughput", "backends"] {
        let chart = &charts[id];
        assert!(chart.is_object(), "#{id} has no svg: {charts}");
        assert!(!chart["title"].as_str().unwrap().is_empty(), "#{id} title");
        assert!(
            chart["width"].as_f64().unwrap() > 200.0,
            "#{id} is laid out"
        );
        assert!(chart["labels"].as_u64().unwrap() >= 1, "#{id} axis labels");
    }
    // Latency: a bar per non-empty bin, 30 prompts in all, the CDF and p50/p95/p99.
    let latency = &charts["latency"];
    let counts = column(&latency["rows"], 2);
    assert_eq!(counts.iter().sum::<u64>(), 30, "{latency}");
    let nonempty = counts.iter().filter(|n| **n > 0).count() as u64;
    assert_eq!(latency["bars"], json!(nonempty), "{latency}");
    assert_eq!(latency["counted"], json!(30), "{latency}");
    assert_eq!(
        (latency["cdf"].as_u64(), latency["markers"].as_u64()),
        (Some(1), Some(3))
    );
    assert!(latency["labels"].as_u64().unwrap() >= 2, "x and y labelled");
    // Throughput: a bar per bucket in which prompts succeeded.
    let throughput = &charts["throughput"];
    let ok = column(&throughput["rows"], 2);
    assert_eq!(ok.iter().sum::<u64>(), 30, "{throughput}");
    let nonempty = ok.iter().filter(|n| **n > 0).count() as u64;
    assert!(nonempty >= 1);
    assert_eq!(throughput["bars"], json!(nonempty), "{throughput}");
    assert!(
        throughput["labels"].as_u64().unwrap() >= 2,
        "x and y labelled"
    );
    // Backends: a row and a bar for each backend that ran prompts, with what its sim ran.
    let backends = &charts["backends"];
    let rows = backends["rows"].as_array().unwrap();
    let shown: BTreeMap<String, u64> = rows
        .iter()
        .map(|r| {
            let n = r[1].as_str().unwrap().parse().unwrap();
            (r[0].as_str().unwrap().to_string(), n)
        })
        .collect();
    assert_eq!(&shown, ran, "{backends}");
    assert_eq!(backends["bars"], json!(ran.len()), "{backends}");
    assert_eq!(backends["counted"], json!(30), "{backends}");
}

#[test]
fn an_unwritable_report_fails_before_any_load() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(sim());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("run.html");
    let out = std::process::Command::new(BIN)
        .args(["loadtest", "--url", &sim.url(), "--report"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("run.html"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(sim.counters().prompts_accepted, 0, "no load was sent");
}

#[test]
fn a_run_that_cannot_start_leaves_no_report() {
    // The target answers, the admin URL does not: nothing is sent, nothing is left behind.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(sim());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.html");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(BIN)
        .args(["loadtest", "--url", &sim.url(), "--report"])
        .arg(&path)
        .args(["--admin-url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("/admin/decisions") && err.contains("--admin-url"),
        "{err}"
    );
    assert!(!path.exists(), "an empty report was left behind");
    assert_eq!(sim.counters().prompts_accepted, 0, "no load was sent");
}

/// A smaller run through the library without the admin URL: the page says why the backends are
/// unknown and shows the share by outcome.
#[tokio::test]
async fn without_the_admin_url_the_share_is_by_outcome() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let options = comfy_gate::loadtest::Options {
        users: 2,
        requests_per_user: Some(2),
        timeout: Duration::from_secs(60),
        ..comfy_gate::loadtest::Options::new(&format!("http://{}", gate.addr))
    };
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        comfy_gate::loadtest::LoadTest::new(options).run(),
    )
    .await
    .expect("the load test ends")
    .expect("the load test runs");
    assert!(report.backends.is_empty());
    assert_eq!(report.outcomes.len(), 4);
    let page = report.to_html();
    assert!(page.contains("Prompts by outcome") && page.contains("--admin-url"));
    assert_eq!(outside_references(&page), Vec::<String>::new());
}
