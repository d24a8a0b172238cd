//! The admin listener (localhost by default): `/healthz` (the process is up), `/readyz` (some
//! backend can take work), `/admin/backends` and backend drain:
//! `POST /admin/backends/{name}/drain` (no new prompts; running ones finish there; prompts
//! waiting in its queue move back to the gate queue) and `POST /admin/backends/{name}/undrain`.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::Gate;
use crate::http::{Body, json as json_resp, status};

pub async fn handle(gate: Arc<Gate>, req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => json_resp(StatusCode::OK, &json!({ "status": "ok" })),
        "/readyz" => {
            let backends: Vec<_> = gate
                .backends
                .iter()
                .map(|b| json!({ "name": b.name(), "health": format!("{:?}", b.health()).to_lowercase() }))
                .collect();
            let code = if gate.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_resp(
                code,
                &json!({ "ready": gate.ready(), "backends": backends }),
            )
        }
        "/admin/decisions" => json_resp(
            StatusCode::OK,
            &json!({ "decisions": gate.recent_decisions() }),
        ),
        "/admin/backends" => {
            let backends: Vec<_> = gate
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "name": b.name(), "url": b.config.base,
                        "health": format!("{:?}", b.health()).to_lowercase(),
                        "inflight": b.inflight.load(std::sync::atomic::Ordering::SeqCst),
                        "max_inflight": b.config.max_inflight,
                        "completed": b.completed.load(std::sync::atomic::Ordering::SeqCst),
                        "ws_connected": b.ws_connected.load(std::sync::atomic::Ordering::SeqCst),
                        "vram_total": gate.vram(b.id).0,
                        "vram_free": gate.vram(b.id).1,
                        "gpu": gate.nvml_reading(b.id).map(|r| json!({
                            "source": "nvml", "uuid": r.uuid, "name": r.name, "total": r.total, "free": r.free,
                            "used": r.used, "gpu_util": r.gpu_util, "mem_util": r.mem_util,
                            "temperature_c": r.temperature_c, "power_mw": r.power_mw,
                            "age_ms": r.age().as_millis() as u64,
                        })),
                        "draining": b.draining.load(std::sync::atomic::Ordering::SeqCst),
                        "stalled": b.stalled.load(std::sync::atomic::Ordering::SeqCst),
                    })
                })
                .collect();
            json_resp(StatusCode::OK, &json!({ "backends": backends }))
        }
        p if p.starts_with("/admin/backends/") && req.method() == http::Method::POST => {
            let rest = &p["/admin/backends/".len()..];
            let Some((name, action)) = rest.rsplit_once('/') else {
                return status(StatusCode::NOT_FOUND);
            };
            let name = crate::http::percent_decode(name);
            let Some(b) = gate.backends.iter().find(|b| b.name() == name).cloned() else {
                return json_resp(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": format!("no backend named {name}") }),
                );
            };
            match action {
                "drain" => {
                    let moved = gate.drain(b.id).await;
                    json_resp(
                        StatusCode::OK,
                        &json!({ "backend": name, "draining": true, "moved": moved }),
                    )
                }
                "undrain" => {
                    b.draining.store(false, std::sync::atomic::Ordering::SeqCst);
                    gate.wake_dispatcher();
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
