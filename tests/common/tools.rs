//! System tools some tests need (promtool, systemd-analyze, the OpenMetrics reference parser).
//! `.ci/run` installs them; a machine without one skips those checks, saying what to install,
//! and CI (`CI=true`) fails instead, so a broken image never turns them into silent passes.

/// The first of `candidates` (a program and the arguments of a run that succeeds only when it
/// is usable) that runs successfully, or `None` outside CI when none does (after a skip line
/// naming `install`); in CI, none is a failure naming `install`.
pub fn find_tool(candidates: &[(&'static str, &[&str])], install: &str) -> Option<&'static str> {
    for (program, probe) in candidates {
        let usable = std::process::Command::new(program)
            .args(*probe)
            .output()
            .is_ok_and(|o| o.status.success());
        if usable {
            return Some(program);
        }
    }
    let why = format!("{} not found: {install}", candidates[0].0);
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipped: {why}");
    None
}
