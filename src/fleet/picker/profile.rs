//! What a prompt asks of a GPU, read from its graph: the checkpoint it loads, how much sampling
//! work it is (steps × megapixels × batch), how much VRAM it needs, and its "shape" (the graph's
//! structure and sizes, not its seeds or texts) under which run times and VRAM peaks are learned.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

/// Activation memory while sampling, per megapixel per image (GB), before anything is learned.
pub const DEFAULT_GB_PER_MEGAPIXEL: f64 = 1.2;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// The checkpoint file the prompt loads, if any.
    pub checkpoint: Option<String>,
    /// Sampling work: Σ steps × megapixels × batch (at least a small constant).
    pub work: f64,
    /// Largest megapixels × batch it samples.
    pub megapixel_batch: f64,
    /// Structure and sizes, for learning.
    pub shape: u64,
}

fn link<'a>(prompt: &'a Value, v: &Value) -> Option<&'a Value> {
    let id = v.as_array().filter(|a| a.len() == 2)?[0].as_str()?;
    prompt.get(id)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Reads a prompt's profile.
pub fn profile(prompt: &Value) -> Profile {
    let mut p = Profile {
        work: 0.05,
        ..Default::default()
    };
    let mut shape: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, node) in prompt.as_object().into_iter().flatten() {
        let class = node["class_type"].as_str().unwrap_or("");
        let inputs = &node["inputs"];
        if p.checkpoint.is_none() {
            for key in ["ckpt_name", "unet_name"] {
                if let Some(name) = inputs[key].as_str() {
                    p.checkpoint = Some(name.to_string());
                }
            }
        }
        let mut sizes = Vec::new();
        if class.contains("Sampler") {
            let steps = num(&inputs["steps"]).unwrap_or(20.0);
            let (mut mp, mut batch) = (512.0 * 512.0 / 1e6, 1.0);
            if let Some(latent) = link(prompt, &inputs["latent_image"]) {
                let li = &latent["inputs"];
                if let (Some(w), Some(h)) = (num(&li["width"]), num(&li["height"])) {
                    mp = w * h / 1e6;
                }
                batch = num(&li["batch_size"]).unwrap_or(1.0);
            }
            p.work += steps * mp * batch;
            p.megapixel_batch = p.megapixel_batch.max(mp * batch);
            sizes.push(format!("{steps}x{mp:.3}x{batch}"));
        }
        for key in ["width", "height", "batch_size"] {
            if let Some(v) = num(&inputs[key]) {
                sizes.push(format!("{key}={v}"));
            }
        }
        shape
            .entry(format!("{class}#{id}"))
            .or_default()
            .extend(sizes);
    }
    let mut h = DefaultHasher::new();
    shape.hash(&mut h);
    p.checkpoint.hash(&mut h);
    p.shape = h.finish();
    p
}

/// Predicted VRAM need in bytes: the checkpoint (if its size is known) plus activation memory,
/// or the largest peak seen for this shape, whichever is larger.
pub fn vram_need(p: &Profile, checkpoint_bytes: Option<u64>, learned_peak: Option<u64>) -> u64 {
    let activation = (DEFAULT_GB_PER_MEGAPIXEL * p.megapixel_batch * 1e9) as u64;
    let formula = checkpoint_bytes.unwrap_or(0) + activation;
    formula.max(learned_peak.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn graph(seed: u64, w: u64, steps: u64) -> Value {
        json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "latent_image": ["5", 0], "model": ["4", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": w, "height": w, "batch_size": 2}}
        })
    }

    #[test]
    fn work_and_shape() {
        let p = profile(&graph(1, 1000, 20));
        assert_eq!(p.checkpoint.as_deref(), Some("a.safetensors"));
        assert!((p.work - (0.05 + 20.0 * 1.0 * 2.0)).abs() < 1e-9);
        assert!((p.megapixel_batch - 2.0).abs() < 1e-9);
        assert_eq!(
            p.shape,
            profile(&graph(2, 1000, 20)).shape,
            "seeds do not change the shape"
        );
        assert_ne!(p.shape, profile(&graph(1, 512, 20)).shape, "sizes do");
        assert_eq!(
            vram_need(&p, Some(1_000_000_000), None),
            1_000_000_000 + 2_400_000_000
        );
        assert_eq!(vram_need(&p, None, Some(9_000_000_000)), 9_000_000_000);
    }
}
