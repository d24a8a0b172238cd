//! The simulated cost model. Numbers are chosen to resemble an RTX 4090-class card at speed
//! 1.0 (SDXL 1024² × 20 steps ≈ 3 s); every duration is multiplied by the time scale.

/// KSampler time per step per megapixel per image, at speed 1.0.
pub const SAMPLER_SECONDS_PER_STEP_MEGAPIXEL: f64 = 0.15;
/// Loading a checkpoint or LoRA from disk, per GB (not divided by speed: it is disk bound).
pub const LOAD_SECONDS_PER_GB: f64 = 0.5;
/// VAE decode per megapixel, at speed 1.0.
pub const VAE_SECONDS_PER_MEGAPIXEL: f64 = 0.05;
/// One CLIPTextEncode, at speed 1.0.
pub const TEXT_ENCODE_SECONDS: f64 = 0.02;
/// Nodes that do next to nothing (empty latents, image ops on small images).
pub const TRIVIAL_NODE_SECONDS: f64 = 0.005;
/// ImageBlur per megapixel per image per kernel tap: ComfyUI's blur is a full 2-D convolution
/// with a (2r+1)² kernel, so a 2048² blur of radius 31 takes seconds (as on ComfyUI on CPU) while
/// small blurs stay trivial.
pub const BLUR_SECONDS_PER_MEGAPIXEL_TAP: f64 = 1e-4;
/// Activation memory while sampling, per megapixel per image, in GB.
pub const SAMPLING_GB_PER_MEGAPIXEL: f64 = 1.2;
/// Largest image batch the sim will materialise (pixels); more fails as out of memory.
pub const MAX_SIM_PIXELS: u64 = 64 << 20;

/// ComfyUI's OOM advice, appended to the exception text.
pub const OOM_TIPS: &str = "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.";

/// Working VRAM of one KSampler run.
pub fn sampling_working_gb(megapixels: f64, batch: u32) -> f64 {
    SAMPLING_GB_PER_MEGAPIXEL * megapixels * batch as f64
}
