//! Scheduling quality end to end: one fixed, seeded workload on a simulated heterogeneous fleet
//! (speeds 2, 1, 1, 0.5; VRAM 80, 24, 24, 12 GB; two checkpoints; mixed sizes; Poisson arrivals
//! at 70 % and 95 % of fleet capacity), replayed against each policy: the gate's default (late
//! binding), the gate binding immediately (no gate queue), round robin and least connections as
//! gate pickers bound immediately (nginx's policies), and real nginx (`round robin`,
//! `least_conn`) in front of the same fleet when `nginx` is on PATH. The sims run with
//! `fast_images`, so their own CPU work per image (unscaled, so it would count ten times at time
//! scale 0.1) stays small. Prints a markdown table per load with each policy's job latency,
//! makespan, GPU busy share, checkpoint loads and failures, and their ratios to the clairvoyant
//! reference of the same trace (`support/clairvoyant.rs`: every job on the GPU where it finishes
//! first, exact times, checkpoint loads paid; the lowest-p95 of its three rules). Below each
//! gate row, the discrete-event simulation's figures for the same trace and policy
//! (`scheduling_des/sim.rs`): the check that the simulation tells the truth. Times are simulated
//! seconds (wall time / time scale). `cargo bench --bench scheduling -- WORD` runs only the
//! policies whose name contains WORD.

#[path = "support/clairvoyant.rs"]
mod clairvoyant;
// Its where-the-time-went shares are the DES bench's.
#[allow(dead_code)]
#[path = "scheduling_des/sim.rs"]
mod des;
#[path = "support/proc.rs"]
mod proc;
#[path = "support/workload.rs"]
mod workload;
// Shared with the overhead bench, which uses other parts of it.
#[allow(dead_code)]
#[path = "support/nginx.rs"]
mod nginx;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comfy_gate::config::{self, FileConfig};
use comfy_gate::fleet::picker::{GpuAware, LeastInFlight, Picker, RoundRobin};
use comfy_gate::sched::decide::Rules;
use comfy_sim::{SimBackend, SimConfig, SimHandle};
use futures_util::StreamExt;
use nginx::{Balance, NginxProcess};
use serde_json::{Value, json};
use workload::{FLEET, Job, Outcome, print_head, print_row, trace};

/// Simulated seconds per wall second; 0.1 keeps per-request overhead small against job times.
const TIME_SCALE: f64 = 0.1;
const JOBS: usize = 80;

/// What the trace is sent through.
#[derive(Clone, Copy)]
enum Front {
    /// The gate with this placement policy and this many prompts per backend (1000: bound at
    /// once, no gate queue).
    Gate(&'static str, usize),
    /// Real nginx with this balancing, straight to the sims.
    Nginx(Balance),
}

async fn start_fleet() -> Vec<SimHandle> {
    let mut sims = Vec::new();
    for (i, (speed, vram)) in FLEET.iter().enumerate() {
        let cfg = SimConfig {
            name: format!("gpu{i}"),
            speed: *speed,
            vram_total_gb: *vram,
            time_scale: TIME_SCALE,
            fast_images: true,
            ..Default::default()
        };
        sims.push(SimBackend::start(cfg).await.expect("sim"));
    }
    sims
}

async fn start_gate(
    sims: &[SimHandle],
    policy: &str,
    max_inflight: usize,
    state: &std::path::Path,
) -> comfy_gate::GateHandle {
    let mut file = FileConfig::default();
    file.server.listen = "127.0.0.1:0".parse().unwrap();
    file.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    file.server.state_dir = Some(state.to_path_buf());
    file.health.interval_ms = 200;
    file.scheduler.max_inflight = max_inflight;
    file.placement.policy = policy.parse().expect("a policy");
    file.backends = sims
        .iter()
        .map(|s| config::backend_from_url(&s.url()))
        .collect();
    comfy_gate::run(config::validate(file, "", "(bench)").expect("config"))
        .await
        .expect("gate")
}

/// Prompt id → (when it ended, succeeded), from `executing` with a null node.
type Done = Arc<Mutex<HashMap<String, (Instant, bool)>>>;

/// Follows the events on one `/ws?clientId=bench` socket into `done`.
async fn follow(ws_url: String, done: Done) -> tokio::task::JoinHandle<()> {
    let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    tokio::spawn(async move {
        let (_, mut rx) = ws.split();
        let mut failed: HashMap<String, bool> = HashMap::new();
        while let Some(Ok(msg)) = rx.next().await {
            let Ok(text) = msg.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            let id = v["data"]["prompt_id"].as_str().unwrap_or("").to_string();
            match v["type"].as_str() {
                Some("execution_error") | Some("execution_interrupted") => {
                    failed.insert(id, true);
                }
                Some("executing") if v["data"]["node"].is_null() => {
                    let bad = failed.contains_key(&id);
                    done.lock().unwrap().insert(id, (Instant::now(), !bad));
                }
                _ => {}
            }
        }
    })
}

/// Replays `jobs` against `base` at their arrival times, following events on `ws_urls`, and
/// waits for every job to end (5 min at most). Returns submit times, ends and the start.
async fn replay(
    jobs: &[Job],
    base: &str,
    ws_urls: Vec<String>,
) -> (
    HashMap<String, Instant>,
    HashMap<String, (Instant, bool)>,
    Instant,
) {
    let done: Done = Arc::default();
    let mut readers = Vec::new();
    for url in ws_urls {
        readers.push(follow(url, done.clone()).await);
    }
    let client = reqwest::Client::new();
    let start = Instant::now();
    let mut submitted: HashMap<String, Instant> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let due = start + Duration::from_secs_f64(job.at_s * TIME_SCALE);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("job-{i}");
        submitted.insert(id.clone(), Instant::now());
        let body = json!({"prompt": job.graph(i as u64), "prompt_id": id, "client_id": "bench"});
        let ok = client
            .post(format!("{base}/prompt"))
            .json(&body)
            .send()
            .await
            .map(|r| r.status().is_success());
        if !matches!(ok, Ok(true)) {
            done.lock().unwrap().insert(id, (Instant::now(), false));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.lock().unwrap().len() < jobs.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in readers {
        r.abort();
    }
    let done = done.lock().unwrap().clone();
    (submitted, done, start)
}

/// Busy time (execution_start → end) from each backend's own history, in simulated seconds.
async fn busy_seconds(sims: &[SimHandle]) -> f64 {
    let client = reqwest::Client::new();
    let mut busy = 0.0;
    for s in sims {
        let h: Value = client
            .get(format!("{}/history", s.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for entry in h.as_object().into_iter().flatten().map(|(_, e)| e) {
            let msgs = entry["status"]["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let start = msgs
                .iter()
                .find(|m| m[0] == "execution_start")
                .and_then(|m| m[1]["timestamp"].as_f64());
            let end = msgs.last().and_then(|m| m[1]["timestamp"].as_f64());
            if let (Some(a), Some(b)) = (start, end) {
                busy += (b - a) / 1000.0 / TIME_SCALE;
            }
        }
    }
    busy
}

async fn run_policy(jobs: &[Job], front: Front, nginx_bin: Option<&std::path::Path>) -> Outcome {
    let sims = start_fleet().await;
    let state = tempfile::tempdir().expect("tempdir");
    let ws = |base: &str| format!("{}/ws?clientId=bench", base.replacen("http", "ws", 1));
    let (submitted, done, start) = match front {
        Front::Gate(policy, max_inflight) => {
            let gate = start_gate(&sims, policy, max_inflight, state.path()).await;
            let base = gate.url();
            let r = replay(jobs, &base, vec![ws(&base)]).await;
            gate.shutdown().await;
            r
        }
        Front::Nginx(balance) => {
            let bin = nginx_bin.expect("nginx");
            let addrs: Vec<_> = sims.iter().map(|s| s.addr()).collect();
            let proxy = NginxProcess::start(bin, &addrs, balance)
                .await
                .expect("nginx");
            // nginx passes events through one socket per backend; follow each sim directly.
            let urls = sims.iter().map(|s| ws(&s.url())).collect();
            replay(jobs, &proxy.url(), urls).await
        }
    };
    let latencies: Vec<f64> = submitted
        .iter()
        .filter_map(|(id, t0)| {
            done.get(id)
                .map(|(t1, _)| (*t1 - *t0).as_secs_f64() / TIME_SCALE)
        })
        .collect();
    let failed = jobs.len() - done.values().filter(|(_, ok)| *ok).count();
    let last = done.values().map(|(t, _)| *t).max().unwrap_or(start);
    let makespan = (last - start).as_secs_f64() / TIME_SCALE;
    let busy = busy_seconds(&sims).await;
    Outcome {
        latencies,
        makespan,
        busy_share: busy / (makespan * FLEET.len() as f64),
        loads: sims.iter().map(|s| s.counters().checkpoint_loads).sum(),
        failed,
    }
}

fn main() {
    // `cargo bench --bench scheduling -- WORD` runs only the policies whose name contains WORD.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let nginx_bin = nginx::find_nginx();
    println!(
        "# Scheduling benchmark ({JOBS} jobs, fleet speeds 2/1/1/0.5, VRAM 80/24/24/12 GB, time scale {TIME_SCALE})\n"
    );
    match &nginx_bin {
        Some(bin) => println!("nginx: {} (real nginx rows included)\n", bin.display()),
        None => println!(
            "nginx: not on PATH, real nginx rows skipped (the nginx-like rows are nginx's policies as gate pickers)\n"
        ),
    }
    let mut policies = vec![
        (
            "gate default (gpu_aware, late binding)",
            Front::Gate("gpu_aware", 2),
        ),
        (
            "gate gpu_aware, bound immediately",
            Front::Gate("gpu_aware", 1000),
        ),
        (
            "round robin (nginx-like picker)",
            Front::Gate("round_robin", 1000),
        ),
        (
            "least connections (nginx-like picker)",
            Front::Gate("least_inflight", 1000),
        ),
    ];
    if nginx_bin.is_some() {
        policies.push((
            "nginx round robin (real nginx)",
            Front::Nginx(Balance::RoundRobin),
        ));
        policies.push((
            "nginx least_conn (real nginx)",
            Front::Nginx(Balance::LeastConn),
        ));
    }
    for load in [0.70, 0.95] {
        let jobs = trace(load, 42, JOBS);
        let (refs, best) = clairvoyant::references(&jobs, &FLEET, Rules::default().max_skips);
        let r = refs[best].summary();
        println!("## Load {:.0} % of capacity\n", load * 100.0);
        print_head();
        clairvoyant::print_rows(&refs, &r);
        for (name, front) in &policies {
            if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            let o = rt.block_on(run_policy(&jobs, *front, nginx_bin.as_deref()));
            print_row(name, &o, &r);
            if let Front::Gate(policy, max_inflight) = front {
                let (o, _) =
                    des::simulate(&jobs, &FLEET, des_picker(policy).as_ref(), *max_inflight);
                print_row("↳ the DES, same trace and policy", &o, &r);
            }
        }
        println!();
    }
}

/// The gate's picker of a `placement.policy` name, for the DES.
fn des_picker(policy: &str) -> Box<dyn Picker> {
    match policy {
        "gpu_aware" => Box::new(GpuAware::default()),
        "round_robin" => Box::new(RoundRobin::default()),
        "least_inflight" => Box::new(LeastInFlight),
        other => panic!("no DES picker for {other}"),
    }
}
