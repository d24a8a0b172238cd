//! Issue 12's long runs, against the real `comfy-gate` binary over four comfy-sim backends:
//!
//! - `soak`: 500 prompts from five clients (two follow over `/ws`, reconnecting with their
//!   `clientId` whenever the socket drops; three poll `/history`), one backend killed and
//!   restarted every 30 s, and the gate itself SIGKILLed twice and started again on the same
//!   state directory. Counts how each prompt ended (completed, errored, lost: no ending within
//!   ten minutes), how many ran to success more than once (the backends' success counters
//!   against the successes in the gate's history), and how many endings each socket client
//!   heard (once, never, twice or more).
//! - `records`: 10,000 small prompts submitted, finished, read and deleted one by one (as
//!   clients that clean up after reading do), then `/admin/records`: every count must be back
//!   to zero. Samples the gate's RSS every 1,000 prompts and reports its peak.
//!
//! `cargo bench --bench chaos` runs both; `cargo bench --bench chaos -- soak` (or `records`)
//! one. Figures go in docs/benchmarks.md. Run without `--bench` (as `cargo test
//! --all-targets` does), it only says how to run it.

#[allow(dead_code, unused_imports)]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use comfy_sim::{Fault, SimConfig, SimHandle};
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{GateProcess, gate_binary, sim_on_own_runtime};
use tokio::sync::RwLock;
use tokio_tungstenite::tungstenite::Message;

/// Prompts of the soak, from `SOAK_CLIENTS` clients.
const SOAK_PROMPTS: usize = 500;
const SOAK_CLIENTS: usize = 5;
/// One backend is killed (and restarted half a second later) this often.
const BACKEND_KILL_EVERY: Duration = Duration::from_secs(30);
/// The gate is SIGKILLed at these times after the start, and started again a second later.
const GATE_KILLS_AT: [Duration; 2] = [Duration::from_secs(45), Duration::from_secs(105)];
/// A prompt with no ending this long after the last submit is lost.
const LOST_AFTER: Duration = Duration::from_secs(600);
/// Prompts of the records case, and how many run at once.
const RECORDS_PROMPTS: usize = 10_000;
const RECORDS_CONCURRENCY: usize = 32;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("chaos: run with `cargo bench --bench chaos [-- soak|records]`");
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if wanted("soak") {
            soak().await;
        }
        if wanted("records") {
            records().await;
        }
    });
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

/// A txt2img of `steps` sampling steps (about `steps` × 0.4 ms at time scale 0.01).
fn txt2img(seed: u64, steps: u64) -> Value {
    let mut g = comfy_gate::loadtest::workflow::default_workflow();
    g["3"]["inputs"]["seed"] = json!(seed);
    g["3"]["inputs"]["steps"] = json!(steps);
    g
}

async fn four_sims() -> Vec<SimHandle> {
    (0..4)
        .map(|i| {
            sim_on_own_runtime(SimConfig {
                name: format!("sim{i}"),
                time_scale: 0.01,
                ..Default::default()
            })
        })
        .collect()
}

/// A gate config for the runs: patient retries, quick health verdicts.
fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("chaos.toml");
    std::fs::write(
        &path,
        "[recovery]\nmax_retries = 8\n[health]\ntimeout_ms = 500\ninterval_ms = 500\n",
    )
    .expect("config");
    path
}

/// The gate's current base URL (it changes when the gate is started again).
type Base = Arc<RwLock<String>>;

/// Posts until the gate answers (it may be down for a moment): the status and body.
async fn post(http: &reqwest::Client, base: &Base, path: &str, body: &Value) -> (u16, Value) {
    loop {
        let url = format!("{}{path}", base.read().await);
        if let Ok(r) = http.post(url).json(body).send().await {
            let code = r.status().as_u16();
            return (code, r.json().await.unwrap_or(Value::Null));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The gate's history entry of `id`, if it has one now.
async fn history_of(http: &reqwest::Client, base: &Base, id: &str) -> Option<Value> {
    let url = format!("{}/history/{id}", base.read().await);
    let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
    v.get(id).cloned()
}

async fn soak() {
    let sims = Arc::new(four_sims().await);
    let backends: Vec<String> = sims.iter().map(|s| s.url()).collect();
    let state = tempfile::tempdir().expect("state dir");
    let config = config_file(state.path());
    let extra = ["--config", config.to_str().expect("utf-8 path")];
    let bin = gate_binary();
    let gate = GateProcess::start_fleet(&bin, &backends, state.path(), &extra).await;
    let base: Base = Arc::new(RwLock::new(gate.url()));
    let started = Instant::now();
    println!(
        "soak: {SOAK_PROMPTS} prompts, 4 backends, a backend kill every {}s, gate SIGKILLs at {:?}",
        BACKEND_KILL_EVERY.as_secs(),
        GATE_KILLS_AT
    );

    let done = Arc::new(AtomicBool::new(false));
    let backend_kills = Arc::new(AtomicUsize::new(0));
    let chaos = {
        let (sims, done, kills) = (sims.clone(), done.clone(), backend_kills.clone());
        tokio::spawn(async move {
            let mut next = Instant::now() + BACKEND_KILL_EVERY;
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if Instant::now() >= next {
                    let k = kills.fetch_add(1, Ordering::SeqCst);
                    sims[k % sims.len()].inject(Fault::Crash {
                        restart_after_ms: Some(500),
                    });
                    next += BACKEND_KILL_EVERY;
                }
            }
        })
    };
    let gate_killer = {
        let (base, state_dir, backends, bin) = (
            base.clone(),
            state.path().to_path_buf(),
            backends.clone(),
            bin.clone(),
        );
        let config = config.clone();
        tokio::spawn(async move {
            let mut gate = gate;
            let mut peak = 0;
            for at in GATE_KILLS_AT {
                tokio::time::sleep_until((started + at).into()).await;
                peak = peak.max(gate.peak_rss_kib());
                gate.kill().await;
                println!(
                    "soak: gate SIGKILLed at {:.0}s",
                    started.elapsed().as_secs_f64()
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                let extra = ["--config", config.to_str().expect("utf-8 path")];
                gate = GateProcess::start_fleet(&bin, &backends, &state_dir, &extra).await;
                *base.write().await = gate.url();
            }
            (gate, peak)
        })
    };

    let mut clients = Vec::new();
    for c in 0..SOAK_CLIENTS {
        let base = base.clone();
        clients.push(tokio::spawn(soak_client(c, base)));
    }
    let mut outcomes: HashMap<String, String> = HashMap::new();
    let mut heard: Vec<HashMap<String, usize>> = Vec::new();
    for c in clients {
        let (o, h) = c.await.expect("client");
        outcomes.extend(o);
        heard.extend(h);
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let _ = chaos.await;
    let (gate, peak) = gate_killer.await.expect("gate killer");
    let peak = peak.max(gate.peak_rss_kib());

    let count = |s: &str| outcomes.values().filter(|o| *o == s).count();
    let (completed, errored, lost) = (count("success"), count("error"), count("lost"));
    let succeeded_on_backends: u64 = sims.iter().map(|s| s.counters().prompts_succeeded).sum();
    let duplicated = succeeded_on_backends.saturating_sub(completed as u64);
    let http = client();
    let all: Value = http
        .get(format!("{}/history", base.read().await))
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    let entries = all.as_object().map_or(0, |m| m.len());
    let mut socket = [0usize; 3];
    for h in &heard {
        for n in h.values() {
            socket[(*n).min(2)] += 1;
        }
    }
    println!();
    println!("| soak | figure |");
    println!("|---|---|");
    println!("| prompts submitted (200) | {} |", outcomes.len());
    println!("| completed (success) | {completed} |");
    println!("| ended with a reported error | {errored} |");
    println!(
        "| lost (no ending within {} s) | {lost} |",
        LOST_AFTER.as_secs()
    );
    println!(
        "| duplicated (backend successes {succeeded_on_backends} − completed) | {duplicated} |"
    );
    println!("| gate history entries | {entries} |");
    println!(
        "| socket clients' endings heard once / never / twice or more | {} / {} / {} |",
        socket[1], socket[0], socket[2]
    );
    println!(
        "| backend kills / gate SIGKILLs | {} / {} |",
        backend_kills.load(Ordering::SeqCst),
        GATE_KILLS_AT.len()
    );
    println!("| wall time | {:.0} s |", elapsed.as_secs_f64());
    println!(
        "| gate peak RSS (largest of its three lives) | {} MiB |",
        peak / 1024
    );
    drop(gate);
}

/// One soak client: submits its share, then follows (clients 0 and 1 over `/ws`, reconnecting
/// with their `clientId`; the others by polling) until every prompt has a history entry.
/// Returns each prompt's outcome (`success`, `error` or `lost`) and, for a socket client, how
/// many endings (`executing {node: null}`) it heard per prompt.
async fn soak_client(
    c: usize,
    base: Base,
) -> (HashMap<String, String>, Option<HashMap<String, usize>>) {
    let http = client();
    let sid = format!("soak-{c}");
    let n = SOAK_PROMPTS / SOAK_CLIENTS;
    let ids: Vec<String> = (0..n).map(|i| format!("{sid}-{i}")).collect();
    let heard = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let follow = Arc::new(AtomicBool::new(c < 2));
    let follower = follow.load(Ordering::SeqCst).then(|| {
        let (base, sid, heard, follow) = (base.clone(), sid.clone(), heard.clone(), follow.clone());
        let mine: HashSet<String> = ids.iter().cloned().collect();
        tokio::spawn(async move {
            while follow.load(Ordering::SeqCst) {
                let url = format!("{}/ws?clientId={sid}", base.read().await).replace("http", "ws");
                let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                // Quiet spells are waited out; a closed socket (the gate died) is reconnected.
                loop {
                    let msg = match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                        Ok(Some(Ok(msg))) => msg,
                        Ok(_) => break,
                        Err(_) if follow.load(Ordering::SeqCst) => continue,
                        Err(_) => break,
                    };
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    let data = &v["data"];
                    if let Some(p) = data.get("prompt_id").and_then(Value::as_str) {
                        assert!(mine.contains(p), "{sid} heard another client's prompt {p}");
                        if v["type"] == "executing" && data["node"].is_null() {
                            *heard.lock().unwrap().entry(p.to_string()).or_default() += 1;
                        }
                    }
                    if !follow.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        })
    });
    for (i, id) in ids.iter().enumerate() {
        let steps = 2500 + (i as u64 * 37 + c as u64 * 11) % 2000;
        let body = json!({"prompt": txt2img(i as u64, steps), "client_id": sid, "prompt_id": id});
        let (code, answer) = post(&http, &base, "/prompt", &body).await;
        assert_eq!(code, 200, "{id}: {answer}");
    }
    let submitted = Instant::now();
    let mut outcomes = HashMap::new();
    for id in &ids {
        loop {
            if let Some(h) = history_of(&http, &base, id).await {
                let status = h["status"]["status_str"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                outcomes.insert(id.clone(), status);
                break;
            }
            if submitted.elapsed() > LOST_AFTER {
                outcomes.insert(id.clone(), "lost".to_string());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Endings relayed just before the last poll still reach the socket.
    tokio::time::sleep(Duration::from_secs(2)).await;
    follow.store(false, Ordering::SeqCst);
    if let Some(f) = follower {
        let _ = f.await;
        let heard = heard.lock().unwrap().clone();
        let all: HashMap<String, usize> = ids
            .iter()
            .map(|id| (id.clone(), heard.get(id).copied().unwrap_or(0)))
            .collect();
        return (outcomes, Some(all));
    }
    (outcomes, None)
}

async fn records() {
    let sims = four_sims().await;
    let backends: Vec<String> = sims.iter().map(|s| s.url()).collect();
    let state = tempfile::tempdir().expect("state dir");
    let config = config_file(state.path());
    let extra = ["--config", config.to_str().expect("utf-8 path")];
    let gate = GateProcess::start_fleet(&gate_binary(), &backends, state.path(), &extra).await;
    let base: Base = Arc::new(RwLock::new(gate.url()));
    let admin = format!("http://{}", gate.admin);
    let http = client();
    let admin_records = || async {
        let v: Value = http
            .get(format!("{admin}/admin/records"))
            .send()
            .await
            .expect("admin")
            .json()
            .await
            .expect("json");
        v
    };
    let started = Instant::now();
    let idle_rss = gate.rss_kib();
    println!("records: {RECORDS_PROMPTS} prompts submitted, finished, read and deleted");
    println!();
    println!("| prompts done | gate RSS (MiB) | records held |");
    println!("|---|---|---|");
    println!("| 0 | {} | {} |", idle_rss / 1024, admin_records().await);
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..RECORDS_CONCURRENCY {
        let (next, finished, base, http) =
            (next.clone(), finished.clone(), base.clone(), http.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= RECORDS_PROMPTS {
                    return;
                }
                let id = format!("rec-{i}");
                let body = json!({"prompt": txt2img(i as u64, 5), "prompt_id": id});
                let (code, answer) = post(&http, &base, "/prompt", &body).await;
                assert_eq!(code, 200, "{id}: {answer}");
                while history_of(&http, &base, &id).await.is_none() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (code, _) = post(&http, &base, "/history", &json!({"delete": [id]})).await;
                assert_eq!(code, 200);
                finished.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let mut reported = 0;
    while reported < RECORDS_PROMPTS {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = finished.load(Ordering::SeqCst);
        if done >= reported + 1000 {
            reported = done / 1000 * 1000;
            let r = admin_records().await;
            println!(
                "| {done} | {} | prompts {} history {} output names {} |",
                gate.rss_kib() / 1024,
                r["prompts"],
                r["history"],
                r["files"]["backend_aliases"]
            );
        }
    }
    for w in workers {
        w.await.expect("worker");
    }
    let left = admin_records().await;
    println!();
    println!("records held at the end: {left}");
    println!(
        "gate RSS: idle {} MiB, end {} MiB, peak {} MiB; {:.0} s",
        idle_rss / 1024,
        gate.rss_kib() / 1024,
        gate.peak_rss_kib() / 1024,
        started.elapsed().as_secs_f64()
    );
    let zero = |v: &Value| v.as_u64() == Some(0);
    let all_zero = zero(&left["prompts"])
        && zero(&left["history"])
        && zero(&left["files"]["backend_aliases"])
        && zero(&left["files"]["copies"])
        && zero(&left["store"]["prompts"])
        && zero(&left["store"]["history"])
        && zero(&left["store"]["aliases"]);
    println!("back to zero: {}", if all_zero { "yes" } else { "NO" });
    assert!(all_zero, "records left behind: {left}");
}
