//! `[placement] policy`: which picker ranks the backends (design §3).

use std::str::FromStr;

use serde::Deserialize;

/// See [`super::PlacementConfig::policy`]; the names are the ones `proxy.toml` takes.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    /// Expected completion time, VRAM headroom, resident checkpoint (design §3).
    #[default]
    GpuAware,
    /// Fewest prompts in flight (nginx's `least_conn`).
    LeastInflight,
    /// Each backend in turn (nginx's default).
    RoundRobin,
}

impl PlacementPolicy {
    /// Every policy with its `proxy.toml` name.
    pub const ALL: [(&'static str, PlacementPolicy); 3] = [
        ("gpu_aware", PlacementPolicy::GpuAware),
        ("least_inflight", PlacementPolicy::LeastInflight),
        ("round_robin", PlacementPolicy::RoundRobin),
    ];

    /// The `proxy.toml` name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("gpu_aware", |(n, _)| n)
    }
}

impl FromStr for PlacementPolicy {
    type Err = String;
    /// A policy by its `proxy.toml` name; the error lists the names.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                format!("`{s}` is not a policy (gpu_aware, least_inflight, round_robin)")
            })
    }
}
