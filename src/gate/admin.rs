//! The admin listener (localhost by default): `/healthz` (the process is up) and `/readyz`
//! (some backend can take work).

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
                        "vram_free": b.telemetry.load().vram_free,
                    })
                })
                .collect();
            json_resp(StatusCode::OK, &json!({ "backends": backends }))
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}
