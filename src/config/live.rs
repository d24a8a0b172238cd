//! The configuration in force. A reload (`SIGHUP`, `comfy-gate reload`, `POST /admin/reload`)
//! validates a whole new [`Config`] first and then swaps it in here in one step, so every
//! reader sees either the old snapshot or the new one. Components hold an `Arc<Live>` and load
//! the snapshot where they use it; code whose fields must agree with each other loads it once
//! and reads them all from that one (the edge does, once per request).

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Config;

/// The current [`Config`] snapshot, swappable (an [`ArcSwap`]).
pub struct Live {
    current: ArcSwap<Config>,
}

impl Live {
    /// A live configuration starting at `config`.
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(config),
        })
    }

    /// The snapshot in force now (one reference-count increment).
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Puts `config` in force; readers that loaded the old snapshot keep it.
    pub fn store(&self, config: Config) {
        self.current.store(Arc::new(config));
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("current", &self.load())
            .finish()
    }
}
