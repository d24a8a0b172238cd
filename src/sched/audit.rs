//! What a prompt that ended cost, and who ran it: one JSON line per prompt in the audit log
//! (`[audit] log`), and the same figures charged to its tenant's usage ([`super::usage`]).
//!
//! Both come from one place, `Scheduler::account`, called by `Scheduler::end_where` (every
//! end but a delete) and `delete_where` (a delete): the one place a prompt ends, so each prompt
//! is accounted once, and `/admin/usage` sums exactly what the lines say.
//!
//! The figures:
//! - **run time**: from the run's `execution_start` to its final `executing {node: null}` as
//!   the gate received them. Where the gate did not see the start (it restarted, or the socket
//!   was down) the backend's own timestamps in the history entry are used (`execution_start`
//!   to the terminal message); without those, from when the gate noticed the run. Only the
//!   run that ended is charged: a run thrown away for a retry (a backend lost mid-run, an
//!   out-of-memory retry, `max_run_time_action = "retry"`) is the fleet's cost, not the
//!   tenant's. A prompt the gate ended is charged only for `MaxRunTimeExceeded` (it held the
//!   GPU until the deadline); one that never ran (deleted, refused, no backend) is charged 0.
//! - **GPU-seconds**: run time × GPUs (one per backend).
//! - **queue wait**: from acceptance to the start of its last run, charged or not (to the
//!   end, for a prompt that never ran).
//! - **outputs**: the file items in the history entry's outputs (`images`, `gifs`, `audio`, …
//!   every type but `input`); **output bytes**: their sizes, read with `HEAD /view` on the
//!   backend that holds each (`null` when one cannot be read, or past [`MAX_SIZED`] files).
//!
//! The line goes through the shared log writer ([`crate::logfile`]): non-blocking (the end of
//! a prompt runs on the event loop, and a slow or full disk must not stall every client's
//! events), lossy past [`BUFFERED_LINES`] waiting lines (dropped lines are counted in
//! `/admin/records`; the usage ledger, kept apart, still sums them), and reopened by name on
//! the next line after [`Reopen::reopen`] (`SIGUSR1`, logrotate's convention).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Scheduler;
use super::outcome::terminal_of;
use super::prompts::PromptRecord;
use super::store::Store;
use super::usage::{Charge, Usage, rfc3339};
use crate::config::AuditConfig;
use crate::files::resolve::{Location, size_on};
use crate::files::{FileKey, Files, output_files};
use crate::fleet::{Fleet, GpuId};
pub use crate::logfile::{BUFFERED_LINES, Reopen};
use crate::logfile::{LogTarget, LogWriter};
use crate::protocol::now_ms;
use comfy_wire::files::refs::{FileRef, Kind};

/// A prompt with more output files than this gets `output_bytes: null` (its sizes are not
/// read: one `HEAD` each).
pub const MAX_SIZED: usize = 256;
/// Output sizes read at once for one prompt.
const SIZED_AT_ONCE: usize = 8;

/// How a prompt ended, for [`Scheduler::account`].
pub enum Ending<'a> {
    /// It ran to its end on its backend; its history entry.
    Ran(&'a Value),
    /// The gate ended it: its error entry and the failure's `exception_type`.
    Failed(&'a Value, &'a str),
    /// Deleted before it started.
    Deleted,
}

/// One audit line (field order is the line's).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Line {
    /// When it ended, RFC 3339 UTC with milliseconds.
    pub time: String,
    pub prompt_id: String,
    /// Its user (auth on), else `null`.
    pub user: Option<String>,
    /// Its tenant key (`user:NAME`, `ip:ADDR`): what usage and limits are keyed by.
    pub tenant: String,
    /// The client address it came from.
    pub client: Option<String>,
    /// The backend it ran on (or was last sent to); `null` if it never left the gate queue.
    pub backend: Option<String>,
    /// That backend's GPU as the gate knows it (NVML name and UUID, or `/system_stats`'
    /// device name); `null` if unknown.
    pub gpu: Option<GpuId>,
    /// GPUs its run used (1 per backend; 0 without a backend).
    pub gpus: u32,
    /// Seconds from acceptance to its last run's start (to its end if it never ran).
    pub queue_wait_s: f64,
    /// Seconds of the run charged (see the module docs).
    pub run_s: f64,
    /// `run_s × gpus`: what `/admin/usage` sums.
    pub gpu_seconds: f64,
    /// `success`, `error`, `interrupted` (the backend's terminal event), `failed` (the gate
    /// ended it), `deleted`.
    pub outcome: &'static str,
    /// The error's `exception_type` (`error`, `failed`), else `null`.
    pub error: Option<String>,
    /// Output files its history entry lists.
    pub outputs: usize,
    /// Their total size in bytes; `null` when not known.
    pub output_bytes: Option<u64>,
}

/// The audit log (if configured) and the usage ledger.
pub struct Audit {
    log: Option<LogWriter>,
    usage: Arc<Usage>,
    /// Lines being prepared (output sizes being read).
    pending: AtomicUsize,
    idle: Notify,
}

impl Audit {
    /// Opens `[audit] log` (a path, appended to, or `stdout`) and the usage ledger over
    /// `store` with its loaded rows. A file that cannot be opened is an error naming it.
    pub fn open(
        config: &AuditConfig,
        store: Arc<Store>,
        usage: Vec<(String, Value)>,
    ) -> std::io::Result<Self> {
        let target = match config.log.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("stdout") => Some(LogTarget::Stdout),
            Some(path) => Some(LogTarget::File(PathBuf::from(path))),
        };
        let log = target
            .map(|t| LogWriter::open(&t, "comfy-gate-audit", "audit.log"))
            .transpose()?;
        Ok(Self {
            log,
            usage: Arc::new(Usage::new(store, usage)),
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// The usage ledger.
    pub fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    /// What reopens the log file (for the `SIGUSR1` handler).
    pub fn reopener(&self) -> Reopen {
        self.log
            .as_ref()
            .map(LogWriter::reopener)
            .unwrap_or_default()
    }

    /// Lines dropped because the writer fell [`BUFFERED_LINES`] behind.
    pub fn dropped_lines(&self) -> usize {
        self.log.as_ref().map_or(0, LogWriter::dropped_lines)
    }

    /// For `/admin/records`.
    pub fn counts(&self) -> Value {
        json!({
            "usage_rows": self.usage.len(),
            "audit_lines_pending": self.pending.load(Ordering::SeqCst),
            "audit_lines_dropped": self.dropped_lines(),
        })
    }

    fn write(&self, line: &Line) {
        let Some(log) = &self.log else { return };
        let Ok(mut text) = serde_json::to_vec(line) else {
            return;
        };
        text.push(b'\n');
        log.write_line(&text);
    }

    /// At shutdown: waits up to `wait` for lines being prepared, then has the writer thread
    /// write what waits and end. Lines of prompts that end later are not written.
    pub async fn close(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            loop {
                let idle = self.idle.notified();
                if self.pending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
        let guard = self.log.as_ref().and_then(LogWriter::close);
        if let Some(guard) = guard {
            // Dropping it waits (up to about a second) for the thread to write what waits.
            let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
        }
    }

    fn line_done(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// The run charged: `(its start in ms since the epoch, its length in ms)`, `None` if nothing
/// ran (see the module docs). `now`/`now_ms` are the same moment on both clocks.
fn run_of(
    r: &PromptRecord,
    entry: Option<&Value>,
    now: Instant,
    now_ms: i64,
) -> Option<(i64, u64)> {
    let wall = |at: Instant| now_ms - now.saturating_duration_since(at).as_millis() as i64;
    let seen = |at: Instant| {
        let end = r.ran_at.unwrap_or(now);
        (
            wall(at),
            end.saturating_duration_since(at).as_millis() as u64,
        )
    };
    match (r.started, r.started_at) {
        (true, Some(at)) if !r.start_unseen => return Some(seen(at)),
        _ => {}
    }
    if let Some(from_entry) = entry.and_then(backend_run) {
        return Some(from_entry);
    }
    match (r.started, r.started_at) {
        (true, Some(at)) => Some(seen(at)),
        _ => None,
    }
}

/// A run as the backend's history entry times it: its `execution_start` to its terminal
/// message (ms since the epoch, the backend's clock).
fn backend_run(entry: &Value) -> Option<(i64, u64)> {
    let messages = entry["status"]["messages"].as_array()?;
    let at = |kind: &str| {
        messages
            .iter()
            .rev()
            .find(|m| m[0] == kind)
            .and_then(|m| m[1]["timestamp"].as_i64())
    };
    let start = at("execution_start")?;
    let end = [
        "execution_success",
        "execution_error",
        "execution_interrupted",
    ]
    .iter()
    .find_map(|k| at(k))?;
    Some((start, u64::try_from(end - start).ok()?))
}

/// `(outcome, error type)` of a prompt that ended.
pub(super) fn outcome_of(ending: &Ending<'_>) -> (&'static str, Option<String>) {
    match ending {
        Ending::Deleted => ("deleted", None),
        Ending::Failed(_, kind) => ("failed", Some(kind.to_string())),
        Ending::Ran(entry) => match terminal_of(entry) {
            Some((kind, _)) if kind == "execution_success" => ("success", None),
            Some((kind, _)) if kind == "execution_interrupted" => ("interrupted", None),
            Some((_, data)) => ("error", data["exception_type"].as_str().map(str::to_string)),
            None if entry["status"]["status_str"] == "success" => ("success", None),
            None => ("error", None),
        },
    }
}

/// Whether a prompt the gate ended is charged its run: it held the GPU until the gate stopped
/// it. Runs lost to failing backends (`BackendFailed`, `Quarantined`) are not.
fn charged_when_failed(kind: &str) -> bool {
    kind == "comfy_gate.MaxRunTimeExceeded"
}

/// The total size of `files` (shown names) as their holders report it; `None` if any is
/// unknown.
async fn output_bytes(
    fleet: &Fleet,
    files: &Files,
    owner: Option<&str>,
    keys: &[FileKey],
) -> Option<u64> {
    if keys.len() > MAX_SIZED {
        return None;
    }
    let size = |(kind, sub, name): &FileKey| {
        let r = Kind::parse(kind).map(|k| FileRef::new(k, sub, name));
        async move {
            let r = r?;
            match files.locate(&r) {
                Location::Gate(path) => tokio::fs::metadata(path).await.ok().map(|m| m.len()),
                Location::Backend { backend, real } => {
                    size_on(fleet, fleet.index_of(&backend)?, &real)
                        .await
                        .ok()
                        .flatten()
                }
                Location::Unknown => size_on(fleet, fleet.index_of(owner?)?, &r)
                    .await
                    .ok()
                    .flatten(),
            }
        }
    };
    let mut total = 0;
    for chunk in keys.chunks(SIZED_AT_ONCE) {
        for s in futures_util::future::join_all(chunk.iter().map(size)).await {
            total += s?;
        }
    }
    Some(total)
}

impl Scheduler {
    /// Accounts for prompt `r`, which just ended: charges its tenant's usage now (before its
    /// client hears the end, so a quota read after it counts it) and, with an audit log,
    /// writes its line once its outputs' sizes are read, in a task.
    pub(super) fn account(&self, r: &PromptRecord, ending: Ending<'_>) {
        let (now, end_ms) = (Instant::now(), now_ms());
        let entry = match &ending {
            Ending::Ran(e) | Ending::Failed(e, _) => Some(*e),
            Ending::Deleted => None,
        };
        let (outcome, error) = outcome_of(&ending);
        let charged = match &ending {
            Ending::Ran(_) => true,
            Ending::Failed(_, kind) => charged_when_failed(kind),
            Ending::Deleted => false,
        };
        // A run that is not charged still ends the wait.
        let run = run_of(r, entry, now, end_ms);
        let backend = r.owner.clone();
        let gpus = u32::from(backend.is_some());
        let run_ms = run.filter(|_| charged).map_or(0, |(_, ms)| ms);
        let gpu_ms = run_ms * u64::from(gpus);
        let waited_until = run.map_or(end_ms, |(start, _)| start);
        self.observe(r, &ending, run.map(|(_, ms)| ms), waited_until, end_ms);
        let mut tenant = r.tenant.clone();
        if tenant.key.is_empty() {
            // A record from before tenants were kept.
            tenant.key = "unknown".into();
        }
        self.audit.usage.charge(&Charge {
            at_ms: end_ms,
            tenant: &tenant,
            run_ms,
            gpu_ms,
            outcome,
        });
        if self.audit.log.is_none() {
            return;
        }
        let files = match &ending {
            Ending::Ran(e) => output_files(e),
            _ => Vec::new(),
        };
        let line = Line {
            time: rfc3339(end_ms),
            prompt_id: r.id.clone(),
            user: tenant.user.clone(),
            tenant: tenant.key.clone(),
            client: tenant.client.clone(),
            gpu: backend
                .as_deref()
                .and_then(|b| self.fleet.index_of(b))
                .and_then(|i| self.fleet.gpu_of(i)),
            backend,
            gpus,
            queue_wait_s: (waited_until - r.create_time).max(0) as f64 / 1000.0,
            run_s: run_ms as f64 / 1000.0,
            gpu_seconds: gpu_ms as f64 / 1000.0,
            outcome,
            error,
            outputs: files.len(),
            output_bytes: Some(0),
        };
        if files.is_empty() {
            self.audit.write(&line);
            return;
        }
        self.audit.pending.fetch_add(1, Ordering::SeqCst);
        let (audit, fleet, gate_files) =
            (self.audit.clone(), self.fleet.clone(), self.files.clone());
        tokio::spawn(async move {
            let mut line = line;
            line.output_bytes =
                output_bytes(&fleet, &gate_files, line.backend.as_deref(), &files).await;
            audit.write(&line);
            audit.line_done();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PromptRecord {
        let mut r = PromptRecord::new(
            "p".into(),
            1.into(),
            Default::default(),
            None,
            "x".into(),
            Default::default(),
        );
        r.create_time = 1_000_000;
        r
    }

    fn entry(start: i64, end_kind: &str, end: i64) -> Value {
        json!({"status": {"status_str": "success", "messages": [
            ["execution_start", {"prompt_id": "p", "timestamp": start}],
            ["execution_cached", {"prompt_id": "p", "nodes": [], "timestamp": start}],
            [end_kind, {"prompt_id": "p", "timestamp": end, "exception_type": "torch.OutOfMemoryError"}],
        ]}})
    }

    #[test]
    fn a_run_the_gate_saw_is_timed_by_the_gate() {
        let now = Instant::now();
        let mut r = record();
        r.started = true;
        r.started_at = Some(now - Duration::from_millis(2_500));
        r.ran_at = Some(now - Duration::from_millis(500));
        let e = entry(5, "execution_success", 9_999);
        assert_eq!(
            run_of(&r, Some(&e), now, 10_000_000),
            Some((10_000_000 - 2_500, 2_000))
        );
        r.ran_at = None;
        assert_eq!(
            run_of(&r, None, now, 10_000_000).map(|x| x.1),
            Some(2_500),
            "still running: until now"
        );
    }

    #[test]
    fn a_start_the_gate_missed_is_timed_by_the_backend() {
        let now = Instant::now();
        let mut r = record();
        let e = entry(2_000_000, "execution_success", 2_000_750);
        assert_eq!(run_of(&r, Some(&e), now, 3_000_000), Some((2_000_000, 750)));
        r.started = true;
        r.start_unseen = true;
        r.started_at = Some(now - Duration::from_millis(100));
        assert_eq!(run_of(&r, Some(&e), now, 3_000_000), Some((2_000_000, 750)));
        assert_eq!(
            run_of(&r, Some(&json!({})), now, 3_000_000).map(|x| x.1),
            Some(100),
            "no timestamps: from when the gate noticed"
        );
        assert_eq!(run_of(&record(), None, now, 3_000_000), None);
    }

    #[test]
    fn outcomes_follow_the_terminal_event() {
        let ok = entry(1, "execution_success", 2);
        let err = entry(1, "execution_error", 2);
        let stop = entry(1, "execution_interrupted", 2);
        assert_eq!(outcome_of(&Ending::Ran(&ok)), ("success", None));
        assert_eq!(
            outcome_of(&Ending::Ran(&err)),
            ("error", Some("torch.OutOfMemoryError".into()))
        );
        assert_eq!(outcome_of(&Ending::Ran(&stop)), ("interrupted", None));
        assert_eq!(
            outcome_of(&Ending::Failed(&err, "comfy_gate.NoBackend")),
            ("failed", Some("comfy_gate.NoBackend".into()))
        );
        assert_eq!(outcome_of(&Ending::Deleted), ("deleted", None));
        assert!(charged_when_failed("comfy_gate.MaxRunTimeExceeded"));
        assert!(!charged_when_failed("comfy_gate.BackendFailed"));
    }
}
