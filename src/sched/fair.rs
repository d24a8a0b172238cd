//! Who goes first when users compete (design §2 "Late binding": priority band, then fair share
//! between users, then `number`): the order in which the waiting prompts are offered to
//! [`decide`](super::decide::decide), and the fair-share state that order is computed from.
//!
//! **Bands** are strict: every prompt of a higher band is offered before any of a lower one. The
//! starvation bound is the aging `decide` already has: a prompt competes one band higher for
//! each whole `placement.max_wait_ms` it has waited ([`effective_band`]), so a `batch` prompt
//! waits at most one `max_wait_ms` per band behind a flood of `interactive` ones, and then
//! competes with them as its user's share, not ahead of them.
//!
//! **Fair share** inside a band is start-time fair queueing (SFQ, Goyal et al. 1996) over GPU
//! seconds: each band keeps a virtual time `V` and each user (tenant) a finish tag `F`. A user's
//! next prompt starts at `max(F, V)`; the smallest start goes first (ties: the prompt earlier in
//! the queue); taking it moves `F` by the prompt's expected run time over the user's weight, and
//! `V` up to that start. Why SFQ rather than deficit round robin: costs are estimates that are
//! only known per prompt (learned run times), a user's share is a real number (`weight`), and
//! SFQ needs no quantum to tune and no rounds to wait for: a user who was idle starts at `V`,
//! level with the busiest one, never with credit saved while idle (so nobody banks time by
//! sleeping), and a user alone in a band gets every slot (work conserving: H's throughput
//! drops only by the GPU time others actually take). Why the start tag rather than the finish
//! tag (WFQ): a user whose next prompt is large is not pushed behind users with small ones; one
//! large prompt costs its user the next turns instead.
//!
//! What a prompt costs is estimated when it is dispatched (the learned run time,
//! [`expected_s`]) and corrected to its measured run time when it ends ([`FairShare::settle`]),
//! so a user is charged the GPU seconds it used (checkpoint loads included) even while the
//! estimates are still poor. A prompt that leaves its backend without a measured run (moved
//! after a failure, deleted) keeps the estimate; run again, it is charged again.
//!
//! Within a user's own prompts the order is the gate queue's (`number`, then prompt_id; a
//! retry first). `front: true` therefore moves a prompt ahead of its own user's prompts only;
//! an admin's `front` prompt is offered before everyone else's in its band. One client alone,
//! or every client of one tenant, sees exactly the order the gate had before fair share.
//!
//! The state lives in memory under the scheduler's lock and is not persisted: it is a short
//! memory of who was served lately, meaningful only while users have work waiting (a user's
//! tag is forgotten as soon as `V` passes it). After a restart every user starts level, which
//! costs at most the imbalance of the moment; persisting it would add a store write to every
//! dispatch for that.
//!
//! Cost: [`FairShare::order`] is one pass over the queue to group it (a 10,000-prompt queue is
//! grouped in well under a millisecond) and a heap over the users for the `k` prompts a pass
//! can use: O(n + k log users).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use crate::fleet::picker::profile::Profile;
use crate::fleet::picker::stats::Learned;

/// The least a prompt is charged, in seconds: a prompt that costs nothing must still move its
/// user's tag, or a user with free prompts could be served forever on ties.
pub const MIN_COST_S: f64 = 1e-3;

/// One waiting prompt as the order sees it. Entries are given in the gate queue's order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Entry<'a> {
    /// The tenant key (`user:NAME`, `ip:ADDR`): whose share it draws on.
    pub tenant: &'a str,
    /// Its band now ([`effective_band`]): 0 is the highest.
    pub band: usize,
    /// Its user's weight (positive; anything else counts as 1).
    pub weight: f64,
    /// An admin's `front: true` prompt: offered before the rest of its band.
    pub first: bool,
}

/// The band a prompt competes in: its own `rank` (0 the highest), one higher for each whole
/// `max_wait_ms` it has waited. `max_wait_ms` 0: every prompt has waited long enough (as
/// `decide` reads it), so every prompt competes in the highest band.
pub fn effective_band(rank: usize, waited_ms: u64, max_wait_ms: u64) -> usize {
    match waited_ms.checked_div(max_wait_ms) {
        Some(steps) => rank.saturating_sub(usize::try_from(steps).unwrap_or(usize::MAX)),
        None => 0,
    }
}

/// The GPU seconds a prompt is expected to take, independent of where it will run: the median
/// over the fleet's `backends` of the learned run time (a faster card takes less, a slower one
/// more; the median is the typical one). Before anything is learned, the prompt's relative work.
pub fn expected_s(learned: &Learned, backends: usize, p: &Profile) -> f64 {
    let mut v: Vec<f64> = (0..backends.max(1)).map(|b| learned.run_s(b, p)).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn weight_of(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 { w } else { 1.0 }
}

/// One band's clock: its virtual time and the finish tags of the users ahead of it.
#[derive(Clone, Debug, Default)]
struct Clock {
    v: f64,
    /// Tenant key → finish tag; only tags above `v` are kept (the rest equal `v`).
    finish: HashMap<String, f64>,
}

impl Clock {
    fn finish_of(&self, tenant: &str) -> f64 {
        self.finish
            .get(tenant)
            .copied()
            .unwrap_or(self.v)
            .max(self.v)
    }

    fn set(&mut self, tenant: &str, f: f64) {
        if f > self.v {
            self.finish.insert(tenant.to_string(), f);
        } else {
            self.finish.remove(tenant);
        }
    }
}

/// What a dispatched prompt was charged, kept until it ends so the charge can be corrected.
#[derive(Clone, Debug, PartialEq)]
struct Charge {
    band: usize,
    tenant: String,
    weight: f64,
    cost: f64,
}

/// The fair-share state: one clock per band and the charges of prompts in flight.
#[derive(Clone, Debug, Default)]
pub struct FairShare {
    clocks: BTreeMap<usize, Clock>,
    charged: HashMap<String, Charge>,
}

/// A user's place in the merge: its next start tag and where its next prompt is.
#[derive(Clone, Copy, Debug)]
struct Turn {
    start: f64,
    /// Queue index of its next prompt (the tie-break: earlier in the queue goes first).
    head: usize,
    tenant: usize,
}

impl PartialEq for Turn {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Turn {}
impl PartialOrd for Turn {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Turn {
    /// Reversed, so the max-heap pops the smallest start, then the earliest head.
    fn cmp(&self, o: &Self) -> Ordering {
        o.start
            .total_cmp(&self.start)
            .then_with(|| o.head.cmp(&self.head))
    }
}

/// One band's prompts, grouped: the admins' `front` prompts, and each tenant's prompts in
/// queue order.
#[derive(Default)]
struct Band<'a> {
    first: Vec<usize>,
    tenants: Vec<(&'a str, Vec<usize>)>,
    index: HashMap<&'a str, usize>,
}

/// A band's clock as one [`FairShare::order`] moves it.
struct Work<'c, 'a> {
    clock: &'c Clock,
    v: f64,
    finish: HashMap<&'a str, f64>,
}

impl<'a> Work<'_, 'a> {
    /// A tenant's next start.
    fn finish_of(&self, tenant: &str) -> f64 {
        self.finish
            .get(tenant)
            .copied()
            .unwrap_or_else(|| self.clock.finish_of(tenant))
            .max(self.v)
    }

    /// `e` is taken: its tenant's tag moves; the virtual time too, unless it was taken out of
    /// turn (an admin's `front`).
    fn take(&mut self, e: &Entry<'a>, cost: f64, out_of_turn: bool) {
        let start = self.finish_of(e.tenant);
        self.finish
            .insert(e.tenant, start + cost.max(MIN_COST_S) / weight_of(e.weight));
        if !out_of_turn {
            self.v = self.v.max(start);
        }
    }
}

impl FairShare {
    /// The first `k` of `entries` (indices, in the gate queue's order) in the order they should
    /// be offered: bands highest first; in each, the admins' `front` prompts, then the tenants'
    /// prompts merged by start tag. `cost(i)`: expected seconds of entry `i` (asked only for the
    /// prompts placed in the answer, at most `k` times). Reads the state, changes nothing.
    pub fn order(
        &self,
        entries: &[Entry<'_>],
        k: usize,
        mut cost: impl FnMut(usize) -> f64,
    ) -> Vec<usize> {
        let mut bands: BTreeMap<usize, Band<'_>> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            let band = bands.entry(e.band).or_default();
            if e.first {
                band.first.push(i);
                continue;
            }
            let t = *band.index.entry(e.tenant).or_insert_with(|| {
                band.tenants.push((e.tenant, Vec::new()));
                band.tenants.len() - 1
            });
            band.tenants[t].1.push(i);
        }
        let mut out = Vec::with_capacity(k.min(entries.len()));
        let empty = Clock::default();
        for (rank, band) in &bands {
            if out.len() >= k {
                break;
            }
            let clock = self.clocks.get(rank).unwrap_or(&empty);
            // This order's working copy of the band's clock (the state itself is moved by real
            // dispatches only).
            let mut work = Work {
                clock,
                v: clock.v,
                finish: HashMap::new(),
            };
            for &i in &band.first {
                if out.len() >= k {
                    return out;
                }
                work.take(&entries[i], cost(i), true);
                out.push(i);
            }
            let mut heap: BinaryHeap<Turn> = band
                .tenants
                .iter()
                .enumerate()
                .map(|(t, (key, list))| Turn {
                    start: work.finish_of(key),
                    head: list[0],
                    tenant: t,
                })
                .collect();
            let mut next = vec![0usize; band.tenants.len()];
            while out.len() < k {
                let Some(turn) = heap.pop() else { break };
                work.take(&entries[turn.head], cost(turn.head), false);
                out.push(turn.head);
                let (key, list) = &band.tenants[turn.tenant];
                next[turn.tenant] += 1;
                if let Some(&head) = list.get(next[turn.tenant]) {
                    // Its tag is at least the start just taken: it is its next start.
                    heap.push(Turn {
                        start: work.finish_of(key),
                        head,
                        tenant: turn.tenant,
                    });
                }
            }
        }
        out
    }

    /// Prompt `id` was dispatched as `e` (its band at that moment), expected to run `cost`
    /// seconds: its tenant's tag moves by `cost / weight` from its start, and the band's
    /// virtual time up to that start, unless it went out of turn (an admin's `front`: moving
    /// `V` to its tag would wipe out what the others are owed).
    pub fn charge(&mut self, id: &str, e: &Entry<'_>, cost: f64) {
        let weight = weight_of(e.weight);
        let cost = cost.max(MIN_COST_S);
        let clock = self.clocks.entry(e.band).or_default();
        let start = clock.finish_of(e.tenant);
        if !e.first {
            clock.v = clock.v.max(start);
        }
        clock.set(e.tenant, start + cost / weight);
        let v = clock.v;
        clock.finish.retain(|_, f| *f > v);
        self.charged.insert(
            id.to_string(),
            Charge {
                band: e.band,
                tenant: e.tenant.to_string(),
                weight,
                cost,
            },
        );
    }

    /// Prompt `id` ended its run: its tenant's tag is corrected from the estimate to the
    /// `actual` seconds it ran (`None`: not measured, the estimate stands). A correction never
    /// takes a tag below the band's virtual time: credit is not saved up.
    pub fn settle(&mut self, id: &str, actual: Option<f64>) {
        let Some(c) = self.charged.remove(id) else {
            return;
        };
        let Some(actual) = actual.filter(|a| a.is_finite() && *a >= 0.0) else {
            return;
        };
        let clock = self.clocks.entry(c.band).or_default();
        let f = clock.finish_of(&c.tenant) + (actual.max(MIN_COST_S) - c.cost) / c.weight;
        clock.set(&c.tenant, f);
    }

    /// Forgets the charges of prompts `in_flight` no longer accepts (moved back to the queue,
    /// deleted, ended without a run): they keep their estimate.
    pub fn retain_charges(&mut self, in_flight: impl Fn(&str) -> bool) {
        self.charged.retain(|id, _| in_flight(id));
    }

    /// A band's virtual time and the tenants it keeps a tag for (for tests and `/admin`).
    pub fn clock(&self, band: usize) -> (f64, usize) {
        self.clocks
            .get(&band)
            .map_or((0.0, 0), |c| (c.v, c.finish.len()))
    }

    /// Charges waiting for their prompt's end.
    pub fn charges(&self) -> usize {
        self.charged.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tenant: &str, band: usize) -> Entry<'_> {
        Entry {
            tenant,
            band,
            weight: 1.0,
            first: false,
        }
    }

    fn w(tenant: &str, weight: f64) -> Entry<'_> {
        Entry {
            weight,
            ..e(tenant, 0)
        }
    }

    fn names<'a>(entries: &[Entry<'a>], order: &[usize]) -> Vec<&'a str> {
        order.iter().map(|&i| entries[i].tenant).collect()
    }

    #[test]
    fn one_tenant_keeps_the_queue_order() {
        let entries: Vec<Entry> = (0..50).map(|_| e("ip:127.0.0.1", 0)).collect();
        let fs = FairShare::default();
        let order = fs.order(&entries, 50, |i| 1.0 + i as f64);
        assert_eq!(order, (0..50).collect::<Vec<_>>());
        assert_eq!(fs.order(&entries, 7, |_| 1.0), (0..7).collect::<Vec<_>>());
        assert!(fs.order(&entries, 0, |_| 1.0).is_empty());
        assert!(fs.order(&[], 5, |_| 1.0).is_empty());
    }

    #[test]
    fn a_light_user_goes_before_a_heavy_users_backlog() {
        // H queued 20 before L's one.
        let mut entries: Vec<Entry> = (0..20).map(|_| e("H", 0)).collect();
        entries.push(e("L", 0));
        let order = FairShare::default().order(&entries, 5, |_| 1.0);
        assert_eq!(names(&entries, &order), ["H", "L", "H", "H", "H"]);
        // H already had its turn (charged), so L goes first.
        let mut fs = FairShare::default();
        fs.charge("h-running", &w("H", 1.0), 1.0);
        let order = fs.order(&entries, 3, |_| 1.0);
        assert_eq!(names(&entries, &order), ["L", "H", "H"]);
    }

    #[test]
    fn equal_users_alternate_and_costs_count() {
        let entries: Vec<Entry> = ["A", "A", "A", "A", "B", "B", "B", "B"]
            .iter()
            .map(|t| e(t, 0))
            .collect();
        let fs = FairShare::default();
        let order = fs.order(&entries, 8, |_| 1.0);
        assert_eq!(
            names(&entries, &order),
            ["A", "B", "A", "B", "A", "B", "A", "B"]
        );
        // A's prompts cost 3 s each, B's 1 s: B gets three turns per A turn.
        let order = fs.order(&entries, 6, |i| if i < 4 { 3.0 } else { 1.0 });
        assert_eq!(names(&entries, &order), ["A", "B", "B", "B", "A", "B"]);
    }

    #[test]
    fn weights_share_in_proportion() {
        let mut entries: Vec<Entry> = (0..30).map(|_| w("heavy", 2.0)).collect();
        entries.extend((0..30).map(|_| w("light", 1.0)));
        let order = FairShare::default().order(&entries, 30, |_| 1.0);
        let heavy = names(&entries, &order)
            .iter()
            .filter(|n| **n == "heavy")
            .count();
        assert_eq!(heavy, 20, "2:1 over 30 turns");
        // Nonsense weights count as 1.
        let entries = [w("a", 0.0), w("a", f64::NAN), w("b", -1.0), w("b", 1.0)];
        let order = FairShare::default().order(&entries, 4, |_| 1.0);
        assert_eq!(names(&entries, &order), ["a", "b", "a", "b"]);
    }

    #[test]
    fn bands_are_strict_and_aging_lifts_a_prompt_one_band_per_max_wait() {
        let entries = [e("batch", 1), e("batch", 1), e("inter", 0), e("old", 0)];
        let order = FairShare::default().order(&entries, 4, |_| 1.0);
        assert_eq!(names(&entries, &order), ["inter", "old", "batch", "batch"]);
        assert_eq!(effective_band(1, 59_999, 60_000), 1);
        assert_eq!(effective_band(1, 60_000, 60_000), 0);
        assert_eq!(effective_band(2, 60_000, 60_000), 1);
        assert_eq!(effective_band(2, 10 * 60_000, 60_000), 0);
        assert_eq!(effective_band(0, u64::MAX, 1), 0);
        assert_eq!(
            effective_band(3, 5, 0),
            0,
            "max_wait_ms 0: everything has waited"
        );
        // k stops inside the first band.
        let order = FairShare::default().order(&entries, 1, |_| 1.0);
        assert_eq!(order, [2]);
    }

    #[test]
    fn an_admins_front_prompt_goes_before_everyone_in_its_band_only() {
        let mut entries = vec![e("A", 0), e("B", 0), e("B", 1)];
        entries.push(Entry {
            first: true,
            ..e("admin", 0)
        });
        entries.push(Entry {
            first: true,
            ..e("admin2", 1)
        });
        let mut fs = FairShare::default();
        fs.charge("x", &w("admin", 1.0), 100.0);
        let order = fs.order(&entries, 5, |_| 1.0);
        assert_eq!(names(&entries, &order), ["admin", "A", "B", "admin2", "B"]);
        let order = fs.order(&entries, 1, |_| 1.0);
        assert_eq!(order, [3]);
    }

    #[test]
    fn ties_go_to_the_prompt_earlier_in_the_queue() {
        // B's first prompt (a `front` one, say: a lower number) wins the first tie, A's second
        // the last.
        let entries = [e("B", 0), e("A", 0), e("A", 0), e("B", 0)];
        let order = FairShare::default().order(&entries, 4, |_| 1.0);
        assert_eq!(order, [0, 1, 2, 3]);
    }

    #[test]
    fn cost_is_asked_only_for_the_prompts_ordered() {
        let entries: Vec<Entry> = (0..10_000)
            .map(|i| e(["a", "b", "c"][i % 3], i % 2))
            .collect();
        let mut asked = 0;
        let order = FairShare::default().order(&entries, 70, |_| {
            asked += 1;
            1.0
        });
        assert_eq!((order.len(), asked), (70, 70));
        assert!(order.iter().all(|&i| entries[i].band == 0));
    }

    #[test]
    fn charges_move_tags_and_an_idle_user_starts_level_without_credit() {
        let mut fs = FairShare::default();
        for i in 0..10 {
            fs.charge(&format!("h{i}"), &w("H", 1.0), 2.0);
        }
        // H served alone: V follows H's starts, H's tag is one prompt ahead.
        assert_eq!(fs.clock(0), (18.0, 1));
        // L arrives now: it starts at V, not at 0 (no credit for its idle time).
        let entries = [e("H", 0), e("L", 0), e("L", 0), e("L", 0)];
        let order = fs.order(&entries, 4, |_| 2.0);
        assert_eq!(names(&entries, &order), ["L", "H", "L", "L"]);
        // Once V passes a tag, the tag is forgotten.
        fs.charge("l0", &w("L", 1.0), 2.0);
        fs.charge("h10", &w("H", 1.0), 2.0);
        fs.charge("l1", &w("L", 1.0), 2.0);
        let (v, kept) = fs.clock(0);
        assert_eq!(v, 20.0);
        assert!(kept <= 2);
        assert_eq!(fs.clock(5), (0.0, 0), "bands keep their own clocks");
    }

    #[test]
    fn settling_corrects_the_estimate_to_the_run() {
        let mut fs = FairShare::default();
        fs.charge("a", &w("A", 1.0), 1.0);
        fs.charge("b", &w("B", 1.0), 1.0);
        // A's prompt really took 10 s: B goes twice before A's next.
        fs.settle("a", Some(10.0));
        let entries = [e("A", 0), e("B", 0), e("B", 0), e("B", 0)];
        let order = fs.order(&entries, 4, |_| 1.0);
        assert_eq!(names(&entries, &order)[..3], ["B", "B", "B"]);
        assert_eq!(fs.charges(), 1);
        // B's took no time at all: its tag falls back to about V, never below.
        fs.settle("b", Some(0.0));
        fs.settle("b", Some(5.0));
        fs.settle("unknown", Some(5.0));
        assert_eq!(fs.charges(), 0);
        let (v, _) = fs.clock(0);
        let order = fs.order(&[e("B", 0)], 1, |_| 1.0);
        assert_eq!(order, [0]);
        assert_eq!(v, 0.0);
        // An unmeasured run keeps its estimate; a forgotten charge is never settled.
        fs.charge("c", &w("C", 1.0), 3.0);
        fs.settle("c", None);
        fs.charge("d", &w("D", 1.0), 3.0);
        fs.retain_charges(|id| id != "d");
        assert_eq!(fs.charges(), 0);
    }

    #[test]
    fn a_heavy_weight_is_charged_less_per_second() {
        let mut fs = FairShare::default();
        fs.charge("x", &w("w4", 4.0), 4.0);
        fs.charge("y", &w("w1", 1.0), 4.0);
        let entries = [
            e("w1", 0),
            Entry {
                weight: 4.0,
                ..e("w4", 0)
            },
        ];
        let order = fs.order(&entries, 2, |_| 4.0);
        assert_eq!(names(&entries, &order), ["w4", "w1"]);
    }
}
