//! `proxy.toml` as `comfy-gate check` and startup read it: TOML, then every field's rule.
//! A bad file is an error naming file, line and field, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = comfy_gate::config::parse(text, "proxy.toml") {
        assert!(!e.to_string().is_empty());
    }
});
