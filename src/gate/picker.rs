//! Which backend gets the next prompt. Policy lives behind a small pure trait so it can be
//! unit-tested and benchmarked without sockets.

/// What a picker may know about one eligible backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: usize,
    pub inflight: usize,
    pub max_inflight: usize,
    /// Free VRAM in bytes from a fresh reading, if any.
    pub vram_free: Option<u64>,
}

/// Chooses among candidates that are healthy and have a free slot.
pub trait Picker: Send + Sync {
    fn pick(&self, candidates: &[Candidate]) -> Option<usize>;
}

/// The default: fewest prompts in flight, then most free VRAM, then configuration order.
#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Picker for LeastLoaded {
    fn pick(&self, candidates: &[Candidate]) -> Option<usize> {
        candidates
            .iter()
            .filter(|c| c.inflight < c.max_inflight)
            .min_by(|a, b| {
                a.inflight
                    .cmp(&b.inflight)
                    .then(b.vram_free.unwrap_or(0).cmp(&a.vram_free.unwrap_or(0)))
                    .then(a.id.cmp(&b.id))
            })
            .map(|c| c.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: usize, inflight: usize, vram: Option<u64>) -> Candidate {
        Candidate {
            id,
            inflight,
            max_inflight: 2,
            vram_free: vram,
        }
    }

    #[test]
    fn fewest_in_flight_then_most_vram() {
        let p = LeastLoaded;
        assert_eq!(p.pick(&[c(0, 1, Some(9)), c(1, 0, Some(1))]), Some(1));
        assert_eq!(p.pick(&[c(0, 0, Some(1)), c(1, 0, Some(9))]), Some(1));
        assert_eq!(p.pick(&[c(0, 0, None), c(1, 0, None)]), Some(0));
        assert_eq!(p.pick(&[c(0, 2, Some(9))]), None);
        assert_eq!(p.pick(&[]), None);
    }
}
