//! The snapshot [`decide`](super::decide::decide) decides over: the fleet as one dispatch pass
//! sees it ([`FleetView`]: per backend its slots, VRAM, capabilities and the work it owns) and
//! the waiting prompts ([`Waiting`]). Plain data with no locks and no clock: the caller builds
//! it once per pass (`super::placing`), a test or a simulation builds it by hand.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::fleet::capabilities::Capabilities;
use crate::fleet::picker::profile::{self, Profile};

/// One prompt a backend owns (sent there and not finished).
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    /// What it asks of the GPU (see [`profile::profile`]).
    pub profile: Profile,
    /// The gate's global queue number; a backend runs what it owns started first, then by
    /// number.
    pub number: f64,
    /// Seconds it has been running, `None` if it has not started.
    pub ran_s: Option<f64>,
}

/// One backend as the snapshot sees it.
#[derive(Clone, Debug)]
pub struct BackendView {
    /// The backend's configured name (for decision records and logs).
    pub name: String,
    /// Healthy, not draining, not stalled: it may get new work.
    pub accepts_work: bool,
    /// Slots in use (prompts sent there and not finished).
    pub inflight: usize,
    /// Slots in all (`scheduler.max_inflight`).
    pub max_inflight: usize,
    /// Total VRAM in bytes; 0 if never read (then any need fits).
    pub vram_total: u64,
    /// Free VRAM in bytes from a reading younger than `stale_after_ms`; `None` otherwise (no
    /// headroom).
    pub vram_free: Option<u64>,
    /// What it can run; `None` until read (then it is assumed to run anything).
    pub capabilities: Option<Arc<Capabilities>>,
    /// The prompts it owns, in any order (see [`Owned`] for the run order).
    pub owns: Vec<Owned>,
}

/// The fleet at the start of a pass. Backends are referred to by their index here.
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    pub backends: Vec<BackendView>,
    /// Names of the uploads the gate holds (as in its input directory, e.g. `cat.png` or
    /// `sub/cat.png`): a prompt naming one may go to a backend that lacks it (the gate places
    /// it there).
    pub uploads: Arc<HashSet<String>>,
}

impl FleetView {
    /// Whether the gate holds an input upload of that loader value (`name`, `sub/name`,
    /// `name [input]`; a name that climbs out of the input directory never counts).
    pub fn uploaded(&self, name: &str) -> bool {
        comfy_wire::files::refs::FileRef::from_loader(name).is_some_and(|r| {
            r.kind == comfy_wire::files::refs::Kind::Input && self.uploads.contains(&r.rel())
        })
    }

    /// Whether backend `b` has every node class and file `prompt` names (unknown
    /// capabilities: assume it has).
    pub fn can_run(&self, b: usize, prompt: &Value) -> bool {
        match &self.backends[b].capabilities {
            Some(caps) => caps.missing(prompt, &|n| self.uploaded(n)).is_none(),
            None => true,
        }
    }

    /// The size in bytes of model file `name`, from the first backend that lists it.
    pub fn ckpt_bytes(&self, name: &str) -> Option<u64> {
        self.backends.iter().find_map(|b| {
            b.capabilities
                .as_ref()
                .and_then(|c| c.model_bytes.get(name).copied())
        })
    }
}

/// One prompt in the gate queue.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub id: String,
    /// The gate's global queue number (the order it will run in once owned).
    pub number: f64,
    /// Its graph (the `prompt` object of the request): the capability check reads it.
    pub prompt: Arc<Value>,
    /// `profile::profile(&prompt)`, computed once by the caller.
    pub profile: Profile,
    /// Backends (indices) it ran on before; a retry prefers others.
    pub tried: Vec<usize>,
    /// Only backends with at least this much total VRAM (bytes) may take it (after an OOM).
    pub min_vram_total: Option<u64>,
    /// Times it was passed over for other prompts' affinity so far.
    pub skips: u32,
    /// Milliseconds since it was accepted.
    pub waited_ms: u64,
    /// Its user's limit on prompts sent to backends at once, if any.
    pub cap: Option<Cap>,
    /// Its priority band now (0, the default, is the highest): holds and the checkpoint
    /// switching rule let only prompts of its own band pass it.
    pub band: usize,
}

/// A limit on prompts sent to backends at once, shared by every waiting prompt of one user
/// (`limits.max_running`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Which limit: prompts with the same group share it.
    pub group: usize,
    /// How many more of the group may be sent now (the limit less those already sent); every
    /// prompt of a group carries the same number.
    pub left: usize,
}

impl Waiting {
    /// A fresh prompt: never tried, never skipped, just accepted.
    pub fn new(id: impl Into<String>, number: f64, prompt: Arc<Value>) -> Self {
        Self {
            id: id.into(),
            number,
            profile: profile::profile(&prompt),
            prompt,
            tried: Vec::new(),
            min_vram_total: None,
            skips: 0,
            waited_ms: 0,
            cap: None,
            band: 0,
        }
    }
}
