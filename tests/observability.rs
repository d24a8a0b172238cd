//! Issue 15: what operators see. `/metrics` after a known workload over comfy-sim counts it
//! (prompts by outcome, histogram counts, per-node counts per class, the queue back to 0) and
//! parses as OpenMetrics; every series the deploy files name is there. A prompt moved off a
//! killed backend shows both attempts on its timeline, and the timeline survives a restart.
//! Real gate, comfy-sim backends, real HTTP and WebSocket clients.

mod common;

use std::collections::HashMap;

use comfy_sim::Fault;
use common::metric_names::METRICS;
use common::tools::find_tool;
use common::*;
use serde_json::{Value, json};

/// `/metrics` of the gate whose admin listener is `admin`, checked to parse as OpenMetrics.
async fn scrape(admin: &str) -> String {
    let resp = http()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = resp.text().await.unwrap();
    check_openmetrics(&text);
    text
}

/// The OpenMetrics reference parser: the Prometheus project's Python client
/// (`prometheus_client.openmetrics.parser`, Debian's `python3-prometheus-client`).
const PARSE: &str = "import sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
families = list(text_string_to_metric_families(sys.stdin.read()))\n\
print(len(families))\n";

/// Holds `text` to the OpenMetrics reference parser (which rejects what the spec does: a
/// missing `# EOF`, a counter sample without `_total`, buckets out of order, a bad label).
/// Without the parser: a failure in CI (`.ci/run` installs it), a skip line elsewhere.
fn check_openmetrics(text: &str) {
    use std::io::Write;
    // `python3` on PATH may be another installation than the one Debian's package serves.
    let probe: &[&str] = &["-c", "import prometheus_client.openmetrics.parser"];
    let install = "the OpenMetrics reference parser is missing: install Debian's \
                   python3-prometheus-client (or pip install prometheus-client)";
    let Some(python) = find_tool(&[("python3", probe), ("/usr/bin/python3", probe)], install)
    else {
        return;
    };
    let mut child = std::process::Command::new(python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let families: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        out.status.success() && families > 20,
        "/metrics is not OpenMetrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The samples named `name` as (labels, value); labels as `k="v"` pairs, in order.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name).then(|| {
                let labels = labels
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once("=\"")?;
                        Some((k.to_string(), v.trim_end_matches('"').to_string()))
                    })
                    .collect();
                (labels, value.parse().unwrap())
            })
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include every `(key, value)` of `with`.
fn total(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(l, _)| {
            with.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Acceptance 1: a known workload, then one scrape. Nine prompts: one that runs out of memory
/// (an error), four slow ones that fill every slot, one that waits behind them and is deleted,
/// three quick ones. The per-node counts are held to the `executing` events the client saw.
#[tokio::test]
async fn a_scrape_after_a_known_workload_counts_it() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let mut ws = Ws::connect(&base, Some("watcher")).await;
    ws.next().await;
    let mut graphs: HashMap<String, Value> = HashMap::new();
    let mut submit = |id: &str, graph: Value| {
        graphs.insert(id.to_string(), graph.clone());
        let base = base.clone();
        let id = id.to_string();
        async move {
            let body = json!({"prompt": graph, "client_id": "watcher", "prompt_id": id});
            let (code, answer) = post_json(&base, "/prompt", &body).await;
            assert_eq!(code, 200, "{answer}");
        }
    };
    // Both equal backends fail the next sampling prompt: no larger one to retry it on.
    a.inject(Fault::OomNext);
    b.inject(Fault::OomNext);
    submit("oom", steps(1, 20)).await;
    let mut frames = ws.until_done("oom").await;
    assert_eq!(
        wait_history(&base, "oom").await["status"]["status_str"],
        "error"
    );
    a.inject(Fault::Clear);
    b.inject(Fault::Clear);
    for i in 0..4 {
        submit(&format!("slow{i}"), steps(10 + i, 3000)).await;
    }
    submit("waiter", blur_graph(9)).await;
    assert!(
        queued(&base).await.contains(&"waiter".to_string()),
        "every slot is taken"
    );
    let (code, _) = post_json(&base, "/queue", &json!({"delete": ["waiter"]})).await;
    assert_eq!(code, 200);
    // They end in whatever order their backends finish them.
    let slow: Vec<String> = (0..4).map(|i| format!("slow{i}")).collect();
    frames.extend(until_all_done(&mut ws, &slow).await);
    for i in 0..3 {
        submit(&format!("quick{i}"), blur_graph(i)).await;
        frames.extend(ws.until_done(&format!("quick{i}")).await);
    }
    for id in [
        "slow0", "slow1", "slow2", "slow3", "quick0", "quick1", "quick2",
    ] {
        assert_eq!(
            wait_history(&base, id).await["status"]["status_str"],
            "success",
            "{id}"
        );
    }

    let text = scrape(&admin).await;
    let count = |name: &str, with: &[(&str, &str)]| total(&text, name, with);
    assert_eq!(count("comfy_gate_prompts_submitted_total", &[]), 9.0);
    let finished = "comfy_gate_prompts_finished_total";
    assert_eq!(count(finished, &[("outcome", "success")]), 7.0, "{text}");
    assert_eq!(count(finished, &[("outcome", "error")]), 1.0);
    assert_eq!(count(finished, &[("outcome", "deleted")]), 1.0);
    assert_eq!(count(finished, &[]), 9.0);
    // Every prompt that ran somewhere is in the histograms once; the deleted one is not.
    for h in ["queue_wait", "run", "end_to_end"] {
        let name = format!("comfy_gate_{h}_seconds_count");
        assert_eq!(count(&name, &[]), 8.0, "{name}");
        let inf = format!("comfy_gate_{h}_seconds_bucket");
        assert_eq!(count(&inf, &[("le", "+Inf")]), 8.0, "{inf}");
    }
    // Per node class: one execution per `executing` the client saw, cached nodes apart.
    let mut executed: HashMap<String, f64> = HashMap::new();
    let mut cached = 0.0;
    for f in &frames {
        let (id, data) = (f.data()["prompt_id"].as_str().unwrap_or(""), f.data());
        let class = |node: &str| graphs[id][node]["class_type"].as_str().unwrap().to_string();
        match f.kind().as_str() {
            "executing" if data["node"].is_string() => {
                *executed
                    .entry(class(data["node"].as_str().unwrap()))
                    .or_default() += 1.0;
            }
            "execution_cached" => cached += data["nodes"].as_array().unwrap().len() as f64,
            _ => {}
        }
    }
    assert!(
        executed["KSampler"] >= 5.0 && executed["ImageBlur"] == 3.0,
        "{executed:?}"
    );
    for (class, n) in &executed {
        let got = count(
            "comfy_gate_node_execution_seconds_count",
            &[("class", class)],
        );
        assert_eq!(got, *n, "executions of {class}");
    }
    assert_eq!(count("comfy_gate_nodes_cached_total", &[]), cached);
    assert!(
        count("comfy_gate_checkpoint_loads_total", &[]) >= 1.0,
        "the first run loads one"
    );
    // The queue is back to 0, and no slot is held.
    let depth = samples(&text, "comfy_gate_queue_depth");
    assert!(
        !depth.is_empty() && depth.iter().all(|(_, v)| *v == 0.0),
        "{depth:?}"
    );
    assert_eq!(count("comfy_gate_backend_slots_in_use", &[]), 0.0);
    assert_eq!(count("comfy_gate_backend_up", &[]), 2.0);
    assert!(count("comfy_gate_placement_decisions_total", &[]) >= 8.0);
    let prompts_ok = count(
        "comfy_gate_http_requests_total",
        &[("route", "prompt"), ("code", "200")],
    );
    assert!(prompts_ok >= 9.0, "{prompts_ok}");
    assert_eq!(count("comfy_gate_websocket_clients", &[]), 1.0);
    assert_eq!(count("comfy_gate_build_info", &[]), 1.0);
    // Every series the alert rules and the Grafana dashboard name is described.
    for (name, kind) in METRICS {
        let family = name.strip_suffix("_total").unwrap_or(name);
        let described = format!("# TYPE {family} {kind}");
        assert!(
            text.contains(&described),
            "{described} missing from /metrics"
        );
    }
}

/// Acceptance 4: the running backend is killed; the prompt runs again elsewhere. Its timeline
/// has both attempts, the first ended by the requeue with its nodes so far, the second run to
/// the end; `comfy_gate_prompts_retried_total` counts the lost run. A restart keeps it.
#[tokio::test]
async fn the_timeline_of_a_prompt_moved_off_a_killed_backend_shows_both_attempts() {
    let (a, b) = (sim().await, sim().await);
    let state_dir = fresh_state_dir();
    let dir = state_dir.clone();
    let gate = gate_with(&[&a, &b], move |f| f.server.state_dir = Some(dir)).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let mut ws = Ws::connect(&base, Some("c")).await;
    ws.next().await;
    let body = json!({"prompt": steps(77, 3000), "client_id": "c", "prompt_id": "p"});
    post_json(&base, "/prompt", &body).await;
    ws.until_kind("progress").await;
    let victim = holder(&[&a, &b], "p").await.expect("running somewhere");
    let (victim_name, survivor_name) = if std::ptr::eq(victim, &a) {
        (
            name_of(&admin, &a.url()).await,
            name_of(&admin, &b.url()).await,
        )
    } else {
        (
            name_of(&admin, &b.url()).await,
            name_of(&admin, &a.url()).await,
        )
    };
    victim.crash();
    ws.until_done("p").await;
    assert_eq!(
        wait_history(&base, "p").await["status"]["status_str"],
        "success"
    );

    let (code, t) = get_json(&admin, "/admin/prompts/p/timeline").await;
    assert_eq!(code, 200, "{t}");
    let attempts = t["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{t:#}");
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(first["backend"], victim_name.as_str());
    assert!(
        first["end"]
            .as_str()
            .unwrap()
            .starts_with("requeued: backend_"),
        "{first}"
    );
    let classes = |a: &Value| -> Vec<String> {
        a["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["class"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        classes(first).contains(&"KSampler".to_string()),
        "it was sampling: {first}"
    );
    assert_eq!(second["backend"], survivor_name.as_str());
    assert_eq!(second["end"], "success");
    assert!(
        classes(second).contains(&"SaveImage".to_string()),
        "{second}"
    );
    assert!(
        second["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["end"].is_i64())
    );
    let (ended, again) = (first["ended_at"].as_i64(), second["dispatched_at"].as_i64());
    assert!(ended.is_some() && ended <= again, "{first} then {second}");
    assert_eq!(t["outcome"], "success");
    let text = scrape(&admin).await;
    assert_eq!(
        total(&text, "comfy_gate_prompts_retried_total", &[]),
        1.0,
        "{text}"
    );

    // Persisted with its history entry: a gate restarted on the same state shows the same.
    gate.shutdown().await;
    let again = gate_with(&[&a, &b], move |f| f.server.state_dir = Some(state_dir)).await;
    let admin = format!("http://{}", again.admin_addr);
    let (code, kept) = get_json(&admin, "/admin/prompts/p/timeline").await;
    assert_eq!(code, 200);
    assert_eq!(kept["attempts"], t["attempts"]);
    let (code, _) = get_json(&admin, "/admin/prompts/unknown/timeline").await;
    assert_eq!(code, 404);
}

/// The frames `ws` receives until every prompt of `ids` has had its final `executing {node:
/// null}`, in any order.
async fn until_all_done(ws: &mut Ws, ids: &[String]) -> Vec<Frame> {
    let mut left: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut frames = Vec::new();
    while !left.is_empty() {
        let f = ws.next().await.expect("the socket stays open");
        let data = f.data();
        if f.kind() == "executing" && data["node"].is_null() {
            left.remove(data["prompt_id"].as_str().unwrap_or(""));
        }
        frames.push(f);
    }
    frames
}

/// The configured name of the backend at `url`, from `/admin/backends`.
async fn name_of(admin: &str, url: &str) -> String {
    let (_, v) = get_json(admin, "/admin/backends").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["url"].as_str().unwrap().trim_end_matches('/') == url.trim_end_matches('/'))
        .map(|b| b["name"].as_str().unwrap().to_string())
        .expect("listed")
}
