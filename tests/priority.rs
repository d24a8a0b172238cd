//! Issue 13, priority bands and per-user running caps with users who sign in (`[auth] mode =
//! "token"`, `Authorization: Bearer TOKEN`). An `interactive` prompt posted behind 50 `batch`
//! prompts is the next to start once a slot frees; `limits.max_running = 1` holds for its user
//! while another user's prompts are sent and run.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn an_interactive_prompt_posted_behind_50_batch_prompts_starts_at_the_next_free_slot() {
    let s = sim().await;
    let gate = gate_with(&[&s], |f| {
        f.scheduler.max_inflight = 1;
        let users = [
            ("batchy", "priority = \"batch\""),
            ("inter", "priority = \"interactive\""),
        ];
        with_users(f, &users, "");
    })
    .await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));

    // The slot is busy with a batch prompt (about 4 s at test speed) until it is interrupted.
    let body = json!({"prompt": steps(0, 10_000), "prompt_id": "b-run"});
    assert_eq!(post_as("batchy", &base, "/prompt", &body).await.0, 200);
    until_running(&s.url(), "b-run").await;
    for i in 0..50 {
        let body = json!({"prompt": steps(i + 1, 20), "prompt_id": format!("b-{i}")});
        let (code, answer) = post_as("batchy", &base, "/prompt", &body).await;
        assert_eq!(code, 200, "{answer}");
    }
    let body = json!({"prompt": steps(99, 20), "prompt_id": "i"});
    let (code, answer) = post_as("inter", &base, "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");

    let interrupt = json!({"prompt_id": "b-run"});
    assert_eq!(
        post_as("batchy", &base, "/interrupt", &interrupt).await.0,
        200
    );
    assert_eq!(
        history_as("inter", &base, "i").await["status"]["status_str"],
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
        let users = [("capped", "limits = { max_running = 1 }"), ("other", "")];
        with_users(f, &users, "");
    })
    .await;
    let base = gate.url();
    let capped: Vec<String> = (0..3).map(|i| format!("c-{i}")).collect();
    let other: Vec<String> = (0..2).map(|i| format!("o-{i}")).collect();
    for (i, id) in capped.iter().enumerate() {
        let body = json!({"prompt": steps(i as u64, 1_500), "prompt_id": id});
        assert_eq!(post_as("capped", &base, "/prompt", &body).await.0, 200);
    }
    for (i, id) in other.iter().enumerate() {
        let body = json!({"prompt": steps(10 + i as u64, 1_500), "prompt_id": id});
        assert_eq!(post_as("other", &base, "/prompt", &body).await.0, 200);
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
        for (user, ids) in [("capped", &capped), ("other", &other)] {
            for id in ids {
                let path = format!("/history/{id}");
                done += usize::from(get_as(user, &base, &path).await.1.get(id).is_some());
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "not all ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        saw_others_run,
        "other's two prompts were on the backend beside capped's one"
    );
    for (user, ids) in [("capped", &capped), ("other", &other)] {
        for id in ids {
            let h = history_as(user, &base, id).await;
            assert_eq!(h["status"]["status_str"], "success", "{id}: {h}");
        }
    }
}
