//! Issue 13, priority bands and per-user running caps with users who sign in (`[auth] mode =
//! "token"`, `Authorization: Bearer TOKEN`). An `interactive` prompt posted behind 50 `batch`
//! prompts is the next to start once a slot frees; `limits.max_running = 1` holds for its user
//! while another user's prompts are sent and run.
//!
//! These need the edge to establish users from their tokens (`[auth]`); without it every
//! request is one anonymous client and both fail.
mod common;

use std::time::Duration;

use comfy_gate::config::FileConfig;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const BATCHY: &str = "batchy-secret-token";
const INTER: &str = "inter-secret-token";
const CAPPED: &str = "capped-secret-token";
const OTHER: &str = "other-secret-token";

fn sha256(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// `[auth] mode = "token"` and these users (TOML `[[users]]` entries, `{NAME}` standing for
/// the SHA-256 of `NAME`'s token).
fn with_users(f: &mut FileConfig, users: &str) {
    let users = users
        .replace("{BATCHY}", &sha256(BATCHY))
        .replace("{INTER}", &sha256(INTER))
        .replace("{CAPPED}", &sha256(CAPPED))
        .replace("{OTHER}", &sha256(OTHER));
    let extra: FileConfig =
        toml::from_str(&format!("[auth]\nmode = \"token\"\n{users}")).expect("users parse");
    f.auth = extra.auth;
    f.users = extra.users;
}

/// Posts `body` to `POST /prompt` as the user of `token`; the status and answer.
async fn post(base: &str, token: &str, body: Value) -> (u16, Value) {
    let req = http()
        .post(format!("{base}/prompt"))
        .bearer_auth(token)
        .json(&body);
    send_for_json(req).await
}

/// The user's history entry for `id`, once there.
async fn history(base: &str, token: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let req = http()
            .get(format!("{base}/history/{id}"))
            .bearer_auth(token);
        let (_, h) = send_for_json(req).await;
        if let Some(entry) = h.get(id) {
            return entry.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history for {id} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the backend at `url` runs `id`.
async fn until_running(url: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, q) = get_json(url, "/queue").await;
        let running = q["queue_running"].as_array().cloned().unwrap_or_default();
        if running.iter().any(|i| i[1] == id) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The prompt ids of `/admin/decisions`, oldest first.
async fn decided(admin: &str) -> Vec<String> {
    let (_, d) = get_json(admin, "/admin/decisions").await;
    d["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter_map(|d| d["prompt_id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn an_interactive_prompt_posted_behind_50_batch_prompts_starts_at_the_next_free_slot() {
    let s = sim().await;
    let gate = gate_with(&[&s], |f| {
        f.scheduler.max_inflight = 1;
        with_users(
            f,
            r#"
            [[users]]
            name = "batchy"
            token_sha256 = "{BATCHY}"
            priority = "batch"
            [[users]]
            name = "inter"
            token_sha256 = "{INTER}"
            priority = "interactive"
            "#,
        );
    })
    .await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));

    // The slot is busy with a batch prompt (about 4 s at test speed) until it is interrupted.
    let body = json!({"prompt": steps(0, 10_000), "prompt_id": "b-run"});
    assert_eq!(post(&base, BATCHY, body).await.0, 200);
    until_running(&s.url(), "b-run").await;
    for i in 0..50 {
        let body = json!({"prompt": steps(i + 1, 20), "prompt_id": format!("b-{i}")});
        let (code, answer) = post(&base, BATCHY, body).await;
        assert_eq!(code, 200, "{answer}");
    }
    let (code, answer) = post(
        &base,
        INTER,
        json!({"prompt": steps(99, 20), "prompt_id": "i"}),
    )
    .await;
    assert_eq!(code, 200, "{answer}");

    let req = http()
        .post(format!("{base}/interrupt"))
        .bearer_auth(BATCHY)
        .json(&json!({"prompt_id": "b-run"}));
    assert_eq!(send_for_json(req).await.0, 200);
    assert_eq!(
        history(&base, INTER, "i").await["status"]["status_str"],
        "success"
    );
    let order = decided(&admin).await;
    assert_eq!(order[..2], ["b-run", "i"], "{order:?}");
    let (_, d) = get_json(&admin, "/admin/decisions").await;
    let i = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["prompt_id"] == "i")
        .unwrap()
        .clone();
    assert_eq!(
        (&i["tenant"], &i["band"]),
        (&json!("user:inter"), &json!("interactive"))
    );
}

#[tokio::test]
async fn max_running_holds_for_a_user_while_another_users_prompts_run() {
    let s = sim().await;
    let gate = gate_with(&[&s], |f| {
        f.scheduler.max_inflight = 3;
        with_users(
            f,
            r#"
            [[users]]
            name = "capped"
            token_sha256 = "{CAPPED}"
            limits = { max_running = 1 }
            [[users]]
            name = "other"
            token_sha256 = "{OTHER}"
            "#,
        );
    })
    .await;
    let base = gate.url();
    let capped: Vec<String> = (0..3).map(|i| format!("c-{i}")).collect();
    let other: Vec<String> = (0..2).map(|i| format!("o-{i}")).collect();
    for (i, id) in capped.iter().enumerate() {
        let body = json!({"prompt": steps(i as u64, 1_500), "prompt_id": id});
        assert_eq!(post(&base, CAPPED, body).await.0, 200);
    }
    for (i, id) in other.iter().enumerate() {
        let body = json!({"prompt": steps(10 + i as u64, 1_500), "prompt_id": id});
        assert_eq!(post(&base, OTHER, body).await.0, 200);
    }
    // What the backend holds (running and queued there), sampled until everything ended.
    let mut saw_others_run = false;
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while done < capped.len() + other.len() {
        let (_, q) = get_json(&s.url(), "/queue").await;
        let held = queue_ids(&q);
        let of = |ids: &[String]| held.iter().filter(|h| ids.contains(h)).count();
        assert!(of(&capped) <= 1, "the backend holds {held:?}");
        saw_others_run |= of(&capped) == 1 && of(&other) == 2;
        done = 0;
        for (token, ids) in [(CAPPED, &capped), (OTHER, &other)] {
            for id in ids {
                let req = http()
                    .get(format!("{base}/history/{id}"))
                    .bearer_auth(token);
                done += usize::from(send_for_json(req).await.1.get(id).is_some());
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "not all ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        saw_others_run,
        "other's two prompts were on the backend beside capped's one"
    );
    for (token, ids) in [(CAPPED, &capped), (OTHER, &other)] {
        for id in ids {
            let h = history(&base, token, id).await;
            assert_eq!(h["status"]["status_str"], "success", "{id}: {h}");
        }
    }
}
