//! comfy-gate: a GPU-aware reverse proxy and load balancer in front of many ComfyUI instances.
//!
//! The crate's folders are its layers; each imports only the ones below it (a test keeps it
//! so, `tests/layering.rs`):
//!
//! ```text
//! edge ──► api ──► sched ──► sessions, files ──► fleet ──► config, error, comfy-wire
//! admin ─────────► sched
//! ```
//!
//! The simulated ComfyUI (comfy-sim) is a crate of its own, linked only by the `demo` command
//! (feature `demo`) and by the tests and benchmarks. What the gate and the simulator both
//! speak (wire shapes, ComfyUI's file rules, HTTP plumbing) is the `comfy-wire` crate.
//!
//! This file is the wiring and nothing else: it builds the components, connects them, and
//! starts their loops ([`run`]). `docs/architecture.md` follows one prompt through them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod edge;
pub mod error;
pub mod files;
pub mod fleet;
pub mod loadtest;
pub mod sched;
pub mod sessions;

pub use comfy_wire::{http, protocol};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use config::Config;
use fleet::Fleet;
use sched::Scheduler;
use sched::prompts::PromptTable;
use sessions::Sessions;

/// How long shutdown waits for client sockets to send their close frames.
pub const CLOSE_FRAMES_WAIT: Duration = Duration::from_secs(1);
/// How often shutdown looks whether every socket has closed.
const CLOSE_FRAMES_POLL: Duration = Duration::from_millis(10);
/// Extra time past `recovery.drain_timeout_ms` before shutdown stops waiting for tasks.
pub const SHUTDOWN_SLACK: Duration = Duration::from_millis(500);

/// A running gate, as [`run`] returns it.
pub struct GateHandle {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    config: Arc<Config>,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GateHandle {
    /// `http://addr` of the client listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: stops accepting, closes client sockets with 1001, gives in-flight
    /// requests up to `recovery.drain_timeout_ms`, then stops. Everything accepted is already
    /// persisted; a restart with the same state directory finishes it.
    pub async fn shutdown(self) {
        self.sessions.close_all();
        // Let every socket send its close frame before the process goes.
        let deadline = tokio::time::Instant::now() + CLOSE_FRAMES_WAIT;
        while !self.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(CLOSE_FRAMES_POLL).await;
        }
        self.stop.cancel();
        let drain = self.config.drain_timeout() + SHUTDOWN_SLACK;
        let _ = tokio::time::timeout(drain, futures_util::future::join_all(self.tasks)).await;
    }
}

/// Starts the gate: client listener, admin listener, probes, upstream sockets, dispatcher and
/// watchdog. State from an earlier run in the same state directory is loaded first; a store
/// that cannot be read is an error naming its file.
pub async fn run(config: Config) -> std::io::Result<GateHandle> {
    let config = Arc::new(config);
    let state_dir = config.state_dir();
    let names: Vec<String> = config.backends.iter().map(|b| b.name.clone()).collect();
    let (store, loaded) = sched::store::Store::open(&state_dir, &names)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let store = Arc::new(store);
    let listener = TcpListener::bind(config.server.listen).await?;
    let admin_listener = TcpListener::bind(config.server.admin_listen).await?;
    let (addr, admin_addr) = (listener.local_addr()?, admin_listener.local_addr()?);
    let stop = CancellationToken::new();
    let fleet = Arc::new(Fleet::new(config.clone(), &loaded.gate_id));
    let files = Arc::new(files::Files::open(
        &state_dir,
        store.clone(),
        loaded.aliases,
    )?);
    let sessions = Arc::new(Sessions::default());
    let table = restore_table(&fleet, loaded.counter, loaded.records);
    let history = sched::history::History::new(store.clone(), loaded.history, &config.recovery);
    let sched = Arc::new(Scheduler::new(
        config.clone(),
        fleet.clone(),
        sessions.clone(),
        files.clone(),
        store.clone(),
        table,
        history,
        stop.clone(),
    ));
    // One probe round before serving, so the first prompt sees a known fleet.
    fleet::probe::probe_all(&fleet).await;
    let mut tasks = Vec::new();
    let (events_tx, events_rx) = mpsc::channel(fleet::socket::EVENTS_CAPACITY);
    for b in fleet.backends() {
        let (f, s) = (fleet.clone(), stop.clone());
        tasks.push(tokio::spawn(fleet::probe::probe_loop(f, b.index, s)));
        let (f, s, tx) = (fleet.clone(), stop.clone(), events_tx.clone());
        tasks.push(tokio::spawn(fleet::socket::socket_loop(f, b.index, tx, s)));
    }
    drop(events_tx);
    tasks.push(tokio::spawn(sched::events::event_loop(
        sched.clone(),
        events_rx,
    )));
    tasks.push(tokio::spawn(sched::dispatch::dispatcher_loop(
        sched.clone(),
    )));
    tasks.push(tokio::spawn(sched::watchdog::watchdog_loop(sched.clone())));
    let ctx = Arc::new(api::Ctx {
        config: config.clone(),
        sched: sched.clone(),
        fleet: fleet.clone(),
        sessions: sessions.clone(),
        files,
        merged: Default::default(),
    });
    let handler = Arc::new(move |req, info| edge::handle(ctx.clone(), req, info));
    let options = http::ServeOptions {
        header_read_timeout: config.header_read_timeout(),
        drain: Some(config.drain_timeout()),
    };
    tasks.push(tokio::spawn(http::serve(
        listener,
        handler,
        options.clone(),
        stop.clone(),
    )));
    let admin = Arc::new(admin::Admin {
        sched,
        fleet: fleet.clone(),
    });
    let admin_handler = Arc::new(move |req, _info| admin::handle(admin.clone(), req));
    tasks.push(tokio::spawn(http::serve(
        admin_listener,
        admin_handler,
        options,
        stop.clone(),
    )));
    tracing::info!(%addr, %admin_addr, backends = fleet.backends().len(), state = %store.path().display(), "comfy-gate listening");
    Ok(GateHandle {
        addr,
        admin_addr,
        config,
        sessions,
        stop,
        tasks,
    })
}

/// The prompt table as the store left it: waiting prompts queued again; a prompt on a backend
/// re-attached once that backend's socket opens (`recovery::reconcile`), or run again if its
/// backend is no longer configured.
fn restore_table(
    fleet: &Fleet,
    counter: i64,
    records: Vec<sched::prompts::PromptRecord>,
) -> PromptTable {
    use sched::prompts::Stage;
    let mut table = PromptTable::default();
    table.set_counter(counter);
    let restored = records.len();
    for r in records {
        let owner_known = r
            .owner
            .as_deref()
            .is_some_and(|o| fleet.index_of(o).is_some());
        let requeue = match r.stage {
            Stage::Queued => true,
            Stage::Dispatching | Stage::OnBackend | Stage::Finishing => !owner_known,
            Stage::Done => false,
        };
        let id = r.id.clone();
        table.admit(r);
        if requeue {
            table.enqueue(&id);
        }
    }
    if restored > 0 {
        tracing::info!(
            prompts = restored,
            queued = table.queue_len(),
            "state restored"
        );
    }
    table
}
