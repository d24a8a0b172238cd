//! The slow-client policy of one client's outbox: what may be dropped, when a client counts as
//! not reading, and how long one frame may take to go out.
//!
//! Every limit here protects the gate (its memory, its writer tasks) from a client that stops
//! reading. None of them refuses a message for its size: a backend's `executed` message or a
//! `SaveImageWebsocket` image may be hundreds of MB, and a client that reads gets it whole.
//! Sizes count against the budget only while waiting, and a frame of any size is taken when
//! less than [`OUTBOX_BYTES`] waits ahead of it.

use std::time::Duration;

use serde_json::Value;

use crate::protocol::frames;

/// Frames queued for one client before it counts as not reading.
pub const OUTBOX_CAPACITY: usize = 1024;
/// Previews are dropped for a client whose outbox has fewer free places than this.
pub const PREVIEW_HEADROOM: usize = OUTBOX_CAPACITY / 2;
/// Bytes waiting for one client beyond which it counts as not reading: the next frame that
/// must not be dropped disconnects it. 1 GiB: several of the largest video previews ComfyUI
/// sends, and a bound on what one stalled client can make the gate hold.
pub const OUTBOX_BYTES: usize = 1 << 30;
/// Previews are dropped for a client with more than this many bytes waiting.
pub const PREVIEW_BYTES_HEADROOM: usize = OUTBOX_BYTES / 2;
/// The time any frame gets to go out to the client's connection; see [`send_timeout`].
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest a reading client is assumed to take bytes, for [`send_timeout`]: 1 MiB/s.
pub const MIN_CLIENT_BYTES_PER_SECOND: u64 = 1 << 20;

/// How long a frame of `bytes` may take to go out before the connection counts as dead:
/// [`SEND_TIMEOUT`] plus the frame's size at [`MIN_CLIENT_BYTES_PER_SECOND`] (60 s for a 50 MB
/// frame), so a large message over a slow but live link is not cut off.
pub fn send_timeout(bytes: usize) -> Duration {
    SEND_TIMEOUT + Duration::from_secs(bytes as u64 / MIN_CLIENT_BYTES_PER_SECOND)
}

/// Whether a binary frame may be dropped for a client that falls behind: latent previews (the
/// next one replaces them), progress text and custom frames may; a PNG image may not. ComfyUI's
/// latent previews are JPEG (`latent_preview.py`), while a PNG preview frame is a node's
/// output: `SaveImageWebsocket` (`custom_nodes/websocket_image_save.py`) sends each image it
/// saves as a full-size PNG through the same path (type 1 with format 2, or type 4 with
/// `image_type: image/png`), and nothing else keeps it.
pub fn is_droppable(frame: &[u8]) -> bool {
    match frames::frame_type(frame) {
        Some(frames::PREVIEW_IMAGE) => frame.get(4..8) != Some(&frames::FORMAT_PNG.to_be_bytes()),
        Some(frames::PREVIEW_IMAGE_WITH_METADATA) => frames::decode_preview_with_metadata(frame)
            .is_none_or(|(meta, _)| {
                meta.get("image_type").and_then(Value::as_str) != Some("image/png")
            }),
        _ => true,
    }
}

/// What the outbox does with a frame offered to a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Queue,
    /// Dropped: a preview for a client that fell behind.
    Drop,
    /// The client is not reading: disconnect it.
    Disconnect,
}

/// The policy: `free` places and `waiting` bytes in the outbox now.
pub fn verdict(droppable: bool, free: usize, waiting: usize) -> Verdict {
    if droppable && (free <= PREVIEW_HEADROOM || waiting > PREVIEW_BYTES_HEADROOM) {
        return Verdict::Drop;
    }
    if free == 0 || waiting > OUTBOX_BYTES {
        return Verdict::Disconnect;
    }
    Verdict::Queue
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn png_images_are_outputs_and_jpeg_previews_are_not() {
        let jpeg1 = frames::encode_preview(frames::FORMAT_JPEG, b"\xff\xd8");
        let png1 = frames::encode_preview(frames::FORMAT_PNG, b"\x89PNG");
        let meta = |t: &str| json!({"prompt_id": "p", "node_id": "1", "image_type": t});
        let jpeg4 = frames::encode_preview_with_metadata(&meta("image/jpeg"), b"\xff\xd8");
        let png4 = frames::encode_preview_with_metadata(&meta("image/png"), b"\x89PNG");
        assert!(is_droppable(&jpeg1));
        assert!(is_droppable(&jpeg4));
        assert!(!is_droppable(&png1));
        assert!(!is_droppable(&png4));
        assert!(
            is_droppable(&[0, 0, 0, 3, 0, 0, 0, 1, b'1', b'x']),
            "progress text"
        );
    }

    #[test]
    fn no_frame_is_refused_for_its_size_alone() {
        let huge = 3 * OUTBOX_BYTES;
        assert_eq!(verdict(false, OUTBOX_CAPACITY, 0), Verdict::Queue);
        assert_eq!(verdict(true, OUTBOX_CAPACITY, 0), Verdict::Queue);
        assert_eq!(verdict(false, 1, OUTBOX_BYTES), Verdict::Queue);
        assert_eq!(verdict(false, 1, huge), Verdict::Disconnect);
        assert_eq!(
            verdict(true, 1000, PREVIEW_BYTES_HEADROOM + 1),
            Verdict::Drop
        );
        assert_eq!(verdict(false, 0, 0), Verdict::Disconnect);
        assert_eq!(send_timeout(0), SEND_TIMEOUT);
        assert_eq!(
            send_timeout(50 << 20),
            SEND_TIMEOUT + Duration::from_secs(50)
        );
    }
}
