//! What a client sends on `/ws`: the upgrade's `?clientId=` and the frames after it (masked
//! client frames, decoded by tungstenite with the gate's 4 MiB frame limit), each text frame
//! read as the gate reads it (`client_feature_flags`). The input is `query\nframe bytes`.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

/// A read-only stream over the fuzz input: writes (pongs, close replies) go nowhere.
struct Input(Cursor<Vec<u8>>);

impl std::io::Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Input {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let query = String::from_utf8_lossy(&data[..split]);
    if let Ok(uri) = format!("/ws?{query}").parse::<http::Uri>() {
        let _ = comfy_wire::http::query_param(&uri, "clientId");
    }
    let frames = data.get(split + 1..).unwrap_or(&[]).to_vec();
    let config = WebSocketConfig::default()
        .max_message_size(Some(4 << 20))
        .max_frame_size(Some(4 << 20));
    let mut ws = WebSocket::from_raw_socket(Input(Cursor::new(frames)), Role::Server, Some(config));
    let mut first = true;
    for _ in 0..64 {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let _ = comfy_wire::protocol::client_feature_flags(text.as_str(), first);
                first = false;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
});
