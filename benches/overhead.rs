//! Proxy overhead: the same requests through the gate, straight to one comfy-sim backend and (with
//! `nginx` on PATH) through nginx, with the same load generator and connection count, each path
//! measured in turn for a few rounds ([`rounds`]) and summed up by medians with their spread.
//!
//! `cargo bench --bench overhead` measures
//! - `GET /history/{id}` (small JSON) of a prompt that ran through the gate (the gate answers it
//!   from its own store) and of one sent to the sim directly (the gate asks the backend: the
//!   proxy path), `GET /userdata/{file}` (passed through) and `GET /view` of a 4 MB PNG: a
//!   closed-loop hyper client, keep-alive connections, direct, gate and nginx in turn
//!   ([`paths`]): median req/s, p50, p99, req/s range;
//! - WebSocket event delivery: 1,000 connected clients, one tiny prompt per client in turn, the
//!   delay from the backend's `execution_start` `timestamp` (epoch ms) to the client's receipt,
//!   direct and gate in turn ([`ws_rounds`]): what the gate adds, median and range;
//! - the gate's RSS (the real `comfy-gate` binary) idle and with 10,000 idle WebSocket clients;
//! - a burst of 10,000 `POST /prompt` from 100 connections, each acknowledged once durable
//!   (issue 16; `-- burst` runs only this), on a fresh gate three times ([`burst`]);
//! - the gate's RSS with 10,000 finished prompts in its history, each with an 80 KB UI
//!   workflow (issue 16; `-- memory`, [`history_rss`]);
//! - a repeated prompt with the result cache on (issue 16; `-- cache`, [`cache_repeat`]);
//! - what metrics and timelines cost (issue 15): a second gate with `[metrics]` off, measured in
//!   turn with the first on a proxied request and on whole prompts ([`metrics_cost`]);
//!
//! and prints a markdown table, then issue 16's targets with the measured ratios. `cargo bench
//! --bench overhead -- WORD` runs only the HTTP cases whose name contains WORD (`ws`: only the
//! WebSocket rounds; `cost`: only the metrics cost). With `OVERHEAD_BASELINE_GATE` set to
//! another `comfy-gate` binary, it is measured as a fourth path, `gate-before`, in the same
//! rounds: a change's before and after side by side. Run without `--bench` (as `cargo test
//! --all-targets` does), it only says how to run it.

#[path = "overhead/burst.rs"]
mod burst;
#[path = "overhead/cache_repeat.rs"]
mod cache_repeat;
#[path = "overhead/history_rss.rs"]
mod history_rss;
#[path = "overhead/metrics_cost.rs"]
mod metrics_cost;
#[path = "overhead/paths.rs"]
mod paths;
#[path = "overhead/rounds.rs"]
mod rounds;
#[allow(dead_code)]
mod support;
#[path = "overhead/ws_rounds.rs"]
mod ws_rounds;

use support::nginx::Balance;
use support::{
    Ctx, GateProcess, HttpCase, NginxProcess, fmt_ms, open_files_limits, raise_open_files, ws_rss,
};

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
    // A second gate binary to compare with, measured in the same rounds.
    let baseline = match std::env::var_os("OVERHEAD_BASELINE_GATE") {
        Some(bin) => {
            let b = GateProcess::start(std::path::Path::new(&bin), &ctx.sim.url()).await;
            println!("overhead: gate-before (pid {}) at {}", b.pid(), b.addr);
            Some(b)
        }
        None => None,
    };
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

    // `cargo bench --bench overhead -- WORD`: only the HTTP cases whose name contains WORD.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let mut paths = vec![("direct", ctx.sim.addr()), ("gate", gate.addr)];
    if let Some(n) = &nginx {
        paths.push(("nginx", n.addr));
    }
    if let Some(b) = &baseline {
        paths.push(("gate-before", b.addr));
    }
    let mut results = Vec::new();
    for case in &cases {
        if filter
            .as_ref()
            .is_some_and(|f| !case.name.contains(f.as_str()))
        {
            continue;
        }
        results.push(paths::measure(case, &paths).await);
    }

    // WebSocket delivery latency: 1,000 clients, direct and through the gate in turn.
    let mut ws_urls = vec![("direct", ctx.sim.url()), ("gate", gate.url())];
    ws_urls.extend(baseline.as_ref().map(|b| ("gate-before", b.url())));
    let ws = match filter.as_deref() {
        None | Some("ws") => Some(ws_rounds::measure(&ws_urls).await),
        Some(_) => None,
    };

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
    drop(baseline);

    // RSS of a fresh gate with idle WebSocket clients.
    let rss = match filter {
        None => Some(ws_rss(&ctx.gate_bin, &ctx.sim.url(), RSS_CLIENTS).await),
        Some(_) => None,
    };

    println!();
    if !results.is_empty() || ws.is_some() {
        println!(
            "| case | path | req/s median (range) | p50 | p99 | req/s vs direct | req/s vs nginx |"
        );
        println!("|---|---|---:|---:|---:|---|---|");
    }
    for r in &results {
        for row in r.rows() {
            println!("{row}");
        }
    }
    for row in ws.iter().flat_map(ws_rounds::WsResult::rows) {
        println!("{row}");
    }
    println!();
    if let Some(rss) = &rss {
        println!("- {}", rss.line());
        if let Some(note) = &rss.note {
            println!("- {note}");
        }
    }
    println!(
        "- HTTP: closed loop, {} keep-alive HTTP/1.1 connections; {} rounds, each path in turn \
         ({:.1} s warm-up + {:.0} s each); latency = request sent → whole body read; req/s, p50 \
         and p99 are medians over the rounds, the range is req/s's min–max; vs = ratio of \
         median req/s.",
        paths::CONNS,
        paths::ROUNDS,
        paths::WARMUP.as_secs_f64(),
        paths::MEASURE.as_secs_f64()
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
         paths). {} rounds, direct then gate in each, {} prompts a round (EmptyImage 8×8 → \
         SaveImage), each for the next client in turn, the next submitted once the previous \
         execution_start arrived; added = gate − direct of the same round, median (range).",
        ws_rounds::ROUNDS,
        ws_rounds::PROMPTS
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
    print_targets(&results, ws.as_ref());
    print_capacity_targets(
        &bursts,
        rss.as_ref(),
        history_memory.as_ref(),
        repeats.as_ref(),
    );
    println!(
        "- total bench time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Issue 16's targets, one line each: the measured ratio, its spread, holds or misses.
fn print_targets(results: &[paths::CaseResult], ws: Option<&ws_rounds::WsResult>) {
    let verdict = |ok: bool| if ok { "holds" } else { "misses" };
    let find = |word: &str| results.iter().find(|r| r.name.contains(word));
    println!();
    println!("targets (issue 16, medians of interleaved rounds):");
    let spread = |r: &paths::CaseResult, label: &str| {
        r.get(label)
            .map_or("—".to_string(), |p| format!("{label} {}", p.rps.range(0)))
    };
    if let Some(r) = find("asked of the backend") {
        let x = r.rps_ratio("gate", "nginx");
        println!(
            "- proxied small JSON (/history/{{id}} asked of the backend): gate/nginx req/s ×{x:.2} \
             (target ≥ ×1.10; {}, {}): {}",
            spread(r, "gate"),
            spread(r, "nginx"),
            verdict(x >= 1.1)
        );
        if let (Some(g), Some(n)) = (r.get("gate"), r.get("nginx")) {
            println!(
                "- proxied small JSON p99: gate {} vs nginx {} (target ≤ nginx's; gate \
                 {}–{} ms, nginx {}–{} ms over rounds): {}",
                fmt_ms(g.p99.median),
                fmt_ms(n.p99.median),
                format_args!("{:.2}", g.p99.min),
                format_args!("{:.2}", g.p99.max),
                format_args!("{:.2}", n.p99.min),
                format_args!("{:.2}", n.p99.max),
                verdict(g.p99.median <= n.p99.median)
            );
        }
    }
    if let Some(r) = find("/view") {
        let (xn, xd) = (r.rps_ratio("gate", "nginx"), r.rps_ratio("gate", "direct"));
        println!(
            "- 4 MB /view: gate/nginx req/s ×{xn:.2} (target ≥ ×1.10): {}; gate/direct ×{xd:.2} \
             (target ≥ ×0.80): {} ({}, {}, {})",
            verdict(xn >= 1.1),
            verdict(xd >= 0.8),
            spread(r, "gate"),
            spread(r, "nginx"),
            spread(r, "direct")
        );
    }
    if let Some(g) = ws.and_then(|w| w.get("gate")) {
        println!(
            "- WS event to {} clients: added p99 {:+.2} ms (range {} ms; target ≤ +2 ms): {}",
            support::group_thousands(ws.map_or(0, |w| w.clients)),
            g.added_p99.median,
            g.added_p99.range(2),
            verdict(g.added_p99.median <= 2.0)
        );
    }
    for r in results {
        if r.get("gate-before").is_some() {
            println!(
                "- {}: gate/gate-before req/s ×{:.2}",
                r.name,
                r.rps_ratio("gate", "gate-before")
            );
        }
    }
}

/// Issue 16's other targets of this bench: the burst, the idle sockets' and the history's
/// memory, the cached repeat; each with its ratio to the target and its spread where it has
/// rounds. (The scheduling targets are `scheduling_des`'s.)
fn print_capacity_targets(
    bursts: &[burst::Burst],
    rss: Option<&support::RssResult>,
    history: Option<&history_rss::HistoryRss>,
    repeats: Option<&cache_repeat::CacheRepeat>,
) {
    let verdict = |ok: bool| if ok { "holds" } else { "misses" };
    if !bursts.is_empty() {
        let mut rates: Vec<f64> = bursts.iter().map(burst::Burst::rate).collect();
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!(
            "- burst of 10,000 POST /prompt from 100 connections: {median:.0} accepted/s durable \
             (range {:.0}–{:.0} over {} bursts; target ≥ 3,000/s: ×{:.2}): {}",
            rates[0],
            rates[rates.len() - 1],
            rates.len(),
            median / 3000.0,
            verdict(median >= 3000.0)
        );
    }
    if let Some(r) = rss {
        let mb = r.loaded_kib as f64 * 1024.0 / 1e6;
        println!(
            "- {} idle WebSocket clients: RSS {mb:.1} MB (target ≤ 80 MB: ×{:.2}): {}",
            support::group_thousands(r.clients),
            mb / 80.0,
            verdict(mb <= 80.0 && r.clients >= r.wanted)
        );
    }
    if let Some(h) = history {
        println!(
            "- {} finished prompts in history, 80 KB workflow each: RSS {:.1} MB (target ≤ 300 \
             MB: ×{:.2}): {}",
            support::group_thousands(h.kept),
            h.rss_mb(),
            h.rss_mb() / 300.0,
            verdict(h.rss_mb() <= 300.0 && h.kept >= history_rss::PROMPTS)
        );
    }
    if let Some(c) = repeats {
        let p99 = support::percentile(&c.cached_ms, 99.0);
        println!(
            "- a repeated prompt with the cache on: p99 {} (target ≤ 20 ms: ×{:.2}), {} runs on \
             a GPU: {}",
            support::fmt_ms(p99),
            p99 / cache_repeat::TARGET_MS,
            c.ran_on_sim,
            verdict(p99 <= cache_repeat::TARGET_MS && c.ran_on_sim == 0)
        );
    }
}
