//! The access log: one line per client request, nginx's `access_log` for the gate
//! (`[access_log]`, docs/gate.md "Access log").
//!
//! Why like nginx: operators already have the tools (goaccess, fail2ban, log shippers) that
//! read nginx's `combined` lines; the `json` format carries the same facts under nginx's
//! variable names, plus the gate's own (user, backend, prompt id), for tools that take JSON.
//!
//! Why the line is written when the response body is done: so that `body_bytes_sent` is what
//! was sent, as nginx counts it (after compression; less than the whole body if the client went
//! away). A WebSocket is one line, with status 101, written when it upgrades. A request whose
//! client went away before the answer is one line with nginx's status 499.
//!
//! Why a handle that swaps: the log can be reconfigured while the gate runs (a config reload
//! switches path, format, or turns it off) and reopened by name (`SIGUSR1`, logrotate).
//! Requests in flight write to whichever log is current when they end. The writing itself is
//! [`crate::logfile`]'s: never a blocking write on the async threads, lossy when far behind.

mod format;
mod layer;

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::config::{self, AccessLogFormat};
use crate::logfile::{LogTarget, LogWriter};
pub use format::Entry;
pub use layer::{AccessLogLayer, AccessLogService, Logged};

/// The access log could not be opened: its message names `access_log.path` and the path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AccessLogError(#[from] pub std::io::Error);

/// The log as it is now: where it writes, and how.
struct Active {
    target: LogTarget,
    format: AccessLogFormat,
    writer: Arc<LogWriter>,
}

/// The gate's access log (cheap to clone: every clone is the same log). Off until configured.
#[derive(Clone, Default)]
pub struct AccessLog {
    active: Arc<ArcSwapOption<Active>>,
}

impl AccessLog {
    /// The log `config` describes (off when it names no path). A file that cannot be opened
    /// for appending is an error naming it.
    pub fn open(config: &config::AccessLog) -> Result<Self, AccessLogError> {
        let log = Self::default();
        log.reconfigure(config)?;
        Ok(log)
    }

    /// Switches to what `config` says, for the lines of requests that end from now on: another
    /// path (opened before the switch), another format (same file), or off. On an error the
    /// log goes on as it was. The log it leaves writes what it had queued, then ends.
    pub fn reconfigure(&self, config: &config::AccessLog) -> Result<(), AccessLogError> {
        let Some(target) = config.target() else {
            retire(self.active.swap(None));
            return Ok(());
        };
        let current = self.active.load_full();
        let writer = match current.as_deref() {
            Some(now) if now.target == target => now.writer.clone(),
            _ => Arc::new(LogWriter::open(
                &target,
                "comfy-gate-access",
                "access_log.path",
            )?),
        };
        let kept = current.is_some_and(|now| Arc::ptr_eq(&now.writer, &writer));
        let old = self.active.swap(Some(Arc::new(Active {
            target,
            format: config.format,
            writer,
        })));
        if !kept {
            retire(old);
        }
        Ok(())
    }

    /// Reopens the log file by name before its next line (what `SIGUSR1` does, after
    /// logrotate renamed it). Nothing when the log is off or on stdout.
    pub fn reopen(&self) {
        if let Some(active) = self.active.load().as_deref() {
            active.writer.reopener().reopen();
        }
    }

    /// Whether lines are being written.
    pub fn is_on(&self) -> bool {
        self.active.load().is_some()
    }

    /// Lines dropped because the writer fell [`crate::logfile::BUFFERED_LINES`] behind (of the
    /// current log).
    pub fn dropped_lines(&self) -> usize {
        self.active
            .load()
            .as_deref()
            .map_or(0, |a| a.writer.dropped_lines())
    }

    /// At shutdown: turns the log off and waits (up to about a second) for its writer to write
    /// what it had queued.
    pub async fn close(&self) {
        let guard = self
            .active
            .swap(None)
            .and_then(|active| active.writer.close());
        if let Some(guard) = guard {
            let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
        }
    }

    /// Writes `entry`'s line in the current format; nothing when the log is off.
    pub fn write(&self, entry: &Entry) {
        if let Some(active) = self.active.load().as_deref() {
            let line = match active.format {
                AccessLogFormat::Combined => entry.combined(),
                AccessLogFormat::Json => entry.json(),
            };
            active.writer.write_line(line.as_bytes());
        }
    }
}

/// Lets a log that was switched away from write what it had queued and end, off the caller's
/// thread (that wait can take about a second).
fn retire(old: Option<Arc<Active>>) {
    if let Some(guard) = old.and_then(|active| active.writer.close()) {
        let _ = std::thread::Builder::new()
            .name("comfy-gate-access-close".into())
            .spawn(move || drop(guard));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(path: &std::path::Path, format: AccessLogFormat) -> config::AccessLog {
        config::AccessLog {
            path: Some(path.display().to_string()),
            format,
        }
    }

    fn entry(status: u16) -> Entry {
        Entry {
            status,
            ..Entry::example()
        }
    }

    /// Waits (within 5 s) until `path` has `n` lines; returns them.
    fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                assert_eq!(lines.len(), n, "{text}");
                return lines;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn reconfigure_switches_format_path_and_off_and_keeps_the_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        let log = AccessLog::open(&at(&a, AccessLogFormat::Combined)).unwrap();
        log.write(&entry(200));
        log.reconfigure(&at(&a, AccessLogFormat::Json)).unwrap();
        log.write(&entry(201));
        let first = lines(&a, 2);
        assert!(first[0].contains("\" 200 "), "{}", first[0]);
        assert!(first[1].starts_with('{') && first[1].contains("\"status\":201"));

        // A directory cannot be appended to: refused, and the log goes on in a.log.
        let e = log
            .reconfigure(&at(dir.path(), AccessLogFormat::Json))
            .unwrap_err();
        assert!(e.to_string().starts_with("access_log.path "), "{e}");
        log.write(&entry(202));
        assert!(lines(&a, 3)[2].contains("\"status\":202"));

        log.reconfigure(&at(&b, AccessLogFormat::Combined)).unwrap();
        log.write(&entry(203));
        assert!(lines(&b, 1)[0].contains("\" 203 "));
        log.reconfigure(&config::AccessLog::default()).unwrap();
        assert!(!log.is_on());
        log.write(&entry(204));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(lines(&b, 1).len(), 1, "off writes nothing");
        assert_eq!(lines(&a, 3).len(), 3);
    }
}
