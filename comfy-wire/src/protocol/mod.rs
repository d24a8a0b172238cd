//! ComfyUI's wire protocol as both sides of comfy-gate speak it: the origin rule, the error
//! shapes of `POST /prompt`, WebSocket event names, binary preview frames and history paging.
//!
//! Kept apart from the sim and the gate so that both produce byte-for-byte the same shapes,
//! and so the rules can be unit-tested without sockets.

pub mod errors;
pub mod frames;
pub mod jobs;
pub mod origin;
pub mod paging;

/// Epoch milliseconds, the unit of every `timestamp` and `create_time` in ComfyUI.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A WebSocket JSON frame: `{"type": …, "data": …}`.
pub fn event(kind: &str, data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "type": kind, "data": data })
}
