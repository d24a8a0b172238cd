//! `libfake_nvml.so`, the workspace's fake NVML library, for the tests that load it.
//!
//! It is found next to the test executable (`target/<profile>/deps/`, where cargo builds it for
//! `cargo test`, or `target/<profile>/`, where `cargo build` puts it), so a custom
//! `CARGO_TARGET_DIR` works; `cargo test -p comfy-gate` does not build the fake-nvml package, so
//! it is then built with `cargo build -p fake-nvml`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const LIB: &str = "libfake_nvml.so";

/// The fake NVML library, built by cargo alongside this test (or now, if it was not).
pub fn fake_nvml_lib() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let deps = exe.parent().expect("target/<profile>/deps");
        let profile = deps.parent().expect("target/<profile>");
        let candidates = [deps.join(LIB), profile.join(LIB)];
        if let Some(found) = candidates.iter().find(|p| p.is_file()) {
            return found.clone();
        }
        build_fake_nvml(profile);
        candidates
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "{LIB} not found in {} or {}: run `cargo build -p fake-nvml` first",
                    deps.display(),
                    profile.display()
                )
            })
    })
}

/// `cargo build -p fake-nvml` for the profile this test was built with.
fn build_fake_nvml(profile_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "fake-nvml",
        "--manifest-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
    ]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    let out = cmd.output().expect("run cargo build -p fake-nvml");
    assert!(
        out.status.success(),
        "cargo build -p fake-nvml failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
