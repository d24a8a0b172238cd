//! Measurements that hold still on a shared machine: every path of a case is measured in turn
//! (direct, gate, nginx, direct, gate, nginx …) for a few rounds, so drift (another build, a
//! bench beside this one) hits each path alike; each path is then summed up by its median over
//! the rounds, with the spread (min–max) beside it so a reader sees how far to trust a ratio.

/// A median over rounds and the range the rounds spanned.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The median (the upper one of an even count) and range of `values` (NaN when empty).
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        Spread {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// `min–max` with `digits` decimals.
    pub fn range(&self, digits: usize) -> String {
        format!("{:.digits$}–{:.digits$}", self.min, self.max)
    }
}

/// The median and range of `values`, as a pair.
pub fn median_and_range(values: Vec<f64>) -> (f64, (f64, f64)) {
    let s = Spread::of(&values);
    (s.median, (s.min, s.max))
}

/// `measure(path, round)` of each of `paths` in turn, `rounds` times: the results by path,
/// then round.
pub async fn in_turn<T>(
    paths: usize,
    rounds: usize,
    mut measure: impl AsyncFnMut(usize, usize) -> T,
) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..paths).map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..rounds {
        for (path, results) in out.iter_mut().enumerate() {
            results.push(measure(path, round).await);
        }
    }
    out
}

/// `a / b`, NaN when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}
