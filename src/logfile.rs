//! The writer behind the gate's line logs (the audit log, [`crate::sched::audit`], and the
//! access log, `crate::edge::access_log`): one line per call, never a blocking write on the
//! async threads, and a file that logrotate can rename away.
//!
//! Why non-blocking: both logs are written from the request and event paths, and a slow or
//! full disk must not stall every client. Lines go through a bounded queue to one writer
//! thread (tracing-appender's `NonBlocking`); past [`BUFFERED_LINES`] waiting lines, new ones
//! are dropped and counted ([`LogWriter::dropped_lines`]), the same trade nginx makes with
//! `access_log … buffer=` (it loses what a crash leaves in the buffer).
//!
//! Why reopen by name: logrotate renames the file and then signals the process (`SIGUSR1`,
//! nginx's `USR1` convention, `deploy/logrotate.d/comfy-gate`). The writer thread reopens
//! the path before its next line, which creates the new file as the gate's own user. Lines
//! written between the rename and that line go to the renamed file; none is lost.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines waiting for a log's writer thread before new ones are dropped.
pub const BUFFERED_LINES: usize = 65_536;

/// Where a log's lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// The process's standard output (journald under systemd); never reopened.
    Stdout,
    /// A file, appended to, created if missing, reopened by name on [`Reopen::reopen`].
    File(PathBuf),
}

/// Asks a log to reopen its file (cheap to clone; a no-op for stdout).
#[derive(Clone, Default)]
pub struct Reopen(Option<Arc<AtomicBool>>);

impl Reopen {
    /// The file is reopened by name before the next line is written.
    pub fn reopen(&self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// One log: a bounded, lossy queue to its own writer thread.
pub struct LogWriter {
    writer: NonBlocking,
    /// Taken by [`LogWriter::close`]: dropping it has the thread write what waits, then end.
    guard: Mutex<Option<WorkerGuard>>,
    reopen: Reopen,
}

impl LogWriter {
    /// Starts the writer thread `thread_name` over `target`. A file that cannot be opened is
    /// an error whose message starts with `what` (the config field, e.g. `audit.log`) and the
    /// path.
    pub fn open(target: &LogTarget, thread_name: &str, what: &str) -> std::io::Result<Self> {
        let builder = NonBlockingBuilder::default()
            .buffered_lines_limit(BUFFERED_LINES)
            .lossy(true)
            .thread_name(thread_name);
        let (writer, guard, reopen) = match target {
            LogTarget::Stdout => {
                let (writer, guard) = builder.finish(std::io::stdout());
                (writer, guard, Reopen::default())
            }
            LogTarget::File(path) => {
                let file = open_append(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
                })?;
                let flag = Arc::new(AtomicBool::new(false));
                let (writer, guard) = builder.finish(ReopeningFile {
                    path: path.clone(),
                    file: BufWriter::new(file),
                    reopen: flag.clone(),
                    failing: false,
                });
                (writer, guard, Reopen(Some(flag)))
            }
        };
        Ok(Self {
            writer,
            guard: Mutex::new(Some(guard)),
            reopen,
        })
    }

    /// Queues one line (`line` should end with `\n`); never blocks. Dropped (and counted) when
    /// [`BUFFERED_LINES`] already wait, or after [`LogWriter::close`].
    pub fn write_line(&self, line: &[u8]) {
        // One write is one entry in the writer's queue.
        let _ = self.writer.clone().write_all(line);
    }

    /// What reopens this log's file (for the `SIGUSR1` handler).
    pub fn reopener(&self) -> Reopen {
        self.reopen.clone()
    }

    /// Lines dropped because the writer fell [`BUFFERED_LINES`] behind.
    pub fn dropped_lines(&self) -> usize {
        self.writer.error_counter().dropped_lines()
    }

    /// Stops taking lines; the returned guard, when dropped, has the thread write what waits
    /// and end (which may block for up to about a second: drop it off the async threads).
    /// `None` after the first call.
    pub fn close(&self) -> Option<WorkerGuard> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The log file, reopened by name when asked (after logrotate renamed it).
struct ReopeningFile {
    path: PathBuf,
    file: BufWriter<File>,
    reopen: Arc<AtomicBool>,
    /// The last reopen failed (logged once until one succeeds).
    failing: bool,
}

impl ReopeningFile {
    fn reopen_if_asked(&mut self) {
        if !self.reopen.swap(false, Ordering::SeqCst) {
            return;
        }
        let _ = self.file.flush();
        match open_append(&self.path) {
            Ok(f) => {
                self.file = BufWriter::new(f);
                self.failing = false;
            }
            Err(e) => {
                // Go on with the old file, and try again at the next line.
                self.reopen.store(true, Ordering::SeqCst);
                if !self.failing {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot reopen a log file; still writing to the old one");
                }
                self.failing = true;
            }
        }
    }
}

impl Write for ReopeningFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.reopen_if_asked();
        self.file.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.reopen_if_asked();
        self.file.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopened_file_starts_anew_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let flag = Arc::new(AtomicBool::new(false));
        let mut f = ReopeningFile {
            path: path.clone(),
            file: BufWriter::new(open_append(&path).unwrap()),
            reopen: flag.clone(),
            failing: false,
        };
        f.write_all(b"one\n").unwrap();
        f.flush().unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        f.write_all(b"two\n").unwrap();
        Reopen(Some(flag)).reopen();
        f.write_all(b"three\n").unwrap();
        f.flush().unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("audit.log.1"), "one\ntwo\n");
        assert_eq!(read("audit.log"), "three\n");
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory is not a file to append to.
        let target = LogTarget::File(dir.path().to_path_buf());
        let e = LogWriter::open(&target, "test-log", "access_log.path")
            .err()
            .expect("refused");
        assert!(e.to_string().starts_with("access_log.path "), "{e}");
    }

    #[test]
    fn lines_reach_the_file_and_close_flushes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let log = LogWriter::open(&LogTarget::File(path.clone()), "test-log", "x").unwrap();
        log.write_line(b"a\n");
        log.write_line(b"b\n");
        drop(log.close());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\n");
        assert_eq!(log.dropped_lines(), 0);
        assert!(log.close().is_none(), "closed once");
    }
}
