//! The sampling thread behind [`NvmlSampler`].

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use nvml_wrapper::Nvml;
use nvml_wrapper::device::Device;
use nvml_wrapper::error::NvmlError;

use super::{GpuReading, GpuSelector, init, read_device};

/// Shortest sampling interval; a zero interval would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

type Readings = Vec<Option<GpuReading>>;

/// Samples the selected GPUs on a dedicated thread every interval.
///
/// The readings hold one slot per selector, in the selectors' order. A slot is `None` only until
/// its GPU is first read; a failed read leaves the previous reading in place, so a stale GPU shows
/// as an ageing [`GpuReading::read_at`]. Each selector is resolved to its GPU's UUID at start and
/// the GPU is found by that UUID afterwards, so an index selector keeps following the same GPU.
/// The thread ends on [`NvmlSampler::stop`] or when the sampler is dropped.
pub struct NvmlSampler {
    readings: Arc<ArcSwap<Readings>>,
    selectors: Vec<GpuSelector>,
    uuids: Vec<String>,
    interval: Duration,
    stop: Arc<StopSignal>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NvmlSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSampler")
            .field("uuids", &self.uuids)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl NvmlSampler {
    /// Loads NVML (`lib_path`, or `libnvidia-ml.so.1`), resolves every selector, takes a first
    /// sample and starts the sampling thread. Errs with a one-line reason when the library cannot
    /// be loaded or initialised, or a selector matches no GPU.
    pub fn start(
        lib_path: Option<&Path>,
        gpus: Vec<GpuSelector>,
        interval: Duration,
    ) -> Result<NvmlSampler, String> {
        if gpus.is_empty() {
            return Err("no GPU selected for NVML sampling".to_string());
        }
        let interval = interval.max(MIN_INTERVAL);
        let nvml = init(lib_path)?;
        let uuids = gpus
            .iter()
            .map(|s| resolve(&nvml, s))
            .collect::<Result<Vec<_>, _>>()?;
        let readings = Arc::new(ArcSwap::from_pointee(vec![None; gpus.len()]));
        let stop = Arc::new(StopSignal::default());
        let mut worker = Worker {
            uuids: uuids.clone(),
            readings: readings.clone(),
            failing: vec![false; gpus.len()],
        };
        let thread_stop = stop.clone();
        // The first sample is taken here, so the readings are filled when `start` returns.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nvml-sampler".to_string())
            .spawn(move || {
                let mut devices: Vec<Option<Device<'_>>> =
                    worker.uuids.iter().map(|_| None).collect();
                worker.sample(&nvml, &mut devices);
                let _ = started_tx.send(());
                let mut next = Instant::now() + interval;
                while !thread_stop.wait_until(next) {
                    worker.sample(&nvml, &mut devices);
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        // Fell behind (a slow read): sample on schedule from now on.
                        next = now + interval;
                    }
                }
                drop(devices);
                if let Err(e) = nvml.shutdown() {
                    tracing::debug!("NVML shutdown: {e}");
                }
            })
            .map_err(|e| format!("cannot start the NVML sampling thread: {e}"))?;
        let _ = started_rx.recv();
        tracing::info!(
            gpus = ?uuids,
            interval_ms = interval.as_millis() as u64,
            "NVML sampling started"
        );
        Ok(NvmlSampler {
            readings,
            selectors: gpus,
            uuids,
            interval,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The latest readings, one slot per selector in the selectors' order.
    pub fn readings(&self) -> Arc<Readings> {
        self.readings.load_full()
    }

    /// The shared cell the sampling thread publishes into, for holders that outlive a borrow.
    pub fn shared(&self) -> Arc<ArcSwap<Readings>> {
        self.readings.clone()
    }

    /// The selectors, as given to [`NvmlSampler::start`].
    pub fn selectors(&self) -> &[GpuSelector] {
        &self.selectors
    }

    /// The UUID each selector resolved to at start, in the selectors' order.
    pub fn uuids(&self) -> &[String] {
        &self.uuids
    }

    /// The sampling interval in effect (at least 10 ms).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Stops the sampling thread and waits for it to end. The last readings stay readable.
    pub fn stop(&self) {
        self.stop.raise();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::warn!("the NVML sampling thread panicked");
        }
    }
}

impl Drop for NvmlSampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds the GPU a selector names and returns its UUID.
fn resolve(nvml: &Nvml, selector: &GpuSelector) -> Result<String, String> {
    let device = match selector {
        GpuSelector::Uuid(uuid) => nvml.device_by_uuid(uuid.as_str()).map_err(|e| match e {
            NvmlError::NotFound | NvmlError::InvalidArg => {
                format!("no GPU with UUID {uuid}{}", seen(nvml))
            }
            e => format!("GPU {uuid}: {e}"),
        })?,
        GpuSelector::Index(index) => nvml.device_by_index(*index).map_err(|e| match e {
            NvmlError::InvalidArg | NvmlError::NotFound => {
                format!("no GPU at index {index}{}", seen(nvml))
            }
            e => format!("GPU {index}: {e}"),
        })?,
    };
    device
        .uuid()
        .map_err(|e| format!("GPU {selector}: reading its UUID: {e}"))
}

/// `" (NVML sees: GPU-a, GPU-b)"`, to help whoever typed a selector that matched nothing.
fn seen(nvml: &Nvml) -> String {
    let Ok(count) = nvml.device_count() else {
        return String::new();
    };
    let uuids: Vec<String> = (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok()?.uuid().ok())
        .collect();
    if uuids.is_empty() {
        " (NVML sees no GPU)".to_string()
    } else {
        format!(" (NVML sees: {})", uuids.join(", "))
    }
}

/// The sampling thread's state.
struct Worker {
    uuids: Vec<String>,
    readings: Arc<ArcSwap<Readings>>,
    /// Per slot: the last read failed (so a failure is logged once, not every interval).
    failing: Vec<bool>,
}

impl Worker {
    /// Reads every slot's GPU and publishes the result. `devices` caches the handles; a handle is
    /// looked up again by UUID after any failed read.
    fn sample<'n>(&mut self, nvml: &'n Nvml, devices: &mut [Option<Device<'n>>]) {
        let mut next: Readings = self.readings.load().as_ref().clone();
        for (slot, uuid) in self.uuids.iter().enumerate() {
            let result = read_slot(nvml, uuid, &mut devices[slot]);
            match result {
                Ok(reading) => {
                    if self.failing[slot] {
                        tracing::info!(gpu = %uuid, "NVML reads again");
                        self.failing[slot] = false;
                    }
                    next[slot] = Some(reading);
                }
                Err(e) => {
                    devices[slot] = None;
                    if !self.failing[slot] {
                        tracing::warn!(gpu = %uuid, "NVML read failed, keeping the last reading: {e}");
                        self.failing[slot] = true;
                    }
                }
            }
        }
        self.readings.store(Arc::new(next));
    }
}

fn read_slot<'n>(
    nvml: &'n Nvml,
    uuid: &str,
    device: &mut Option<Device<'n>>,
) -> Result<GpuReading, String> {
    if device.is_none() {
        *device = Some(nvml.device_by_uuid(uuid).map_err(|e| e.to_string())?);
    }
    let reading = read_device(device.as_ref().expect("set above"))?;
    if reading.uuid != uuid {
        return Err(format!("the handle now reads GPU {}", reading.uuid));
    }
    Ok(reading)
}

/// A stop flag the sampling thread sleeps on.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    fn raise(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Sleeps until `deadline` or a stop; true when stopped.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .wake
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
