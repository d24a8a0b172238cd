//! Real pixels for simulated nodes: solid, synthesised, blurred and inverted images, PNG files
//! with ComfyUI's text chunks, and small JPEG latent previews.
//!
//! Outputs must be real PNGs whose content depends on the prompt, so a test can tell one
//! prompt's image from another's even when file names collide across backends. The gate needs
//! the PNG decode and encode too (`/upload/mask` composites a mask onto its original), which is
//! why the type lives here, beside ComfyUI's file rules, rather than in the sim.

use std::io::Cursor;

/// An RGB image, 8 bits per channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    pub fn solid(width: u32, height: u32, color: u32) -> Self {
        let (r, g, b) = ((color >> 16) as u8, (color >> 8) as u8, color as u8);
        let n = (width as usize) * (height as usize);
        let mut rgb = Vec::with_capacity(n * 3);
        for _ in 0..n {
            rgb.extend_from_slice(&[r, g, b]);
        }
        Self { width, height, rgb }
    }

    /// A deterministic picture that depends on `seed`: diagonal bands in seed-chosen colours.
    pub fn synthesize(width: u32, height: u32, seed: u64) -> Self {
        let mix = |k: u64| {
            let mut z = seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let (c0, c1, period) = (mix(1), mix(2), 8 + (mix(3) % 56) as u32);
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                let band = ((x + y) / period) % 2 == 0;
                let c = if band { c0 } else { c1 };
                let shade = ((x ^ y) & 0x1F) as u8;
                rgb.extend_from_slice(&[
                    (c as u8).wrapping_add(shade),
                    ((c >> 8) as u8).wrapping_add(shade),
                    ((c >> 16) as u8).wrapping_add(shade),
                ]);
            }
        }
        Self { width, height, rgb }
    }

    /// ImageAddNoise's stand-in: each channel moves `strength` (0 to 1) of the way towards a
    /// uniform random value drawn from `seed`. ComfyUI adds clamped Gaussian noise; uniform noise
    /// makes strength 1 incompressible, so a PNG of it is as large as its raw pixels
    /// (3 bytes a pixel), which lets a test size a frame by its pixel count.
    pub fn add_noise(&self, seed: u64, strength: f64) -> Self {
        let strength = strength.clamp(0.0, 1.0);
        let mut state = seed;
        let mut next = || {
            // splitmix64: deterministic per seed, fast enough for tens of megapixels.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut rgb = Vec::with_capacity(self.rgb.len());
        for chunk in self.rgb.chunks(8) {
            let noise = next().to_le_bytes();
            for (v, n) in chunk.iter().zip(noise) {
                let mixed = *v as f64 + strength * (n as f64 - *v as f64);
                rgb.push(mixed.round() as u8);
            }
        }
        Self {
            width: self.width,
            height: self.height,
            rgb,
        }
    }

    pub fn invert(&self) -> Self {
        Self {
            width: self.width,
            height: self.height,
            rgb: self.rgb.iter().map(|v| 255 - v).collect(),
        }
    }

    /// A box blur of the given radius (two separable passes), standing in for ImageBlur.
    pub fn blur(&self, radius: u32) -> Self {
        if radius == 0 || self.width == 0 || self.height == 0 {
            return self.clone();
        }
        let (w, h) = (self.width as usize, self.height as usize);
        let pass = |src: &[u8], len: usize, lines: usize, idx: &dyn Fn(usize, usize) -> usize| {
            let mut out = vec![0u8; src.len()];
            let r = radius as i64;
            for line in 0..lines {
                for c in 0..3 {
                    let mut sum: i64 = 0;
                    let at =
                        |i: i64| src[idx(line, i.clamp(0, len as i64 - 1) as usize) + c] as i64;
                    for i in -r..=r {
                        sum += at(i);
                    }
                    for i in 0..len {
                        out[idx(line, i) + c] = (sum / (2 * r + 1)) as u8;
                        sum += at(i as i64 + r + 1) - at(i as i64 - r);
                    }
                }
            }
            out
        };
        let horizontal = pass(&self.rgb, w, h, &|line, i| (line * w + i) * 3);
        let both = pass(&horizontal, h, w, &|line, i| (i * w + line) * 3);
        Self {
            width: self.width,
            height: self.height,
            rgb: both,
        }
    }

    /// Encodes a PNG with the given `tEXt` chunks (ComfyUI stores `prompt` and `workflow`).
    pub fn to_png(&self, text: &[(String, String)], fast: bool) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width, self.height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(if fast {
                png::Compression::Fast
            } else {
                png::Compression::Default
            });
            for (k, v) in text {
                let _ = enc.add_text_chunk(k.clone(), v.clone());
            }
            if let Ok(mut writer) = enc.write_header() {
                let _ = writer.write_image_data(&self.rgb);
            }
        }
        out
    }

    /// Decodes a PNG into RGB plus, when it has alpha, the alpha channel.
    pub fn from_png(bytes: &[u8]) -> Result<(Self, Option<Vec<u8>>), String> {
        let mut decoder = png::Decoder::new(Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
        let (w, h) = (info.width, info.height);
        let data = &buf[..info.buffer_size()];
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        let mut alpha = None;
        match info.color_type {
            png::ColorType::Rgb => rgb.extend_from_slice(data),
            png::ColorType::Rgba => {
                let mut a = Vec::with_capacity((w * h) as usize);
                for px in data.chunks_exact(4) {
                    rgb.extend_from_slice(&px[..3]);
                    a.push(px[3]);
                }
                alpha = Some(a);
            }
            png::ColorType::Grayscale => {
                for v in data {
                    rgb.extend_from_slice(&[*v, *v, *v]);
                }
            }
            png::ColorType::GrayscaleAlpha => {
                let mut a = Vec::with_capacity((w * h) as usize);
                for px in data.chunks_exact(2) {
                    rgb.extend_from_slice(&[px[0], px[0], px[0]]);
                    a.push(px[1]);
                }
                alpha = Some(a);
            }
            png::ColorType::Indexed => return Err("indexed PNG after expansion".into()),
        }
        Ok((
            Self {
                width: w,
                height: h,
                rgb,
            },
            alpha,
        ))
    }

    /// A small JPEG, as ComfyUI's latent2rgb previews are.
    pub fn to_jpeg(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let enc = jpeg_encoder::Encoder::new(&mut out, 85);
        let _ = enc.encode(
            &self.rgb,
            self.width.min(u16::MAX as u32) as u16,
            self.height.min(u16::MAX as u32) as u16,
            jpeg_encoder::ColorType::Rgb,
        );
        out
    }
}

impl Image {
    /// A WebP of the image (lossless: the sim's and the gate's `/view?preview=webp` carry
    /// ComfyUI's format and content type, not its lossy quality setting).
    pub fn to_webp(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let enc = image_webp::WebPEncoder::new(&mut out);
        let _ = enc.encode(
            &self.rgb,
            self.width,
            self.height,
            image_webp::ColorType::Rgb8,
        );
        out
    }
}

/// Reads the `tEXt` chunks of a PNG (for tests and the gate's checks).
pub fn png_text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let decoder = png::Decoder::new(Cursor::new(bytes));
    match decoder.read_info() {
        Ok(reader) => reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_pixels_and_text() {
        let img = Image::synthesize(17, 9, 42);
        let png = img.to_png(&[("prompt".into(), "{\"1\":2}".into())], true);
        let (back, alpha) = Image::from_png(&png).unwrap();
        assert_eq!(back, img);
        assert!(alpha.is_none());
        assert_eq!(
            png_text_chunks(&png),
            vec![("prompt".to_string(), "{\"1\":2}".to_string())]
        );
    }

    #[test]
    fn full_strength_noise_does_not_compress() {
        let noisy = Image::solid(200, 100, 0x808080).add_noise(7, 1.0);
        assert_eq!(noisy, Image::solid(200, 100, 0x808080).add_noise(7, 1.0));
        assert!(noisy.to_png(&[], true).len() >= 200 * 100 * 3);
        assert_eq!(
            Image::solid(4, 4, 9).add_noise(7, 0.0),
            Image::solid(4, 4, 9)
        );
    }

    #[test]
    fn seeds_give_different_pictures() {
        assert_ne!(
            Image::synthesize(8, 8, 1).rgb,
            Image::synthesize(8, 8, 2).rgb
        );
    }

    #[test]
    fn blur_keeps_size_and_smooths() {
        let img = Image::synthesize(20, 10, 7);
        let b = img.blur(3);
        assert_eq!((b.width, b.height, b.rgb.len()), (20, 10, img.rgb.len()));
        assert_eq!(
            Image::solid(5, 5, 0x336699).blur(2),
            Image::solid(5, 5, 0x336699)
        );
    }
}
