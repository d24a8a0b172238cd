//! Issue 11, failing inputs 5 and 6: a prompt is always findable, and `status` never runs ahead
//! of the truth. ComfyUI moves a prompt from pending to running to history under one lock and
//! computes every `status` count from that state; through the gate, over any number of
//! backends, clients must see the same.
mod common;

use std::collections::HashSet;
use std::time::Duration;

use comfy_sim::Fault;
use common::*;
use serde_json::{Value, json};

/// Where `/queue` lists `id`, if anywhere.
fn in_queue(queue: &Value, id: &str) -> bool {
    ["queue_running", "queue_pending"].iter().any(|k| {
        queue[k]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i[1] == id))
    })
}

/// Whether `GET /history/{id}` has the entry.
async fn in_history(base: &str, id: &str) -> bool {
    let (code, h) = get_json(base, &format!("/history/{id}")).await;
    assert_eq!(code, 200);
    h.get(id).is_some()
}

/// `path` answered `ms` wall milliseconds late.
fn slow(path: &str, ms: u64) -> Fault {
    Fault::SlowRoute {
        path: path.into(),
        ms,
    }
}

/// `queue_remaining` of a `status` frame.
fn remaining(f: &Frame) -> Option<u64> {
    (f.kind() == "status")
        .then(|| f.data()["status"]["exec_info"]["queue_remaining"].as_u64())
        .flatten()
}

/// A client library's flow (wait for the first `status` with `queue_remaining: 0` after its
/// prompt started, then read `/history/{id}` once) finds the entry every time: the gate sends
/// no idle `status` before it holds the history entry.
/// The backends answer `/history` 150 ms late, as a busy ComfyUI may.
#[tokio::test]
async fn a_client_that_reads_history_on_the_first_idle_status_finds_its_prompt() {
    let (a, b) = (sim().await, sim().await);
    for s in [&a, &b] {
        s.inject(slow("/history", 150));
    }
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("lib")).await;
    ws.next().await;
    for round in 0..10 {
        let id = format!("p-{round}");
        let (code, _) = post_json(
            &base,
            "/prompt",
            &json!({"prompt": steps(round, 20), "client_id": "lib", "prompt_id": id}),
        )
        .await;
        assert_eq!(code, 200);
        let mut started = false;
        loop {
            let f = ws.next().await.expect("the socket stays open");
            if f.kind() == "execution_start" && f.data()["prompt_id"] == id.as_str() {
                started = true;
            }
            if started && remaining(&f) == Some(0) {
                break;
            }
        }
        assert!(
            in_history(&base, &id).await,
            "round {round}: `status` said the queue is empty before /history had {id}"
        );
    }
}

/// The `status` a client gets on connect counts the prompt running for it, also while the
/// gate's socket to that backend is down mid-run (the backend keeps running it).
#[tokio::test]
async fn the_status_on_connect_counts_a_running_prompt() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut first = Ws::connect(&base, Some("c")).await;
    first.next().await;
    post_json(
        &base,
        "/prompt",
        &json!({"prompt": steps(1, 10000), "client_id": "c", "prompt_id": "long"}),
    )
    .await;
    first.until_kind("progress").await;
    let mut hello = Ws::connect(&base, Some("c2")).await;
    let status = hello.next().await.expect("a first frame");
    assert_eq!(remaining(&status), Some(1), "{:?}", status.data());
    // While the fault holds, the backend closes every socket, the gate's too.
    let running = holder(&[&a, &b], "long").await.expect("running somewhere");
    running.inject(Fault::DropWebsockets);
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut again = Ws::connect(&base, Some(&format!("c3-{i}"))).await;
        let status = again.next().await.expect("a first frame");
        assert_eq!(status.kind(), "status");
        assert_eq!(remaining(&status), Some(1), "{i}: {:?}", status.data());
    }
    running.inject(Fault::Clear);
    post_json(&base, "/interrupt", &json!({})).await;
}

/// `POST /history {"delete": [id]}` forgets the prompt as ComfyUI does: the entry is gone and
/// the id may be submitted again.
#[tokio::test]
async fn a_deleted_history_entry_frees_its_id() {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let body = json!({"prompt": steps(3, 10), "prompt_id": "again"});
    assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
    wait_history(&base, "again").await;
    let (code, _) = post_json(&base, "/history", &json!({"delete": ["again"]})).await;
    assert_eq!(code, 200);
    assert!(!in_history(&base, "again").await);
    let (code, answer) = post_json(&base, "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");
    wait_history(&base, "again").await;
}

/// Failing input 5: one prompt in the whole fleet, running on a backend that hangs or stalls,
/// moves to the other backend; every `status` a client hears counts it once.
#[tokio::test]
async fn one_prompt_moved_off_a_failed_backend_is_counted_once() {
    for fault in [Fault::Hang, Fault::Stall] {
        let (a, b) = (sim().await, sim().await);
        let gate = gate_with(&[&a, &b], |f| {
            f.recovery.stall_timeout_ms = 1000;
            f.health.timeout_ms = 300;
        })
        .await;
        let base = gate.url();
        let mut ws = Ws::connect(&base, Some("f")).await;
        ws.next().await;
        post_json(
            &base,
            "/prompt",
            &json!({"prompt": steps(5, 3000), "client_id": "f", "prompt_id": "p"}),
        )
        .await;
        let mut frames = ws.until_kind("progress").await;
        let victim = holder(&[&a, &b], "p").await.expect("running somewhere");
        victim.inject(fault.clone());
        frames.extend(ws.until_done("p").await);
        let counts: Vec<u64> = frames.iter().filter_map(remaining).collect();
        assert!(
            counts.iter().all(|n| *n <= 1),
            "{fault:?}: one prompt counted as more: {counts:?}"
        );
        assert_eq!(counts.last(), Some(&0), "{fault:?}: {counts:?}");
        victim.inject(Fault::Clear);
    }
}

/// Acceptance 5: prompts that wait in the gate queue, move to one of three backends (which
/// queue and report them 30 ms late) and finish, among other clients' load, polled every few milliseconds: never in neither of `/queue` and
/// `/history` (read in that order), never in both (read the other way round), exactly once in
/// each `/api/jobs` list; and after the last submission, no `status` says 0 before every
/// history entry exists.
#[tokio::test]
async fn a_prompt_is_always_in_exactly_one_of_queue_and_history() {
    let sims = [sim().await, sim().await, sim().await];
    // A real ComfyUI validates a prompt before queueing it and takes a moment to answer
    // `/history`: the moves between the gate and a backend are not instant.
    for s in &sims {
        s.inject(slow("/prompt", 30));
        s.inject(slow("/history", 30));
    }
    let gate = gate(&sims.iter().collect::<Vec<_>>()).await;
    let base = gate.url();
    // Other clients' load, from their own sockets.
    let mut ids = Vec::new();
    let mut load = Vec::new();
    for client in 0..3u64 {
        let base = base.clone();
        let mine: Vec<String> = (0..6).map(|i| format!("load-{client}-{i}")).collect();
        ids.extend(mine.clone());
        load.push(tokio::spawn(async move {
            let sid = format!("load-{client}");
            let mut ws = Ws::connect(&base, Some(&sid)).await;
            ws.next().await;
            for (i, id) in mine.iter().enumerate() {
                let graph = steps(client * 10 + i as u64, 250 + 50 * client);
                let body = json!({"prompt": graph, "client_id": sid, "prompt_id": id});
                assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
            }
            // A client that reads its socket to the end, as real ones do.
            tokio::spawn(async move { while ws.next().await.is_some() {} });
        }));
    }
    for l in load {
        l.await.expect("load client");
    }
    // Behind that load, these wait in the gate queue first.
    let watched: Vec<String> = (0..8).map(|i| format!("watched-{i}")).collect();
    for (i, id) in watched.iter().enumerate() {
        let body = json!({"prompt": steps(100 + i as u64, 100), "prompt_id": id});
        assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
    }
    ids.extend(watched.clone());
    let (_, queue) = get_json(&base, "/queue").await;
    assert!(
        watched.iter().all(|id| in_queue(&queue, id)),
        "the watched prompts are still to run: {}",
        queue["queue_pending"].as_array().map_or(0, Vec::len)
    );
    // Every submission has been answered: from here a `status` of 0 means all of them ended.
    let checker = {
        let (base, ids) = (base.clone(), ids.clone());
        tokio::spawn(async move {
            let mut ws = Ws::connect(&base, Some("checker")).await;
            loop {
                let f = ws.next().await.expect("socket open");
                if remaining(&f) == Some(0) {
                    break;
                }
            }
            // All at once, the last submitted first: the entries written last are the ones a
            // count running ahead would miss.
            let reads = ids.iter().rev().map(|id| in_history(&base, id));
            let found = futures_util::future::join_all(reads).await;
            for (id, found) in ids.iter().rev().zip(found) {
                assert!(found, "`status` said 0 before /history had {id}");
            }
        })
    };
    let mut done: HashSet<String> = HashSet::new();
    let mut polls = 0;
    while done.len() < watched.len() {
        polls += 1;
        let open: Vec<&String> = watched.iter().filter(|id| !done.contains(*id)).collect();
        for id in open {
            let (_, queue) = get_json(&base, "/queue").await;
            let queued = in_queue(&queue, id);
            let finished = in_history(&base, id).await;
            assert!(
                queued || finished,
                "poll {polls}: {id} in neither /queue nor /history"
            );
            let finished_first = in_history(&base, id).await;
            let (_, queue) = get_json(&base, "/queue").await;
            assert!(
                !(finished_first && in_queue(&queue, id)),
                "poll {polls}: {id} in both /history and /queue"
            );
            if finished_first {
                done.insert(id.clone());
            }
        }
        let (_, jobs) = get_json(&base, "/api/jobs?limit=500").await;
        for id in &watched {
            let listed = jobs["jobs"]
                .as_array()
                .map_or(0, |j| j.iter().filter(|j| j["id"] == id.as_str()).count());
            assert_eq!(
                listed, 1,
                "poll {polls}: {id} listed {listed} times in /api/jobs"
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::timeout(PATIENCE, checker)
        .await
        .expect("the fleet goes idle")
        .expect("checker");
}
