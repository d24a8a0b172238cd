//! Live counters of a load test and a one-line progress bar on stderr (drawn only when stderr is
//! a terminal).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::report::Status;

/// How often the progress line is redrawn.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// Counters updated as prompts are submitted and end.
#[derive(Default)]
pub(crate) struct Progress {
    pub submitted: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub timed_out: AtomicU64,
}

impl Progress {
    pub fn record(&self, status: &Status) {
        let counter = match status {
            Status::Succeeded => &self.succeeded,
            Status::Failed(_) => &self.failed,
            Status::TimedOut => &self.timed_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.timed_out.load(Ordering::Relaxed)
    }
}

/// A bar redrawn every 200 ms; cleared when dropped.
pub(crate) struct Bar {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bar {
    /// Starts drawing when `enabled` and stderr is a terminal; otherwise does nothing.
    /// `total` is the number of prompts when known, `duration` the submission window.
    pub fn start(
        enabled: bool,
        progress: Arc<Progress>,
        total: Option<u64>,
        duration: Option<Duration>,
    ) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REDRAW_EVERY);
            loop {
                tick.tick().await;
                let line = render(&progress, total, duration, started.elapsed());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
            }
        });
        Self { task: Some(task) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

fn render(
    p: &Progress,
    total: Option<u64>,
    duration: Option<Duration>,
    elapsed: Duration,
) -> String {
    const WIDTH: usize = 30;
    let done = p.done();
    let fraction = match (total, duration) {
        (Some(t), _) if t > 0 => done as f64 / t as f64,
        (_, Some(d)) if !d.is_zero() => elapsed.as_secs_f64() / d.as_secs_f64(),
        _ => 0.0,
    }
    .clamp(0.0, 1.0);
    let filled = (fraction * WIDTH as f64).round() as usize;
    let of = total.map(|t| format!("/{t}")).unwrap_or_default();
    format!(
        "[{}{}] {done}{of} done, {} in flight | ok {} failed {} timed out {} | {:.0}s",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        p.submitted.load(Ordering::Relaxed).saturating_sub(done),
        p.succeeded.load(Ordering::Relaxed),
        p.failed.load(Ordering::Relaxed),
        p.timed_out.load(Ordering::Relaxed),
        elapsed.as_secs_f64()
    )
}
