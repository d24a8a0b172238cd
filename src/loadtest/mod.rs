//! A load generator for any ComfyUI-compatible server (ComfyUI, the gate, comfy-sim).
//!
//! Users submit with `POST /prompt` (one client_id per user, a fresh prompt_id per prompt) and
//! follow their prompts over `/ws?clientId=`, falling back to polling `/history/{id}`. Either
//! closed loop (each user submits its next prompt when the last one ends) or open loop (prompts
//! arrive as a Poisson process at `rate` per second, spread over the users' sockets).
//! The [`Report`] prints as a table or JSON, or draws itself as one HTML page of charts
//! ([`Report::to_html`], `--report FILE.html`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), comfy_gate::loadtest::LoadTestError> {
//! use comfy_gate::loadtest::{LoadTest, Options};
//! let report = LoadTest::new(Options {
//!     users: 4,
//!     requests_per_user: Some(3),
//!     ..Options::new("http://127.0.0.1:8188")
//! })
//! .run()
//! .await?;
//! println!("{report}");
//! # Ok(()) }
//! ```

mod backends;
mod client;
mod follow;
mod html;
mod progress;
mod report;
mod svg;
pub mod workflow;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinSet;

use client::Target;
use follow::User;
use progress::{Bar, Progress};
pub use report::{Outcome, Percentiles, Report, Status, UNKNOWN_BACKEND};

/// How long a prompt may take, by default, before it counts as timed out (`--timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Base URL, `http://HOST:PORT`.
    pub url: String,
    /// The graph in ComfyUI's API format (default: [`workflow::default_workflow`]).
    pub workflow: Value,
    /// Concurrent users (closed loop), or client sockets the arrivals share (open loop).
    pub users: usize,
    /// Prompts per user (open loop: `users ×` this in all). `None` with a `duration`: until
    /// the duration is over; `None` without one: 1.
    pub requests_per_user: Option<u64>,
    /// Stop submitting after this long (prompts in flight still finish).
    pub duration: Option<Duration>,
    /// Open loop: prompts per second arriving as a Poisson process.
    pub rate: Option<f64>,
    /// A fresh random value in every `seed` / `noise_seed` input of every prompt.
    pub vary_seed: bool,
    /// Per prompt, from submission to its end.
    pub timeout: Duration,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// The gate's admin listener, `http://HOST:PORT`: when set, which backend ran each prompt
    /// is read from its `/admin/decisions` during the run ([`Report::backends`]). The client
    /// API cannot tell (see `backends`).
    pub admin_url: Option<String>,
}

impl Options {
    /// The defaults (one user, one prompt, the built-in workflow) against `url`.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            workflow: workflow::default_workflow(),
            users: 1,
            requests_per_user: None,
            duration: None,
            rate: None,
            vary_seed: false,
            timeout: DEFAULT_TIMEOUT,
            progress: false,
            admin_url: None,
        }
    }
}

/// Why a load test could not start (nothing was sent to the server's queue).
#[derive(Debug, thiserror::Error)]
pub enum LoadTestError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "{url} does not look like ComfyUI: GET /system_stats and GET /prompt answered HTTP {status}"
    )]
    NotComfyUi { url: String, status: u16 },
    #[error("workflow {name}: {reason}")]
    Workflow { name: String, reason: String },
    #[error("{url}/admin/decisions cannot be read (--admin-url): {reason}")]
    Admin { url: String, reason: String },
    #[error("{0}")]
    Options(String),
}

/// A configured load test.
pub struct LoadTest {
    options: Options,
}

impl LoadTest {
    /// A load test of `options` (nothing is checked or sent until [`LoadTest::run`]).
    pub fn new(options: Options) -> Self {
        Self { options }
    }

    /// Checks the options and the server, sends the load and waits for every prompt.
    pub async fn run(self) -> Result<Report, LoadTestError> {
        run(self.options).await
    }
}

/// What every prompt task shares.
struct Shared {
    workflow: Value,
    vary_seed: bool,
    timeout: Duration,
    progress: Arc<Progress>,
    outcomes: Mutex<Vec<Outcome>>,
    /// Prompts' times are counted from here.
    start: Instant,
}

impl Shared {
    async fn one(&self, user: &User) {
        let mut graph = self.workflow.clone();
        if self.vary_seed {
            workflow::vary_seeds(&mut graph);
        }
        self.progress
            .submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let outcome = user.run_prompt(graph, self.timeout, self.start).await;
        self.progress.record(&outcome.status);
        self.outcomes.lock().unwrap().push(outcome);
    }
}

/// Runs a load test (see [`LoadTest`]).
pub async fn run(options: Options) -> Result<Report, LoadTestError> {
    check_options(&options)?;
    let target = Arc::new(Target::parse(&options.url)?);
    workflow::check_graph(&options.workflow).map_err(|reason| LoadTestError::Workflow {
        name: "(options)".into(),
        reason,
    })?;
    preflight(&target).await?;
    let placements = match &options.admin_url {
        Some(url) => Some(backends::Placements::start(url).await?),
        None => None,
    };

    let requests = match (options.requests_per_user, options.duration) {
        (None, None) => Some(1),
        (r, _) => r,
    };
    let users: Vec<Arc<User>> =
        futures_util::future::join_all((0..options.users).map(|_| User::connect(target.clone())))
            .await
            .into_iter()
            .map(Arc::new)
            .collect();
    let progress = Arc::new(Progress::default());
    let total = requests.map(|m| m * options.users as u64);
    let bar = Bar::start(options.progress, progress.clone(), total, options.duration);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        start,
        workflow: options.workflow.clone(),
        vary_seed: options.vary_seed,
        timeout: options.timeout,
        progress,
        outcomes: Mutex::new(Vec::new()),
    });

    let deadline = options.duration.map(|d| start + d);
    let open = move |now: Instant| deadline.is_none_or(|d| now < d);
    let mut tasks = JoinSet::new();
    match options.rate {
        None => {
            for user in &users {
                let (user, shared) = (user.clone(), shared.clone());
                tasks.spawn(async move {
                    let mut sent = 0;
                    while requests.is_none_or(|m| sent < m) && open(Instant::now()) {
                        shared.one(&user).await;
                        sent += 1;
                    }
                });
            }
        }
        Some(rate) => {
            let mut next = start;
            let mut sent: u64 = 0;
            while total.is_none_or(|t| sent < t) {
                tokio::time::sleep_until(next.into()).await;
                if !open(Instant::now()) {
                    break;
                }
                let user = users[(sent % users.len() as u64) as usize].clone();
                let shared = shared.clone();
                tasks.spawn(async move { shared.one(&user).await });
                sent += 1;
                // Exponential inter-arrival times make a Poisson process.
                let u: f64 = 1.0 - rand::random::<f64>(); // (0, 1]
                next += Duration::from_secs_f64(-u.ln() / rate);
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let wall = start.elapsed();
    drop(bar);
    let mut outcomes = shared.outcomes.lock().unwrap().clone();
    if let Some(placements) = placements {
        let chosen = placements.finish().await;
        for o in &mut outcomes {
            let name = chosen.get(&o.prompt_id).map(String::as_str);
            o.backend = Some(name.unwrap_or(UNKNOWN_BACKEND).to_string());
        }
    }
    let mode = if options.rate.is_some() {
        "open"
    } else {
        "closed"
    };
    let mut report = Report::from_outcomes(&target.base, mode, options.users, &outcomes, wall);
    report.settings = settings(&options, requests);
    Ok(report)
}

/// The options as the HTML report's summary lists them.
fn settings(o: &Options, requests: Option<u64>) -> Vec<(String, String)> {
    let nodes = o.workflow.as_object().map_or(0, |g| g.len());
    let mut out = vec![
        ("users", o.users.to_string()),
        (
            "prompts per user",
            requests.map_or("until the duration is over".into(), |r| r.to_string()),
        ),
    ];
    if let Some(d) = o.duration {
        out.push(("duration", format!("{} s", d.as_secs_f64())));
    }
    if let Some(r) = o.rate {
        out.push(("arrival rate", format!("{r} prompts/s (Poisson)")));
    }
    out.push(("vary seed", o.vary_seed.to_string()));
    out.push(("timeout", format!("{} s", o.timeout.as_secs_f64())));
    out.push(("workflow", format!("{nodes} nodes")));
    if let Some(a) = &o.admin_url {
        out.push(("admin URL", a.clone()));
    }
    out.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn check_options(o: &Options) -> Result<(), LoadTestError> {
    let bad = |m: &str| Err(LoadTestError::Options(m.to_string()));
    if o.users == 0 {
        return bad("--users must be at least 1");
    }
    if o.requests_per_user == Some(0) {
        return bad("--requests-per-user must be at least 1");
    }
    if let Some(r) = o.rate
        && !(r.is_finite() && r > 0.0)
    {
        return bad("--rate must be a positive number of prompts per second");
    }
    if o.timeout.is_zero() {
        return bad("--timeout must be positive");
    }
    if o.duration.is_some_and(|d| d.is_zero()) {
        return bad("--duration must be positive");
    }
    Ok(())
}

/// Checks that the URL answers like ComfyUI before any load is sent.
async fn preflight(target: &Target) -> Result<(), LoadTestError> {
    let mut status = 0;
    for path in ["/system_stats", "/prompt"] {
        match target.get(path).await {
            Err(reason) => {
                return Err(LoadTestError::Unreachable {
                    url: target.base.clone(),
                    reason,
                });
            }
            Ok((200, _)) => return Ok(()),
            Ok((code, _)) => status = code,
        }
    }
    Err(LoadTestError::NotComfyUi {
        url: target.base.clone(),
        status,
    })
}
