//! The admin listener (localhost by default): `/healthz` (the process is up), `/readyz` (some
//! backend can take work), `/admin/backends`, `/admin/decisions`, `/admin/records` (how many of
//! each kind of record the gate holds, in memory and in its store), and backend drain:
//! `POST /admin/backends/{name}/drain` (no new prompts; running ones finish there; prompts
//! waiting in its queue move back to the gate queue) and `POST /admin/backends/{name}/undrain`.
//! `GET /admin/usage?user=&since=`: GPU-seconds and prompts per tenant from the usage ledger
//! (`sched::usage`), the sums of the audit log's lines. `POST /admin/reload`: the configuration
//! file read again and put in force (200 with what changed; 400 with file, line and field when
//! it is invalid, and nothing changed).
//!
//! What operators look at (issue 15): `GET /metrics` (OpenMetrics text, [`crate::metrics`] and
//! [`gauges`]), `GET /admin/prompts/{id}/timeline` (a prompt's timeline, attempts and nodes,
//! [`crate::sched::timeline`]), and the live dashboard at `/` with its socket at
//! `/dashboard/ws` ([`dashboard`]).

pub mod dashboard;
pub mod gauges;
pub mod view;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::fleet::{BackendState, Fleet};
use crate::http::{Body, json as json_resp, status};
use crate::sched::{Scheduler, recovery, usage};

/// What the admin routes use.
pub struct Admin {
    pub sched: Arc<Scheduler>,
    pub fleet: Arc<Fleet>,
    /// The replay ring and live frames of the dashboard.
    pub dashboard: Arc<dashboard::Dashboard>,
    /// `POST /admin/reload`: the gate's reload (the wiring's, which this layer cannot name).
    pub reload: ReloadFn,
}

/// A reload as the admin API calls it: `Ok(report)` as JSON, or the error's text (file, line,
/// field).
pub type ReloadFn =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Value, String>> + Send + Sync>;

/// Serves one admin request.
pub async fn handle(admin: Arc<Admin>, mut req: Request<Incoming>) -> Response<Body> {
    let fleet = &admin.fleet;
    match req.uri().path() {
        "/" | "/dashboard" if req.method() == http::Method::GET => {
            let mut resp = Response::new(crate::http::full(dashboard::PAGE));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        "/dashboard/ws" => {
            dashboard::socket(&mut req, admin.dashboard.clone(), admin.sched.clone())
        }
        "/metrics" if fleet.metrics.on().is_none() => json_resp(
            StatusCode::NOT_FOUND,
            &json!({ "error": "metrics are off ([metrics] enabled = false)" }),
        ),
        "/metrics" if req.method() == http::Method::GET => {
            let mut resp = Response::new(crate::http::full(fleet.metrics.encode()));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            resp
        }
        p if p.starts_with("/admin/prompts/") => {
            let Some(id) = timeline_id(p) else {
                return status(StatusCode::NOT_FOUND);
            };
            match admin.sched.timeline(&id) {
                Some(t) => json_resp(StatusCode::OK, &t),
                None => json_resp(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": format!("no prompt {id} is known (or its history entry was pruned)") }),
                ),
            }
        }
        "/healthz" => json_resp(StatusCode::OK, &json!({ "status": "ok" })),
        "/readyz" => {
            let backends: Vec<_> = fleet
                .backends()
                .iter()
                .map(|b| json!({ "name": b.name(), "health": b.health().as_str() }))
                .collect();
            let ready = fleet.ready();
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_resp(code, &json!({ "ready": ready, "backends": backends }))
        }
        "/admin/reload" if req.method() == http::Method::POST => match (admin.reload)().await {
            Ok(report) => json_resp(
                StatusCode::OK,
                &json!({ "reloaded": true, "report": report }),
            ),
            Err(error) => json_resp(
                StatusCode::BAD_REQUEST,
                &json!({ "reloaded": false, "error": error }),
            ),
        },
        "/admin/records" => json_resp(StatusCode::OK, &admin.sched.records()),
        "/admin/usage" => usage(&admin.sched, req.uri().query().unwrap_or("")),
        "/admin/decisions" => json_resp(
            StatusCode::OK,
            &json!({ "decisions": admin.sched.recent_decisions() }),
        ),
        "/admin/backends" => {
            let slots = admin.sched.slots_used();
            let backends: Vec<_> = fleet
                .backends()
                .iter()
                .filter(|b| !b.is_gone())
                .map(|b| describe(fleet, b, slots.get(b.index).copied().unwrap_or(0)))
                .collect();
            json_resp(StatusCode::OK, &json!({ "backends": backends }))
        }
        p if p.starts_with("/admin/backends/") && req.method() == http::Method::POST => {
            let rest = &p["/admin/backends/".len()..];
            let Some((name, action)) = rest.rsplit_once('/') else {
                return status(StatusCode::NOT_FOUND);
            };
            let name = crate::http::percent_decode(name);
            let Some(i) = fleet.index_of(&name) else {
                return json_resp(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": format!("no backend named {name}") }),
                );
            };
            match action {
                "drain" => {
                    let moved = recovery::drain(&admin.sched, i).await;
                    json_resp(
                        StatusCode::OK,
                        &json!({ "backend": name, "draining": true, "moved": moved }),
                    )
                }
                "undrain" => {
                    fleet.set_draining(i, false);
                    json_resp(
                        StatusCode::OK,
                        &json!({ "backend": name, "draining": false }),
                    )
                }
                _ => status(StatusCode::NOT_FOUND),
            }
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}

/// The prompt id of `/admin/prompts/{id}/timeline` (percent-decoded), or `None` for any other
/// path under `/admin/prompts/`.
fn timeline_id(path: &str) -> Option<String> {
    let id = path
        .strip_prefix("/admin/prompts/")?
        .strip_suffix("/timeline")
        .filter(|id| !id.is_empty())?;
    Some(crate::http::percent_decode(id))
}

/// `GET /admin/usage`: per tenant, GPU-seconds, run seconds and prompts that ended (by
/// outcome), largest first. `user`: a user name or a tenant key (`user:NAME`, `ip:ADDR` for
/// anonymous clients); `since`: RFC 3339 or seconds since the epoch, counted from the start of
/// the UTC hour holding it (`from`). A bad `since` is a 400 saying so.
fn usage(sched: &Scheduler, query: &str) -> Response<Body> {
    let mut who = None;
    let mut since = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "user" if !v.is_empty() => who = Some(v.into_owned()),
            "since" if !v.is_empty() => match usage::parse_time(&v) {
                Some(ms) => since = Some(ms),
                None => {
                    let error = format!(
                        "since: {v:?} is neither an RFC 3339 time (2026-05-01T00:00:00Z) nor seconds since the epoch"
                    );
                    return json_resp(StatusCode::BAD_REQUEST, &json!({ "error": error }));
                }
            },
            _ => {}
        }
    }
    let rows = sched.audit().usage().summary(who.as_deref(), since);
    let seconds = |ms: u64| ms as f64 / 1000.0;
    let (mut gpu_ms, mut run_ms, mut prompts) = (0, 0, 0);
    let users: Vec<Value> = rows
        .iter()
        .map(|t| {
            gpu_ms += t.usage.gpu_ms;
            run_ms += t.usage.run_ms;
            prompts += t.usage.prompts();
            json!({
                "user": t.usage.user, "tenant": t.tenant,
                "gpu_seconds": seconds(t.usage.gpu_ms), "run_seconds": seconds(t.usage.run_ms),
                "prompts": t.usage.prompts(), "outcomes": t.usage.outcomes,
            })
        })
        .collect();
    let from = since.map(|ms| usage::rfc3339(ms.div_euclid(usage::HOUR_MS) * usage::HOUR_MS));
    json_resp(
        StatusCode::OK,
        &json!({
            "user": who, "since": since.map(usage::rfc3339), "from": from,
            "users": users,
            "total": {
                "gpu_seconds": seconds(gpu_ms), "run_seconds": seconds(run_ms), "prompts": prompts,
            },
        }),
    )
}

/// One backend as `/admin/backends` shows it (`inflight`: slots in use).
fn describe(fleet: &Fleet, b: &BackendState, inflight: usize) -> Value {
    let (vram_total, vram_free) = fleet.vram(b.index);
    json!({
        "name": b.name(), "url": b.config.base,
        "health": b.health().as_str(),
        "state": b.state_word(),
        "inflight": inflight,
        "max_inflight": b.max_inflight(),
        "completed": b.completed.load(Ordering::SeqCst),
        "ws_connected": b.ws_connected.load(Ordering::SeqCst),
        "vram_total": vram_total,
        "vram_free": vram_free,
        "gpu": fleet.nvml_reading(b.index).map(|r| json!({
            "source": "nvml", "uuid": r.uuid, "name": r.name, "total": r.total, "free": r.free,
            "used": r.used, "gpu_util": r.gpu_util, "mem_util": r.mem_util,
            "temperature_c": r.temperature_c, "power_mw": r.power_mw,
            "age_ms": r.age().as_millis() as u64,
        })),
        "draining": b.draining.load(Ordering::SeqCst),
        "stalled": b.is_stalled(),
        "busy": b.busy.load(Ordering::SeqCst),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_prompt_id_between_prefix_and_suffix_is_a_timeline() {
        assert_eq!(
            super::timeline_id("/admin/prompts/a%2Fb/timeline").as_deref(),
            Some("a/b")
        );
        assert_eq!(super::timeline_id("/admin/prompts/timeline"), None);
        assert_eq!(super::timeline_id("/admin/prompts//timeline"), None);
        assert_eq!(super::timeline_id("/admin/prompts/x"), None);
    }
}
