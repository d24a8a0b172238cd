//! ComfyUI's `GET /history` paging (`max_items`, `offset`), over any ordered entry list.
//!
//! The sim pages its own history with it and the gate pages the merged history of its fleet,
//! so both must cut pages by the same (slightly odd) Python rules; one function keeps them equal.

use serde_json::{Map, Value};

/// ComfyUI's history paging over any ordered entry list.
pub fn page<'a>(
    entries: impl Iterator<Item = (&'a String, &'a Value)>,
    len: usize,
    max_items: Option<i64>,
    offset: i64,
) -> Map<String, Value> {
    let mut offset = offset;
    if let (true, Some(max)) = (offset < 0, max_items) {
        offset = len as i64 - max;
    }
    let mut out = Map::new();
    if max_items.is_some_and(|m| m <= 0) {
        // Python's `len(out) >= max_items` is checked after the first insert.
        for (i, (k, v)) in entries.enumerate() {
            if i as i64 >= offset {
                out.insert(k.clone(), v.clone());
                break;
            }
        }
        return out;
    }
    for (i, (k, v)) in entries.enumerate() {
        if i as i64 >= offset {
            out.insert(k.clone(), v.clone());
            if max_items.is_some_and(|m| out.len() as i64 >= m) {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(max_items: Option<i64>, offset: i64) -> Vec<String> {
        let entries: Vec<(String, Value)> = (0..5).map(|i| (format!("p{i}"), json!(i))).collect();
        let m = page(
            entries.iter().map(|(k, v)| (k, v)),
            entries.len(),
            max_items,
            offset,
        );
        m.keys().cloned().collect()
    }

    #[test]
    fn pages_follow_comfyui() {
        assert_eq!(keys(Some(2), -1), ["p3", "p4"]);
        assert_eq!(keys(Some(2), 1), ["p1", "p2"]);
        assert_eq!(keys(None, 3), ["p3", "p4"]);
        assert_eq!(keys(None, -1).len(), 5);
        // Python checks `len(out) >= max_items` only after the first insert.
        assert_eq!(keys(Some(0), 2), ["p2"]);
    }
}
