//! The scheduling benches' common ground: the simulated fleet, the seeded trace, comfy-sim's
//! cost model for a job, the computed lower bound and queueing reference, and the markdown
//! table they print. Shared by `scheduling` (end to end, real gate and sims) and
//! `scheduling_des` (the same decision in simulated time).

// Each bench uses its own part of this file.
#![allow(dead_code)]

use serde_json::{Value, json};

use comfy_sim::SimConfig;
/// comfy-sim's cost model: the one place the benches name its path.
pub use comfy_sim::cost;

/// The fleet: (relative speed, VRAM in GB) per GPU.
pub const FLEET: [(f64, f64); 4] = [(2.0, 80.0), (1.0, 24.0), (1.0, 24.0), (0.5, 12.0)];
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
/// at `load` × the fleet's capacity (its summed speed over the mean service time at speed 1).
pub fn trace(load: f64, seed: u64, n: usize) -> Vec<Job> {
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
    let capacity: f64 = FLEET.iter().map(|f| f.0).sum();
    let rate = load * capacity / mean_service;
    let mut t = 0.0;
    for j in &mut jobs {
        t += -(1.0 - rnd()).ln() / rate;
        j.at_s = t;
    }
    jobs
}

/// A queueing reference, computed, not run: each job in arrival order on the GPU where it would
/// finish first, with exact service times, checkpoints always resident and no overhead. What
/// queueing alone costs on this trace (the lower bound ignores it).
/// Returns (latencies, makespan).
pub fn greedy_reference(jobs: &[Job]) -> (Vec<f64>, f64) {
    let models = SimConfig::default();
    let mut free_at = [0.0f64; FLEET.len()];
    let mut latencies = Vec::new();
    for j in jobs {
        let ckpt_gb = models
            .model_size_gb("checkpoints", j.ckpt)
            .expect("the sims list the trace's checkpoints");
        let megapixels = (j.side * j.side) as f64 / 1e6 * j.batch as f64;
        let need = ckpt_gb + cost::sampling_working_gb(megapixels / j.batch as f64, j.batch as u32);
        let best = FLEET
            .iter()
            .enumerate()
            .filter(|(_, (_, vram))| need <= *vram)
            .map(|(b, (speed, _))| (b, free_at[b].max(j.at_s) + j.service_s(*speed)))
            .min_by(|x, y| x.1.total_cmp(&y.1));
        if let Some((b, end)) = best {
            free_at[b] = end;
            latencies.push(end - j.at_s);
        }
    }
    (latencies, free_at.iter().copied().fold(0.0, f64::max))
}

pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// The lower bound of a trace: p50/p95/p99 of each job's service time on the fastest GPU, and
/// total work over total speed (or the last arrival) for the makespan.
pub struct Bound {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub makespan: f64,
}

impl Bound {
    pub fn of(jobs: &[Job]) -> Self {
        let fastest = FLEET.iter().map(|f| f.0).fold(0.0, f64::max);
        let capacity: f64 = FLEET.iter().map(|f| f.0).sum();
        let total_work: f64 = jobs.iter().map(|j| j.service_s(1.0)).sum();
        let makespan = (total_work / capacity).max(jobs.last().map(|j| j.at_s).unwrap_or(0.0));
        let lat: Vec<f64> = jobs.iter().map(|j| j.service_s(fastest)).collect();
        Self {
            p50: pct(&lat, 0.5),
            p95: pct(&lat, 0.95),
            p99: pct(&lat, 0.99),
            makespan,
        }
    }
}

/// What one policy did on a trace. Times in simulated seconds.
pub struct Outcome {
    pub latencies: Vec<f64>,
    pub makespan: f64,
    pub busy_share: f64,
    pub loads: u64,
    pub failed: usize,
}

/// The table's header, the lower bound's row and the queueing reference's row.
pub fn print_head(jobs: &[Job], lb: &Bound) {
    println!(
        "| policy | p50 s (×LB) | p95 s (×LB) | p99 s (×LB) | makespan s (×LB) | GPU busy | ckpt loads | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| lower bound | {:.2} | {:.2} | {:.2} | {:.1} | | | |",
        lb.p50, lb.p95, lb.p99, lb.makespan
    );
    let (g, g_makespan) = greedy_reference(jobs);
    let (g50, g95, g99) = (pct(&g, 0.5), pct(&g, 0.95), pct(&g, 0.99));
    println!(
        "| queueing reference (computed: greedy, exact times, no loads) | {g50:.2} ({:.2}) | {g95:.2} ({:.2}) | {g99:.2} ({:.2}) | {g_makespan:.1} ({:.2}) | | 0 | 0 |",
        g50 / lb.p50,
        g95 / lb.p95,
        g99 / lb.p99,
        g_makespan / lb.makespan
    );
}

/// One policy's row.
pub fn print_row(name: &str, o: &Outcome, lb: &Bound) {
    let (p50, p95, p99) = (
        pct(&o.latencies, 0.5),
        pct(&o.latencies, 0.95),
        pct(&o.latencies, 0.99),
    );
    println!(
        "| {name} | {p50:.2} ({:.2}) | {p95:.2} ({:.2}) | {p99:.2} ({:.2}) | {:.1} ({:.2}) | {:.0} % | {} | {} |",
        p50 / lb.p50,
        p95 / lb.p95,
        p99 / lb.p99,
        o.makespan,
        o.makespan / lb.makespan,
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
