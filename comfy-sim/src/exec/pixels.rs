//! The pixels a decode produces, in full or cheaply ([`crate::SimConfig::fast_images`]).

use comfy_wire::files::images::Image;

/// The image VAEDecode produces for one latent: a synthesised picture that depends on `seed`,
/// or with `fast` a solid one in a seed-chosen colour (one fill, no per-pixel work).
pub(super) fn decoded(width: u32, height: u32, seed: u64, fast: bool) -> Image {
    if !fast {
        return Image::synthesize(width, height, seed);
    }
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z ^= z >> 29;
    let px = [z as u8, (z >> 8) as u8, (z >> 16) as u8];
    Image {
        width,
        height,
        rgb: px.repeat(width as usize * height as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_images_are_valid_pngs_of_the_right_size() {
        let text = [("prompt".to_string(), "{}".to_string())];
        let fast = decoded(1024, 768, 7, true);
        let bytes = fast.to_png(&text, true);
        let (back, alpha) = Image::from_png(&bytes).expect("a PNG");
        assert_eq!((back.width, back.height), (1024, 768));
        assert_eq!(back, fast);
        assert!(alpha.is_none());
        // Solid and fast: tiny beside the 2.3 MB of raw pixels.
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
        // The seed still shows; the default still synthesises.
        assert_ne!(decoded(8, 8, 1, true), decoded(8, 8, 2, true));
        assert_eq!(decoded(64, 32, 3, false), Image::synthesize(64, 32, 3));
    }
}
