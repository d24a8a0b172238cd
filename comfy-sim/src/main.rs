//! `comfy-sim`: runs one simulated ComfyUI instance. The first line printed is the bound
//! address, so scripts can start it on port 0 and read where it listens.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use comfy_sim::{SimBackend, SimConfig, config::default_models};

#[derive(Parser, Debug)]
#[command(
    name = "comfy-sim",
    about = "A simulated ComfyUI backend (HTTP + WebSocket API)"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// Instance name (shown in /system_stats).
    #[arg(long, default_value = "sim")]
    name: String,
    /// Relative GPU speed (compute time is divided by it).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Total VRAM in GB.
    #[arg(long, default_value_t = 24.0)]
    vram_gb: f64,
    /// Model file as FOLDER/NAME=SIZE_GB (repeatable), e.g. checkpoints/x.safetensors=6.9.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Start without the default model files.
    #[arg(long)]
    no_default_models: bool,
    /// Multiplies every simulated duration (0.01 = a hundred times faster).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Send latent previews while sampling.
    #[arg(long)]
    previews: bool,
    /// Cheap images: solid pictures written with the fast PNG encoder, so the sim's own CPU
    /// work per image stays small (for benchmarks). Off by default.
    #[arg(long)]
    fast_images: bool,
    /// Directory for input/, output/, temp/ and user/ (default: a temporary directory).
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// Largest request body in MB.
    #[arg(long, default_value_t = 100.0)]
    max_upload_size: f64,
}

fn parse_model(spec: &str) -> anyhow::Result<(String, String, f64)> {
    let (path, size) = spec
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--model {spec}: expected FOLDER/NAME=SIZE_GB"))?;
    let (folder, name) = path
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--model {spec}: expected FOLDER/NAME=SIZE_GB"))?;
    let size: f64 = size
        .parse()
        .map_err(|_| anyhow::anyhow!("--model {spec}: size must be a number of GB"))?;
    Ok((folder.to_string(), name.to_string(), size))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = SimConfig {
        listen: args.listen,
        name: args.name,
        speed: args.speed,
        vram_total_gb: args.vram_gb,
        models: if args.no_default_models {
            Default::default()
        } else {
            default_models()
        },
        time_scale: args.time_scale,
        previews: args.previews,
        fast_images: args.fast_images,
        base_dir: args.base_dir,
        max_upload_size: (args.max_upload_size * 1024.0 * 1024.0).round() as u64,
    };
    for spec in &args.models {
        let (folder, name, size) = parse_model(spec)?;
        config = config.with_model(&folder, &name, size);
    }
    let sim = SimBackend::start(config).await?;
    println!("{}", sim.addr());
    tokio::signal::ctrl_c().await?;
    sim.stop();
    Ok(())
}
