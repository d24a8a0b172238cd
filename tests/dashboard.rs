//! Issue 15, acceptance 3: the live dashboard in a real browser (headless Chromium over
//! WebDriver). Against a gate over three sims it shows three backends, a prompt running with
//! its current node and progress, then that prompt's finished waterfall; it draws VRAM points
//! per GPU; the replay slider shows an earlier state (the prompt running again). A screenshot
//! is written where `COMFY_GATE_SCREENSHOT` says (how `docs/dashboard.png` is made).

mod common;

use std::time::{Duration, Instant};

use comfy_sim::{SimBackend, SimConfig};
use common::browser::Browser;
use common::*;
use serde_json::{Value, json};

/// Waits until the page's JavaScript `expr` is true (polled every 100 ms), or fails saying
/// what it waited for.
async fn until(browser: &Browser, what: &str, expr: &str) {
    let deadline = Instant::now() + PATIENCE;
    let script = format!("return Boolean({expr});");
    while Instant::now() < deadline {
        if browser.execute(&script, vec![]).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = browser
        .execute("return document.body.innerText;", vec![])
        .await;
    panic!("the dashboard never showed {what} ({expr}); the page read:\n{page}");
}

/// The text of the first element matching `selector` ("" when none).
async fn text(browser: &Browser, selector: &str) -> String {
    let script = "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';";
    let v = browser.execute(script, vec![json!(selector)]).await;
    v.as_str().unwrap_or("").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_a_running_prompt_its_waterfall_and_replays() {
    // Sims at twice the tests' usual speed-up: a 10,000-step prompt samples for about 8 s.
    let slower = || async {
        let config = SimConfig {
            time_scale: 0.02,
            ..Default::default()
        };
        SimBackend::start(config).await.expect("sim starts")
    };
    let (a, b, c) = (slower().await, slower().await, slower().await);
    let gate = gate(&[&a, &b, &c]).await;
    let (base, admin) = (gate.url(), format!("http://{}", gate.admin_addr));
    let Some(browser) = Browser::start().await else {
        return;
    };
    browser.goto(&format!("{admin}/")).await;

    // The fleet: three backends, each with its VRAM chart.
    until(
        &browser,
        "three backends",
        "document.querySelectorAll('#fleet tr.backend').length === 3",
    )
    .await;
    assert_eq!(text(&browser, "#conn").await, "live");
    until(
        &browser,
        "three VRAM charts",
        "document.querySelectorAll('#vram .gpu').length === 3",
    )
    .await;

    // A prompt running, with its node and a progress bar, pushed as it happens.
    let body = json!({"prompt": steps(5, 10000), "prompt_id": "p"});
    let (code, answer) = post_json(&base, "/prompt", &body).await;
    assert_eq!(code, 200, "{answer}");
    let row = "document.querySelector('#fleet a.prompt[data-prompt=\"p\"]')";
    until(&browser, "the prompt running", row).await;
    let node = format!("{row}.closest('tr').querySelector('.node').textContent");
    until(
        &browser,
        "the sampler node",
        &format!("{node}.includes('KSampler')"),
    )
    .await;
    let bar = format!("{row}.closest('tr').querySelector('.bar.progress')");
    until(&browser, "its progress bar", &bar).await;
    let running_at: i64 = browser
        .execute("return state.frames[state.frames.length - 1].at;", vec![])
        .await
        .as_i64()
        .unwrap();

    // Picked, it is watched: its waterfall grows, and once it ends shows every node, ended.
    browser
        .execute(&format!("{row}.click(); return true;"), vec![])
        .await;
    assert_eq!(
        wait_history(&base, "p").await["status"]["status_str"],
        "success"
    );
    until(&browser, "the finished waterfall", "document.querySelector('#waterfall svg') && document.querySelector('#waterfall svg').textContent.includes('success')").await;
    let bars = browser.find_all("#waterfall rect.wf-node").await;
    assert!(bars.len() >= 7, "a bar per node of txt2img: {}", bars.len());
    assert_eq!(text(&browser, "#wf-title").await, "p");
    until(
        &browser,
        "the prompt gone from the fleet",
        &format!("!{row}"),
    )
    .await;

    // VRAM points, one series per GPU.
    let points = browser.find_all("#vram circle.vram-point").await;
    assert!(points.len() >= 3, "VRAM points: {}", points.len());

    // Replay: the slider at the moment it ran shows it running again; back to live, it is gone.
    // The last frame it ran in, when its progress bar had moved on most.
    let index = browser
        .execute(
            "return state.frames.findLastIndex(f => f.at >= arguments[0] && \
             f.backends.some(b => b.running && b.running.prompt_id === 'p'));",
            vec![json!(running_at)],
        )
        .await;
    let index = index.as_i64().unwrap();
    assert!(index >= 0);
    let slide = "const s = document.querySelector('#replay'); s.value = arguments[0]; \
                 s.dispatchEvent(new Event('input')); return s.value;";
    browser.execute(slide, vec![json!(index)]).await;
    until(
        &browser,
        "the replayed moment",
        &format!("{row} && document.querySelector('#replay-time').textContent.startsWith('as of')"),
    )
    .await;
    if let Ok(path) = std::env::var("COMFY_GATE_SCREENSHOT") {
        browser.screenshot(std::path::Path::new(&path)).await;
    }
    browser
        .execute(
            "document.querySelector('#live').click(); return true;",
            vec![],
        )
        .await;
    until(
        &browser,
        "live again",
        &format!("!{row} && document.querySelector('#replay-time').textContent === 'live'"),
    )
    .await;
    browser.close().await;
}
