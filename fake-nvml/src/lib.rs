//! fake-nvml: a test-only stand-in for `libnvidia-ml.so`, so the gate's NVML telemetry can be
//! tested in CI without a GPU or an NVIDIA driver.
//!
//! The crate builds `libfake_nvml.so` (a `cdylib`; the name deliberately differs from the real
//! `libnvidia-ml.so.1` so nothing loads it by accident). Load it with
//! `nvml_wrapper::Nvml::builder().lib_path(path).init()`.
//!
//! # Exported symbols
//!
//! Exactly what nvml-wrapper 0.13 calls for init/shutdown, device enumeration and the readings
//! the gate samples:
//!
//! `nvmlInit_v2`, `nvmlInitWithFlags`, `nvmlShutdown`, `nvmlErrorString`,
//! `nvmlSystemGetDriverVersion`, `nvmlDeviceGetCount_v2`, `nvmlDeviceGetHandleByIndex_v2`,
//! `nvmlDeviceGetHandleByUUID`, `nvmlDeviceGetUUID`, `nvmlDeviceGetName`,
//! `nvmlDeviceGetMemoryInfo_v2`, `nvmlDeviceGetUtilizationRates`, `nvmlDeviceGetTemperature`,
//! `nvmlDeviceGetPowerUsage`.
//!
//! nvml-wrapper resolves every other NVML symbol lazily; calling a wrapper method whose symbol
//! is absent here yields `NvmlError::FailedToLoadSymbol`, not a crash.
//!
//! # State file
//!
//! The devices come from the JSON file named by the environment variable `FAKE_NVML_STATE`,
//! which is **re-read on every call**, so a test changes readings by rewriting the file:
//!
//! ```json
//! {"driver_version": "550.54.15",
//!  "devices": [{"uuid": "GPU-…", "name": "Fake RTX", "total": 25769803776,
//!               "free": 20000000000, "used": 5769803776, "gpu_util": 40, "mem_util": 22,
//!               "temperature": 61, "power_mw": 180000}]}
//! ```
//!
//! * `uuid`, `name`, `total` and `free` are required. `used` defaults to `total - free`,
//!   `reserved` to 0, `driver_version` to `"0.0.0-fake"`.
//! * `gpu_util`, `mem_util`, `temperature` and `power_mw` are optional: an absent one makes the
//!   matching call return `NVML_ERROR_NOT_SUPPORTED`, as a real GPU lacking the sensor does.
//! * `"lost": true` makes every per-device reading call return `NVML_ERROR_GPU_IS_LOST` (the
//!   handle lookups still succeed), to simulate a failing read.
//!
//! Write the file atomically (write a temporary file in the same directory, then rename it over
//! the state file): a reader that catches a half-written file gets `NVML_ERROR_UNKNOWN`.
//!
//! A missing `FAKE_NVML_STATE` variable, or a file that is missing or does not parse, makes
//! `nvmlInit_v2`/`nvmlInitWithFlags` return `NVML_ERROR_DRIVER_NOT_LOADED`: the caller sees "no
//! NVML", as on a machine without the driver. After a successful init the same conditions make
//! calls return `NVML_ERROR_UNKNOWN`.
//!
//! Device handles are `index + 1` cast to a pointer. Like real NVML, init is reference counted:
//! calls made while no init is outstanding return `NVML_ERROR_UNINITIALIZED`.

// The exported functions follow the NVML C contract: every pointer argument must be null or
// valid for the access NVML documents (buffers of at least `length` bytes, out-structs of the
// right type). They are `unsafe extern "C"` for that reason; a per-function `# Safety` section
// would repeat the NVML documentation.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{CStr, c_char, c_uint, c_ulonglong, c_void};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;

type NvmlReturn = c_uint;
type NvmlDevice = *mut c_void;

const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;
const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

const NVML_TEMPERATURE_GPU: c_uint = 0;

/// `nvmlMemory_v2_t` from nvml.h (and nvml-wrapper-sys' bindings).
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `NVML_STRUCT_VERSION(Memory, 2)`: the struct size with the version in the top byte.
const NVML_MEMORY_V2: c_uint = (size_of::<NvmlMemoryV2>() as c_uint) | (2 << 24);

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct NvmlUtilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// Outstanding `nvmlInit*` calls not yet matched by `nvmlShutdown`.
static INIT_COUNT: AtomicU32 = AtomicU32::new(0);

#[derive(Deserialize)]
struct State {
    #[serde(default)]
    driver_version: Option<String>,
    #[serde(default)]
    devices: Vec<FakeDevice>,
}

#[derive(Deserialize)]
struct FakeDevice {
    uuid: String,
    name: String,
    total: u64,
    free: u64,
    #[serde(default)]
    used: Option<u64>,
    #[serde(default)]
    reserved: u64,
    #[serde(default)]
    gpu_util: Option<u32>,
    #[serde(default)]
    mem_util: Option<u32>,
    #[serde(default)]
    temperature: Option<u32>,
    #[serde(default)]
    power_mw: Option<u32>,
    #[serde(default)]
    lost: bool,
}

fn read_state() -> Option<State> {
    let path = std::env::var_os("FAKE_NVML_STATE")?;
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The state, for a call made after init.
fn state() -> Result<State, NvmlReturn> {
    if INIT_COUNT.load(Ordering::SeqCst) == 0 {
        return Err(NVML_ERROR_UNINITIALIZED);
    }
    read_state().ok_or(NVML_ERROR_UNKNOWN)
}

/// Runs `f` on the device behind `handle`; `f` is not called for a lost device.
fn with_device(handle: NvmlDevice, f: impl FnOnce(&FakeDevice) -> NvmlReturn) -> NvmlReturn {
    let state = match state() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let index = handle as usize;
    if index == 0 {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match state.devices.get(index - 1) {
        None => NVML_ERROR_INVALID_ARGUMENT,
        Some(d) if d.lost => NVML_ERROR_GPU_IS_LOST,
        Some(d) => f(d),
    }
}

/// Copies `s` and a terminating NUL into the caller's buffer of `length` bytes.
unsafe fn write_c_string(s: &str, buf: *mut c_char, length: c_uint) -> NvmlReturn {
    if buf.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > length as usize {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller guarantees `buf` holds `length` bytes; we write `len + 1 <= length`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    NVML_SUCCESS
}

/// Stores `value` through `out` unless it is null.
unsafe fn write_out<T>(out: *mut T, value: T) -> NvmlReturn {
    if out.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: the caller guarantees a non-null `out` is valid for writes of `T`.
    unsafe { out.write(value) };
    NVML_SUCCESS
}

fn init() -> NvmlReturn {
    if read_state().is_none() {
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    INIT_COUNT.fetch_add(1, Ordering::SeqCst);
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    init()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    init()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    match INIT_COUNT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => NVML_SUCCESS,
        Err(_) => NVML_ERROR_UNINITIALIZED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let s: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    match state() {
        Ok(s) => unsafe {
            write_c_string(
                s.driver_version.as_deref().unwrap_or("0.0.0-fake"),
                version,
                length,
            )
        },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> NvmlReturn {
    match state() {
        Ok(s) => unsafe { write_out(device_count, s.devices.len() as c_uint) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    match state() {
        Ok(s) if (index as usize) < s.devices.len() => unsafe {
            write_out(device, (index as usize + 1) as NvmlDevice)
        },
        Ok(_) => NVML_ERROR_INVALID_ARGUMENT,
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    let state = match state() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if uuid.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let uuid = unsafe { CStr::from_ptr(uuid) };
    match state
        .devices
        .iter()
        .position(|d| d.uuid.as_bytes() == uuid.to_bytes())
    {
        Some(i) => unsafe { write_out(device, (i + 1) as NvmlDevice) },
        None => NVML_ERROR_NOT_FOUND,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    with_device(device, |d| unsafe { write_c_string(&d.uuid, uuid, length) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    with_device(device, |d| unsafe { write_c_string(&d.name, name, length) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    if memory.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `memory` is non-null and points to the caller's `nvmlMemory_v2_t`.
    if unsafe { (*memory).version } != NVML_MEMORY_V2 {
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    with_device(device, |d| {
        let value = NvmlMemoryV2 {
            version: NVML_MEMORY_V2,
            total: d.total,
            reserved: d.reserved,
            free: d.free,
            used: d.used.unwrap_or(d.total.saturating_sub(d.free)),
        };
        unsafe { write_out(memory, value) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: NvmlDevice,
    utilization: *mut NvmlUtilization,
) -> NvmlReturn {
    with_device(device, |d| match (d.gpu_util, d.mem_util) {
        (Some(gpu), Some(memory)) => unsafe {
            write_out(utilization, NvmlUtilization { gpu, memory })
        },
        _ => NVML_ERROR_NOT_SUPPORTED,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: NvmlDevice,
    sensor_type: c_uint,
    temp: *mut c_uint,
) -> NvmlReturn {
    with_device(device, |d| {
        if sensor_type != NVML_TEMPERATURE_GPU {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        match d.temperature {
            Some(t) => unsafe { write_out(temp, t) },
            None => NVML_ERROR_NOT_SUPPORTED,
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: NvmlDevice,
    power: *mut c_uint,
) -> NvmlReturn {
    with_device(device, |d| match d.power_mw {
        Some(p) => unsafe { write_out(power, p) },
        None => NVML_ERROR_NOT_SUPPORTED,
    })
}
