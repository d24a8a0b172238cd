//! `comfy-gate demo`: a simulated fleet (three comfy-sim backends of different speed and VRAM)
//! behind the gate, all in one process, so a new user can see the gate work in one command.

use std::net::SocketAddr;

use crate::GateHandle;
use crate::config::{self, Config, FileConfig};
use comfy_sim::{SimBackend, SimConfig, SimHandle};

/// The demo fleet: a fast 80 GB card, a 24 GB card, a slow 12 GB card.
pub fn fleet() -> Vec<SimConfig> {
    [
        ("gpu0-h100", 2.0, 80.0),
        ("gpu1-4090", 1.0, 24.0),
        ("gpu2-3060", 0.5, 12.0),
    ]
    .into_iter()
    .map(|(name, speed, vram)| SimConfig {
        name: name.to_string(),
        speed,
        vram_total_gb: vram,
        previews: true,
        ..Default::default()
    })
    .collect()
}

/// A running demo: the sims and the gate (its state lives in a temporary directory that goes
/// away with the demo).
pub struct Demo {
    pub sims: Vec<SimHandle>,
    pub gate: GateHandle,
    _state: tempfile::TempDir,
}

/// Starts the fleet (at `time_scale`) and the gate on `listen`.
pub async fn start(listen: SocketAddr, admin: SocketAddr, time_scale: f64) -> anyhow::Result<Demo> {
    let mut sims = Vec::new();
    for cfg in fleet() {
        sims.push(SimBackend::start(SimConfig { time_scale, ..cfg }).await?);
    }
    let mut file = FileConfig::default();
    file.server.listen = listen;
    file.server.admin_listen = admin;
    let state = tempfile::Builder::new()
        .prefix("comfy-gate-demo-")
        .tempdir()?;
    file.server.state_dir = Some(state.path().to_path_buf());
    file.health.interval_ms = 500;
    file.backends = sims
        .iter()
        .map(|s| config::backend_from_url(&s.url()))
        .collect();
    for (b, s) in file.backends.iter_mut().zip(&sims) {
        b.name = Some(s.config().name.clone());
    }
    let cfg: Config = config::validate(file, "", "(demo)")?;
    let gate = crate::run(cfg).await?;
    Ok(Demo {
        sims,
        gate,
        _state: state,
    })
}
