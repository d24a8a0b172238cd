//! `comfy-gate`: run the gateway, check a config, run the demo fleet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use comfy_gate::config;

mod service;

/// mimalloc: a proxy allocates and frees many small buffers per request (headers, JSON values);
/// glibc malloc spent about a sixth of the gate's CPU on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "comfy-gate",
    version,
    about = "GPU-aware reverse proxy and load balancer for ComfyUI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Run {
        /// Configuration file (see proxy.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Client-facing address (overrides the file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin address (overrides the file).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// A backend base URL, repeatable (replaces the file's backends).
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Directory of the durable state (overrides `server.state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Ask a running gate to read its configuration again (`POST /admin/reload` on its admin
    /// listener, what `SIGHUP` and `systemctl reload` do): prints what changed, or the
    /// file's error (file, line, field) and exits 1.
    Reload {
        /// The gate's configuration file: its `server.admin_listen` is where to ask.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The admin listener's URL, e.g. `http://127.0.0.1:8189` (overrides `--config`).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Validate a configuration file and report errors with file, line and field.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a new token for a user of `[auth] mode = "token"`: prints the token on stderr (give
    /// it to the user; it is stored nowhere) and the `[[users]]` lines for proxy.toml on
    /// stdout.
    Token {
        /// The user's name (A-Z a-z 0-9 . _ -).
        name: String,
    },
    /// Read every local GPU through NVML once and print what it read (JSON).
    Gpus {
        /// Path of the NVML library (default: libnvidia-ml.so.1).
        #[arg(long)]
        nvml_library: Option<PathBuf>,
    },
    /// Start three simulated ComfyUI backends and the gate in front of them.
    Demo {
        /// Client-facing address.
        #[arg(long, default_value = "127.0.0.1:8188")]
        listen: SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:8189")]
        admin_listen: SocketAddr,
        /// Simulated time scale (1.0 = real GPU durations).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
    },
    /// Send prompts to a ComfyUI-compatible server (ComfyUI, the gate, comfy-sim) and report
    /// counts, latency percentiles, throughput and errors.
    Loadtest {
        /// Base URL of the server, http://HOST:PORT.
        #[arg(long)]
        url: String,
        /// Workflow in ComfyUI's API format, or a {"prompt": …} body (default: built-in
        /// SDXL txt2img).
        #[arg(long)]
        workflow: Option<PathBuf>,
        /// Concurrent users, each with its own client_id and WebSocket.
        #[arg(long, default_value_t = 1)]
        users: usize,
        /// Prompts per user (default 1, or unlimited with --duration).
        #[arg(long)]
        requests_per_user: Option<u64>,
        /// Stop submitting after this many seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        duration: Option<Duration>,
        /// Open loop: prompts per second arriving as a Poisson process.
        #[arg(long)]
        rate: Option<f64>,
        /// Vary an input per prompt: `seed` gives every seed / noise_seed input a random value.
        #[arg(long, value_parser = ["seed"])]
        vary: Option<String>,
        /// Per-prompt timeout in seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "600")]
        timeout: Duration,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the run as one self-contained HTML page of charts (latency, throughput
        /// over time, prompts per backend) to this file.
        #[arg(long, value_name = "FILE.html")]
        report: Option<PathBuf>,
        /// The gate's admin listener, http://HOST:PORT: read which backend ran each prompt from
        /// its /admin/decisions (the client API cannot tell) for the per-backend share.
        #[arg(long, value_name = "URL")]
        admin_url: Option<String>,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("expected a positive number of seconds, got {s:?}"))
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `SIGUSR1` reopens the audit log and the access log files by name (logrotate's
/// `postrotate` convention, nginx's `USR1`).
#[cfg(unix)]
fn reopen_on_sigusr1(
    audit: comfy_gate::sched::audit::Reopen,
    access: comfy_gate::edge::access_log::AccessLog,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1: the audit and access logs are reopened");
            audit.reopen();
            access.reopen();
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reopen_on_sigusr1(
    _audit: comfy_gate::sched::audit::Reopen,
    _access: comfy_gate::edge::access_log::AccessLog,
) -> anyhow::Result<()> {
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Token { name } => {
            if !config::valid_name(&name) {
                eprintln!(
                    "{name:?}: a user name is 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
                );
                std::process::exit(2);
            }
            let (token, digest) = comfy_gate::edge::auth::new_token();
            // The token on stderr, the lines for the file on stdout: `comfy-gate token NAME >>
            // proxy.toml` never writes the secret into the file.
            eprintln!("token for {name} (give it to them; it is stored nowhere): {token}");
            println!("\n[[users]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"");
            Ok(())
        }
        Command::Check { config: path } => match config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: ok ({} backends, listen {})",
                    path.display(),
                    c.backends.len(),
                    c.server.listen
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        Command::Run {
            config: path,
            listen,
            admin_listen,
            backends,
            state_dir,
        } => {
            let source = config::Source {
                path,
                listen,
                admin_listen,
                backends,
                state_dir,
            };
            let cfg = match source.read() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            };
            let handle = match comfy_gate::run(cfg).await {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("comfy-gate: {e}");
                    std::process::exit(1);
                }
            };
            if source.path.is_some() {
                handle.reloader().set_source(source);
            }
            reopen_on_sigusr1(handle.audit_reopener(), handle.access_log())?;
            println!(
                "comfy-gate listening on {} (admin http://{})",
                handle.url(),
                handle.admin_addr
            );
            service::serve_until_stopped(&handle).await?;
            handle.shutdown().await;
            Ok(())
        }
        Command::Reload {
            config: path,
            admin,
        } => {
            let admin = match (admin, path) {
                (Some(url), _) => url,
                (None, Some(p)) => match config::load(&p) {
                    Ok(c) => format!("http://{}", c.server.admin_listen),
                    Err(e) => {
                        eprintln!("{e}");
                        std::process::exit(1);
                    }
                },
                (None, None) => format!("http://{}", config::ServerConfig::default().admin_listen),
            };
            std::process::exit(service::ask_to_reload(&admin).await)
        }
        Command::Gpus { nvml_library } => {
            match comfy_gate::fleet::nvml::probe(nvml_library.as_deref()) {
                Ok(gpus) => {
                    let out: Vec<serde_json::Value> = gpus
                    .iter()
                    .map(|g| {
                        serde_json::json!({
                            "uuid": g.uuid, "name": g.name, "total": g.total, "free": g.free, "used": g.used,
                            "gpu_util": g.gpu_util, "mem_util": g.mem_util,
                            "temperature_c": g.temperature_c, "power_mw": g.power_mw,
                        })
                    })
                    .collect();
                    println!("{}", serde_json::to_string_pretty(&out)?);
                    Ok(())
                }
                Err(e) => {
                    eprintln!("comfy-gate: NVML unavailable: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Demo {
            listen,
            admin_listen,
            time_scale,
        } => run_demo(listen, admin_listen, time_scale).await,
        Command::Loadtest {
            url,
            workflow,
            users,
            requests_per_user,
            duration,
            rate,
            vary,
            timeout,
            json,
            report,
            admin_url,
        } => {
            use comfy_gate::loadtest::{self, LoadTest, Options};
            let graph = match workflow.as_deref().map(loadtest::workflow::load_file) {
                None => loadtest::workflow::default_workflow(),
                Some(Ok(g)) => g,
                Some(Err(e)) => {
                    eprintln!("comfy-gate loadtest: {e}");
                    std::process::exit(1);
                }
            };
            let options = Options {
                workflow: graph,
                users,
                requests_per_user,
                duration,
                rate,
                vary_seed: vary.is_some(),
                timeout,
                progress: true,
                admin_url,
                ..Options::new(&url)
            };
            // The report's file is opened before the run, so a bad path fails in a second,
            // not after an hour of load; it is removed again when the run cannot start.
            let page = match &report {
                None => None,
                Some(path) => match std::fs::File::create(path) {
                    Ok(file) => Some((path, file)),
                    Err(e) => {
                        eprintln!("comfy-gate loadtest: cannot write {}: {e}", path.display());
                        std::process::exit(1);
                    }
                },
            };
            let result = match LoadTest::new(options).run().await {
                Ok(result) => result,
                Err(e) => {
                    if let Some((path, _)) = page {
                        let _ = std::fs::remove_file(path);
                    }
                    eprintln!("comfy-gate loadtest: {e}");
                    std::process::exit(1);
                }
            };
            if json {
                println!("{}", result.to_json());
            } else {
                print!("{result}");
            }
            if let Some((path, mut file)) = page {
                use std::io::Write;
                if let Err(e) = file
                    .write_all(result.to_html().as_bytes())
                    .and_then(|()| file.flush())
                {
                    eprintln!("comfy-gate loadtest: cannot write {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
            Ok(())
        }
    }
}

/// `comfy-gate demo`: the simulated fleet behind the gate until Ctrl-C.
#[cfg(feature = "demo")]
async fn run_demo(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    time_scale: f64,
) -> anyhow::Result<()> {
    let demo = comfy_gate::demo::start(listen, admin_listen, time_scale).await?;
    println!("comfy-gate demo listening on http://{}", demo.gate.addr);
    println!(
        "dashboard: http://{}/  (the fleet live, with an hour of replay; Prometheus: /metrics)",
        demo.gate.admin_addr
    );
    for s in &demo.sims {
        let c = s.config();
        println!(
            "  backend {:<10} {}  speed {:.1}  VRAM {} GB",
            c.name,
            s.url(),
            c.speed,
            c.vram_total_gb
        );
    }
    println!(
        "admin: http://{}/readyz  http://{}/admin/backends",
        demo.gate.admin_addr, demo.gate.admin_addr
    );
    println!(
        "open:  http://{}/system_stats  (every simulated GPU)",
        demo.gate.addr
    );
    println!(
        "run:   ComfyUI's script_examples/websockets_api_example.py with server_address = \"{}\"",
        demo.gate.addr
    );
    println!(
        "       (the sims have sd_xl_base_1.0.safetensors and v1-5-pruned-emaonly-fp16.safetensors)"
    );
    service::shutdown_signal().await;
    demo.gate.shutdown().await;
    Ok(())
}

/// Without the `demo` feature the gate links no simulator; the subcommand says so.
#[cfg(not(feature = "demo"))]
async fn run_demo(
    _listen: SocketAddr,
    _admin_listen: SocketAddr,
    _time_scale: f64,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "this comfy-gate was built without the demo (cargo feature `demo`); rebuild with default features"
    )
}
