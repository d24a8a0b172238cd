//! NVML telemetry for GPUs on the gate's own machine.
//!
//! Why NVML: for a backend whose GPU sits on the same host as the gate, NVML reads the driver's
//! own counters. Its free VRAM is exact and device-wide (it includes every process on the GPU,
//! not only ComfyUI's view of itself), and it is as fresh as the sampler's interval, with no HTTP
//! round trip to a backend that may be busy. Remote backends, whose GPUs NVML cannot see, keep
//! using ComfyUI's `/system_stats`.
//!
//! [`NvmlSampler`] runs a dedicated thread (NVML calls block, and must not stall the async
//! runtime) that reads the selected GPUs every interval and publishes the readings through an
//! [`ArcSwap`](arc_swap::ArcSwap), so readers never wait on NVML. [`probe`] is a one-shot read of
//! every GPU, for a command-line probe and for reporting what a real GPU read.
//!
//! The library is `libnvidia-ml.so.1` unless a path is given (nvml-wrapper's default on Linux).
//! Tests point it at `libfake_nvml.so`, built from the workspace's `fake-nvml` crate, which serves
//! readings from a JSON file.

mod sampler;

use std::path::Path;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::device::Device;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;

pub use sampler::NvmlSampler;

/// The library nvml-wrapper loads when no path is given.
const DEFAULT_LIB: &str = "libnvidia-ml.so.1";

pub use crate::config::GpuSelector;

/// One read of one GPU. Memory is in bytes; `None` where the GPU does not report that value.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub uuid: String,
    pub name: String,
    pub total: u64,
    pub free: u64,
    pub used: u64,
    /// Percent of the last sample period in which a kernel ran.
    pub gpu_util: Option<u32>,
    /// Percent of the last sample period in which device memory was read or written.
    pub mem_util: Option<u32>,
    pub temperature_c: Option<u32>,
    /// Board power draw in milliwatts.
    pub power_mw: Option<u32>,
    /// When the memory counters were read.
    pub read_at: Instant,
}

impl GpuReading {
    /// How long ago this reading was taken.
    pub fn age(&self) -> Duration {
        self.read_at.elapsed()
    }
}

/// Reads every GPU NVML sees, in index order, once.
pub fn probe(lib_path: Option<&Path>) -> Result<Vec<GpuReading>, String> {
    let nvml = init(lib_path)?;
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML device count: {e}"))?;
    (0..count)
        .map(|i| {
            let device = nvml
                .device_by_index(i)
                .map_err(|e| format!("GPU {i}: {e}"))?;
            read_device(&device).map_err(|e| format!("GPU {i}: {e}"))
        })
        .collect()
}

/// Loads and initialises NVML, with a one-line reason on failure.
fn init(lib_path: Option<&Path>) -> Result<Nvml, String> {
    let mut builder = Nvml::builder();
    if let Some(path) = lib_path {
        builder.lib_path(path.as_os_str());
    }
    let lib = lib_path.map_or_else(|| DEFAULT_LIB.to_string(), |p| p.display().to_string());
    builder.init().map_err(|e| {
        let reason = match e {
            NvmlError::LibloadingError(e) => format!("cannot load NVML library {lib}: {e}"),
            NvmlError::FailedToLoadSymbol(e) => {
                format!("{lib} is not a usable NVML library: {e}")
            }
            e => format!("NVML initialisation failed ({lib}): {e}"),
        };
        one_line(&reason)
    })
}

/// Reads one device. Memory, UUID and name must succeed; the other values are optional.
fn read_device(device: &Device<'_>) -> Result<GpuReading, String> {
    let memory = device
        .memory_info()
        .map_err(|e| format!("memory info: {e}"))?;
    let read_at = Instant::now();
    let uuid = device.uuid().map_err(|e| format!("UUID: {e}"))?;
    let name = device.name().map_err(|e| format!("name: {e}"))?;
    let utilization = device.utilization_rates().ok();
    Ok(GpuReading {
        uuid,
        name,
        total: memory.total,
        free: memory.free,
        used: memory.used,
        gpu_util: utilization.as_ref().map(|u| u.gpu),
        mem_util: utilization.as_ref().map(|u| u.memory),
        temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
        power_mw: device.power_usage().ok(),
        read_at,
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
