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

/// What a client's text frame on `/ws` asks for. ComfyUI's `websocket_handler` reads one thing:
/// a first message `{"type": "feature_flags", "data": {…}}` gets the client's flags (the `data`
/// object, or `{}` when absent) recorded and the server's flags sent back. Anything else (a later
/// message, bad JSON, another type) is ignored: `None`.
pub fn client_feature_flags(text: &str, first_message: bool) -> Option<serde_json::Value> {
    if !first_message {
        return None;
    }
    let data: serde_json::Value = serde_json::from_str(text).ok()?;
    if data.get("type").and_then(serde_json::Value::as_str) != Some("feature_flags") {
        return None;
    }
    Some(
        data.get("data")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_first_feature_flags_message_counts() {
        let m = r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true}}"#;
        assert_eq!(
            client_feature_flags(m, true),
            Some(serde_json::json!({"supports_preview_metadata": true}))
        );
        assert_eq!(client_feature_flags(m, false), None);
        assert_eq!(
            client_feature_flags(r#"{"type": "feature_flags"}"#, true),
            Some(serde_json::json!({}))
        );
        assert_eq!(client_feature_flags(r#"{"type": "other"}"#, true), None);
        assert_eq!(client_feature_flags("not json", true), None);
        assert_eq!(client_feature_flags("[1]", true), None);
    }
}
