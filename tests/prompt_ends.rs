//! How a prompt ends, seen from outside: whatever ends a prompt (its run, an interrupt, the
//! gate giving up, a refusal after waiting, a drain, a delete), its client hears exactly one
//! ending — one of `execution_success` / `execution_error` / `execution_interrupted`, then
//! `executing {node: null, prompt_id}` — and `/history/{id}` has one entry that fits it; a
//! prompt deleted while waiting ends with no events and no history, as in ComfyUI. Real gate,
//! comfy-sim backends on port 0, real HTTP and WebSocket clients (design §2 Interrupt, Recovery).

mod common;

use std::time::Duration;

use comfy_gate::config::RunTimeAction;
use comfy_sim::{SimConfig, SimHandle};
use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long the socket is watched after an ending for a second one (not a timing assertion).
const GRACE: Duration = Duration::from_millis(600);
const TERMINALS: [&str; 3] = [
    "execution_success",
    "execution_error",
    "execution_interrupted",
];

/// A txt2img at 2048² (about 6 ms a step at test speed, few frames per second of run).
fn big(seed: u64, n: u64) -> Value {
    let mut g = steps(seed, n);
    g["5"]["inputs"]["width"] = json!(2048);
    g["5"]["inputs"]["height"] = json!(2048);
    g
}

/// A prompt that runs far longer than any test waits: it is ended by what the test does.
fn long(seed: u64) -> Value {
    big(seed, 10000)
}

fn about(f: &Frame, id: &str) -> bool {
    f.data()["prompt_id"] == id
}

fn is_terminal(f: &Frame, id: &str) -> bool {
    TERMINALS.contains(&f.kind().as_str()) && about(f, id)
}

fn is_done(f: &Frame, id: &str) -> bool {
    f.kind() == "executing" && f.data()["node"].is_null() && about(f, id)
}

/// One client's socket and every frame it has received.
struct Inbox {
    ws: Ws,
    log: Vec<Frame>,
    cursor: usize,
}

impl Inbox {
    async fn open(base: &str, client_id: &str) -> Inbox {
        let mut ws = Ws::connect(base, Some(client_id)).await;
        let first = ws.next().await.expect("the first status");
        Inbox {
            ws,
            log: vec![first],
            cursor: 1,
        }
    }

    /// Reads one more frame into the log; panics once `deadline` has passed.
    async fn read(&mut self, waiting_for: &str, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.ws.next_within(left).await {
            Ok(Some(f)) => self.log.push(f),
            Ok(None) => panic!("the socket closed while waiting for {waiting_for}"),
            Err(()) => panic!(
                "no {waiting_for} within patience ({} frames)",
                self.log.len()
            ),
        }
    }

    /// The next frame (after the last one returned) that `hit` accepts.
    async fn next_where(&mut self, what: &str, hit: impl Fn(&Frame) -> bool) -> Frame {
        let deadline = Instant::now() + 2 * PATIENCE;
        loop {
            if let Some(i) = (self.cursor..self.log.len()).find(|&i| hit(&self.log[i])) {
                self.cursor = i + 1;
                return self.log[i].clone();
            }
            self.read(what, deadline).await;
        }
    }

    /// Keeps reading for `GRACE`: anything late lands in the log.
    async fn linger(&mut self) {
        let until = Instant::now() + GRACE;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.ws.next_within(left).await {
                Ok(Some(f)) => self.log.push(f),
                _ => break,
            }
        }
    }

    fn kinds_about(&self, id: &str) -> Vec<String> {
        self.log
            .iter()
            .filter(|f| about(f, id))
            .map(Frame::kind)
            .collect()
    }

    /// Waits for `id`'s `executing null`, watches a while longer, and asserts the prompt ended
    /// exactly once: one terminal event, then one `executing null`. Returns the terminal event.
    async fn ended_once(&mut self, id: &str) -> Frame {
        let deadline = Instant::now() + 2 * PATIENCE;
        while !self.log.iter().any(|f| is_done(f, id)) {
            self.read(&format!("end of {id}"), deadline).await;
        }
        self.linger().await;
        let kinds = self.kinds_about(id);
        let terminals: Vec<usize> = (0..self.log.len())
            .filter(|&i| is_terminal(&self.log[i], id))
            .collect();
        let dones: Vec<usize> = (0..self.log.len())
            .filter(|&i| is_done(&self.log[i], id))
            .collect();
        assert_eq!(terminals.len(), 1, "{id}: one terminal event: {kinds:?}");
        assert_eq!(dones.len(), 1, "{id}: one `executing null`: {kinds:?}");
        assert!(
            terminals[0] < dones[0],
            "{id}: terminal event first: {kinds:?}"
        );
        self.log[terminals[0]].clone()
    }

    /// The last `status` heard says the queue is empty.
    fn last_status_is_empty(&self) {
        let last = self.log.iter().rev().find(|f| f.kind() == "status");
        let status = last.expect("a status").data().clone();
        assert_eq!(
            status["status"]["exec_info"]["queue_remaining"], 0,
            "the last status: {status}"
        );
    }
}

async fn submit(client: &reqwest::Client, base: &str, body: Value) {
    let (code, r) = send_for_json(client.post(format!("{base}/prompt")).json(&body)).await;
    assert_eq!(code, 200, "accepted: {r}");
}

async fn prompt(base: &str, client_id: &str, id: &str, graph: Value) {
    let body = json!({"prompt": graph, "client_id": client_id, "prompt_id": id});
    submit(&http(), base, body).await;
}

/// `/history/{id}` holds exactly one entry with this status and one terminal message, the last,
/// of kind `last`; `/api/jobs` lists the prompt once. Returns the entry.
async fn history_fits(base: &str, id: &str, status_str: &str, last: &str) -> Value {
    let entry = wait_history(base, id).await;
    let (_, whole) = get_json(base, &format!("/history/{id}")).await;
    assert_eq!(whole.as_object().map(|m| m.len()), Some(1), "{whole}");
    assert_eq!(entry["status"]["status_str"], status_str, "{id}: {entry}");
    assert_eq!(entry["status"]["completed"], status_str == "success");
    let messages = entry["status"]["messages"].as_array().expect("messages");
    let ends = messages
        .iter()
        .filter(|m| TERMINALS.contains(&m[0].as_str().unwrap_or("")))
        .count();
    assert_eq!(ends, 1, "{id}: one terminal message: {messages:?}");
    assert_eq!(messages.last().unwrap()[0], last, "{id}: {messages:?}");
    let (_, jobs) = get_json(base, "/api/jobs").await;
    let listed = jobs["jobs"].as_array().unwrap().iter();
    assert_eq!(listed.filter(|j| j["id"] == id).count(), 1, "{jobs}");
    entry
}

/// `/history/{id}` is `{}`.
async fn no_history(base: &str, id: &str) {
    let (_, h) = get_json(base, &format!("/history/{id}")).await;
    assert_eq!(h, json!({}), "{id} has no history");
}

/// The gate's `/queue` lists none of `ids`, and (everything having ended) `GET /prompt` says
/// `queue_remaining` 0.
async fn queue_empty_of(base: &str, ids: &[&str]) {
    let listed = queued(base).await;
    assert!(
        ids.iter().all(|id| !listed.contains(&id.to_string())),
        "{listed:?}"
    );
    let (_, p) = get_json(base, "/prompt").await;
    assert_eq!(p["exec_info"]["queue_remaining"], 0, "{p}");
}

fn progress_of(id: &str) -> impl Fn(&Frame) -> bool + '_ {
    move |f| f.kind() == "progress" && about(f, id)
}

/// 1. Every backend that runs the prompt crashes and retries run out: `execution_error` naming
///    the gate's failure, once, and an error history entry saying why.
#[tokio::test]
async fn out_of_retries() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate_with(&[&a, &b], |f| f.recovery.max_retries = 1).await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "doomed", long(1)).await;
    for _ in 0..2 {
        c.next_where("a run", progress_of("doomed")).await;
        let victim = holder(&[&a, &b], "doomed").await.expect("running");
        victim.crash();
        let start = |f: &Frame| f.kind() == "execution_start" || is_done(f, "doomed");
        c.next_where("a fresh start or the end", start).await;
    }
    let end = c.ended_once("doomed").await;
    assert_eq!(end.kind(), "execution_error");
    assert_eq!(end.data()["exception_type"], "comfy_gate.BackendFailed");
    let h = history_fits(&base, "doomed", "error", "execution_error").await;
    let why = &h["status"]["messages"].as_array().unwrap().last().unwrap()[1];
    assert!(
        why["exception_message"]
            .as_str()
            .unwrap()
            .contains("max_retries is 1"),
        "{why}"
    );
    queue_empty_of(&base, &["doomed"]).await;
}

/// 2. A prompt that waited in the gate queue and is then refused by the backend's validation:
///    `execution_error` with the validation message, once; an error history entry.
#[tokio::test]
async fn refused_after_waiting() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| f.backends[0].max_inflight = Some(1)).await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "busy", long(1)).await;
    c.next_where("busy runs", progress_of("busy")).await;
    // Passes the gate's capability check (classes and files exist); the backend's validation
    // refuses the step count.
    prompt(&base, "c", "refused", steps(2, 99_999)).await;
    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    assert_eq!(c.ended_once("busy").await.kind(), "execution_interrupted");
    let end = c.ended_once("refused").await;
    assert_eq!(end.kind(), "execution_error");
    let msg = end.data()["exception_message"].as_str().unwrap_or("");
    assert!(msg.contains("bigger than max"), "{}", end.data());
    let h = history_fits(&base, "refused", "error", "execution_error").await;
    assert!(h["status"]["messages"][0][1]["node_errors"]["3"].is_object());
    queue_empty_of(&base, &["busy", "refused"]).await;
    c.last_status_is_empty();
}

/// 3. A prompt past `max_run_time` (action `fail`) is interrupted: one ending, as the gate
///    reports it, and a history entry that says the same; the backend is free again.
#[tokio::test]
async fn max_run_time() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| {
        f.recovery.max_run_time_s = 1;
        f.recovery.max_run_time_action = RunTimeAction::Fail;
    })
    .await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "slow", long(1)).await;
    let end = c.ended_once("slow").await;
    let kind = end.kind();
    assert!(
        kind == "execution_interrupted" || kind == "execution_error",
        "{kind}"
    );
    history_fits(&base, "slow", "error", &kind).await;
    queue_empty_of(&base, &["slow"]).await;
    prompt(&base, "c", "next", blur_graph(1)).await;
    assert_eq!(c.ended_once("next").await.kind(), "execution_success");
}

/// 4. Drain: a prompt waiting in the drained backend's queue runs on another and ends once; the
///    running one finishes on the drained backend, once — also when it is the only backend.
#[tokio::test]
async fn drain() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let backend = |s: &SimHandle, verb: &str| format!("/admin/backends/{}/{verb}", s.addr());
    let (code, _) = post_json(&admin, &backend(&b, "drain"), &json!({})).await;
    assert_eq!(code, 200);
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "running", big(1, 1000)).await;
    prompt(&base, "c", "waiting", steps(2, 100)).await;
    c.next_where("running runs", progress_of("running")).await;
    let (_, q) = get_json(&a.url(), "/queue").await;
    assert_eq!(q["queue_pending"][0][1], "waiting", "setup: {q}");
    post_json(&admin, &backend(&b, "undrain"), &json!({})).await;
    let (code, r) = post_json(&admin, &backend(&a, "drain"), &json!({})).await;
    assert_eq!((code, &r["moved"]), (200, &json!(["waiting"])));
    for id in ["running", "waiting"] {
        assert_eq!(c.ended_once(id).await.kind(), "execution_success", "{id}");
        history_fits(&base, id, "success", "execution_success").await;
    }
    assert_eq!(a.counters().prompts_succeeded, 1, "running finished there");
    assert_eq!(b.counters().prompts_succeeded, 1, "waiting ran elsewhere");
    queue_empty_of(&base, &["running", "waiting"]).await;

    // The only backend is drained while it runs the prompt.
    let lone = sim().await;
    let gate = common::gate(&[&lone]).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "last", big(3, 300)).await;
    c.next_where("last runs", progress_of("last")).await;
    let (code, _) = post_json(&admin, &backend(&lone, "drain"), &json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(c.ended_once("last").await.kind(), "execution_success");
    history_fits(&base, "last", "success", "execution_success").await;
    assert_eq!(lone.counters().prompts_succeeded, 1);
    queue_empty_of(&base, &["last"]).await;
}

/// 5. A waiting prompt whose only capable backend is gone for good (the other backend lacks its
///    checkpoint) ends with `execution_error` once instead of waiting forever.
#[tokio::test]
async fn no_backend_left_that_can_run_it() {
    const ONLY: &str = "only_a.safetensors";
    let a = sim_with(SimConfig::default().with_model("checkpoints", ONLY, 2.0)).await;
    let b = sim().await;
    let gate = gate_with(&[&a, &b], |f| {
        f.scheduler.max_inflight = 1;
        f.recovery.max_retries = 0;
        f.recovery.unplaceable_timeout_ms = 1000;
    })
    .await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    let mut busy = long(1);
    busy["4"]["inputs"]["ckpt_name"] = json!(ONLY);
    prompt(&base, "c", "busy", busy).await;
    c.next_where("busy runs", progress_of("busy")).await;
    prompt(&base, "c", "stranded", txt2img(2, ONLY)).await;
    let (_, q) = get_json(&base, "/queue").await;
    assert_eq!(q["queue_pending"][0][1], "stranded", "setup: waits: {q}");
    a.crash();
    assert_eq!(c.ended_once("busy").await.kind(), "execution_error");
    let end = c.ended_once("stranded").await;
    assert_eq!(end.kind(), "execution_error");
    history_fits(&base, "stranded", "error", "execution_error").await;
    queue_empty_of(&base, &["busy", "stranded"]).await;
    assert_eq!(b.counters().prompts_accepted, 0, "b cannot run it");
}

/// 6. Delete and clear of waiting prompts: gone from `/queue`, a `status` update, no terminal
///    events, `/history/{id}` `{}` — as ComfyUI does. Clear takes only the caller's own.
#[tokio::test]
async fn delete_of_a_waiting_prompt() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| f.backends[0].max_inflight = Some(1)).await;
    let base = gate.url();
    let (mine, theirs) = (http_from([127, 0, 0, 2]), http_from([127, 0, 0, 3]));
    let mut c = Inbox::open(&base, "c").await;
    let mut o = Inbox::open(&base, "o").await;
    let body =
        |cid: &str, id: &str, g: Value| json!({"prompt": g, "client_id": cid, "prompt_id": id});
    submit(&mine, &base, body("c", "busy", long(1))).await;
    c.next_where("busy runs", progress_of("busy")).await;
    submit(&mine, &base, body("c", "gone-1", blur_graph(1))).await;
    submit(&mine, &base, body("c", "gone-2", blur_graph(2))).await;
    submit(&theirs, &base, body("o", "stays", blur_graph(3))).await;
    let remaining = |n: u64| {
        move |f: &Frame| {
            f.kind() == "status" && f.data()["status"]["exec_info"]["queue_remaining"] == n
        }
    };
    c.next_where("4 queued", remaining(4)).await;

    let delete = mine
        .post(format!("{base}/queue"))
        .json(&json!({"delete": ["gone-1"]}));
    assert_eq!(send_for_json(delete).await.0, 200);
    assert_eq!(queued(&base).await, ["busy", "gone-2", "stays"]);
    c.next_where("a status after the delete", remaining(3))
        .await;

    let clear = mine
        .post(format!("{base}/queue"))
        .json(&json!({"clear": true}));
    assert_eq!(send_for_json(clear).await.0, 200);
    // Another's waiting prompt and the caller's running one stay.
    assert_eq!(queued(&base).await, ["busy", "stays"]);
    c.next_where("a status after the clear", remaining(2)).await;

    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    assert_eq!(c.ended_once("busy").await.kind(), "execution_interrupted");
    assert_eq!(o.ended_once("stays").await.kind(), "execution_success");
    c.linger().await;
    for id in ["gone-1", "gone-2"] {
        assert_eq!(
            c.kinds_about(id),
            Vec::<String>::new(),
            "no events for {id}"
        );
        no_history(&base, id).await;
    }
    assert_eq!(
        a.counters().prompts_accepted,
        2,
        "deleted prompts never ran"
    );
    queue_empty_of(&base, &["busy", "stays"]).await;
}

/// 7. An interrupt naming a prompt that still waits in the gate queue changes nothing (ComfyUI
///    ignores an interrupt whose id is not the running prompt): it runs later and succeeds once.
#[tokio::test]
async fn interrupt_of_a_waiting_prompt() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| f.backends[0].max_inflight = Some(1)).await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "busy", long(1)).await;
    c.next_where("busy runs", progress_of("busy")).await;
    prompt(&base, "c", "later", steps(2, 20)).await;
    let (code, _) = post_json(&base, "/interrupt", &json!({"prompt_id": "later"})).await;
    assert_eq!(code, 200);
    assert_eq!(queued(&base).await, ["busy", "later"], "still waiting");
    post_json(&base, "/interrupt", &json!({"prompt_id": "busy"})).await;
    assert_eq!(c.ended_once("busy").await.kind(), "execution_interrupted");
    let end = c.ended_once("later").await;
    assert_eq!(end.kind(), "execution_success");
    assert!(
        c.kinds_about("later")
            .contains(&"execution_start".to_string())
    );
    history_fits(&base, "later", "success", "execution_success").await;
    queue_empty_of(&base, &["busy", "later"]).await;
}

/// 8. Interrupt of the running prompt by id: `execution_interrupted` once, and ComfyUI's
///    history for an interrupted run (`status_str` "error", not completed).
#[tokio::test]
async fn interrupt_of_the_running_prompt() {
    let a = sim().await;
    let gate = gate(&[&a]).await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "stopped", long(1)).await;
    c.next_where("it runs", progress_of("stopped")).await;
    post_json(&base, "/interrupt", &json!({"prompt_id": "stopped"})).await;
    let end = c.ended_once("stopped").await;
    assert_eq!(end.kind(), "execution_interrupted");
    history_fits(&base, "stopped", "error", "execution_interrupted").await;
    queue_empty_of(&base, &["stopped"]).await;
    c.last_status_is_empty();
}

/// After a prompt ended because its backend crashed, the `status` its client hears says the
/// queue is empty, as `GET /prompt` does: the dead backend's last count no longer counts.
#[tokio::test]
async fn status_after_a_crash_says_the_queue_is_empty() {
    let a = sim().await;
    let gate = gate_with(&[&a], |f| f.recovery.max_retries = 0).await;
    let base = gate.url();
    let mut c = Inbox::open(&base, "c").await;
    prompt(&base, "c", "lost", long(1)).await;
    c.next_where("it runs", progress_of("lost")).await;
    a.crash();
    assert_eq!(c.ended_once("lost").await.kind(), "execution_error");
    queue_empty_of(&base, &["lost"]).await;
    c.last_status_is_empty();
}
