//! What one simulated ComfyUI instance is: its name, GPU, speed, model files and clock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// One model file an instance has, with the VRAM it takes when loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// Path relative to its model folder, as ComfyUI lists it (`sd_xl_base_1.0.safetensors`).
    pub name: String,
    /// Size in GB; loading takes `LOAD_SECONDS_PER_GB` per GB and holds this much VRAM.
    pub size_gb: f64,
}

impl ModelFile {
    pub fn new(name: &str, size_gb: f64) -> Self {
        Self {
            name: name.to_string(),
            size_gb,
        }
    }
}

/// Configuration of one simulated instance. Every field has a default (see [`Default`]).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address to bind; port 0 picks a free port. Default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// Name shown in `/system_stats` (device name) and logs. Default `sim`.
    pub name: String,
    /// Relative GPU speed; simulated compute time is divided by it. Default 1.0.
    pub speed: f64,
    /// Total VRAM in GB. Default 24.
    pub vram_total_gb: f64,
    /// Model files per folder (`checkpoints`, `loras`, `vae`, `embeddings` …).
    /// Default: two checkpoints, one LoRA, one VAE, one embedding (see [`default_models`]).
    pub models: BTreeMap<String, Vec<ModelFile>>,
    /// Multiplies every simulated duration; tests run at 0.01. Default 1.0.
    pub time_scale: f64,
    /// Send latent previews during sampling (ComfyUI's `--preview-method auto`); a prompt's
    /// `extra_data.preview_method` overrides it. Default false (ComfyUI's default is `none`).
    pub previews: bool,
    /// Cheap images: VAEDecode makes a solid picture in a seed-chosen colour instead of a
    /// synthesised one, and SaveImage writes it with the fast PNG encoder, so the sim's own CPU
    /// work per image (about 10 ms for 512², 45 ms for 1024² by default) does not count in a
    /// benchmark's timings; still valid PNGs of the right dimensions. Default false.
    pub fast_images: bool,
    /// Directory holding `input/`, `output/`, `temp/` and `user/`. Default: a fresh temporary
    /// directory removed when the handle is dropped.
    pub base_dir: Option<PathBuf>,
    /// Largest request body in bytes (ComfyUI's `--max-upload-size`). Default 100 MiB.
    pub max_upload_size: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            name: "sim".to_string(),
            speed: 1.0,
            vram_total_gb: 24.0,
            models: default_models(),
            time_scale: 1.0,
            previews: false,
            fast_images: false,
            base_dir: None,
            max_upload_size: 100 << 20,
        }
    }
}

impl SimConfig {
    /// Files of one model folder (empty for a folder the instance does not have).
    pub fn files(&self, folder: &str) -> Vec<String> {
        self.models
            .get(folder)
            .map(|files| files.iter().map(|f| f.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Size in GB of a model file, if the instance has it.
    pub fn model_size_gb(&self, folder: &str, name: &str) -> Option<f64> {
        self.models
            .get(folder)?
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.size_gb)
    }

    /// Adds (or replaces) a model file.
    pub fn with_model(mut self, folder: &str, name: &str, size_gb: f64) -> Self {
        let files = self.models.entry(folder.to_string()).or_default();
        files.retain(|f| f.name != name);
        files.push(ModelFile::new(name, size_gb));
        files.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }
}

/// The model folders ComfyUI 0.8 registers, in its order (`GET /models`).
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

/// Two checkpoints of different size, a LoRA, a VAE and an embedding.
pub fn default_models() -> BTreeMap<String, Vec<ModelFile>> {
    let mut m = BTreeMap::new();
    m.insert(
        "checkpoints".to_string(),
        vec![
            ModelFile::new("sd_xl_base_1.0.safetensors", 6.9),
            ModelFile::new("v1-5-pruned-emaonly-fp16.safetensors", 2.1),
        ],
    );
    m.insert(
        "loras".to_string(),
        vec![ModelFile::new("add_detail.safetensors", 0.15)],
    );
    m.insert(
        "vae".to_string(),
        vec![ModelFile::new("sdxl_vae.safetensors", 0.33)],
    );
    m.insert(
        "embeddings".to_string(),
        vec![ModelFile::new("easynegative.safetensors", 0.01)],
    );
    m
}
