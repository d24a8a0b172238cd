//! Which backend gets a prompt (design §3): filter, then score. Policies live behind the small
//! pure [`Picker`] trait, so they unit-test and benchmark without sockets, and the default policy
//! can be compared with simple baselines on equal terms.
//!
//! The caller filters first (healthy, not draining or stalled, every node class and model file
//! the prompt names, predicted VRAM need within the card's total); a picker orders the rest. A
//! picker may choose a backend without a free slot: the prompt then waits for it (a hold). Every
//! decision says why (chosen, runner-up, scores).

pub mod profile;
pub mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::config::PlacementPolicy;

/// What a picker may know about one eligible backend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub id: usize,
    /// Has a free slot now. A picker may still choose a full backend: the prompt then waits for
    /// it (a hold), as when a busy GPU with the right checkpoint will finish it sooner.
    pub free: bool,
    pub inflight: usize,
    pub max_inflight: usize,
    /// Total VRAM in bytes (0 if never read).
    pub vram_total: u64,
    /// Free VRAM in bytes from a fresh reading; `None` when the reading is stale or missing,
    /// which counts as no headroom.
    pub vram_free: Option<u64>,
    /// Seconds this backend is expected to need for the work already on it.
    pub queued_s: f64,
    /// Seconds this backend is expected to need for this prompt.
    pub run_s: f64,
    /// Seconds of checkpoint loading this prompt would cost here (0 if it is resident).
    pub load_s: f64,
    /// VRAM the prompt would add here: its need, less its checkpoint if that is resident.
    pub need_here: u64,
}

/// What the prompt needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Need {
    pub vram_bytes: u64,
}

/// A picker's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub id: usize,
    pub runner_up: Option<usize>,
    /// `(backend, score)`, lower is better, for every candidate considered.
    pub scores: Vec<(usize, f64)>,
    pub reason: String,
    /// Why it won, as one fixed word (the `reason` label of
    /// `comfy_gate_placement_decisions_total`): `only_candidate`, `sooner`,
    /// `resident_checkpoint`, `runner_up_full`, `more_headroom`, `least_inflight`,
    /// `round_robin`.
    pub kind: &'static str,
}

/// A placement policy.
pub trait Picker: Send + Sync {
    fn name(&self) -> &'static str;
    fn pick(&self, need: &Need, candidates: &[Candidate]) -> Option<Choice>;
}

fn ranked(
    mut scored: Vec<(usize, f64)>,
    kind: &'static str,
    reason: impl Fn(usize, Option<usize>) -> String,
) -> Option<Choice> {
    scored.sort_by(|a, b| {
        a.1.partial_cmp(&b.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    let id = scored.first()?.0;
    let runner_up = scored.get(1).map(|s| s.0);
    Some(Choice {
        id,
        runner_up,
        reason: reason(id, runner_up),
        kind,
        scores: scored,
    })
}

/// The default: the backend expected to finish the prompt soonest (work already there, this
/// prompt's run time there, a checkpoint load unless it is resident); among backends within
/// `tolerance` of the soonest, the one with the most VRAM headroom after the prompt's need (a
/// stale reading has none). Estimates are learned and noisy, so near-equal times count as equal
/// and free memory decides.
#[derive(Debug)]
pub struct GpuAware {
    /// Completion times within this fraction of the soonest count as equal. Default 0.2.
    pub tolerance: f64,
    /// ... or within this many seconds (measurement noise on very short jobs). Default 0.05.
    pub tolerance_s: f64,
    /// A checkpoint load also evicts the resident checkpoint, which later prompts are likely to
    /// need back: the load counts this many times more when backends are compared. Default 1.
    pub switch_penalty: f64,
}

impl Default for GpuAware {
    fn default() -> Self {
        Self {
            tolerance: 0.2,
            tolerance_s: 0.05,
            switch_penalty: 1.0,
        }
    }
}

impl GpuAware {
    fn completion_s(c: &Candidate) -> f64 {
        c.queued_s + c.run_s + c.load_s
    }

    /// What backends are compared by: completion time plus the cost of the eviction.
    fn score_s(&self, c: &Candidate) -> f64 {
        Self::completion_s(c) + self.switch_penalty * c.load_s
    }

    /// Free VRAM after the prompt, as a fraction of the card (0 with no fresh reading).
    fn headroom(c: &Candidate) -> f64 {
        match (c.vram_free, c.vram_total) {
            (Some(free), total) if total > 0 => (free as f64 - c.need_here as f64) / total as f64,
            _ => 0.0,
        }
    }
}

impl Picker for GpuAware {
    fn name(&self) -> &'static str {
        "gpu_aware"
    }

    fn pick(&self, _need: &Need, candidates: &[Candidate]) -> Option<Choice> {
        let soonest = candidates
            .iter()
            .map(|c| self.score_s(c))
            .fold(f64::INFINITY, f64::min);
        let near = |c: &Candidate| {
            self.score_s(c) <= (soonest * (1.0 + self.tolerance)).max(soonest + self.tolerance_s)
        };
        // Rank: near-soonest first; among those, one with the checkpoint resident (a load
        // evicts what the next prompts of the other checkpoint need: a cost the completion time
        // does not show), then a free one before a full one (waiting only pays when it is
        // clearly sooner), then by headroom; the rest by completion time.
        let mut order: Vec<&Candidate> = candidates.iter().collect();
        order.sort_by(|a, b| {
            let key = |c: &Candidate| {
                let n = near(c);
                (
                    !n,
                    n && c.load_s > 0.0,
                    n && !c.free,
                    if n {
                        -Self::headroom(c)
                    } else {
                        self.score_s(c)
                    },
                )
            };
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0)
                .then(ka.1.cmp(&kb.1))
                .then(ka.2.cmp(&kb.2))
                .then(ka.3.partial_cmp(&kb.3).unwrap_or(std::cmp::Ordering::Equal))
                .then(a.id.cmp(&b.id))
        });
        let chosen = *order.first()?;
        let runner_up = order.get(1).copied();
        let describe = |c: &Candidate| {
            format!(
                "done in {:.2}s (queued {:.2}s + run {:.2}s + load {:.2}s), {:.1} GB headroom",
                Self::completion_s(c),
                c.queued_s,
                c.run_s,
                c.load_s,
                Self::headroom(c) * c.vram_total as f64 / 1e9
            )
        };
        let mut reason = format!("expected {}", describe(chosen));
        let mut kind = "only_candidate";
        if let Some(u) = runner_up {
            let why;
            (why, kind) = if !near(u) {
                ("later", "sooner")
            } else if u.load_s > 0.0 && chosen.load_s == 0.0 {
                ("checkpoint not resident", "resident_checkpoint")
            } else if !u.free && chosen.free {
                ("full", "runner_up_full")
            } else {
                ("less headroom", "more_headroom")
            };
            reason.push_str(&format!("; runner-up {} ({why}): {}", u.id, describe(u)));
        }
        Some(Choice {
            id: chosen.id,
            runner_up: runner_up.map(|c| c.id),
            scores: order.iter().map(|c| (c.id, self.score_s(c))).collect(),
            reason,
            kind,
        })
    }
}

/// Baseline: fewest prompts in flight (nginx's least_conn), then configuration order.
#[derive(Debug, Default)]
pub struct LeastInFlight;

impl Picker for LeastInFlight {
    fn name(&self) -> &'static str {
        "least_inflight"
    }

    fn pick(&self, _need: &Need, candidates: &[Candidate]) -> Option<Choice> {
        let scored = candidates
            .iter()
            .map(|c| (c.id, c.inflight as f64))
            .collect();
        ranked(scored, "least_inflight", |_, _| {
            "fewest prompts in flight".into()
        })
    }
}

/// Baseline: round robin over the eligible backends (nginx's default), ignoring load.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Picker for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&self, _need: &Need, candidates: &[Candidate]) -> Option<Choice> {
        if candidates.is_empty() {
            return None;
        }
        // Strict rotation over every eligible backend, as nginx does: the prompt waits for its
        // turn's backend if that one is full; the turn advances only when it is taken.
        let mut ids: Vec<usize> = candidates.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        let start = self.next.load(Ordering::Relaxed) % n;
        let chosen = ids[start];
        if candidates.iter().any(|c| c.id == chosen && c.free) {
            self.next.fetch_add(1, Ordering::Relaxed);
        }
        let scored = (0..n).map(|k| (ids[(start + k) % n], k as f64)).collect();
        ranked(scored, "round_robin", |_, _| "round robin".into())
    }
}

/// The picker for a configured policy.
pub fn for_policy(policy: PlacementPolicy) -> Box<dyn Picker> {
    match policy {
        PlacementPolicy::GpuAware => Box::new(GpuAware::default()),
        PlacementPolicy::LeastInflight => Box::new(LeastInFlight),
        PlacementPolicy::RoundRobin => Box::new(RoundRobin::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: usize, free_gb: Option<u64>, queued_s: f64, run_s: f64, load_s: f64) -> Candidate {
        Candidate {
            id,
            free: true,
            inflight: 0,
            max_inflight: 2,
            vram_total: 80_000_000_000,
            vram_free: free_gb.map(|g| g * 1_000_000_000),
            queued_s,
            run_s,
            load_s,
            need_here: 5_000_000_000,
        }
    }

    #[test]
    fn most_headroom_wins_when_times_are_equal() {
        let p = GpuAware::default();
        let need = Need {
            vram_bytes: 5_000_000_000,
        };
        assert_eq!(
            p.pick(
                &need,
                &[c(0, Some(10), 0.0, 3.0, 0.0), c(1, Some(40), 0.0, 3.0, 0.0)]
            )
            .unwrap()
            .id,
            1
        );
        assert_eq!(
            p.pick(
                &need,
                &[c(0, Some(60), 0.0, 3.0, 0.0), c(1, Some(40), 0.0, 3.0, 0.0)]
            )
            .unwrap()
            .id,
            0
        );
        // A stale reading has no headroom.
        assert_eq!(
            p.pick(
                &need,
                &[c(0, None, 0.0, 3.0, 0.0), c(1, Some(20), 0.0, 3.0, 0.0)]
            )
            .unwrap()
            .id,
            1
        );
    }

    #[test]
    fn sooner_completion_beats_headroom() {
        let p = GpuAware::default();
        let choice = p
            .pick(
                &Need::default(),
                &[c(0, Some(70), 6.0, 3.0, 0.0), c(1, Some(10), 0.0, 1.0, 0.0)],
            )
            .unwrap();
        assert_eq!((choice.id, choice.runner_up), (1, Some(0)));
        assert!(
            choice.reason.contains("runner-up 0 (later)"),
            "{}",
            choice.reason
        );
        // A resident checkpoint saves the load.
        let choice = p
            .pick(
                &Need::default(),
                &[c(0, Some(40), 0.0, 3.0, 3.0), c(1, Some(40), 0.0, 3.0, 0.0)],
            )
            .unwrap();
        assert_eq!(choice.id, 1);
    }

    #[test]
    fn a_resident_checkpoint_wins_a_near_tie_and_a_switch_counts_twice() {
        let p = GpuAware::default();
        // Near-equal: the one without a load wins although the other has more headroom.
        let choice = p
            .pick(
                &Need::default(),
                &[c(0, Some(70), 0.0, 3.0, 0.2), c(1, Some(10), 0.3, 3.0, 0.0)],
            )
            .unwrap();
        assert_eq!(choice.id, 1);
        assert!(
            choice.reason.contains("checkpoint not resident"),
            "{}",
            choice.reason
        );
        // Done at 5 s with a 2 s load, or at 6.5 s without: beyond the tolerance on time
        // alone, but the load also evicts a checkpoint, which tips it.
        let choice = p
            .pick(
                &Need::default(),
                &[c(0, Some(70), 0.0, 3.0, 2.0), c(1, Some(70), 3.5, 3.0, 0.0)],
            )
            .unwrap();
        assert_eq!(choice.id, 1);
    }

    #[test]
    fn baselines() {
        let cands = [
            c(0, Some(1), 0.0, 1.0, 0.0),
            c(2, Some(1), 0.0, 1.0, 0.0),
            c(5, Some(1), 0.0, 1.0, 0.0),
        ];
        let rr = RoundRobin::default();
        let seq: Vec<usize> = (0..6)
            .map(|_| rr.pick(&Need::default(), &cands).unwrap().id)
            .collect();
        assert_eq!(seq, [0, 2, 5, 0, 2, 5]);
        let mut busy = cands.clone();
        busy[0].inflight = 1;
        assert_eq!(LeastInFlight.pick(&Need::default(), &busy).unwrap().id, 2);
        assert!(GpuAware::default().pick(&Need::default(), &[]).is_none());
        for (name, policy) in PlacementPolicy::ALL {
            assert_eq!(for_policy(policy).name(), name);
        }
        assert!("nope".parse::<PlacementPolicy>().is_err());
    }
}
