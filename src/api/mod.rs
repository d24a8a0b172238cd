//! ComfyUI's API as the gate serves it: the routes the gate answers itself (submit, owned
//! routes, merged reads, files, the client WebSocket). Requests arrive from [`crate::edge`],
//! which has already judged the origin and named the caller; routes the gate does not own are
//! proxied by the edge.

pub mod control;
pub mod facts;
pub mod files;
pub mod limits;
pub mod merged;
pub mod router;
pub mod ws;

use std::sync::Arc;

use serde_json::{Value, json};

use crate::files::Files;
use crate::fleet::Fleet;
use crate::sched::Scheduler;
use crate::sessions::Sessions;

/// A client request's body: hyper's, behind `server.body_read_timeout_ms` (nginx's
/// `client_body_timeout`): a read that waits longer than that for the next bytes fails with
/// [`crate::http::BodyReadTimeout`], which `http::read_body` and the proxy answer with 408.
pub type ClientBody = crate::http::TimeoutBody<hyper::body::Incoming>;

/// What every route may use.
pub struct Ctx {
    pub config: Arc<crate::config::Live>,
    pub sched: Arc<Scheduler>,
    pub fleet: Arc<Fleet>,
    pub sessions: Arc<Sessions>,
    pub files: Arc<Files>,
    /// Node definitions merged across the fleet.
    pub merged: merged::Cache,
    /// `[limits]`' buckets and socket counts.
    pub limits: limits::Limiter,
}

impl Ctx {
    /// The gate's feature flags (`/features` and the `feature_flags` reply).
    pub fn features(&self) -> Value {
        json!({
            "supports_preview_metadata": true,
            "max_upload_size": self.config.load().server.max_body_bytes,
            "extension": { "manager": { "supports_v4": true } },
        })
    }
}
