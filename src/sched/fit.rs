//! Whether the fleet can ever meet a prompt's VRAM need (issue 12: every prompt reaches an end).
//!
//! The need is a prediction (`profile::vram_need`: the checkpoint plus 1.2 GB per megapixel
//! sampled, or the largest peak learned for the prompt's shape), so it is trusted only within a
//! margin (`placement.vram_margin`):
//!
//! - up to the largest card: placed by the usual rules (it fits);
//! - above it, up to `margin` × the largest card: tried on the largest card, as one ComfyUI
//!   would run it and report out of memory if it does not fit;
//! - above that: it can never run here. The gate refuses it at submit when every configured
//!   backend is up (the fleet cannot grow), and otherwise ends it once no backend that is up
//!   could take it for `recovery.unplaceable_timeout_ms`.
//!
//! A card whose size is not known (no telemetry yet) may fit anything.

use serde_json::{Value, json};

use super::Scheduler;
use crate::fleet::picker::profile::{self, Profile};
use crate::protocol::errors;

/// What the fleet can do with a VRAM need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VramFit {
    /// Some card holds it, or some card's size is unknown.
    Fits,
    /// Over every card, within the margin: try it on the largest (`largest` bytes).
    Stretch { largest: u64 },
    /// Over `margin` × the largest card (`largest` bytes): it can never run on these cards.
    Never { need: u64, largest: u64 },
}

/// The verdict for `need` bytes over cards of `totals` bytes (0: unknown), with `margin` ≥ 1.
/// No card at all fits nothing it could not fit later: [`VramFit::Fits`].
pub fn vram_fit(need: u64, totals: &[u64], margin: f64) -> VramFit {
    if totals.is_empty() || totals.contains(&0) {
        return VramFit::Fits;
    }
    let largest = totals.iter().copied().max().unwrap_or(0);
    if need <= largest {
        VramFit::Fits
    } else if need as f64 <= margin.max(1.0) * largest as f64 {
        VramFit::Stretch { largest }
    } else {
        VramFit::Never { need, largest }
    }
}

/// [`vram_fit`] of `profile` over the live fleet's `backends` (fleet indices): the need from
/// its checkpoint size (any backend's listing) and the peak learned for its shape; each card's
/// total from NVML or `/system_stats`.
pub fn fleet_fit(sched: &Scheduler, profile: &Profile, backends: &[usize]) -> VramFit {
    let fleet = &sched.fleet;
    let ckpt_bytes = profile.checkpoint.as_deref().and_then(|c| {
        fleet.backends().iter().find_map(|b| {
            b.capabilities
                .load()
                .as_ref()
                .and_then(|caps| caps.model_bytes.get(c).copied())
        })
    });
    let peak = sched.lock().learned.peak(profile.shape);
    let need = profile::vram_need(profile, ckpt_bytes, peak);
    let totals: Vec<u64> = backends.iter().map(|&b| fleet.vram(b).0).collect();
    vram_fit(need, &totals, sched.config.load().placement.vram_margin)
}

/// The 400 for a prompt no card can ever hold, in ComfyUI's error shape (`error` with `type`,
/// `message`, `details`, `extra_info`; empty `node_errors`).
pub fn never_fits_body(need: u64, largest: u64) -> Value {
    const GB: f64 = 1e9;
    errors::prompt_error_body(
        errors::error_item(
            "prompt_exceeds_vram",
            "Prompt needs more VRAM than any GPU of the fleet has",
            &format!(
                "predicted need {:.1} GB; the largest GPU has {:.1} GB",
                need as f64 / GB,
                largest as f64 / GB
            ),
            json!({ "need_bytes": need, "largest_bytes": largest }),
        ),
        json!({}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    #[test]
    fn within_the_card_fits_over_it_stretches_far_over_never() {
        let cards = [24 * GB, 12 * GB];
        assert_eq!(vram_fit(20 * GB, &cards, 1.5), VramFit::Fits);
        assert_eq!(
            vram_fit(30 * GB, &cards, 1.5),
            VramFit::Stretch { largest: 24 * GB }
        );
        assert_eq!(
            vram_fit(160 * GB, &cards, 1.5),
            VramFit::Never {
                need: 160 * GB,
                largest: 24 * GB
            }
        );
    }

    #[test]
    fn an_unknown_card_or_no_card_may_fit_anything() {
        assert_eq!(vram_fit(500 * GB, &[24 * GB, 0], 1.5), VramFit::Fits);
        assert_eq!(vram_fit(500 * GB, &[], 1.5), VramFit::Fits);
    }
}
