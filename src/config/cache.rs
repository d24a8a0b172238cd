//! `[cache]`: the gate's result cache (issue 16; `sched::cache`). Off by default: a repeated
//! prompt then runs again, as on one ComfyUI whose own cache was cleared.

use serde::Deserialize;

/// `[cache]`: answer a prompt identical to one already finished from the earlier outputs,
/// without a GPU. Read at start (a reload that changes it says `restart_needed`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Keep finished prompts' outputs and answer identical prompts from them. Default false.
    /// A client opts one prompt out with `"extra_data": {"comfy_gate": {"cache": false}}`.
    pub enabled: bool,
    /// Finished prompts remembered at most; beyond it the least recently used go first.
    /// Default 1000.
    pub max_entries: usize,
    /// Bytes of remembered outputs at most (their UI dicts and `meta`, as JSON; the files stay
    /// on the backends); beyond it the least recently used go first. Default 67108864 (64 MiB).
    pub max_bytes: usize,
    /// A remembered result older than this (seconds since its run ended) is not served and is
    /// forgotten. Default 86400 (a day).
    pub max_age_s: u64,
    /// With `[auth]` on, serve one user's results to another user sending the same prompt.
    /// Default false: each user has a cache of their own. With auth off there are no users
    /// (everyone may read every output, as on ComfyUI) and the cache is shared.
    pub share_between_users: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_entries: 1000,
            max_bytes: 64 << 20,
            max_age_s: 86_400,
            share_between_users: false,
        }
    }
}
