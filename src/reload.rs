//! Hot reload: `SIGHUP`, `comfy-gate reload` and `POST /admin/reload` read the configuration
//! again ([`config::Source`]) and put it in force without dropping a client connection, a
//! WebSocket, or a queued or running prompt (nginx's `nginx -s reload`).
//!
//! A reload validates the whole new file first; one that fails validation changes nothing and
//! its error names the file, the line and the field. Then, in this order:
//!
//! 1. Backends: one the file names for the first time is added and its probe and socket loops
//!    start; one it no longer names is retired (no new work; prompts it holds but has not
//!    started go back to the head of the gate queue, as `POST /admin/backends/{name}/drain`
//!    does; the one it runs finishes there) and its loops end once it holds nothing; one named
//!    again comes back (with new loops if they had ended); one whose `max_inflight` changed
//!    takes the new value. A name keeps its URL for the life of the gate, retired or not (its
//!    prompts, outputs and store records are keyed by name): a file giving a known name a new
//!    URL is refused (name the new one differently).
//! 2. The snapshot ([`config::Live`]) is swapped: limits, users, tokens, bands, timeouts,
//!    health and placement parameters are read from it from then on.
//! 3. The hooks of the listeners and logs run (TLS certificates, access log, connection caps).
//!    One that refuses its new settings (an access log path that cannot be opened; a
//!    certificate is loaded during validation already) keeps its old ones; the reload is
//!    otherwise in force and its report says what was kept and why.
//!
//! Fields read once at start (the listen addresses, the state directory, the audit log, NVML
//! telemetry, `[metrics]`, `[cache]`, the placement policy, history retention, the PROXY protocol switch, TLS switched
//! on or off and its redirect listener, the CA bundle trusted for `https://` backends) keep
//! their old values; the report names the ones that changed, to be applied by a restart.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError};
use crate::fleet::{self, Fleet};
use crate::sched::{self, Scheduler};

/// How often a retiring backend is checked for prompts it still holds.
const RETIRE_POLL: Duration = Duration::from_millis(250);

/// What a reload did, as `POST /admin/reload` answers it (JSON).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ReloadReport {
    /// The file read.
    pub file: String,
    /// Backends added, by name.
    pub added: Vec<String>,
    /// Backends retired (they finish what they run, then leave), by name.
    pub removed: Vec<String>,
    /// Backends whose `max_inflight` changed, or that a reload named again after they retired.
    pub changed: Vec<String>,
    /// Fields that changed but are read only at start: a restart applies them.
    pub restart_needed: Vec<&'static str>,
    /// Parts that refused their new settings and kept their old ones, with why (e.g. an access
    /// log path that cannot be opened). Empty when everything was applied.
    pub kept_old: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is missing, unreadable, invalid, or cannot be applied to the running gate (a
    /// known backend's new URL): file, line, field.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// There is no file to read (the gate was started without `--config`).
    #[error("the gate was started without --config: there is no file to reload")]
    NoFile,
}

/// Something a reload also updates once the new snapshot is in force (a TLS acceptor, the
/// access log, the connection caps). An error keeps that part's old settings; its text (what
/// and why) goes into [`ReloadReport::kept_old`].
pub type ReloadHook = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;

/// Starts the probe and socket loops of a backend (at start, and for one a reload adds).
#[derive(Clone)]
pub struct BackendLoops {
    pub fleet: Arc<Fleet>,
    /// Weak, so that the event loop ends when the last socket loop does (at shutdown).
    pub events: mpsc::WeakSender<fleet::socket::UpstreamEvent>,
}

impl BackendLoops {
    /// Spawns backend `i`'s loops; they end with its own stop token (the gate's stop, or the
    /// end of its retirement).
    pub fn start(&self, i: usize) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(events) = self.events.upgrade() else {
            return Vec::new(); // the gate is stopping
        };
        let stop = self.fleet.get(i).stop_token();
        self.fleet.metrics.zero_backend(self.fleet.get(i).name());
        let (f, s) = (self.fleet.clone(), stop.clone());
        let probe = tokio::spawn(crate::supervise("probe loop", stop.clone(), move || {
            fleet::probe::probe_loop(f.clone(), i, s.clone())
        }));
        let (f, s, tx) = (self.fleet.clone(), stop.clone(), events);
        let socket = tokio::spawn(crate::supervise("socket loop", stop, move || {
            fleet::socket::socket_loop(f.clone(), i, tx.clone(), s.clone())
        }));
        vec![probe, socket]
    }
}

/// The gate's reloader: one reload at a time.
pub struct Reloader {
    live: Arc<config::Live>,
    sched: Arc<Scheduler>,
    loops: BackendLoops,
    stop: CancellationToken,
    source: std::sync::Mutex<Option<config::Source>>,
    hooks: std::sync::Mutex<Vec<ReloadHook>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader of `live`, whose backends are `loops.fleet`'s; `stop` is the gate's.
    pub fn new(
        live: Arc<config::Live>,
        sched: Arc<Scheduler>,
        loops: BackendLoops,
        stop: CancellationToken,
    ) -> Self {
        Self {
            live,
            sched,
            loops,
            stop,
            source: Default::default(),
            hooks: Default::default(),
            one_at_a_time: Default::default(),
        }
    }

    /// Where a reload reads the configuration from (the binary sets its `--config` and
    /// overrides; without a source a reload is refused).
    pub fn set_source(&self, source: config::Source) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Adds a part that follows reloads.
    pub fn add_hook(&self, hook: ReloadHook) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// Reads the source again and puts it in force (see the module doc). An error changes
    /// nothing; a part that refused its new settings is reported in the `Ok` report.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.one_at_a_time.lock().await;
        let source = self
            .source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let source = source
            .filter(|s| s.path.is_some())
            .ok_or(ReloadError::NoFile)?;
        let file = source
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut next = source.read()?;
        let old = self.live.load();
        let fleet = &self.loops.fleet;
        check_urls(fleet, &next, &file)?;
        let mut report = ReloadReport {
            file,
            restart_needed: restart_needed(&old, &next),
            ..ReloadReport::default()
        };
        self.apply_backends(&next, &mut report);
        let home = &next.backends[next.home].name;
        next.home = fleet.index_of(home).unwrap_or(old.home);
        self.live.store(next);
        let current = self.live.load();
        fleet.changed.notify_one();
        report.kept_old = self
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|hook| hook(&current).err())
            .collect();
        for why in &report.kept_old {
            tracing::error!(error = %why, "part of the reload was refused; that part keeps its old settings");
        }
        tracing::info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            restart_needed = ?report.restart_needed,
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Step 1 of the module doc: adds, retires, brings back and updates backends.
    fn apply_backends(&self, next: &Config, report: &mut ReloadReport) {
        let fleet = &self.loops.fleet;
        for b in &next.backends {
            let Some(i) = fleet.index_of(&b.name) else {
                let i = fleet.add(b.clone());
                self.loops.start(i);
                report.added.push(b.name.clone());
                continue;
            };
            let state = fleet.get(i);
            let back = !state.is_listed();
            if back && fleet.reinstate(i) {
                self.loops.start(i);
            }
            if back || state.max_inflight() != b.max_inflight {
                state.set_max_inflight(b.max_inflight);
                report.changed.push(b.name.clone());
            }
        }
        let named = |name: &str| next.backends.iter().any(|b| b.name == name);
        for b in fleet.backends().iter() {
            if b.is_listed() && !named(b.name()) {
                fleet.retire(b.index);
                report.removed.push(b.name().to_string());
                tokio::spawn(retire(self.sched.clone(), b.index, self.stop.clone()));
            }
        }
    }
}

/// Takes the prompts a retired backend holds but has not started back to the gate queue (again
/// on every poll: one being sent to it as it retired arrives later), and once it holds nothing
/// ends its loops. Named again by a later reload meanwhile, it stays.
async fn retire(sched: Arc<Scheduler>, i: usize, stop: CancellationToken) {
    let b = sched.fleet.get(i);
    loop {
        if b.is_listed() || stop.is_cancelled() {
            return;
        }
        let moved = sched::recovery::take_back_unstarted(&sched, i).await;
        if !moved.is_empty() {
            tracing::info!(
                backend = b.name(),
                prompts = moved.len(),
                "prompts not started on a retired backend go back to the gate queue"
            );
        }
        if sched.held_by(b.name()) == 0 {
            sched.fleet.set_gone(i);
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETIRE_POLL) => {}
        }
    }
}

/// A name keeps its URL for the life of the gate: prompts it runs are followed on its socket,
/// and its name keys them, their outputs and their store records. The error names the file,
/// the line and the field of the new URL.
fn check_urls(fleet: &Fleet, next: &Config, file: &str) -> Result<(), ConfigError> {
    for (i, b) in next.backends.iter().enumerate() {
        let Some(known) = fleet.index_of(&b.name).map(|k| fleet.get(k)) else {
            continue;
        };
        if known.config.base != b.base {
            return Err(ConfigError {
                file: file.to_string(),
                line: b.line,
                field: format!("backend[{i}].url"),
                message: format!(
                    "backend `{}` was {} when the gate started; a name keeps its url while the \
                     gate runs: give the new one another name (the old one then finishes its \
                     work and leaves), or restart the gate",
                    b.name, known.config.base
                ),
            });
        }
    }
    Ok(())
}
/// The fields a reload cannot apply that differ between `old` and `next`.
fn restart_needed(old: &Config, next: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |differs: bool, field: &'static str| {
        if differs {
            changed.push(field);
        }
    };
    check(old.server.listen != next.server.listen, "server.listen");
    check(
        old.server.admin_listen != next.server.admin_listen,
        "server.admin_listen",
    );
    check(old.state_dir() != next.state_dir(), "server.state_dir");
    check(
        old.edge.proxy_protocol != next.edge.proxy_protocol,
        "edge.proxy_protocol",
    );
    check(
        old.tls.is_some() != next.tls.is_some(),
        "tls (switched on or off)",
    );
    check(
        old.tls.as_ref().and_then(|t| t.redirect_listen)
            != next.tls.as_ref().and_then(|t| t.redirect_listen),
        "tls.redirect_listen",
    );
    check(old.backend_ca != next.backend_ca, "tls.backend_ca");
    check(old.telemetry != next.telemetry, "telemetry");
    check(old.metrics != next.metrics, "metrics");
    check(old.cache != next.cache, "cache");
    check(old.audit != next.audit, "audit");
    check(
        old.placement.policy != next.placement.policy,
        "placement.policy",
    );
    check(
        old.recovery.history_max_entries != next.recovery.history_max_entries
            || old.recovery.history_max_age_hours != next.recovery.history_max_age_hours
            || old.recovery.max_output_names != next.recovery.max_output_names,
        "recovery (history_max_entries, history_max_age_hours, max_output_names)",
    );
    let gpu_moved = next.backends.iter().any(|b| {
        old.backends
            .iter()
            .any(|o| o.name == b.name && o.gpu != b.gpu)
    });
    check(gpu_moved, "backend gpu");
    changed
}
