//! The gate's library does not link the simulator. comfy-sim is an optional dependency behind the
//! `demo` feature, named only by `src/demo.rs` and the `demo` command in `src/main.rs`; what the
//! gate shares with the sim comes from comfy-wire. A gate built without the feature therefore
//! carries no simulator code, and this test keeps a new import from slipping past default builds.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn only_the_demo_names_the_simulator() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed = [src.join("demo.rs"), src.join("main.rs")];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found the gate's sources: {files:?}");
    let offenders: Vec<_> = files
        .iter()
        .filter(|f| !allowed.contains(f))
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("readable source");
            text.contains("comfy_sim") || text.contains("crate::sim")
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "the gate's library names the simulator: {offenders:?}"
    );
}
