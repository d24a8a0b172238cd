//! The fake library, loaded through nvml-wrapper 0.13 exactly as the gate loads the real one.
//!
//! cargo builds `libfake_nvml.so` into `target/<profile>/deps/`, next to this test executable,
//! before running it. Each test runs in a child process of this binary with `FAKE_NVML_STATE`
//! naming its own state file (setting the variable in-process would need `unsafe`).

use std::path::{Path, PathBuf};
use std::process::Command;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use serde_json::json;

const CHILD: &str = "FAKE_NVML_TEST_CHILD";
const UUID_A: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000001";
const UUID_B: &str = "GPU-bbbbbbbb-0000-4000-8000-000000000002";

fn lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().join("libfake_nvml.so");
    assert!(path.is_file(), "{} not built", path.display());
    path
}

/// See the gate's tests/nvml.rs: `Some(state file)` in the child, `None` in the parent.
fn state_file_in_child(test: &str) -> Option<PathBuf> {
    if std::env::var_os(CHILD).is_some() {
        return Some(std::env::var_os("FAKE_NVML_STATE").unwrap().into());
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("FAKE_NVML_STATE", dir.path().join("state.json"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "child run of `{test}` failed:\n{text}"
    );
    assert!(text.contains("test result: ok. 1 passed"), "{text}");
    None
}

fn write_state(path: &Path, state: serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, state.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn init() -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(lib().as_os_str()).init()
}

#[test]
fn no_state_file_means_no_driver() {
    let Some(state) = state_file_in_child("no_state_file_means_no_driver") else {
        return;
    };
    assert!(matches!(init(), Err(NvmlError::DriverNotLoaded)));
    std::fs::write(&state, "{ not json").unwrap();
    assert!(matches!(init(), Err(NvmlError::DriverNotLoaded)));
}

#[test]
fn serves_the_state_file_through_nvml_wrapper() {
    let Some(state) = state_file_in_child("serves_the_state_file_through_nvml_wrapper") else {
        return;
    };
    write_state(
        &state,
        json!({"driver_version": "550.54.15", "devices": [
            {"uuid": UUID_A, "name": "Fake RTX 4090", "total": 1000, "free": 700, "used": 250,
             "reserved": 50, "gpu_util": 40, "mem_util": 25, "temperature": 61,
             "power_mw": 180000},
            {"uuid": UUID_B, "name": "Fake A4000", "total": 500, "free": 100},
        ]}),
    );
    let nvml = init().unwrap();
    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.device_count().unwrap(), 2);

    let a = nvml.device_by_index(0).unwrap();
    assert_eq!(a.uuid().unwrap(), UUID_A);
    assert_eq!(a.name().unwrap(), "Fake RTX 4090");
    let mem = a.memory_info().unwrap();
    assert_eq!(
        (mem.total, mem.free, mem.used, mem.reserved),
        (1000, 700, 250, 50)
    );
    let util = a.utilization_rates().unwrap();
    assert_eq!((util.gpu, util.memory), (40, 25));
    assert_eq!(a.temperature(TemperatureSensor::Gpu).unwrap(), 61);
    assert_eq!(a.power_usage().unwrap(), 180_000);

    let b = nvml.device_by_uuid(UUID_B).unwrap();
    assert_eq!(b.name().unwrap(), "Fake A4000");
    assert_eq!(
        b.memory_info().unwrap().used,
        400,
        "used defaults to total - free"
    );
    assert!(matches!(
        b.utilization_rates(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        b.temperature(TemperatureSensor::Gpu),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(b.power_usage(), Err(NvmlError::NotSupported)));

    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));
    assert!(matches!(
        nvml.device_by_uuid("GPU-nope"),
        Err(NvmlError::NotFound)
    ));
    // A symbol the fake does not export fails cleanly.
    assert!(matches!(
        a.fan_speed(0),
        Err(NvmlError::FailedToLoadSymbol(_))
    ));

    // Re-read on every call; a lost GPU fails its reads but keeps its handle.
    write_state(
        &state,
        json!({"devices": [
            {"uuid": UUID_A, "name": "Fake RTX 4090", "total": 1000, "free": 10, "lost": true},
            {"uuid": UUID_B, "name": "Fake A4000", "total": 500, "free": 499},
        ]}),
    );
    assert_eq!(b.memory_info().unwrap().free, 499);
    assert!(matches!(a.memory_info(), Err(NvmlError::GpuLost)));
    assert!(nvml.device_by_uuid(UUID_A).is_ok());

    // A broken state file after init is an unknown error, not a crash.
    std::fs::write(&state, "{").unwrap();
    assert!(matches!(b.memory_info(), Err(NvmlError::Unknown)));
}

#[test]
fn init_is_reference_counted() {
    let Some(state) = state_file_in_child("init_is_reference_counted") else {
        return;
    };
    write_state(
        &state,
        json!({"devices": [{"uuid": UUID_A, "name": "Fake", "total": 10, "free": 5}]}),
    );
    let first = init().unwrap();
    let second = init().unwrap();
    first.shutdown().unwrap();
    assert_eq!(second.device_count().unwrap(), 1);
    second.shutdown().unwrap();
    // Drop calls nvmlShutdown too (and ignores its result).
    drop(init().unwrap());
}
