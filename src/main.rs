//! `comfy-gate`: the gateway binary. This first version only reports that the gateway is not
//! built yet; `comfy-sim` is the usable binary of this release.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "comfy-gate",
    version,
    about = "GPU-aware reverse proxy and load balancer for ComfyUI"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (not built yet).
    Run,
    /// Start a simulated fleet and the gateway (not built yet).
    Demo,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Run) | Some(Command::Demo) | None => {
            eprintln!(
                "comfy-gate: the gateway is not built yet in this release; run `comfy-sim` for a simulated ComfyUI backend"
            );
            std::process::exit(2);
        }
    }
}
