//! Issue 12, chaos in CI: four backends, one killed and restarted every 1.5 s, while 200
//! prompts from four clients run (two follow over `/ws`, two poll `/history`). Every prompt ends
//! exactly once (success, or an error its client is told of), none is lost, and each socket
//! client hears only its own prompts' events, and each ending once.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use comfy_sim::Fault;
use common::*;
use serde_json::json;

const PER_CLIENT: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prompt_ends_once_while_backends_die() {
    let sims = Arc::new([sim().await, sim().await, sim().await, sim().await]);
    let gate = gate_with(&sims.iter().collect::<Vec<_>>(), |f| {
        f.recovery.max_retries = 5;
        f.health.timeout_ms = 300;
    })
    .await;
    let base = gate.url();

    // Chaos: one backend at a time crashes and comes back half a second later.
    let done = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (sims, done) = (sims.clone(), done.clone());
        tokio::spawn(async move {
            let mut kills = 0;
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                sims[kills % sims.len()].inject(Fault::Crash {
                    restart_after_ms: Some(500),
                });
                kills += 1;
            }
            kills
        })
    };

    let mut followers = Vec::new();
    for c in 0..4usize {
        let base = base.clone();
        followers.push(tokio::spawn(async move {
            let sid = format!("chaos-{c}");
            let ids: Vec<String> = (0..PER_CLIENT).map(|i| format!("{sid}-{i}")).collect();
            let mut ws = if c < 2 {
                let mut ws = Ws::connect(&base, Some(&sid)).await;
                ws.next().await;
                Some(ws)
            } else {
                None
            };
            for (i, id) in ids.iter().enumerate() {
                let n = 200 + (i as u64 * 37) % 200;
                let body = json!({"prompt": steps(i as u64, n), "client_id": sid, "prompt_id": id});
                assert_eq!(post_json(&base, "/prompt", &body).await.0, 200, "{id}");
            }
            let mine: HashSet<&String> = ids.iter().collect();
            let mut endings: HashMap<String, usize> = HashMap::new();
            if let Some(ws) = ws.as_mut() {
                while endings.len() < ids.len() {
                    let f = ws
                        .next_within(Duration::from_secs(60))
                        .await
                        .expect("events keep coming")
                        .expect("the socket stays open");
                    if let Some(p) = f.data().get("prompt_id").and_then(|p| p.as_str()) {
                        assert!(mine.contains(&p.to_string()), "{sid} heard {p}'s event");
                        if f.kind() == "executing" && f.data()["node"].is_null() {
                            *endings.entry(p.to_string()).or_default() += 1;
                        }
                    }
                }
            }
            let mut outcomes = HashMap::new();
            for id in &ids {
                let h = wait_history(&base, id).await;
                outcomes.insert(
                    id.clone(),
                    h["status"]["status_str"].as_str().unwrap_or("").to_string(),
                );
            }
            (ids, endings, outcomes)
        }));
    }
    let mut total = 0;
    let mut errors = 0;
    for f in followers {
        let (ids, endings, outcomes) = f.await.expect("client");
        for id in &ids {
            let outcome = &outcomes[id];
            assert!(
                outcome == "success" || outcome == "error",
                "{id}: {outcome}"
            );
            errors += usize::from(outcome == "error");
            if !endings.is_empty() {
                assert_eq!(endings.get(id), Some(&1), "{id} ended once on its socket");
            }
        }
        total += ids.len();
    }
    done.store(true, Ordering::SeqCst);
    let kills = chaos.await.expect("chaos");
    assert_eq!(total, 4 * PER_CLIENT);
    assert!(kills >= 1, "at least one backend died meanwhile");
    let (_, h) = get_json(&base, "/history").await;
    assert_eq!(
        h.as_object().map(|m| m.len()),
        Some(total),
        "one entry each, none extra"
    );
    eprintln!("chaos: {total} prompts, {errors} ended in error, {kills} kills");
}
