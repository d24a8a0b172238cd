//! NVML telemetry (`comfy_gate::fleet::nvml`) against `libfake_nvml.so`, the workspace's fake
//! NVML library, which serves GPU readings from the JSON file named by `FAKE_NVML_STATE`.
//!
//! How the fake library is found: `tests/common/fake_nvml.rs`.
//!
//! Every test that loads the fake runs in a child process of this test binary, with
//! `FAKE_NVML_STATE` naming a file in a fresh temporary directory: the library reads the
//! variable from the process environment, and setting it in-process (`std::env::set_var`) is
//! unsafe in edition 2024. Each test thus has its own state file and its own NVML instance, and the
//! tests can run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use comfy_gate::fleet::nvml::{GpuReading, GpuSelector, NvmlSampler, probe};
use common::fake_nvml::fake_nvml_lib;
use serde_json::{Value, json};

const CHILD: &str = "COMFY_GATE_NVML_TEST_CHILD";
const GIB: u64 = 1 << 30;
const UUID_A: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000001";
const UUID_B: &str = "GPU-bbbbbbbb-0000-4000-8000-000000000002";
const INTERVAL: Duration = Duration::from_millis(20);

/// In the parent test process: runs the test named `test` in a child process of this binary with
/// `FAKE_NVML_STATE` set to a fresh (not yet written) file, checks that it passed, and returns
/// `None`. In that child: returns the state file's path, and the test's body runs.
fn state_file_in_child(test: &str) -> Option<PathBuf> {
    if std::env::var_os(CHILD).is_some() {
        let state = std::env::var_os("FAKE_NVML_STATE").expect("FAKE_NVML_STATE in the child");
        return Some(PathBuf::from(state));
    }
    fake_nvml_lib(); // build it once here rather than in every child
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
    assert!(
        text.contains("test result: ok. 1 passed"),
        "child run of `{test}` ran no test (misspelt name?):\n{text}"
    );
    None
}

/// Replaces the state file atomically (temporary file, then rename), as the fake requires.
fn write_state(path: &Path, devices: Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "devices": devices }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A fully instrumented GPU.
fn gpu(uuid: &str, name: &str, total: u64, free: u64) -> Value {
    json!({
        "uuid": uuid, "name": name, "total": total, "free": free, "used": total - free,
        "gpu_util": 40, "mem_util": 25, "temperature": 61, "power_mw": 180_000,
    })
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn slot(sampler: &NvmlSampler, i: usize) -> GpuReading {
    sampler.readings()[i]
        .clone()
        .unwrap_or_else(|| panic!("slot {i} has no reading"))
}

#[test]
fn selectors_parse_uuids_and_indexes() {
    assert_eq!(GpuSelector::parse("0"), Ok(GpuSelector::Index(0)));
    assert_eq!(GpuSelector::parse(" 12 "), Ok(GpuSelector::Index(12)));
    assert_eq!(
        GpuSelector::parse(UUID_A),
        Ok(GpuSelector::Uuid(UUID_A.to_string()))
    );
    assert_eq!(
        "MIG-1234".parse::<GpuSelector>(),
        Ok(GpuSelector::Uuid("MIG-1234".to_string()))
    );
    for bad in ["", "GPU-", "gpu0", "-1", "99999999999"] {
        assert!(GpuSelector::parse(bad).is_err(), "{bad:?} parsed");
    }
    assert_eq!(GpuSelector::Index(3).to_string(), "3");
    let from_json: Vec<GpuSelector> =
        serde_json::from_str(&format!(r#"["1", "{UUID_B}"]"#)).unwrap();
    assert_eq!(
        from_json,
        [GpuSelector::Index(1), GpuSelector::Uuid(UUID_B.to_string())]
    );
}

#[test]
fn a_missing_library_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnvidia-ml.so.1");
    let err =
        NvmlSampler::start(Some(&missing), vec![GpuSelector::Index(0)], INTERVAL).unwrap_err();
    assert!(err.contains("cannot load NVML library"), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(!err.contains('\n'), "{err}");
    let err = probe(Some(&missing)).unwrap_err();
    assert!(err.contains("cannot load NVML library"), "{err}");

    let err = NvmlSampler::start(Some(fake_nvml_lib()), vec![], INTERVAL).unwrap_err();
    assert!(err.contains("no GPU selected"), "{err}");
}

#[test]
fn a_missing_state_file_fails_init() {
    let Some(_never_written) = state_file_in_child("a_missing_state_file_fails_init") else {
        return;
    };
    let err = NvmlSampler::start(Some(fake_nvml_lib()), vec![GpuSelector::Index(0)], INTERVAL)
        .unwrap_err();
    assert!(err.contains("NVML initialisation failed"), "{err}");
    assert!(err.contains("driver is not loaded"), "{err}");
    let err = probe(Some(fake_nvml_lib())).unwrap_err();
    assert!(err.contains("driver is not loaded"), "{err}");
}

#[test]
fn readings_match_each_selected_gpu() {
    let Some(state) = state_file_in_child("readings_match_each_selected_gpu") else {
        return;
    };
    write_state(
        &state,
        json!([
            gpu(UUID_A, "Fake RTX 4090", 24 * GIB, 20 * GIB),
            // No utilisation, temperature or power sensors: those read as None.
            { "uuid": UUID_B, "name": "Fake A4000", "total": 16 * GIB, "free": 3 * GIB },
        ]),
    );
    let before = Instant::now();
    let sampler = NvmlSampler::start(
        Some(fake_nvml_lib()),
        vec![GpuSelector::Uuid(UUID_B.to_string()), GpuSelector::Index(0)],
        INTERVAL,
    )
    .unwrap();
    // The first sample is taken before start returns.
    assert_eq!(sampler.uuids(), [UUID_B, UUID_A]);
    let b = slot(&sampler, 0);
    assert_eq!(
        (b.uuid.as_str(), b.name.as_str(), b.total, b.free, b.used),
        (UUID_B, "Fake A4000", 16 * GIB, 3 * GIB, 13 * GIB)
    );
    assert_eq!(
        (b.gpu_util, b.mem_util, b.temperature_c, b.power_mw),
        (None, None, None, None)
    );
    assert!(b.read_at >= before);
    let a = slot(&sampler, 1);
    assert_eq!(
        (a.uuid.as_str(), a.name.as_str(), a.total, a.free, a.used),
        (UUID_A, "Fake RTX 4090", 24 * GIB, 20 * GIB, 4 * GIB)
    );
    assert_eq!(
        (a.gpu_util, a.mem_util, a.temperature_c, a.power_mw),
        (Some(40), Some(25), Some(61), Some(180_000))
    );

    let all = probe(Some(fake_nvml_lib())).unwrap();
    let seen: Vec<(&str, u64)> = all.iter().map(|r| (r.uuid.as_str(), r.free)).collect();
    assert_eq!(seen, [(UUID_A, 20 * GIB), (UUID_B, 3 * GIB)]);
}

#[test]
fn readings_follow_rewrites_of_the_state_file() {
    let Some(state) = state_file_in_child("readings_follow_rewrites_of_the_state_file") else {
        return;
    };
    write_state(
        &state,
        json!([
            gpu(UUID_A, "Fake RTX 4090", 24 * GIB, 20 * GIB),
            gpu(UUID_B, "Fake A4000", 16 * GIB, 3 * GIB),
        ]),
    );
    let sampler = NvmlSampler::start(
        Some(fake_nvml_lib()),
        vec![GpuSelector::Index(0), GpuSelector::Index(1)],
        INTERVAL,
    )
    .unwrap();
    let first = sampler.readings();
    assert_eq!(slot(&sampler, 0).free, 20 * GIB);

    let mut a = gpu(UUID_A, "Fake RTX 4090", 24 * GIB, 2 * GIB);
    a["temperature"] = json!(83);
    a["gpu_util"] = json!(100);
    write_state(
        &state,
        json!([a, gpu(UUID_B, "Fake A4000", 16 * GIB, 15 * GIB)]),
    );
    wait_for("the new free memory", || {
        sampler.readings()[0].as_ref().unwrap().free == 2 * GIB
            && sampler.readings()[1].as_ref().unwrap().free == 15 * GIB
    });
    let a = slot(&sampler, 0);
    assert_eq!(
        (a.used, a.temperature_c, a.gpu_util),
        (22 * GIB, Some(83), Some(100))
    );
    assert!(a.read_at > first[0].as_ref().unwrap().read_at);
}

#[test]
fn an_unknown_gpu_is_refused_by_name() {
    let Some(state) = state_file_in_child("an_unknown_gpu_is_refused_by_name") else {
        return;
    };
    write_state(
        &state,
        json!([gpu(UUID_A, "Fake RTX 4090", 24 * GIB, 20 * GIB)]),
    );
    let unknown = "GPU-deadbeef-0000-4000-8000-00000000dead";
    let err = NvmlSampler::start(
        Some(fake_nvml_lib()),
        vec![
            GpuSelector::Index(0),
            GpuSelector::Uuid(unknown.to_string()),
        ],
        INTERVAL,
    )
    .unwrap_err();
    assert!(
        err.contains(&format!("no GPU with UUID {unknown}")),
        "{err}"
    );
    assert!(err.contains(UUID_A), "lists the GPUs NVML sees: {err}");

    let err = NvmlSampler::start(Some(fake_nvml_lib()), vec![GpuSelector::Index(1)], INTERVAL)
        .unwrap_err();
    assert!(err.contains("no GPU at index 1"), "{err}");
}

#[test]
fn a_failed_read_keeps_the_last_reading() {
    let Some(state) = state_file_in_child("a_failed_read_keeps_the_last_reading") else {
        return;
    };
    let healthy = json!([
        gpu(UUID_A, "Fake RTX 4090", 24 * GIB, 20 * GIB),
        gpu(UUID_B, "Fake A4000", 16 * GIB, 3 * GIB),
    ]);
    write_state(&state, healthy);
    let sampler = NvmlSampler::start(
        Some(fake_nvml_lib()),
        vec![
            GpuSelector::Uuid(UUID_A.to_string()),
            GpuSelector::Uuid(UUID_B.to_string()),
        ],
        INTERVAL,
    )
    .unwrap();

    // GPU A falls off the bus: its reads fail, even though the file now says 1 GiB free.
    let mut lost = gpu(UUID_A, "Fake RTX 4090", 24 * GIB, GIB);
    lost["lost"] = json!(true);
    write_state(
        &state,
        json!([lost, gpu(UUID_B, "Fake A4000", 16 * GIB, 4 * GIB)]),
    );
    wait_for("GPU B's new reading", || slot(&sampler, 1).free == 4 * GIB);
    let stale = slot(&sampler, 0);
    // Let several intervals pass: B keeps being read, A's reading only ages.
    let b_then = slot(&sampler, 1).read_at;
    wait_for("more reads of GPU B", || {
        slot(&sampler, 1).read_at > b_then + 5 * INTERVAL
    });
    let a = slot(&sampler, 0);
    assert_eq!(a, stale, "a failed read must not replace the reading");
    assert_eq!(a.free, 20 * GIB);
    assert!(a.age() >= 5 * INTERVAL);

    // It comes back: the next sample reads it again.
    write_state(
        &state,
        json!([
            gpu(UUID_A, "Fake RTX 4090", 24 * GIB, GIB),
            gpu(UUID_B, "Fake A4000", 16 * GIB, 4 * GIB),
        ]),
    );
    wait_for("GPU A to read again", || slot(&sampler, 0).free == GIB);
    assert!(slot(&sampler, 0).read_at > stale.read_at);
}

#[test]
fn stop_ends_sampling() {
    let Some(state) = state_file_in_child("stop_ends_sampling") else {
        return;
    };
    write_state(
        &state,
        json!([gpu(UUID_A, "Fake RTX 4090", 24 * GIB, 20 * GIB)]),
    );
    let sampler =
        NvmlSampler::start(Some(fake_nvml_lib()), vec![GpuSelector::Index(0)], INTERVAL).unwrap();
    let shared = sampler.shared();
    sampler.stop();
    let last = slot(&sampler, 0);
    write_state(&state, json!([gpu(UUID_A, "Fake RTX 4090", 24 * GIB, GIB)]));
    std::thread::sleep(10 * INTERVAL);
    assert_eq!(slot(&sampler, 0), last, "no sample after stop");
    sampler.stop(); // idempotent
    drop(sampler);
    // The published readings outlive the sampler.
    assert_eq!(shared.load()[0].as_ref().unwrap().free, 20 * GIB);
}
