//! What the gate learns from running prompts: seconds per unit of sampling work per backend (so
//! a faster GPU draws more work), run time per backend and shape, checkpoint load time per
//! backend and checkpoint (timed from the loader node's events), VRAM peaks per shape, and the
//! checkpoint each backend has resident.

use std::collections::HashMap;

use indexmap::IndexMap;

use super::profile::Profile;

/// Weight of a new observation in the moving averages.
const ALPHA: f64 = 0.3;

/// Prompt shapes remembered at most (run times per backend and shape, VRAM peaks per shape):
/// shapes come from clients' graphs, so their number is the clients' to choose. Beyond it the
/// shape learned first is forgotten first.
pub const MAX_SHAPES: usize = 4096;

/// `map[key]`, inserted with `V::default()` if absent; when that makes `map` longer than
/// `cap`, the oldest entry goes.
fn bounded_entry<K: std::hash::Hash + Eq, V: Default>(
    map: &mut IndexMap<K, V>,
    key: K,
    cap: usize,
) -> &mut V {
    if !map.contains_key(&key) && map.len() >= cap {
        map.shift_remove_index(0);
    }
    map.entry(key).or_default()
}

fn ewma(slot: &mut Option<f64>, x: f64) {
    *slot = Some(match *slot {
        Some(prev) => prev + ALPHA * (x - prev),
        None => x,
    });
}

#[derive(Debug, Default)]
pub struct Learned {
    sec_per_work: HashMap<usize, Option<f64>>,
    run_s: IndexMap<(usize, u64), Option<f64>>,
    load_s: HashMap<(usize, String), Option<f64>>,
    peak_bytes: IndexMap<u64, u64>,
    resident: HashMap<usize, String>,
}

impl Learned {
    /// A prompt ran `seconds` on `backend` (its checkpoint load, `load_seconds`, included).
    pub fn observe_run(&mut self, backend: usize, p: &Profile, seconds: f64, load_seconds: f64) {
        let compute = (seconds - load_seconds).max(0.0);
        ewma(
            self.sec_per_work.entry(backend).or_default(),
            compute / p.work.max(1e-6),
        );
        let cap = MAX_SHAPES * self.sec_per_work.len().max(1);
        ewma(
            bounded_entry(&mut self.run_s, (backend, p.shape), cap),
            compute,
        );
        if let Some(ckpt) = &p.checkpoint {
            self.resident.insert(backend, ckpt.clone());
        }
    }

    /// A checkpoint loader node took `seconds` on `backend`.
    pub fn observe_load(&mut self, backend: usize, checkpoint: &str, seconds: f64) {
        ewma(
            self.load_s
                .entry((backend, checkpoint.to_string()))
                .or_default(),
            seconds,
        );
        self.resident.insert(backend, checkpoint.to_string());
    }

    pub fn observe_peak(&mut self, shape: u64, used_bytes: u64) {
        let peak = bounded_entry(&mut self.peak_bytes, shape, MAX_SHAPES);
        *peak = (*peak).max(used_bytes);
    }

    pub fn peak(&self, shape: u64) -> Option<u64> {
        self.peak_bytes.get(&shape).copied()
    }

    /// How many prompt shapes have a learned VRAM peak (at most [`MAX_SHAPES`]) and how many
    /// (backend, shape) run times are kept.
    pub fn shapes(&self) -> (usize, usize) {
        (self.peak_bytes.len(), self.run_s.len())
    }

    pub fn resident(&self, backend: usize) -> Option<&str> {
        self.resident.get(&backend).map(String::as_str)
    }

    /// Median seconds per unit of work over backends seen so far.
    fn fleet_sec_per_work(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.sec_per_work.values().flatten().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        Some(v[v.len() / 2])
    }

    /// Expected compute seconds of `p` on `backend`: its own history for this shape, else its
    /// speed times the work, else the fleet's median speed, else the work itself (relative).
    pub fn run_s(&self, backend: usize, p: &Profile) -> f64 {
        if let Some(Some(s)) = self.run_s.get(&(backend, p.shape)) {
            return *s;
        }
        let rate = self
            .sec_per_work
            .get(&backend)
            .copied()
            .flatten()
            .or_else(|| self.fleet_sec_per_work())
            .unwrap_or(1.0);
        rate * p.work
    }

    /// Expected checkpoint load seconds of `p` on `backend` once `resident` is the checkpoint
    /// there (0 if it is `p`'s): what the prompt costs behind work already queued there.
    pub fn load_after(&self, backend: usize, resident: Option<&str>, p: &Profile) -> f64 {
        let Some(ckpt) = &p.checkpoint else {
            return 0.0;
        };
        if resident == Some(ckpt.as_str()) {
            return 0.0;
        }
        if let Some(Some(s)) = self.load_s.get(&(backend, ckpt.clone())) {
            return *s;
        }
        // Another backend's time for this checkpoint, else nothing known yet.
        self.load_s
            .iter()
            .filter(|((_, c), _)| c == ckpt)
            .filter_map(|(_, s)| *s)
            .fold(None, |acc: Option<f64>, s| {
                Some(acc.map_or(s, |a| a.max(s)))
            })
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prof(work: f64, shape: u64, ckpt: &str) -> Profile {
        Profile {
            checkpoint: Some(ckpt.into()),
            work,
            megapixel_batch: 1.0,
            shape,
        }
    }

    #[test]
    fn learns_speed_load_and_residency() {
        let mut l = Learned::default();
        let p = prof(10.0, 7, "a");
        assert_eq!(
            l.run_s(0, &p),
            10.0,
            "relative work before anything is known"
        );
        l.observe_run(0, &p, 3.0, 1.0);
        l.observe_run(1, &prof(10.0, 8, "b"), 6.0, 0.0);
        assert!(
            (l.run_s(0, &p) - 2.0).abs() < 1e-9,
            "its own history for the shape"
        );
        assert!((l.run_s(1, &p) - 6.0).abs() < 1e-9, "its speed × work");
        l.observe_load(1, "a", 4.0);
        assert_eq!(
            l.load_after(1, l.resident(1), &p),
            0.0,
            "resident after loading"
        );
        assert_eq!(
            l.load_after(0, l.resident(0), &prof(1.0, 9, "b")),
            0.0,
            "nothing known about b on 0 yet"
        );
        l.observe_load(0, "b", 2.0);
        assert_eq!(
            l.load_after(0, l.resident(0), &p),
            4.0,
            "another backend's time for the checkpoint"
        );
    }

    #[test]
    fn shapes_chosen_by_clients_are_bounded() {
        let mut l = Learned::default();
        for shape in 0..(MAX_SHAPES as u64 + 10) {
            l.observe_peak(shape, 1 << 30);
        }
        assert_eq!(l.shapes().0, MAX_SHAPES);
        assert_eq!(l.peak(0), None, "the first learned went first");
        assert_eq!(l.peak(MAX_SHAPES as u64 + 9), Some(1 << 30));
    }
}
