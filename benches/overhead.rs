//! Proxy overhead: the same requests through the gate, straight to one comfy-sim backend and (with
//! `nginx` on PATH) through nginx, with the same load generator and connection count.
//!
//! `cargo bench --bench overhead` measures
//! - `GET /history/{id}` (small JSON) of a prompt that ran through the gate (the gate answers it
//!   from its own store) and of one sent to the sim directly (the gate asks the backend: the
//!   proxy path), and `GET /view` of a 4 MB PNG: a closed-loop hyper client, keep-alive, `CONNS`
//!   connections, `WARMUP` then `MEASURE` per case: req/s, p50, p99;
//! - WebSocket event delivery: 1,000 connected clients, one tiny prompt per client in turn, the
//!   delay from the backend's `execution_start` `timestamp` (epoch ms) to the client's receipt;
//! - the gate's RSS (the real `comfy-gate` binary) idle and with 10,000 idle WebSocket clients.
//!
//! - a burst of 10,000 `POST /prompt` from 100 connections, each acknowledged once durable
//!   (issue 16; `-- burst` runs only this), on a fresh gate three times ([`burst`]);
//! - the gate's RSS with 10,000 finished prompts in its history, each with an 80 KB UI
//!   workflow (issue 16; `-- memory`, [`history_rss`]);
//! - a repeated prompt with the result cache on (issue 16; `-- cache`, [`cache_repeat`]);
//! - what metrics and timelines cost (issue 15): a second gate with `[metrics]` off, measured in
//!   turn with the first on a proxied request and on whole prompts ([`metrics_cost`]);
//!
//! and prints a markdown table. `cargo bench --bench overhead -- WORD` runs only the HTTP cases
//! whose name contains WORD (`cost`: only the metrics cost). Run without `--bench` (as `cargo test --all-targets` does), it only
//! says how to run it.

#[path = "overhead/burst.rs"]
mod burst;
#[path = "overhead/cache_repeat.rs"]
mod cache_repeat;
#[path = "overhead/history_rss.rs"]
mod history_rss;
#[path = "overhead/metrics_cost.rs"]
mod metrics_cost;
#[allow(dead_code)]
mod support;

use std::time::Duration;

use support::nginx::Balance;
use support::{
    Ctx, GateProcess, HttpCase, LoadStats, NginxProcess, fmt_ms, http_load, open_files_limits,
    raise_open_files, ws_latency, ws_rss,
};

/// Concurrent keep-alive connections of the HTTP load generator.
const CONNS: usize = 32;
/// Warm-up before each HTTP measurement.
const WARMUP: Duration = Duration::from_secs(1);
/// Length of each HTTP measurement.
const MEASURE: Duration = Duration::from_secs(5);
/// WebSocket clients of the delivery-latency case.
const WS_CLIENTS: usize = 1_000;
/// Prompts (one `execution_start` each) of the delivery-latency case.
const WS_PROMPTS: usize = 1_000;
/// Idle WebSocket clients of the RSS case.
const RSS_CLIENTS: usize = 10_000;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("overhead: a benchmark; run it with `cargo bench --bench overhead`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

struct Row {
    case: String,
    path: &'static str,
    rate: String,
    p50_ms: f64,
    p99_ms: f64,
    ratio: String,
}

async fn run() {
    let started = std::time::Instant::now();
    // Open files first: the RSS case holds 10,000 sockets in this process.
    let before = open_files_limits();
    raise_open_files();
    let (soft, hard) = open_files_limits();
    println!(
        "overhead: open files limit (ulimit -n): soft {} hard {} (was soft {})",
        soft, hard, before.0
    );

    let mut ctx = Ctx::start().await;
    println!(
        "overhead: comfy-sim (time_scale 0.01) at {}; gate binary {}",
        ctx.sim.url(),
        ctx.gate_bin.display()
    );

    let gate = GateProcess::start(&ctx.gate_bin, &ctx.sim.url()).await;
    println!("overhead: gate (pid {}) at {}", gate.pid(), gate.addr);
    let history_id = ctx.prepare_history(&gate.url()).await;
    let view_name = ctx.prepare_view().await;

    let nginx = match support::nginx::find_nginx() {
        Some(bin) => {
            match NginxProcess::start(&bin, &[ctx.sim.addr()], Balance::RoundRobin).await {
                Ok(n) => {
                    println!("overhead: nginx (pid {}) at {}", n.pid(), n.addr);
                    Some(n)
                }
                Err(e) => {
                    println!("nginx: failed to start ({e}), skipped");
                    None
                }
            }
        }
        None => {
            println!("nginx: not on PATH, skipped");
            None
        }
    };

    let proxied_history_id = ctx.prepare_history_direct().await;
    let userdata_path = ctx.prepare_userdata().await;
    let cases = [
        HttpCase {
            name: "GET /history/{id} (small JSON, the gate's own prompt)".to_string(),
            path: format!("/history/{history_id}"),
            expect_min_bytes: 100,
        },
        HttpCase {
            name: "GET /history/{id} (small JSON, asked of the backend)".to_string(),
            path: format!("/history/{proxied_history_id}"),
            expect_min_bytes: 100,
        },
        HttpCase {
            name: "GET /userdata/{file} (small JSON, passed through)".to_string(),
            path: format!("/userdata/{userdata_path}"),
            expect_min_bytes: 500,
        },
        HttpCase {
            name: format!("GET /view 4 MB PNG ({} B, type=output)", ctx.view_bytes),
            path: format!("/view?filename={view_name}&type=output"),
            expect_min_bytes: ctx.view_bytes,
        },
    ];

    let mut rows = Vec::new();
    let mut nginx_lines = Vec::new();
    // `cargo bench --bench overhead -- WORD`: only the HTTP cases whose name contains WORD.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    for case in &cases {
        if filter
            .as_ref()
            .is_some_and(|f| !case.name.contains(f.as_str()))
        {
            continue;
        }
        let mut targets = vec![("direct", ctx.sim.addr()), ("gate", gate.addr)];
        if let Some(n) = &nginx {
            targets.push(("nginx", n.addr));
        }
        let mut results: Vec<(&'static str, LoadStats)> = Vec::new();
        for (label, addr) in targets {
            let s = http_load(
                addr,
                &case.path,
                case.expect_min_bytes,
                CONNS,
                WARMUP,
                MEASURE,
            )
            .await;
            println!(
                "overhead: {} via {label}: {:.0} req/s, p50 {}, p99 {}, {} errors",
                case.name,
                s.rps(),
                fmt_ms(s.p50_ms()),
                fmt_ms(s.p99_ms()),
                s.errors
            );
            results.push((label, s));
        }
        let direct = results[0].1.clone();
        for (label, s) in &results {
            rows.push(Row {
                case: case.name.clone(),
                path: label,
                rate: format!("{:.0}", s.rps()),
                p50_ms: s.p50_ms(),
                p99_ms: s.p99_ms(),
                ratio: if *label == "direct" {
                    "1.00".to_string()
                } else {
                    http_ratio(s, &direct)
                },
            });
        }
        if nginx.is_some() {
            let g = &results[1].1;
            let n = &results[2].1;
            nginx_lines.push(format!(
                "- {}: nginx/direct {}; gate/nginx {}",
                case.name,
                http_ratio(n, &direct),
                http_ratio(g, n)
            ));
        }
    }

    // WebSocket delivery latency: 1,000 clients, direct then through the gate.
    let mut ws = Vec::new();
    let ws_targets = [("direct", ctx.sim.url()), ("gate", gate.url())];
    for (label, url) in ws_targets.into_iter().filter(|_| filter.is_none()) {
        let r = ws_latency(&url, label, WS_CLIENTS, WS_PROMPTS).await;
        println!(
            "overhead: ws delivery via {label}: {} clients, {} events, p50 {}, p99 {} ({:.1} s)",
            r.clients,
            r.latencies_ms.len(),
            fmt_ms(r.p50_ms()),
            fmt_ms(r.p99_ms()),
            r.elapsed.as_secs_f64()
        );
        ws.push((label, r));
    }
    let direct_p50 = ws.first().map_or(f64::NAN, |w| w.1.p50_ms());
    let direct_p99 = ws.first().map_or(f64::NAN, |w| w.1.p99_ms());
    for (label, r) in &ws {
        rows.push(Row {
            case: format!(
                "WS execution_start delivery ({} clients)",
                support::group_thousands(r.clients)
            ),
            path: label,
            rate: format!(
                "{:.0} ev/s",
                r.latencies_ms.len() as f64 / r.elapsed.as_secs_f64()
            ),
            p50_ms: r.p50_ms(),
            p99_ms: r.p99_ms(),
            ratio: if *label == "direct" {
                "—".to_string()
            } else {
                format!(
                    "p50 {:+.1} ms, p99 {:+.1} ms",
                    r.p50_ms() - direct_p50,
                    r.p99_ms() - direct_p99
                )
            },
        });
    }

    // Issue 16: a burst of submissions, durably accepted, on a gate of its own (fresh store).
    let mut bursts = Vec::new();
    if filter.is_none() || filter.as_deref() == Some("burst") {
        for _ in 0..3 {
            let fresh = GateProcess::start(&ctx.gate_bin, &ctx.sim.url()).await;
            bursts.push(burst::burst(&fresh).await);
        }
    }

    // Issue 16: a history of 10,000 prompts with big workflows, and repeats answered from the
    // result cache, each on a gate of its own (`-- memory`, `-- cache` run only these).
    let mut history_memory = None;
    if filter.is_none() || filter.as_deref() == Some("memory") {
        history_memory = Some(history_rss::history_rss(&ctx.gate_bin).await);
    }
    let mut repeats = None;
    if filter.is_none() || filter.as_deref() == Some("cache") {
        repeats = Some(cache_repeat::cache_repeat(&ctx.gate_bin, &ctx.sim).await);
    }

    // Issue 15: the cost of metrics and timelines, the same gate with them off beside it.
    let mut costs = Vec::new();
    if filter.is_none() || filter.as_deref() == Some("cost") {
        let off = GateProcess::start_with(&ctx.gate_bin, &ctx.sim.url(), metrics_cost::OFF).await;
        let path = format!("/history/{proxied_history_id}");
        let case = "GET /history/{id} (asked of the backend)";
        costs.push(metrics_cost::http_cost(&gate, &off, case, &path).await);
        costs.push(metrics_cost::prompt_cost(&gate, &off).await);
    }

    drop(nginx);
    drop(gate);

    // RSS of a fresh gate with idle WebSocket clients.
    let rss = match filter {
        None => Some(ws_rss(&ctx.gate_bin, &ctx.sim.url(), RSS_CLIENTS).await),
        Some(_) => None,
    };

    println!();
    if !rows.is_empty() {
        println!("| case | path | req/s | p50 | p99 | ratio vs direct |");
        println!("|---|---|---:|---:|---:|---|");
    }
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.case,
            r.path,
            r.rate,
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            r.ratio
        );
    }
    println!();
    for l in &nginx_lines {
        println!("{l}");
    }
    if nginx_lines.is_empty() {
        println!("- nginx: not measured (not on PATH or did not start)");
    }
    if let Some(rss) = &rss {
        println!("- {}", rss.line());
        if let Some(note) = &rss.note {
            println!("- {note}");
        }
    }
    println!(
        "- HTTP: closed loop, {CONNS} keep-alive HTTP/1.1 connections, {:.0} s warm-up + {:.0} s \
         per row, latency = request sent → whole body read. ratio = path/direct (req/s ×, p50 ×, \
         p99 ×).",
        WARMUP.as_secs_f64(),
        MEASURE.as_secs_f64()
    );
    println!(
        "- /history/{{id}}, the gate's own prompt: it ran through the gate, so the gate answers \
         from its own history store (no backend round trip); direct and nginx ask the sim. \
         Asked of the backend: the prompt was sent to the sim directly, so the gate asks the \
         backend, rewrites file names it has aliases for, and answers (the proxy path). \
         /userdata: a saved workflow, passed through to the home backend unchanged."
    );
    println!(
        "- /view: a noise PNG written straight into the sim's output dir; the gate has no alias \
         for it, so it asks the backend and streams the body through (a real proxy path)."
    );
    println!(
        "- WS: latency = client receive time − `execution_start.timestamp` set by the sim when it \
         sends; both epoch ms, the timestamp is whole ms (up to +1 ms bias, same for both \
         paths). {WS_PROMPTS} prompts (EmptyImage 8×8 → SaveImage), each for the next client in \
         turn, the next submitted once the previous execution_start arrived."
    );
    println!(
        "- gate = the release `comfy-gate` binary as a separate process; the sim runs in this \
         process on a runtime of its own (2 threads), the load generator on another ({} CPUs).",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if !bursts.is_empty() {
        let mut rates: Vec<f64> = bursts.iter().map(burst::Burst::rate).collect();
        rates.sort_by(f64::total_cmp);
        println!();
        println!(
            "- burst of {} `POST /prompt` from {} connections, each acknowledged only once \
             durable: median {:.0} accepted/s over {} runs (range {:.0}–{:.0}), p99 of the last \
             {}, refused {}",
            burst::PROMPTS,
            burst::CONNECTIONS,
            rates[rates.len() / 2],
            rates.len(),
            rates[0],
            rates[rates.len() - 1],
            fmt_ms(bursts.last().map_or(f64::NAN, |b| b.p99_ms)),
            bursts.iter().map(|b| b.refused).sum::<usize>()
        );
    }
    if let Some(h) = &history_memory {
        println!("- {}", h.line());
    }
    if let Some(c) = &repeats {
        println!("- {}", c.line());
    }
    if !costs.is_empty() {
        println!();
        println!(
            "| metrics and timelines (issue 15) | on: median (range) | off: median (range) | on/off |"
        );
        println!("|---|---:|---:|---|");
        for c in &costs {
            println!("{}", c.row());
        }
        println!(
            "- on = the default configuration; off = `[metrics] enabled = false, timelines = \
             false`; two gate processes over the same sim, measured in turn, 5 rounds each; \
             target (acceptance 6): on/off ≥ 0.97 in req/s."
        );
    }
    println!(
        "- total bench time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `req/s ×a, p50 ×b, p99 ×c` of `s` against `base`.
fn http_ratio(s: &LoadStats, base: &LoadStats) -> String {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    format!(
        "req/s ×{:.2}, p50 ×{:.2}, p99 ×{:.2}",
        div(s.rps(), base.rps()),
        div(s.p50_ms(), base.p50_ms()),
        div(s.p99_ms(), base.p99_ms())
    )
}
