//! The gateway: ComfyUI's HTTP and WebSocket API in front of many backends, with a gate-side
//! queue and late binding (design §1–2).
//!
//! A prompt is recorded (owner map first: WebSocket events can beat HTTP answers), then either
//! forwarded at once to the best backend with a free slot, or held in the gate queue until a
//! slot frees. One upstream socket per backend, under the gate's own clientId, carries every
//! event of every prompt; the gate routes each to the client that owns the prompt.

mod admin;
pub mod capabilities;
mod dispatch;
mod events;
pub mod fleet;
mod gate_files;
mod health;
mod merged;
pub mod placement;
mod placing;
pub mod prompts;
mod recovery;
mod routes;
pub mod sessions;
pub mod store;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use indexmap::IndexMap;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use fleet::BackendState;
use gate_files::GateFiles;
use placement::Picker;
use placement::stats::Learned;
use prompts::{PromptTable, Stage};
use sessions::Sessions;
use upstream::Upstream;

/// Shared state of a running gate.
pub struct Gate {
    pub config: Arc<Config>,
    pub backends: Vec<Arc<BackendState>>,
    prompts: Mutex<PromptTable>,
    pub sessions: Sessions,
    pub upstream: Upstream,
    picker: Box<dyn Picker>,
    /// Run times, load times, VRAM peaks and resident checkpoints learned from the fleet.
    learned: Mutex<Learned>,
    /// The most recent placement decisions, newest last (admin API).
    decisions: Mutex<std::collections::VecDeque<Value>>,
    files: GateFiles,
    /// Wakes the dispatcher: a slot freed, a prompt arrived, a backend came up.
    wake: Notify,
    /// Serialises slot reservation so two dispatches never take the same slot.
    reserve: Mutex<()>,
    /// Bumped when a backend's health flips (invalidates merged caches).
    pub fleet_generation: AtomicU64,
    merged_cache: Mutex<merged::Cache>,
    /// Durable state (queue, owners, history, aliases).
    store: Arc<store::Store>,
    /// NVML readings for backends whose GPU is local: the sampler and, per backend, its slot.
    nvml: Option<(crate::telemetry::NvmlSampler, Vec<Option<usize>>)>,
    /// Finished prompts' history entries, oldest first: `id → (finished_at_ms, entry)`.
    history: Mutex<IndexMap<String, (i64, Arc<Value>)>>,
    pub stop: CancellationToken,
}

/// A running gate, as `run` returns it.
pub struct GateHandle {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gate: Arc<Gate>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GateHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: stops accepting, closes client sockets with 1001, gives in-flight
    /// requests up to `recovery.drain_timeout_ms`, then stops. Everything accepted is already
    /// persisted; a restart with the same state directory finishes it.
    pub async fn shutdown(self) {
        self.gate.sessions.close_all();
        // Let every socket send its close frame before the process goes.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.gate.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.stop.cancel();
        let drain = self.gate.config.drain_timeout() + std::time::Duration::from_millis(500);
        let _ = tokio::time::timeout(drain, futures_util::future::join_all(self.tasks)).await;
    }
}

impl Gate {
    fn lock_prompts(&self) -> MutexGuard<'_, PromptTable> {
        self.prompts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `{"exec_info": {"queue_remaining": N}}` over the gate queue and every backend.
    pub fn queue_info(&self) -> Value {
        let queued = self.lock_prompts().queue_len();
        let on_backends: usize = self
            .backends
            .iter()
            .map(|b| b.queue_remaining.load(Ordering::SeqCst))
            .sum();
        json!({ "exec_info": { "queue_remaining": queued + on_backends } })
    }

    /// The gate-wide `status` broadcast.
    pub fn broadcast_status(&self) {
        self.sessions
            .broadcast_json("status", json!({ "status": self.queue_info() }));
    }

    /// The gate's feature flags (`/features` and the `feature_flags` reply).
    pub fn features(&self) -> Value {
        json!({
            "supports_preview_metadata": true,
            "max_upload_size": self.config.server.max_body_bytes,
            "extension": { "manager": { "supports_v4": true } },
        })
    }

    /// The node now executing for a client's running prompt (the reconnect replay).
    fn running_node_of(&self, sid: &str) -> Option<String> {
        self.lock_prompts()
            .records()
            .filter(|r| r.client_id.as_deref() == Some(sid) && r.started)
            .filter(|r| r.stage == prompts::Stage::OnBackend)
            .find_map(|r| r.last_node.clone())
    }

    pub fn backend(&self, id: usize) -> &Arc<BackendState> {
        &self.backends[id]
    }

    /// Whether any backend can take work.
    pub fn ready(&self) -> bool {
        self.backends.iter().any(|b| b.is_up())
    }
}

/// Starts NVML sampling for the backends mapped to a local GPU. Without the library (or a GPU)
/// one line says so and `/system_stats` serves every backend.
fn start_nvml(config: &Config) -> Option<(crate::telemetry::NvmlSampler, Vec<Option<usize>>)> {
    if !config.telemetry.nvml {
        return None;
    }
    let mut selectors = Vec::new();
    let mut slots = Vec::new();
    for b in &config.backends {
        match &b.gpu {
            Some(g) => {
                slots.push(Some(selectors.len()));
                selectors.push(g.clone());
            }
            None => slots.push(None),
        }
    }
    if selectors.is_empty() {
        return None;
    }
    let interval = std::time::Duration::from_millis(config.telemetry.interval_ms);
    match crate::telemetry::NvmlSampler::start(
        config.telemetry.nvml_library.as_deref(),
        selectors,
        interval,
    ) {
        Ok(sampler) => {
            tracing::info!(gpus = sampler.uuids().len(), "NVML telemetry on");
            Some((sampler, slots))
        }
        Err(reason) => {
            tracing::warn!("NVML unavailable ({reason}); using /system_stats for every backend");
            None
        }
    }
}

/// Starts the gate: client listener, admin listener, probes, upstream sockets, dispatcher and
/// watchdog. State from an earlier run in the same state directory is loaded first; a store that
/// cannot be read is an error naming its file.
pub async fn run(config: Config) -> std::io::Result<GateHandle> {
    let config = Arc::new(config);
    let state_dir = config.state_dir();
    let (store, loaded) =
        store::Store::open(&state_dir).map_err(|e| std::io::Error::other(e.to_string()))?;
    let store = Arc::new(store);
    let listener = TcpListener::bind(config.server.listen).await?;
    let admin_listener = TcpListener::bind(config.server.admin_listen).await?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let stop = CancellationToken::new();
    let backends: Vec<Arc<BackendState>> = config
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Arc::new(BackendState::new(
                i,
                b.clone(),
                format!("comfy-gate-{}-{i}", loaded.gate_id),
            ))
        })
        .collect();
    let files = GateFiles::open(&state_dir, store.clone(), loaded.aliases)?;
    let mut table = PromptTable::default();
    table.set_counter(loaded.counter);
    let mut queued = Vec::new();
    for mut r in loaded.records {
        match (r.stage, r.owner) {
            (Stage::Queued, _) | (Stage::Dispatching | Stage::OnBackend, None) => {
                queued.push(r.id.clone());
            }
            (Stage::Dispatching | Stage::OnBackend, Some(o)) if o < backends.len() => {
                // Re-attached once its backend answers (see `reconcile`).
                r.stage = Stage::OnBackend;
                backends[o].inflight.fetch_add(1, Ordering::SeqCst);
            }
            (Stage::Dispatching | Stage::OnBackend, Some(_)) => queued.push(r.id.clone()),
            (Stage::Done, _) => {}
        }
        table.insert(r);
    }
    for id in &queued {
        table.enqueue(id);
    }
    let history: IndexMap<String, (i64, Arc<Value>)> = loaded
        .history
        .into_iter()
        .map(|(id, t, e)| (id, (t, Arc::new(e))))
        .collect();
    if table.records().next().is_some() {
        tracing::info!(
            prompts = table.records().count(),
            queued = queued.len(),
            "state restored"
        );
    }
    let nvml = start_nvml(&config);
    let gate = Arc::new(Gate {
        upstream: Upstream::new(config.upstream_timeout()),
        config: config.clone(),
        backends,
        prompts: Mutex::new(table),
        sessions: Sessions::default(),
        picker: placement::by_name(&config.placement.policy).expect("validated policy"),
        learned: Mutex::new(Learned::default()),
        decisions: Mutex::new(std::collections::VecDeque::new()),
        files,
        wake: Notify::new(),
        reserve: Mutex::new(()),
        fleet_generation: AtomicU64::new(0),
        merged_cache: Mutex::new(merged::Cache::default()),
        store,
        nvml,
        history: Mutex::new(history),
        stop: stop.clone(),
    });
    // One probe round before serving, so the first prompt sees a known fleet.
    health::probe_all(&gate).await;
    let mut tasks = Vec::new();
    for b in &gate.backends {
        tasks.push(tokio::spawn(health::probe_loop(gate.clone(), b.id)));
        tasks.push(tokio::spawn(events::upstream_loop(gate.clone(), b.id)));
    }
    tasks.push(tokio::spawn(dispatch::dispatcher_loop(gate.clone())));
    tasks.push(tokio::spawn(recovery::watchdog_loop(gate.clone())));
    let serving = gate.clone();
    let handler = Arc::new(move |req, info| routes::handle(serving.clone(), req, info));
    let options = crate::http::ServeOptions {
        header_read_timeout: config.header_read_timeout(),
        drain: Some(config.drain_timeout()),
    };
    tasks.push(tokio::spawn(crate::http::serve(
        listener,
        handler,
        options.clone(),
        stop.clone(),
    )));
    let admin_gate = gate.clone();
    let admin_handler = Arc::new(move |req, _info| admin::handle(admin_gate.clone(), req));
    tasks.push(tokio::spawn(crate::http::serve(
        admin_listener,
        admin_handler,
        options,
        stop.clone(),
    )));
    tracing::info!(%addr, %admin_addr, backends = gate.backends.len(), state = %gate.store.path().display(), "comfy-gate listening");
    Ok(GateHandle {
        addr,
        admin_addr,
        gate,
        stop,
        tasks,
    })
}
