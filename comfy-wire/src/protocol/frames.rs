//! Binary WebSocket frames (reference §6.5): previews as type 1 (format + image) or type 4
//! (JSON metadata naming the prompt + image), and progress text as type 3.
//!
//! The gate receives previews as type 4 (it always negotiates metadata upstream) and must give
//! type 1 to clients that did not; [`type4_to_type1`] is that conversion.

use serde_json::Value;

pub const PREVIEW_IMAGE: u32 = 1;
pub const TEXT: u32 = 3;
pub const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// Image format numbers inside a type 1 frame.
pub const FORMAT_JPEG: u32 = 1;
pub const FORMAT_PNG: u32 = 2;

/// `[u32 1][u32 format][image]`.
pub fn encode_preview(format: u32, image: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + image.len());
    out.extend_from_slice(&PREVIEW_IMAGE.to_be_bytes());
    out.extend_from_slice(&format.to_be_bytes());
    out.extend_from_slice(image);
    out
}

/// `[u32 4][u32 M][M bytes of JSON metadata][image]`.
pub fn encode_preview_with_metadata(metadata: &Value, image: &[u8]) -> Vec<u8> {
    let meta = serde_json::to_vec(metadata).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + meta.len() + image.len());
    out.extend_from_slice(&PREVIEW_IMAGE_WITH_METADATA.to_be_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(image);
    out
}

/// The event type of a binary frame, if it has the 4-byte header.
pub fn frame_type(frame: &[u8]) -> Option<u32> {
    frame
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Metadata and image of a type 4 frame.
pub fn decode_preview_with_metadata(frame: &[u8]) -> Option<(Value, &[u8])> {
    if frame_type(frame)? != PREVIEW_IMAGE_WITH_METADATA {
        return None;
    }
    let len_bytes = frame.get(4..8)?;
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    let meta = frame.get(8..8usize.checked_add(len)?)?;
    let image = frame.get(8 + len..)?;
    let value = serde_json::from_slice(meta).ok()?;
    Some((value, image))
}

/// Rewrites a type 4 frame as the type 1 frame a client without metadata support expects.
pub fn type4_to_type1(frame: &[u8]) -> Option<Vec<u8>> {
    let (meta, image) = decode_preview_with_metadata(frame)?;
    let format = match meta.get("image_type").and_then(Value::as_str) {
        Some("image/png") => FORMAT_PNG,
        _ => FORMAT_JPEG,
    };
    Some(encode_preview(format, image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type4_round_trips_to_type1() {
        let meta = json!({"node_id": "3", "prompt_id": "p", "image_type": "image/png"});
        let frame = encode_preview_with_metadata(&meta, b"IMG");
        let (back, image) = decode_preview_with_metadata(&frame).unwrap();
        assert_eq!(back, meta);
        assert_eq!(image, b"IMG");
        let t1 = type4_to_type1(&frame).unwrap();
        assert_eq!(frame_type(&t1), Some(PREVIEW_IMAGE));
        assert_eq!(&t1[4..8], &FORMAT_PNG.to_be_bytes());
        assert_eq!(&t1[8..], b"IMG");
    }

    #[test]
    fn truncated_frames_are_rejected() {
        assert!(decode_preview_with_metadata(&[0, 0, 0, 4, 0, 0, 0, 9, b'{']).is_none());
        assert!(frame_type(&[0, 1]).is_none());
    }
}
