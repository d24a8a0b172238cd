//! The scheduling benches' common ground: the fleet shapes, the seeded trace, comfy-sim's cost
//! model for a job, and the markdown rows they print against the clairvoyant reference
//! (`clairvoyant.rs`). Shared by `scheduling` (end to end, real gate and sims) and
//! `scheduling_des` (the same decision in simulated time).

// Each bench uses its own part of this file.
#![allow(dead_code)]

use serde_json::{Value, json};

use comfy_sim::SimConfig;
/// comfy-sim's cost model: the one place the benches name its path.
pub use comfy_sim::cost;

/// The fleet: (relative speed, VRAM in GB) per GPU.
pub const FLEET: [(f64, f64); 4] = [(2.0, 80.0), (1.0, 24.0), (1.0, 24.0), (0.5, 12.0)];
/// comfy-sim's VRAM held by the process itself (GB).
pub const BASELINE_GB: f64 = 0.4;

/// A fleet shape: a name and (relative speed, VRAM in GB) per GPU.
pub struct Shape {
    pub name: &'static str,
    pub gpus: Vec<(f64, f64)>,
}

impl Shape {
    /// The end-to-end bench's fleet: [`FLEET`].
    pub fn heterogeneous4() -> Self {
        Self {
            name: "heterogeneous 4 (speeds 2/1/1/0.5, VRAM 80/24/24/12 GB)",
            gpus: FLEET.to_vec(),
        }
    }

    /// Eight equal GPUs: speed 1, 24 GB each.
    pub fn equal8() -> Self {
        Self {
            name: "8 equal (speed 1, 24 GB)",
            gpus: vec![(1.0, 24.0); 8],
        }
    }

    /// 64 mixed: 16 of each of [`FLEET`]'s four kinds, interleaved.
    pub fn mixed64() -> Self {
        Self {
            name: "64 mixed (16 each of the four kinds)",
            gpus: (0..64).map(|i| FLEET[i % FLEET.len()]).collect(),
        }
    }

    /// The three shapes the DES reports.
    pub fn all() -> Vec<Self> {
        vec![Self::heterogeneous4(), Self::equal8(), Self::mixed64()]
    }
}

/// The trace's two checkpoints (comfy-sim's default models).
pub const CKPTS: [&str; 2] = [
    "sd_xl_base_1.0.safetensors",
    "v1-5-pruned-emaonly-fp16.safetensors",
];

pub struct Job {
    /// Arrival, seconds from the start.
    pub at_s: f64,
    pub ckpt: &'static str,
    pub side: u64,
    pub batch: u64,
    pub steps: u64,
}

impl Job {
    /// Seconds this job runs on a GPU of `speed` with its checkpoint resident, by comfy-sim's
    /// cost model: sampling, VAE decode, two text encodes, the empty latent.
    pub fn service_s(&self, speed: f64) -> f64 {
        let megapixels = (self.side * self.side) as f64 / 1e6 * self.batch as f64;
        (cost::SAMPLER_SECONDS_PER_STEP_MEGAPIXEL * self.steps as f64 * megapixels
            + cost::VAE_SECONDS_PER_MEGAPIXEL * megapixels
            + 2.0 * cost::TEXT_ENCODE_SECONDS)
            / speed
            + cost::TRIVIAL_NODE_SECONDS
    }

    /// Its ComfyUI graph (API format).
    pub fn graph(&self, seed: u64) -> Value {
        json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": self.steps, "cfg": 7, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                  "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": self.ckpt}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": self.side, "height": self.side, "batch_size": self.batch}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a lighthouse"}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}}
        })
    }

    /// Its checkpoint's size in GB (comfy-sim's default model list).
    pub fn ckpt_gb(&self) -> f64 {
        SimConfig::default()
            .model_size_gb("checkpoints", self.ckpt)
            .expect("the sims list the trace's checkpoints")
    }

    /// Sampling working memory in GB.
    pub fn working_gb(&self) -> f64 {
        cost::sampling_working_gb((self.side * self.side) as f64 / 1e6, self.batch as u32)
    }
}

/// A seeded trace of `n` jobs: 70 % small (512²), 25 % large (1024²), 5 % very large (1536² ×
/// 2, which the 12 GB card cannot hold with SDXL); checkpoints half and half; Poisson arrivals
/// at `load` × [`FLEET`]'s capacity (its summed speed over the mean service time at speed 1).
pub fn trace(load: f64, seed: u64, n: usize) -> Vec<Job> {
    trace_on(load, seed, n, &FLEET)
}

/// [`trace`] with arrivals at `load` × the capacity of `fleet` ((speed, VRAM GB) per GPU).
pub fn trace_on(load: f64, seed: u64, n: usize, fleet: &[(f64, f64)]) -> Vec<Job> {
    let mut x = seed;
    let mut rnd = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let mut jobs: Vec<Job> = (0..n)
        .map(|_| {
            let r = rnd();
            let (side, batch) = if r < 0.70 {
                (512, 1)
            } else if r < 0.95 {
                (1024, 1)
            } else {
                (1536, 2)
            };
            Job {
                at_s: 0.0,
                ckpt: CKPTS[(rnd() * 2.0) as usize % 2],
                side,
                batch,
                steps: 20,
            }
        })
        .collect();
    let mean_service: f64 = jobs.iter().map(|j| j.service_s(1.0)).sum::<f64>() / n as f64;
    let capacity: f64 = fleet.iter().map(|f| f.0).sum();
    let rate = load * capacity / mean_service;
    let mut t = 0.0;
    for j in &mut jobs {
        t += -(1.0 - rnd()).ln() / rate;
        j.at_s = t;
    }
    jobs
}

pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// What one policy did on a trace. Times in simulated seconds.
pub struct Outcome {
    pub latencies: Vec<f64>,
    pub makespan: f64,
    pub busy_share: f64,
    pub loads: u64,
    pub failed: usize,
}

/// p50, p95, p99 latency and makespan, simulated seconds.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub makespan: f64,
}

impl Summary {
    pub fn of(latencies: &[f64], makespan: f64) -> Self {
        Self {
            p50: pct(latencies, 0.5),
            p95: pct(latencies, 0.95),
            p99: pct(latencies, 0.99),
            makespan,
        }
    }

    /// Each figure over `r`'s.
    pub fn ratio(&self, r: &Summary) -> [f64; 4] {
        [
            self.p50 / r.p50,
            self.p95 / r.p95,
            self.p99 / r.p99,
            self.makespan / r.makespan,
        ]
    }
}

impl Outcome {
    pub fn summary(&self) -> Summary {
        Summary::of(&self.latencies, self.makespan)
    }
}

/// The header of a one-trace table: figures with their ratio to the reference.
pub fn print_head() {
    println!(
        "| policy | p50 s (×ref) | p95 s (×ref) | p99 s (×ref) | makespan s (×ref) | GPU busy | ckpt loads | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
}

/// One policy's row of a one-trace table, against the reference `r`.
pub fn print_row(name: &str, o: &Outcome, r: &Summary) {
    let s = o.summary();
    let x = s.ratio(r);
    println!(
        "| {name} | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.1} ({:.2}) | {:.0} % | {} | {} |",
        s.p50,
        x[0],
        s.p95,
        x[1],
        s.p99,
        x[2],
        s.makespan,
        x[3],
        o.busy_share * 100.0,
        o.loads,
        o.failed
    );
}

/// What the gate reads from a default comfy-sim: its `/object_info` (every node class and combo
/// value) and its model sizes (`/experiment/models/checkpoints`, in bytes).
pub fn sim_capabilities() -> comfy_gate::fleet::capabilities::Capabilities {
    use comfy_sim::nodes;
    let config = SimConfig::default();
    let info: serde_json::Map<String, Value> = nodes::catalogue()
        .iter()
        .map(|d| (d.class.to_string(), nodes::object_info(d, &config, &[])))
        .collect();
    let mut caps =
        comfy_gate::fleet::capabilities::Capabilities::from_object_info(&Value::Object(info));
    for folder in ["checkpoints", "loras"] {
        let listing: Vec<Value> = config.models[folder]
            .iter()
            .map(|m| json!({"name": m.name, "size": (m.size_gb * 1024.0 * 1024.0 * 1024.0) as u64}))
            .collect();
        caps.add_model_sizes(&Value::Array(listing));
    }
    caps
}
