//! The gate queue's order (issue 16): waiting prompts by `(number, id)`, with prompts put back
//! after a failure at the head (a retry goes first).
//!
//! Why two parts: the queue was one list, and placing a prompt meant walking it to the first
//! one that sorts after it, so a burst that filled it to 10,000 prompts spent more time walking
//! the queue than anything else (`docs/benchmarks.md`, "A burst of submissions"). Prompts that
//! are put back at the head are few and may sort anywhere; every other prompt keeps the rest
//! sorted. So the head is a short list (`front`), the rest an ordered set (`ordered`), and the
//! queue is the one followed by the other: the same order as the list it replaces, with a
//! prompt placed or removed in O(log n) plus the length of the head.

use std::cmp::Ordering;
use std::collections::{BTreeSet, VecDeque};

/// A prompt's `number` as the queue orders it: by value, so -0 and 0 are equal and the id
/// decides, as they were in the list this replaces (ComfyUI's numbers are JSON numbers, so
/// never NaN; a NaN would count as equal to everything).
#[derive(Clone, Copy, Debug)]
pub struct Key(pub f64);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.partial_cmp(&other.0).unwrap_or(Ordering::Equal)
    }
}

/// The waiting prompts' ids in queue order: `front`, then `ordered`.
#[derive(Debug, Default)]
pub struct GateQueue {
    /// Put back at the head, and any prompt placed before one of them.
    front: VecDeque<String>,
    /// Every other waiting prompt, by `(number, id)`.
    ordered: BTreeSet<(Key, String)>,
}

impl GateQueue {
    /// `id` at the head.
    pub fn push_front(&mut self, id: String) {
        self.front.push_front(id);
    }

    /// `id` (numbered `key`) before the first waiting prompt that sorts after it by `(number,
    /// id)`, or last; `key_of` gives a waiting prompt's number.
    pub fn insert(&mut self, key: Key, id: String, key_of: impl Fn(&str) -> Key) {
        let after = |q: &String| (key_of(q), q.as_str()) > (key, id.as_str());
        match self.front.iter().position(after) {
            Some(i) => self.front.insert(i, id),
            None => {
                self.ordered.insert((key, id));
            }
        }
    }

    /// Takes `id` (numbered `key`) out; whether it was there.
    pub fn remove(&mut self, key: Key, id: &str) -> bool {
        if let Some(i) = self.front.iter().position(|q| q == id) {
            self.front.remove(i);
            return true;
        }
        self.ordered.remove(&(key, id.to_string()))
    }

    /// The ids in queue order.
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.front
            .iter()
            .chain(self.ordered.iter().map(|(_, id)| id))
    }

    pub fn len(&self) -> usize {
        self.front.len() + self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The list the queue replaces, as the old code kept it: the reference for the order.
    fn list_insert(list: &mut Vec<String>, numbers: &HashMap<String, f64>, id: &str) {
        let k = (numbers[id], id.to_string());
        let pos = list
            .iter()
            .position(|q| (numbers[q], q.clone()) > k)
            .unwrap_or(list.len());
        list.insert(pos, id.to_string());
    }

    #[test]
    fn it_keeps_the_order_of_the_list_it_replaces() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut queue, mut list) = (GateQueue::default(), Vec::<String>::new());
        let mut numbers = HashMap::new();
        for step in 0..3000 {
            let id = format!("p{}", rng.gen_range(0..300));
            let waiting = list.contains(&id);
            // Whole numbers, halves, and both zeros (a client may send `-0`).
            let drawn = match rng.gen_range(0..20) {
                0 => -0.0,
                1 => 0.0,
                _ => rng.gen_range(-100..800) as f64 / 2.0,
            };
            let n = *numbers.entry(id.clone()).or_insert(drawn);
            match rng.gen_range(0..10) {
                0..=4 if !waiting => {
                    queue.insert(Key(n), id.clone(), |q| Key(numbers[q]));
                    list_insert(&mut list, &numbers, &id);
                }
                5 if !waiting => {
                    queue.push_front(id.clone());
                    list.insert(0, id.clone());
                }
                6..=9 if waiting => {
                    assert!(queue.remove(Key(n), &id));
                    list.retain(|q| *q != id);
                }
                _ => {}
            }
            let order: Vec<&String> = queue.iter().collect();
            let expected: Vec<&String> = list.iter().collect();
            assert_eq!(order, expected, "step {step}");
            assert_eq!(queue.len(), list.len());
        }
    }
}
