//! The gate as a service of the operating system: signals and systemd's notify protocol.
//!
//! - `SIGTERM` / `SIGINT` (Ctrl-C): graceful shutdown (`STOPPING=1` first).
//! - `SIGHUP`: reload the configuration (`RELOADING=1` with `MONOTONIC_USEC`, then `READY=1`
//!   when done, failed or not; systemd's `Type=notify-reload` protocol, `sd_notify(3)`).
//! - With `NOTIFY_SOCKET` set (systemd's `Type=notify`): `READY=1` once both listeners are up,
//!   a `STATUS=` line after each reload, and `WATCHDOG=1` every half `WatchdogSec=` when the
//!   unit sets one (`WATCHDOG_USEC`). Without `NOTIFY_SOCKET` every notice is a no-op.
//!
//! The messages go through the `sd-notify` crate.

use std::time::Duration;

use comfy_gate::GateHandle;
use sd_notify::NotifyState;

/// Resolves on the first `SIGTERM` or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// One notice to systemd (a no-op without `NOTIFY_SOCKET`); a failure to send is logged.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Tells systemd the gate is ready, reloads on `SIGHUP`, pets the watchdog, and returns on
/// `SIGTERM` or `SIGINT` after telling systemd the gate is stopping. The handlers are in place
/// before `READY=1`: a signal sent as soon as systemd sees the gate ready is never the
/// default action (which would end the process).
#[cfg(unix)]
pub async fn serve_until_stopped(handle: &GateHandle) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let watchdog = sd_notify::watchdog_enabled().map(|every| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        })
    });
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(handle).await,
        }
    }
    notify(&[NotifyState::Stopping]);
    if let Some(task) = watchdog {
        task.abort();
    }
    Ok(())
}

/// Without unix signals: ready at once, stopped by Ctrl-C.
#[cfg(not(unix))]
pub async fn serve_until_stopped(_handle: &GateHandle) -> anyhow::Result<()> {
    shutdown_signal().await;
    Ok(())
}

/// `SIGHUP`: a reload between `RELOADING=1` and `READY=1`; its outcome is logged and shown in
/// the unit's status line.
#[cfg(unix)]
async fn reload(handle: &GateHandle) {
    let mut reloading = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        reloading.push(now);
    }
    notify(&reloading);
    tracing::info!("SIGHUP: reloading the configuration");
    let status = match handle.reload().await {
        Ok(report) if report.kept_old.is_empty() => "serving; configuration reloaded".to_string(),
        Ok(report) => format!(
            "serving; configuration reloaded, but kept old: {}",
            report.kept_old.join("; ")
        ),
        Err(e) => {
            tracing::error!(error = %e, "reload failed; the configuration in force is unchanged");
            format!("serving; last reload failed: {e}")
        }
    };
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// How long `comfy-gate reload` waits for the gate's answer.
const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// `comfy-gate reload`: `POST {admin}/admin/reload`; prints the answer and returns the exit
/// code (0 reloaded; 1 refused, unreachable, or reloaded with a part that kept its old
/// settings, such as a bad new certificate).
pub async fn ask_to_reload(admin: &str) -> i32 {
    let url = format!("{}/admin/reload", admin.trim_end_matches('/'));
    let client = match reqwest::Client::builder().timeout(RELOAD_WAIT).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comfy-gate reload: {e}");
            return 1;
        }
    };
    match client.post(&url).send().await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let body = resp.text().await.unwrap_or_default();
            let kept_old = |v: &serde_json::Value| {
                v["report"]["kept_old"]
                    .as_array()
                    .is_some_and(|k| !k.is_empty())
            };
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) if ok && kept_old(&v) => {
                    eprintln!(
                        "comfy-gate reload: reloaded, but some parts kept their old settings: {}",
                        v["report"]["kept_old"]
                    );
                    return 1;
                }
                Ok(v) if ok => println!("reloaded: {}", v["report"]),
                Ok(v) => eprintln!(
                    "comfy-gate reload: refused: {}",
                    v["error"].as_str().unwrap_or(&body)
                ),
                Err(_) => eprintln!("comfy-gate reload: {url} answered: {body}"),
            }
            if ok { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("comfy-gate reload: cannot reach {url}: {e}");
            1
        }
    }
}
