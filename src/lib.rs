//! comfy-gate: a GPU-aware reverse proxy and load balancer in front of many ComfyUI instances.
//!
//! The crate's folders are its layers; each imports only the ones below it (a test keeps it
//! so, `tests/layering.rs`):
//!
//! ```text
//! edge ──► api ──► sched ──► sessions, files ──► fleet ──► config, error, logfile, comfy-wire
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
pub mod logfile;
pub mod metrics;
pub mod reload;
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
use sessions::Sessions;

/// How long shutdown waits for client sockets to send their close frames.
pub const CLOSE_FRAMES_WAIT: Duration = Duration::from_secs(1);
/// How often shutdown looks whether every socket has closed.
const CLOSE_FRAMES_POLL: Duration = Duration::from_millis(10);
/// Extra time past `recovery.drain_timeout_ms` before shutdown stops waiting for tasks.
pub const SHUTDOWN_SLACK: Duration = Duration::from_millis(500);
/// How long shutdown waits for audit lines whose output sizes are being read.
const AUDIT_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A running gate, as [`run`] returns it.
pub struct GateHandle {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The cleartext listener that redirects to HTTPS (`[tls] redirect_listen`), if any.
    pub redirect_addr: Option<SocketAddr>,
    config: Arc<config::Live>,
    reloader: Arc<reload::Reloader>,
    connections: http::ConnectionStats,
    tls: Option<Arc<http::TlsAcceptor>>,
    sessions: Arc<Sessions>,
    audit: Arc<sched::audit::Audit>,
    access_log: edge::access_log::AccessLog,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GateHandle {
    /// `http://addr` of the client listener (`https://addr` with `[tls]`).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Client connections open on the client listener now (accepted, not yet closed; upgraded
    /// WebSockets included; the admin and redirect listeners not).
    pub fn open_connections(&self) -> usize {
        self.connections.open()
    }

    /// The client listener's connection count itself, for a watcher that outlives `&self`.
    pub fn connection_stats(&self) -> http::ConnectionStats {
        self.connections.clone()
    }

    /// Reopens the audit log file by name before its next line (what `SIGUSR1` does, after
    /// logrotate renamed it). Nothing without an audit log file.
    pub fn reopen_audit_log(&self) {
        self.audit.reopener().reopen();
    }

    /// What [`GateHandle::reopen_audit_log`] does, for a signal handler that outlives `&self`.
    pub fn audit_reopener(&self) -> sched::audit::Reopen {
        self.audit.reopener()
    }

    /// The reloader (`SIGHUP`, `POST /admin/reload`); see [`reload`].
    pub fn reloader(&self) -> Arc<reload::Reloader> {
        self.reloader.clone()
    }

    /// Reads the configuration source again and puts it in force (what `SIGHUP` does).
    pub async fn reload(&self) -> Result<reload::ReloadReport, reload::ReloadError> {
        self.reloader.reload().await
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load()
    }

    /// The access log (`[access_log]`): `reopen()` it by name (`SIGUSR1`), or `reconfigure()`
    /// it while the gate runs (path, format, off; a config reload). Every clone is the same log.
    pub fn access_log(&self) -> edge::access_log::AccessLog {
        self.access_log.clone()
    }

    /// Reopens the audit log and the access log files by name before their next lines: what
    /// `SIGUSR1` does (logrotate's `postrotate`, nginx's `USR1`).
    pub fn reopen_logs(&self) {
        self.reopen_audit_log();
        self.access_log.reopen();
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
        let drain = self.config.load().drain_timeout() + SHUTDOWN_SLACK;
        let _ = tokio::time::timeout(drain, futures_util::future::join_all(self.tasks)).await;
        // The usage flusher wrote its last rows as it stopped; the audit lines still being
        // prepared are written, then the writer thread ends.
        self.audit.close(AUDIT_CLOSE_WAIT).await;
        self.access_log.close().await;
    }
}

/// Starts the gate: client listener, admin listener, probes, upstream sockets, dispatcher and
/// watchdog. State from an earlier run in the same state directory is loaded first; a store
/// that cannot be read is an error naming its file.
pub async fn run(config: Config) -> std::io::Result<GateHandle> {
    let config = config::Live::new(config);
    let boot = config.load();
    let state_dir = boot.state_dir();
    let names: Vec<String> = boot.backends.iter().map(|b| b.name.clone()).collect();
    let (store, loaded) = sched::store::Store::open(&state_dir, &names)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let store = Arc::new(store);
    let audit = Arc::new(sched::audit::Audit::open(
        &boot.audit,
        store.clone(),
        loaded.usage,
    )?);
    let access_log = edge::access_log::AccessLog::open(&boot.access_log).map_err(|e| e.0)?;
    let tls = match &boot.tls {
        Some(tls) => Some(Arc::new(
            http::TlsAcceptor::from_pem_files(&tls.cert, &tls.key)
                .map_err(|e| std::io::Error::other(format!("[tls]: {e}")))?,
        )),
        None => None,
    };
    let listener = TcpListener::bind(boot.server.listen).await?;
    let admin_listener = TcpListener::bind(boot.server.admin_listen).await?;
    let (addr, admin_addr) = (listener.local_addr()?, admin_listener.local_addr()?);
    let redirect_listener = match boot.tls.as_ref().and_then(|t| t.redirect_listen) {
        Some(at) => Some(TcpListener::bind(at).await?),
        None => None,
    };
    let redirect_addr = match &redirect_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let stop = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::new(boot.metrics.enabled));
    metrics.zero_bands(&boot.auth.bands);
    let fleet = Arc::new(Fleet::new(
        config.clone(),
        &loaded.gate_id,
        stop.clone(),
        metrics.clone(),
    ));
    let files = Arc::new(files::Files::open(
        &state_dir,
        store.clone(),
        loaded.aliases,
        boot.recovery.max_output_names,
    )?);
    let sessions = Arc::new(Sessions::default());
    let table = sched::restore::restore_table(&fleet, loaded.counter, loaded.records);
    files.hold_kept_history(loaded.history.iter().map(|(_, _, entry)| entry));
    let history = sched::history::History::new(store.clone(), loaded.history, &boot.recovery);
    let sched = Arc::new(Scheduler::new(
        config.clone(),
        fleet.clone(),
        sessions.clone(),
        files.clone(),
        store.clone(),
        table,
        history,
        audit.clone(),
        stop.clone(),
    ));
    // One probe round before serving, so the first prompt sees a known fleet.
    fleet::probe::probe_all(&fleet).await;
    let mut tasks = Vec::new();
    let (events_tx, events_rx) = mpsc::channel(fleet::socket::EVENTS_CAPACITY);
    let loops = reload::BackendLoops {
        fleet: fleet.clone(),
        events: events_tx.downgrade(),
    };
    for b in fleet.backends().iter() {
        tasks.extend(loops.start(b.index));
    }
    drop(events_tx);
    // The receiver outlives a panicked event loop: the restarted one reads on from it.
    let events_rx = Arc::new(tokio::sync::Mutex::new(events_rx));
    let sc = sched.clone();
    tasks.push(tokio::spawn(supervise(
        "event loop",
        stop.clone(),
        move || {
            let (sched, events) = (sc.clone(), events_rx.clone());
            async move { sched::events::event_loop(sched, &mut *events.lock().await).await }
        },
    )));
    let sc = sched.clone();
    tasks.push(tokio::spawn(supervise(
        "dispatcher loop",
        stop.clone(),
        move || sched::dispatch::dispatcher_loop(sc.clone()),
    )));
    let (usage, stop_usage) = (audit.usage().clone(), stop.clone());
    tasks.push(tokio::spawn(supervise(
        "usage flusher",
        stop.clone(),
        move || sched::usage::flush_loop(usage.clone(), stop_usage.clone()),
    )));
    let sc = sched.clone();
    tasks.push(tokio::spawn(supervise(
        "watchdog loop",
        stop.clone(),
        move || sched::watchdog::watchdog_loop(sc.clone()),
    )));
    let ctx = Arc::new(api::Ctx {
        config: config.clone(),
        sched: sched.clone(),
        fleet: fleet.clone(),
        sessions: sessions.clone(),
        files,
        merged: Default::default(),
        limits: Default::default(),
    });
    let handler = Arc::new(edge::stack::client_handler(ctx, access_log.clone()));
    // Each listener counts its own connections: a flood of clients never locks the operator
    // out of the admin listener, which has no per-address cap (it is the operator's, on
    // localhost by default).
    let limits: http::SharedLimits = Arc::new(arc_swap::ArcSwap::from_pointee(boot.conn_limits()));
    let admin_limits: http::SharedLimits =
        Arc::new(arc_swap::ArcSwap::from_pointee(admin_limits_of(&boot)));
    let admin_options = http::ServeOptions {
        limits: admin_limits.clone(),
        drain: Some(boot.drain_timeout()),
        ..Default::default()
    };
    let options = http::ServeOptions {
        limits: limits.clone(),
        stats: http::ConnectionStats::default(),
        proxy_protocol: boot.edge.proxy_protocol.then(|| {
            let live = config.clone();
            let trust: http::TrustedPeer = Arc::new(move |ip| {
                edge::forwarded::is_trusted(&live.load().edge.trusted_proxies, ip)
            });
            trust
        }),
        tls: tls.clone(),
        ..admin_options.clone()
    };
    let connections = options.stats.clone();
    if let Some(listener) = redirect_listener {
        let https_port = addr.port();
        let redirect = Arc::new(move |req: hyper::Request<hyper::body::Incoming>, _info| {
            std::future::ready(edge::https_redirect::answer(&req, https_port))
        });
        let redirect_options = http::ServeOptions {
            limits: limits.clone(),
            drain: Some(boot.drain_timeout()),
            ..Default::default()
        };
        tasks.push(tokio::spawn(http::serve(
            listener,
            redirect,
            redirect_options,
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(http::serve(
        listener,
        handler,
        options.clone(),
        stop.clone(),
    )));
    let reloader = Arc::new(reload::Reloader::new(
        config.clone(),
        sched.clone(),
        loops,
        stop.clone(),
    ));
    let log = access_log.clone();
    reloader.add_hook(Box::new(move |c: &Config| {
        log.reconfigure(&c.access_log).map_err(|e| e.to_string())
    }));
    // Each connection reads the caps and timeouts at its accept: new ones get the new values.
    let (caps, admin_caps) = (limits.clone(), admin_limits.clone());
    reloader.add_hook(Box::new(move |c: &Config| {
        caps.store(Arc::new(c.conn_limits()));
        admin_caps.store(Arc::new(admin_limits_of(c)));
        Ok(())
    }));
    // New handshakes get the new certificate; a pair that does not load keeps the old one.
    // (TLS switched on or off, or a new redirect address, waits for a restart: `restart_needed`.)
    if let Some(acceptor) = tls.clone() {
        reloader.add_hook(Box::new(move |c: &Config| match &c.tls {
            Some(t) => acceptor
                .reload(&t.cert, &t.key)
                .map_err(|e| format!("[tls]: {e}; the certificate served so far is kept")),
            None => Ok(()),
        }));
    }
    let for_admin = reloader.clone();
    let dashboard = Arc::new(admin::dashboard::Dashboard::new(stop.clone()));
    metrics.register_collector(Box::new(admin::gauges::FleetGauges {
        sched: Arc::downgrade(&sched),
        connections: connections.clone(),
    }));
    let (d, sc, conns, st) = (
        dashboard.clone(),
        sched.clone(),
        connections.clone(),
        stop.clone(),
    );
    tasks.push(tokio::spawn(supervise(
        "dashboard sampler",
        stop.clone(),
        move || admin::dashboard::sample_loop(d.clone(), sc.clone(), conns.clone(), st.clone()),
    )));
    let admin = Arc::new(admin::Admin {
        sched,
        fleet: fleet.clone(),
        dashboard,
        reload: Arc::new(move || {
            let reloader = for_admin.clone();
            Box::pin(async move {
                match reloader.reload().await {
                    Ok(report) => Ok(serde_json::to_value(report).unwrap_or_default()),
                    Err(e) => Err(e.to_string()),
                }
            })
        }),
    });
    let admin_handler = Arc::new(move |req: hyper::Request<hyper::body::Incoming>, _info| {
        use futures_util::FutureExt;
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        std::panic::AssertUnwindSafe(admin::handle(admin.clone(), req))
            .catch_unwind()
            .map(move |done| {
                done.unwrap_or_else(|payload| {
                    let message = http::panic_message(payload.as_ref());
                    tracing::error!(%method, %path, panic = %message, "admin request panicked; answered 500");
                    error::GateError::Internal.into_response()
                })
            })
    });
    tasks.push(tokio::spawn(http::serve(
        admin_listener,
        admin_handler,
        admin_options,
        stop.clone(),
    )));
    tracing::info!(%addr, %admin_addr, backends = fleet.backends().len(), state = %store.path().display(), "comfy-gate listening");
    Ok(GateHandle {
        addr,
        admin_addr,
        redirect_addr,
        config,
        reloader,
        connections,
        tls,
        sessions,
        audit,
        access_log,
        stop,
        tasks,
    })
}

/// The admin listener's connection limits: the client listener's, without the per-address cap.
fn admin_limits_of(config: &Config) -> http::ConnLimits {
    http::ConnLimits {
        max_connections_per_ip: 0,
        ..config.conn_limits()
    }
}

/// Pause before a loop that panicked runs again: one that panics on every turn logs once a
/// second instead of spinning.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs one of the gate's background loops, and runs it again if it panics. A panic there is a
/// bug, but stopping would be worse: without its dispatcher, event loop, watchdog, probes or
/// upstream sockets the gate would go on accepting prompts and never run or end them, a
/// silent outage. Restarting is safe because each loop keeps its state in the scheduler and
/// fleet, whose locks shrug off poisoning (the event loop's receiver outlives it too); the
/// one item being handled when it panicked is lost, and the watchdog and recovery end what it
/// left half done. Each panic is logged at error level with the loop's name and message.
pub(crate) async fn supervise<F, Fut>(name: &'static str, stop: CancellationToken, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()> + Send,
{
    use futures_util::FutureExt;
    loop {
        match std::panic::AssertUnwindSafe(start()).catch_unwind().await {
            Ok(()) => return,
            Err(payload) => {
                let message = http::panic_message(payload.as_ref());
                tracing::error!(task = name, panic = %message, "background loop panicked; restarting it");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESTART_PAUSE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio_util::sync::CancellationToken;

    /// A loop that panics is run again (after the pause) until it returns on its own.
    #[tokio::test]
    async fn a_panicking_loop_is_restarted_until_it_returns() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        super::supervise("test loop", CancellationToken::new(), move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// A stop while it waits to restart ends the supervisor.
    #[tokio::test]
    async fn a_stop_ends_the_restarts() {
        let stop = CancellationToken::new();
        stop.cancel();
        super::supervise("test loop", stop, || async { panic!("always") }).await;
    }
}
