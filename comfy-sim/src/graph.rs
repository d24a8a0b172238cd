//! ComfyUI's `ExecutionList` (comfy_execution/graph.py): which node runs next.
//!
//! Output nodes are added first; their uncached inputs are pulled in depth-first; among ready
//! nodes, output nodes go first, then nodes feeding an output, then those two steps away, then
//! the earliest added. Reproducing it keeps the sim's `executing` order equal to ComfyUI's.

use std::collections::{BTreeSet, HashMap, HashSet};

use indexmap::IndexMap;
use serde_json::{Map, Value};

pub struct ExecutionList<'a> {
    prompt: &'a Map<String, Value>,
    is_output_class: &'a (dyn Fn(&str) -> bool + Sync),
    pending: HashSet<String>,
    /// When each node was added: ComfyUI's `pendingNodes` order, which breaks ties.
    added: HashMap<String, usize>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, IndexMap<String, ()>>,
    /// The ready nodes (pending, nothing blocking them) by (rank, order added), built on the
    /// first `stage` and kept up to date by `complete`, so that picking the next node costs a
    /// lookup, not a pass over every pending node (10,000 output nodes stay linear).
    ready: Option<BTreeSet<(u8, usize, String)>>,
}

fn link_source(v: &Value) -> Option<&str> {
    match v {
        Value::Array(a) if a.len() == 2 && a[1].is_number() => a[0].as_str(),
        _ => None,
    }
}

impl<'a> ExecutionList<'a> {
    pub fn new(
        prompt: &'a Map<String, Value>,
        is_output_class: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> Self {
        Self {
            prompt,
            is_output_class,
            pending: HashSet::new(),
            added: HashMap::new(),
            block_count: HashMap::new(),
            blocking: HashMap::new(),
            ready: None,
        }
    }

    pub fn add_node(&mut self, id: &str, is_cached: &dyn Fn(&str) -> bool) {
        self.ready = None;
        let mut stack = vec![id.to_string()];
        let mut links = Vec::new();
        while let Some(u) = stack.pop() {
            if self.pending.contains(&u) || !self.prompt.contains_key(&u) {
                continue;
            }
            self.pending.insert(u.clone());
            let order = self.added.len();
            self.added.entry(u.clone()).or_insert(order);
            self.block_count.insert(u.clone(), 0);
            self.blocking.insert(u.clone(), IndexMap::new());
            if let Some(inputs) = self.prompt[&u]["inputs"].as_object() {
                for v in inputs.values() {
                    if let Some(from) = link_source(v) {
                        if !is_cached(from) {
                            stack.push(from.to_string());
                        }
                        links.push((from.to_string(), u.clone()));
                    }
                }
            }
        }
        for (from, to) in links {
            if is_cached(&from) || !self.prompt.contains_key(&from) {
                continue;
            }
            let blocked = self.blocking.entry(from).or_default();
            if !blocked.contains_key(&to) {
                blocked.insert(to.clone(), ());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    fn is_output(&self, id: &str) -> bool {
        self.prompt[id]["class_type"]
            .as_str()
            .is_some_and(|c| (self.is_output_class)(c))
    }

    /// ComfyUI's `ux_friendly_pick_node`: an output node first, then a node feeding an output,
    /// then one two steps from an output, then the earliest added. A node's rank cannot change
    /// while it waits: what it blocks is released only when it completes.
    fn rank(&self, id: &str) -> u8 {
        let blocked = |id: &str| self.blocking.get(id).into_iter().flat_map(|m| m.keys());
        if self.is_output(id) {
            0
        } else if blocked(id).any(|b| self.is_output(b)) {
            1
        } else if blocked(id).any(|b| blocked(b).any(|c| self.is_output(c))) {
            2
        } else {
            3
        }
    }

    fn ready_key(&self, id: &str) -> (u8, usize, String) {
        (self.rank(id), self.added[id], id.to_string())
    }

    /// The next node to run, or `None` when nothing is left (or only a cycle).
    pub fn stage(&mut self) -> Option<String> {
        if self.ready.is_none() {
            let ready = self
                .pending
                .iter()
                .filter(|id| self.block_count.get(*id) == Some(&0))
                .map(|id| self.ready_key(id))
                .collect();
            self.ready = Some(ready);
        }
        self.ready
            .as_ref()
            .and_then(|r| r.first())
            .map(|(_, _, id)| id.clone())
    }

    pub fn complete(&mut self, id: &str) {
        if !self.pending.remove(id) {
            return;
        }
        if let (Some(ready), Some(&order)) = (self.ready.as_mut(), self.added.get(id)) {
            // Its rank is one of four.
            (0..4).any(|rank| ready.remove(&(rank, order, id.to_string())));
        }
        let Some(blocked) = self.blocking.remove(id) else {
            return;
        };
        let mut now_ready = Vec::new();
        for to in blocked.keys() {
            if let Some(c) = self.block_count.get_mut(to) {
                *c = c.saturating_sub(1);
                if *c == 0 && self.pending.contains(to) {
                    now_ready.push(to.clone());
                }
            }
        }
        let keys: Vec<_> = now_ready.iter().map(|to| self.ready_key(to)).collect();
        if let Some(ready) = self.ready.as_mut() {
            ready.extend(keys);
        }
    }
}

/// The order in which the nodes `outputs` need would run, nothing cached: the dry run of
/// [`ExecutionList`] (stage, complete, repeat). Nodes caught in a cycle never become ready and
/// are left out. Linear in the graph's size, whatever its depth or shape; the sim's validator
/// fuzz target (`fuzz/`) runs it on every graph the validator accepts.
pub fn execution_order(
    prompt: &Map<String, Value>,
    outputs: &[String],
    is_output_class: &(dyn Fn(&str) -> bool + Sync),
) -> Vec<String> {
    let mut list = ExecutionList::new(prompt, is_output_class);
    for o in outputs {
        list.add_node(o, &|_| false);
    }
    let mut order = Vec::new();
    while let Some(id) = list.stage() {
        list.complete(&id);
        order.push(id);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// ComfyUI's default txt2img graph runs loader, latent, negative, positive, sampler, decode,
    /// save: the order ComfyUI's own list produces.
    #[test]
    fn txt2img_order_matches_comfyui() {
        let prompt = json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}
        });
        let prompt = prompt.as_object().unwrap();
        let is_output = |c: &str| c == "SaveImage";
        let mut list = ExecutionList::new(prompt, &is_output);
        list.add_node("9", &|_| false);
        let mut order = Vec::new();
        while let Some(id) = list.stage() {
            list.complete(&id);
            order.push(id);
        }
        assert_eq!(order, ["4", "5", "7", "6", "3", "8", "9"]);
    }

    /// The ranked ready set picks what ComfyUI's pass over every pending node picks: checked
    /// against that pass (the sim's former `stage`) on pseudo-random graphs.
    #[test]
    fn ranked_ready_set_picks_as_a_full_pass_does() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20 {
            let n = 60;
            let mut prompt = Map::new();
            for i in 0..n {
                let mut inputs = Map::new();
                for k in 0..rand(4) {
                    if i > 0 {
                        inputs.insert(format!("in{k}"), json!([rand(i).to_string(), 0]));
                    }
                }
                let class = if rand(4) == 0 { "Out" } else { "Mid" };
                prompt.insert(
                    i.to_string(),
                    json!({"class_type": class, "inputs": inputs}),
                );
            }
            let is_output = |c: &str| c == "Out";
            let outputs: Vec<String> = prompt
                .iter()
                .filter(|(_, v)| v["class_type"] == "Out")
                .map(|(k, _)| k.clone())
                .collect();
            let mut list = ExecutionList::new(&prompt, &is_output);
            for o in &outputs {
                list.add_node(o, &|_| false);
            }
            // The former pass: pending in order added, blocking edges as built.
            let mut pending: Vec<String> = {
                let mut v: Vec<(&usize, &String)> =
                    list.added.iter().map(|(k, o)| (o, k)).collect();
                v.sort();
                v.into_iter().map(|(_, k)| k.clone()).collect()
            };
            let mut counts = list.block_count.clone();
            let mut blocking = list.blocking.clone();
            let out = |id: &str| prompt[id]["class_type"] == "Out";
            let mut order = Vec::new();
            while let Some(id) = list.stage() {
                list.complete(&id);
                order.push(id);
            }
            let mut expected = Vec::new();
            loop {
                let ready: Vec<&String> = pending.iter().filter(|id| counts[*id] == 0).collect();
                let blocked = |id: &str| blocking.get(id).into_iter().flat_map(|m| m.keys());
                let Some(next) = ready
                    .iter()
                    .find(|id| out(id))
                    .or_else(|| ready.iter().find(|id| blocked(id).any(|b| out(b))))
                    .or_else(|| {
                        ready
                            .iter()
                            .find(|id| blocked(id).any(|b| blocked(b).any(|c| out(c))))
                    })
                    .or(ready.first())
                    .map(|id| id.to_string())
                else {
                    break;
                };
                pending.retain(|p| *p != next);
                for to in blocking.remove(&next).unwrap_or_default().keys() {
                    *counts.get_mut(to).unwrap() -= 1;
                }
                expected.push(next);
            }
            assert_eq!(order, expected);
            assert_eq!(order.len(), list.added.len());
        }
    }
}
