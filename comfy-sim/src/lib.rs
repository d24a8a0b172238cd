//! comfy-sim: a simulated ComfyUI instance that behaves like the real one on the wire.
//!
//! Every test, benchmark and the demo need ComfyUI backends, and CI has no GPU. A sim instance
//! validates prompts as ComfyUI does, runs them one at a time in simulated time (with a cost
//! model, resident models in simulated VRAM and ComfyUI's output cache), writes real PNGs and
//! emits ComfyUI's WebSocket messages in ComfyUI's order. Faults can be injected to exercise the
//! gate's recovery. `docs/comfy-sim.md` lists where it differs from ComfyUI on purpose.
//!
//! It is a crate of its own so that the gate's library does not carry a simulator: it shares
//! only `comfy-wire` (wire shapes, file rules, HTTP plumbing) with the gate and never links it,
//! and the gate links it only for its `demo` command, its tests and its benchmarks.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use comfy_sim::{SimBackend, SimConfig, Fault};
//! let sim = SimBackend::start(SimConfig { time_scale: 0.01, ..Default::default() }).await?;
//! println!("ComfyUI at {}", sim.url());
//! sim.inject(Fault::Crash { restart_after_ms: None });
//! sim.restart().await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod cost;
mod exec;
pub mod faults;

mod graph;
mod hub;

mod instance;
pub mod nodes;
pub mod queue;
mod routes;
mod userdata;
mod utility_nodes;
pub mod validate;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_util::sync::CancellationToken;

use comfy_wire::files::Dirs;
pub use config::{ModelFile, SimConfig};
pub use faults::Fault;
use faults::Faults;
pub use graph::execution_order;
pub use instance::SimStats;
use instance::{Instance, lock};

/// Every node class a sim instance offers: the core catalogue ([`nodes::catalogue`]) and the
/// model-free utility nodes, in `/object_info` order.
pub fn node_catalogue() -> Vec<nodes::NodeDef> {
    nodes::catalogue()
        .into_iter()
        .chain(utility_nodes::defs())
        .collect()
}

/// Requests the HTTP side sends to the owner of the instance (a crash must outlive the request).
pub(crate) enum ControlRequest {
    Inject(Fault),
}

/// Starts simulated instances.
pub struct SimBackend;

impl SimBackend {
    /// Binds `config.listen`, starts the worker and serves until the handle is stopped or
    /// dropped.
    pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
        let (tempdir, base) = match &config.base_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let t = tempfile::Builder::new().prefix("comfy-sim-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (control_tx, mut control_rx) = unbounded_channel();
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            addr,
            base,
            _tempdir: tempdir,
            faults: Arc::new(Faults::default()),
            stats: Arc::new(SimStats::default()),
            current: Mutex::new(None),
            control_tx,
        });
        shared.launch(listener)?;
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(ControlRequest::Inject(fault)) = control_rx.recv().await {
                let Some(shared) = weak.upgrade() else { return };
                SimHandle { shared }.inject(fault);
            }
        });
        Ok(SimHandle { shared })
    }
}

struct Shared {
    config: Arc<SimConfig>,
    addr: SocketAddr,
    base: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    faults: Arc<Faults>,
    stats: Arc<SimStats>,
    current: Mutex<Option<Arc<Instance>>>,
    control_tx: UnboundedSender<ControlRequest>,
}

impl Shared {
    fn launch(&self, listener: TcpListener) -> std::io::Result<()> {
        let dirs = Dirs::create(&self.base)?;
        let stop = CancellationToken::new();
        let inst = Arc::new(Instance::new(
            self.config.clone(),
            dirs,
            self.faults.clone(),
            self.stats.clone(),
            stop.clone(),
        ));
        tokio::spawn(exec::run_worker(inst.clone()));
        let control = self.control_tx.clone();
        let serving = inst.clone();
        let handler =
            Arc::new(move |req, _info| routes::handle(serving.clone(), control.clone(), req));
        tokio::spawn(comfy_wire::http::serve(
            listener,
            handler,
            comfy_wire::http::ServeOptions::default(),
            stop,
        ));
        *lock(&self.current) = Some(inst);
        Ok(())
    }

    fn kill(&self) {
        if let Some(inst) = lock(&self.current).take() {
            inst.stop.cancel();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running (or crashed) simulated instance. Dropping it stops the instance.
pub struct SimHandle {
    shared: Arc<Shared>,
}

/// A snapshot of an instance's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimCounters {
    pub checkpoint_loads: u64,
    pub prompts_accepted: u64,
    pub prompts_finished: u64,
    pub prompts_succeeded: u64,
}

impl SimHandle {
    /// The bound address (stable across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Directory holding `input/`, `output/`, `temp/`, `user/`.
    pub fn base_dir(&self) -> &Path {
        &self.shared.base
    }

    /// Whether the process is up (not crashed or stopped).
    pub fn is_running(&self) -> bool {
        lock(&self.shared.current).is_some()
    }

    /// Injects a fault.
    pub fn inject(&self, fault: Fault) {
        let faults = &self.shared.faults;
        match fault {
            Fault::Crash { restart_after_ms } => {
                self.shared.kill();
                if let Some(ms) = restart_after_ms {
                    let weak = Arc::downgrade(&self.shared);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        if let Some(shared) = weak.upgrade() {
                            let _ = SimHandle { shared }.restart().await;
                        }
                    });
                }
            }
            Fault::Hang => faults.hang.store(true, Ordering::SeqCst),
            Fault::Stall => faults.stall.store(true, Ordering::SeqCst),
            Fault::Slow { factor } => faults.set_slow_factor(factor),
            Fault::FailProbes => faults.fail_probes.store(true, Ordering::SeqCst),
            Fault::OomNext => faults.oom_next.store(true, Ordering::SeqCst),
            Fault::DropWebsockets => {
                if let Some(inst) = lock(&self.shared.current).as_ref() {
                    inst.hub.drop_all();
                }
            }
            Fault::Silent { ms } => faults.set_silent(ms),
            Fault::SlowProbes { ms } => faults.set_slow_probes(ms),
            Fault::SlowRoute { path, ms } => faults.set_slow_route(&path, ms),
            Fault::PoisonPrompt {
                marker,
                restart_after_ms,
            } => faults.set_poison(marker, restart_after_ms),
            Fault::Clear => faults.clear(),
        }
    }

    /// Kills the process: the listener closes, every connection drops, memory state is lost.
    pub fn crash(&self) {
        self.inject(Fault::Crash {
            restart_after_ms: None,
        });
    }

    /// Starts a fresh process on the same address and directories (as after a restart of
    /// ComfyUI: empty queue and history, `temp/` wiped, faults cleared but a poison prompt,
    /// which kills the new process too). No-op if running.
    pub async fn restart(&self) -> std::io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let poison = self.shared.faults.poison();
        self.shared.faults.clear();
        if let Some((marker, restart_after_ms)) = poison {
            self.shared.faults.set_poison(marker, restart_after_ms);
        }
        let mut last_err = None;
        for _ in 0..100 {
            match TcpListener::bind(self.shared.addr).await {
                Ok(listener) => return self.shared.launch(listener),
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("bind failed")))
    }

    /// Stops the process (like a crash, but meant for the end of a test).
    pub fn stop(&self) {
        self.shared.kill();
    }

    pub fn counters(&self) -> SimCounters {
        let s = &self.shared.stats;
        SimCounters {
            checkpoint_loads: s.checkpoint_loads.load(Ordering::SeqCst),
            prompts_accepted: s.prompts_accepted.load(Ordering::SeqCst),
            prompts_finished: s.prompts_finished.load(Ordering::SeqCst),
            prompts_succeeded: s.prompts_succeeded.load(Ordering::SeqCst),
        }
    }
}

/// `GET /sim/stats`: counters and live state, for tests and benchmarks over HTTP.
fn stats_json(inst: &Instance) -> Value {
    let s = &inst.stats;
    let gpu = lock(&inst.gpu);
    json!({
        "name": inst.config.name,
        "checkpoint_loads": s.checkpoint_loads.load(Ordering::SeqCst),
        "prompts_accepted": s.prompts_accepted.load(Ordering::SeqCst),
        "prompts_finished": s.prompts_finished.load(Ordering::SeqCst),
        "prompts_succeeded": s.prompts_succeeded.load(Ordering::SeqCst),
        "resident_models": gpu.resident.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "queue_remaining": lock(&inst.queue).remaining(),
        "websockets": inst.hub.connected(),
    })
}
