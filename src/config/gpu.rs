//! `[[backend]] gpu`: which local GPU a backend runs on, for NVML telemetry.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which GPU to sample: by UUID (stable across reboots and driver reorderings) or by NVML index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GpuSelector {
    /// An NVML UUID, `GPU-…` (or `MIG-…` for a MIG instance).
    Uuid(String),
    /// An NVML device index, as `nvidia-smi` numbers them.
    Index(u32),
}

impl GpuSelector {
    /// Parses `"GPU-…"`/`"MIG-…"` as a UUID and a decimal number as an index.
    pub fn parse(s: &str) -> Result<GpuSelector, String> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(GpuSelector::Index)
                .map_err(|_| format!("GPU index `{s}` is out of range"));
        }
        if (s.starts_with("GPU-") || s.starts_with("MIG-")) && s.len() > 4 {
            return Ok(GpuSelector::Uuid(s.to_string()));
        }
        Err(format!(
            "`{s}` is neither a GPU index (0, 1, …) nor a GPU UUID (GPU-…)"
        ))
    }
}

impl FromStr for GpuSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        GpuSelector::parse(s)
    }
}

impl TryFrom<String> for GpuSelector {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        GpuSelector::parse(&s)
    }
}

impl From<GpuSelector> for String {
    fn from(s: GpuSelector) -> String {
        s.to_string()
    }
}

impl fmt::Display for GpuSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuSelector::Uuid(u) => f.write_str(u),
            GpuSelector::Index(i) => write!(f, "{i}"),
        }
    }
}
