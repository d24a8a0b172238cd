//! One accepted prompt as the gate keeps it: what the client sent, who sent it, where it is, and
//! what the gate saw of its run. Persisted except for the run state (fields marked `skip`);
//! its stage and owner are written only by the table's transitions ([`super::prompts`]).

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value, json};
use tokio::time::Instant;

use super::tenant::Tenant;
use super::timeline::{Happened, Timeline};
use crate::fleet::picker::profile::{self, Profile};

/// Where a prompt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// In the gate queue.
    Queued,
    /// Being sent to `owner`.
    Dispatching,
    /// Accepted by `owner` (queued or running there).
    OnBackend,
    /// Ran to its end on `owner` (slot free again); its history entry is being collected.
    Finishing,
    /// Ended (any outcome); kept for its history entry and ownership until pruned.
    Done,
}

/// What the gate saw of a prompt's run, enough to write its history entry itself if the backend
/// cannot give it (it died right after finishing).
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    pub messages: Vec<Value>,
    pub outputs: Map<String, Value>,
    pub meta: Map<String, Value>,
}

/// One accepted prompt. Fields not marked `skip` are persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    pub number: Number,
    /// The client's request body (`prompt`, `extra_data`, `partial_execution_targets` …).
    pub body: Map<String, Value>,
    /// The client's own `client_id`, if it sent one (events go to that socket only).
    pub client_id: Option<String>,
    /// Who submitted it (see [`super::tenant::Caller::identity`]): scopes interrupt/clear.
    pub identity: String,
    /// Whose it is: user, client address, band, weight (isolation, limits, fair share, audit).
    #[serde(default)]
    pub tenant: Tenant,
    /// Sent with `front: true` (ahead of its user's other prompts; an admin's, of its band).
    #[serde(default)]
    pub front: bool,
    /// Written only by [`super::prompts::PromptTable`]'s transitions.
    pub stage: Stage,
    /// The configured name of the backend it was sent to (kept after it ends: `/view` and
    /// history deletes follow it).
    pub owner: Option<String>,
    pub create_time: i64,
    /// Runs lost to failed backends so far (bounded by `recovery.max_retries`).
    #[serde(default)]
    pub attempts: u32,
    /// Names of the backends it was sent to before (a retry prefers others).
    #[serde(default)]
    pub tried: Vec<String>,
    /// Backends (by name) that failed while sending it or running it: its suspicion count
    /// (`recovery.quarantine_after`).
    #[serde(default)]
    pub suspected_on: Vec<String>,
    /// The one out-of-memory retry was used.
    #[serde(default)]
    pub oom_retried: bool,
    /// Only backends with at least this much VRAM (bytes) may take it (after an OOM).
    #[serde(default)]
    pub min_vram_total: Option<u64>,
    /// What happened to it, when ([`super::timeline`]); persisted with it.
    #[serde(default)]
    pub timeline: Timeline,
    /// `execution_start` seen on the owner.
    #[serde(skip)]
    pub started: bool,
    /// It started while the gate was not listening (re-attached, or its first event was not
    /// `execution_start`): `started_at` is when the gate noticed, so the run is not learned from.
    #[serde(skip)]
    pub start_unseen: bool,
    #[serde(skip)]
    pub started_at: Option<Instant>,
    /// When its run's final `executing {node: null}` arrived (the run's end as the gate saw it;
    /// its history entry is collected after).
    #[serde(skip)]
    pub ran_at: Option<Instant>,
    /// Last event from the owner for this prompt (stall detection).
    #[serde(skip)]
    pub last_event: Option<Instant>,
    /// The last event was `progress`: the node running reports progress, so its silence means
    /// something (a node without a progress bar may run silently for minutes).
    #[serde(skip)]
    pub reports_progress: bool,
    /// A stall check is asking the owner's `/queue` about it.
    #[serde(skip)]
    pub corroborating: bool,
    /// Its backend's terminal event (`execution_success`, `_error`, `_interrupted`) was relayed
    /// to its client; if not (the gate was down when it ended), `end` sends the one in its
    /// history entry.
    #[serde(skip)]
    pub terminal_sent: bool,
    /// Last `executing` node, for the reconnect replay.
    #[serde(skip)]
    pub last_node: Option<String>,
    /// The current run will be thrown away and the prompt run again (OOM or timeout retry):
    /// its remaining events are not shown to the client.
    #[serde(skip)]
    pub retry_after_run: bool,
    /// When the gate asked the owner to interrupt it for exceeding `max_run_time`.
    #[serde(skip)]
    pub deadline_interrupt: Option<Instant>,
    #[serde(skip)]
    pub log: RunLog,
    /// When the last `executing` node started (node timings: checkpoint load times).
    #[serde(skip)]
    pub last_node_at: Option<Instant>,
    /// Checkpoint load seconds measured in the current run.
    #[serde(skip)]
    pub load_measured_s: f64,
    /// Why the current run will be run again (`out_of_memory`, `max_run_time`), with
    /// `retry_after_run`.
    #[serde(skip)]
    pub retry_reason: Option<&'static str>,
    /// How it ended, as `comfy_gate_prompts_finished_total` counts it: taken by `end` before
    /// the end clears the run's state (a `max_run_time` interrupt is a `timeout`).
    #[serde(skip)]
    pub outcome: Option<&'static str>,
    /// The running node's last `progress` (`value`, `max`), for the dashboard's progress bar.
    #[serde(skip)]
    pub progress: Option<(f64, f64)>,
    /// Times the dispatcher passed it over for another prompt's checkpoint affinity.
    #[serde(skip)]
    pub skips: u32,
    /// Since when no backend that is up can run it (while it waits).
    #[serde(skip)]
    pub unplaceable_since: Option<Instant>,
    /// Its key in the result cache (`[cache]` on, not opted out): a successful run is
    /// remembered under it ([`super::cache`]).
    #[serde(skip)]
    pub cache_key: Option<super::cache::Key>,
    /// Its graph (`body.prompt`) shared, and what it asks of a GPU: derived once, on first use
    /// (every dispatch pass reads both).
    #[serde(skip)]
    graph: OnceLock<(Arc<Value>, Profile)>,
    /// [`PromptRecord::client_extra_data`], derived once (`/queue` shows it on every read).
    #[serde(skip)]
    extra: OnceLock<Arc<Value>>,
}

impl PromptRecord {
    /// The class of node `node` in its graph: its `class_type`, or that of the node it was
    /// expanded from (ComfyUI shows nodes inside a subgraph or expansion as `PARENT.CHILD…`);
    /// empty when unknown.
    pub fn class_of(&self, node: &str) -> &str {
        let graph = self.body.get("prompt").unwrap_or(&Value::Null);
        graph[node]["class_type"]
            .as_str()
            .or_else(|| {
                let parent = node.split(['.', ':']).next()?;
                graph[parent]["class_type"].as_str()
            })
            .unwrap_or("")
    }

    /// A freshly accepted prompt, waiting.
    pub fn new(
        id: String,
        number: Number,
        body: Map<String, Value>,
        client_id: Option<String>,
        identity: String,
        tenant: Tenant,
    ) -> Self {
        let create_time = crate::protocol::now_ms();
        let mut timeline = Timeline::default();
        timeline.mark(create_time, Happened::Submitted);
        Self {
            id,
            number,
            body,
            client_id,
            identity,
            tenant,
            front: false,
            stage: Stage::Queued,
            owner: None,
            create_time,
            timeline,
            attempts: 0,
            tried: Vec::new(),
            suspected_on: Vec::new(),
            oom_retried: false,
            min_vram_total: None,
            started: false,
            start_unseen: false,
            started_at: None,
            ran_at: None,
            last_event: None,
            reports_progress: false,
            corroborating: false,
            last_node: None,
            terminal_sent: false,
            retry_after_run: false,
            deadline_interrupt: None,
            log: RunLog::default(),
            last_node_at: None,
            progress: None,
            outcome: None,
            retry_reason: None,
            load_measured_s: 0.0,
            skips: 0,
            unplaceable_since: None,
            cache_key: None,
            graph: OnceLock::new(),
            extra: OnceLock::new(),
        }
    }

    /// The session its events go to: its `client_id` in its user's namespace
    /// ([`crate::sessions::session_key`]); `None` without a `client_id`.
    pub fn session(&self) -> Option<String> {
        let sid = self.client_id.as_deref()?;
        Some(crate::sessions::session_key(
            self.tenant.user.as_deref(),
            sid,
        ))
    }

    /// Its graph, shared, and its profile (see [`profile::profile`]).
    pub fn graph(&self) -> &(Arc<Value>, Profile) {
        self.graph.get_or_init(|| {
            let prompt = self.body.get("prompt").cloned().unwrap_or(Value::Null);
            let p = profile::profile(&prompt);
            (Arc::new(prompt), p)
        })
    }

    /// Once it is done its body lives in its history entry, in the store: the graph and
    /// `extra_data` (whose UI workflow can be megabytes) leave memory, with what was derived
    /// from them and the run's event log (all but its outputs). Nothing reads them once a
    /// prompt ended.
    pub fn shed_body(&mut self) {
        // `prompt` stays, empty: code that indexes it reads nothing instead of panicking.
        self.body = Map::from_iter([("prompt".to_string(), json!({}))]);
        // The run's event log goes, but for the outputs its client was shown: with auth on
        // they are what lets it `/view` them when the gate ended the run (its entry then has
        // none).
        self.log = RunLog {
            outputs: std::mem::take(&mut self.log.outputs),
            ..RunLog::default()
        };
        self.graph = OnceLock::new();
        self.extra = OnceLock::new();
    }

    /// Accepted and not started yet: waiting in the gate queue, being sent, or queued on its
    /// backend (what `[limits] max_waiting` counts).
    pub fn is_waiting_to_start(&self) -> bool {
        match self.stage {
            Stage::Queued | Stage::Dispatching => true,
            Stage::OnBackend => !self.started,
            Stage::Finishing | Stage::Done => false,
        }
    }

    /// Whether it holds a slot on `backend` (or on any backend, with `None`).
    pub fn holds_slot(&self, backend: Option<&str>) -> bool {
        matches!(self.stage, Stage::Dispatching | Stage::OnBackend)
            && self.owner.is_some()
            && backend.is_none_or(|b| self.owner.as_deref() == Some(b))
    }

    /// Dispatched to `backend` and not yet ended there (its events are the client's).
    pub fn in_flight_on(&self, backend: &str) -> bool {
        matches!(
            self.stage,
            Stage::Dispatching | Stage::OnBackend | Stage::Finishing
        ) && self.owner.as_deref() == Some(backend)
    }

    /// Back to waiting: no owner, no run state.
    pub(super) fn reset_run(&mut self) {
        self.stage = Stage::Queued;
        self.owner = None;
        self.started = false;
        self.start_unseen = false;
        self.started_at = None;
        self.ran_at = None;
        self.last_event = None;
        self.reports_progress = false;
        self.corroborating = false;
        self.last_node = None;
        self.terminal_sent = false;
        self.retry_after_run = false;
        self.retry_reason = None;
        self.deadline_interrupt = None;
        self.log = RunLog::default();
        self.last_node_at = None;
        self.load_measured_s = 0.0;
        self.progress = None;
    }

    /// The client-facing 5-element queue item `[number, id, prompt, extra_data, outputs]`.
    pub fn queue_item(&self, outputs: Vec<String>) -> Value {
        json!([
            self.number,
            self.id,
            self.body.get("prompt").cloned().unwrap_or(Value::Null),
            self.client_extra_data(),
            outputs
        ])
    }

    /// [`PromptRecord::client_extra_data`], shared (it never changes once admitted).
    pub fn client_extra(&self) -> &Arc<Value> {
        self.extra
            .get_or_init(|| Arc::new(self.client_extra_data()))
    }

    /// `extra_data` as the client would see it on one ComfyUI.
    pub fn client_extra_data(&self) -> Value {
        let mut extra = match self.body.get("extra_data") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        for key in ["auth_token_comfy_org", "api_key_comfy_org"] {
            extra.remove(key);
        }
        if let Some(cid) = &self.client_id {
            extra.insert("client_id".into(), json!(cid));
        }
        extra.insert("create_time".into(), json!(self.create_time));
        Value::Object(extra)
    }
}
