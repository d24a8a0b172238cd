//! Issue 12, failing input 1: a prompt that kills the backend it is sent to is quarantined
//! after `recovery.quarantine_after` (2) backends died on it, instead of going round the fleet
//! forever; the prompts that shared those backends still complete, charged no retry.
mod common;

use comfy_sim::Fault;
use common::*;
use serde_json::json;

const MARKER: &str = "kills-comfyui-at-validation";

#[tokio::test]
async fn a_prompt_that_kills_its_backend_is_quarantined_and_the_others_complete() {
    let sims = [sim().await, sim().await, sim().await];
    for s in &sims {
        s.inject(Fault::PoisonPrompt {
            marker: MARKER.into(),
            restart_after_ms: Some(300),
        });
    }
    // No retries at all: a prompt that merely shared a backend the poison killed must not be
    // charged one.
    let gate = gate_with(&sims.iter().collect::<Vec<_>>(), |f| {
        f.recovery.max_retries = 0
    })
    .await;
    let base = gate.url();

    // Innocent prompts from another client, running and waiting across the fleet.
    let mut innocent = Ws::connect(&base, Some("innocent")).await;
    innocent.next().await;
    let ids: Vec<String> = (0..6).map(|i| format!("innocent-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let body =
            json!({"prompt": steps(i as u64, 400), "client_id": "innocent", "prompt_id": id});
        assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
    }
    innocent.until_kind("execution_start").await;

    let mut poisoner = Ws::connect(&base, Some("poisoner")).await;
    poisoner.next().await;
    let mut poison = txt2img(9, SD15);
    poison["6"]["inputs"]["text"] = json!(MARKER);
    let body = json!({"prompt": poison, "client_id": "poisoner", "prompt_id": "poison"});
    let (code, answer) = post_json(&base, "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");

    let frames = poisoner.until_done("poison").await;
    let error = frames
        .iter()
        .find(|f| f.kind() == "execution_error")
        .unwrap_or_else(|| panic!("no execution_error: {frames:?}"));
    assert_eq!(error.data()["exception_type"], "comfy_gate.Quarantined");
    let h = wait_history(&base, "poison").await;
    assert_eq!(h["status"]["status_str"], "error", "{h}");
    let message = error.data()["exception_message"].as_str().unwrap();
    assert!(message.contains("on 2 backends"), "{message}");

    for id in &ids {
        let h = wait_history(&base, id).await;
        assert_eq!(h["status"]["status_str"], "success", "{id}: {h}");
    }
    // The poison is never sent again: the fleet stays up from here on.
    let after = json!({"prompt": steps(50, 20), "prompt_id": "after"});
    assert_eq!(post_json(&base, "/prompt", &after).await.0, 200);
    assert_eq!(
        wait_history(&base, "after").await["status"]["status_str"],
        "success"
    );
}
