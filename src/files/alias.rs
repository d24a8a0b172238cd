//! The one namespace of output and temp names across backends (design §2 "Files follow
//! prompts"). Output names collide across backends (`ComfyUI_00001_.png` on every fresh
//! ComfyUI, `folder_paths.get_save_image_path`), so the first file seen under a name keeps it and
//! a later one from another backend is shown under the next free counter. A file the gate holds
//! itself (an upload of type output or temp) reserves its name the same way, under the owner
//! [`GATE_OWNER`].

use std::collections::{HashMap, VecDeque};

use super::FileKey;

/// The owner recorded for files the gate's own store holds (not a backend name: config names
/// cannot contain a NUL).
pub const GATE_OWNER: &str = "\0gate";

/// Shown name ↔ (owner, real name). A backend file's name is owned by the kept history entries
/// that list it ([`AliasIndex::list`], counted: ComfyUI repeats a cached output in every later
/// entry that reuses it) and goes when the last of them does. Names no kept entry lists (made
/// while relaying a backend's own entries) are at most `cap`: beyond it the oldest go.
pub(super) struct AliasIndex {
    by_real: HashMap<(String, FileKey), String>,
    pub(super) by_alias: HashMap<FileKey, (String, String)>,
    /// The sequence number each backend file's name was given under.
    given: HashMap<FileKey, u64>,
    /// Backend files' names in the order they were given, with their sequence numbers (an entry
    /// whose number is no longer the name's is stale: skipped when met, compacted away when
    /// stale entries outnumber the live ones).
    order: VecDeque<(u64, FileKey)>,
    next_seq: u64,
    /// How many kept history entries list each name.
    listed: HashMap<FileKey, u32>,
    /// How many entries of `by_alias` name a backend's file (the rest are the gate's own).
    backend_names: usize,
    cap: usize,
}

impl Default for AliasIndex {
    fn default() -> Self {
        Self::with_cap(usize::MAX)
    }
}

/// The next name in ComfyUI's `<prefix>_<counter>_.<ext>` sequence, or `name (n).ext`.
fn bump(name: &str, n: u32) -> String {
    let Some((before_ext, ext)) = name.rsplit_once('.') else {
        return format!("{name} ({n})");
    };
    let counter = before_ext
        .strip_suffix('_')
        .and_then(|body| body.rsplit_once('_'))
        .filter(|(_, digits)| !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()));
    match counter {
        Some((prefix, digits)) => {
            let value = digits.parse::<u64>().unwrap_or(0) + u64::from(n);
            format!("{prefix}_{value:0width$}_.{ext}", width = digits.len())
        }
        None => format!("{before_ext} ({n}).{ext}"),
    }
}

impl AliasIndex {
    /// An empty index keeping at most `cap` names of backends' files.
    pub(super) fn with_cap(cap: usize) -> Self {
        Self {
            by_real: HashMap::new(),
            by_alias: HashMap::new(),
            given: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            listed: HashMap::new(),
            backend_names: 0,
            cap,
        }
    }

    /// Sets `shown` → `(owner, real)`, replacing what it named. Returns the names forgotten to
    /// stay within the cap.
    pub(super) fn insert(&mut self, shown: FileKey, owner: String, real: String) -> Vec<FileKey> {
        self.unset(&shown);
        let (kind, sub, name) = shown.clone();
        self.by_real
            .insert((owner.clone(), (kind, sub, real.clone())), name);
        if owner != GATE_OWNER {
            self.backend_names += 1;
            self.next_seq += 1;
            self.given.insert(shown.clone(), self.next_seq);
            self.order.push_back((self.next_seq, shown.clone()));
        }
        self.by_alias.insert(shown, (owner, real));
        self.over_cap()
    }

    /// Removes `shown` from both maps; what it named.
    fn unset(&mut self, shown: &FileKey) -> Option<(String, String)> {
        let (owner, real) = self.by_alias.remove(shown)?;
        let (kind, sub, _) = shown.clone();
        self.by_real
            .remove(&(owner.clone(), (kind, sub, real.clone())));
        if owner != GATE_OWNER {
            self.backend_names -= 1;
            self.given.remove(shown);
        }
        Some((owner, real))
    }

    /// Forgets the oldest names of backends' files beyond the cap, passing over those a kept
    /// history entry lists (bounded by the history's own bound).
    fn over_cap(&mut self) -> Vec<FileKey> {
        let mut forgotten = Vec::new();
        let mut kept = Vec::new();
        let mut budget = self.order.len();
        while self.backend_names > self.cap && budget > 0 {
            budget -= 1;
            let Some((seq, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.given.get(&oldest) != Some(&seq) {
                continue;
            }
            if self.listed.contains_key(&oldest) {
                kept.push((seq, oldest));
                continue;
            }
            self.unset(&oldest);
            forgotten.push(oldest);
        }
        for entry in kept.into_iter().rev() {
            self.order.push_front(entry);
        }
        if self.order.len() > 2 * self.backend_names + 1024 {
            let given = &self.given;
            self.order.retain(|(seq, k)| given.get(k) == Some(seq));
        }
        forgotten
    }

    /// Sets the cap without applying it (see [`AliasIndex::enforce_cap`]).
    pub(super) fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// Applies the cap now: the names forgotten.
    pub(super) fn enforce_cap(&mut self) -> Vec<FileKey> {
        self.over_cap()
    }

    /// A kept history entry lists `shown` (a backend file's name): it stays while one does.
    pub(super) fn list(&mut self, shown: &FileKey) {
        if self.held_by_backend(shown) {
            *self.listed.entry(shown.clone()).or_default() += 1;
        }
    }

    /// A history entry that listed `shown` is gone: whether no kept entry lists it now.
    /// A name nobody listed (its entry's hold found it already gone) is left alone: it may have
    /// been given to another file since.
    pub(super) fn unlist(&mut self, shown: &FileKey) -> bool {
        match self.listed.get_mut(shown) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.listed.remove(shown);
                true
            }
            None => false,
        }
    }

    /// The shown name of a backend's file, whether it was just assigned, and the names
    /// forgotten to make room for it.
    pub(super) fn alias(&mut self, backend: &str, key: FileKey) -> (String, bool, Vec<FileKey>) {
        if let Some(a) = self.by_real.get(&(backend.to_string(), key.clone())) {
            return (a.clone(), false, Vec::new());
        }
        let (kind, sub, name) = key;
        let mut shown = name.clone();
        let mut n = 0;
        while self
            .by_alias
            .contains_key(&(kind.clone(), sub.clone(), shown.clone()))
        {
            n += 1;
            shown = bump(&name, n);
        }
        let forgotten = self.insert((kind, sub, shown.clone()), backend.to_string(), name);
        (shown, true, forgotten)
    }

    /// The gate's own file `shown` takes its name (an upload stored under it, possibly over a
    /// backend file shown under that name, as an overwrite on one ComfyUI would).
    pub(super) fn reserve(&mut self, shown: FileKey) {
        let real = shown.2.clone();
        self.insert(shown, GATE_OWNER.to_string(), real);
    }

    /// Forgets the backend file shown as `shown` (the gate's own files keep their names: they
    /// are owned by the upload store). Returns its owner and real name when it was held.
    pub(super) fn forget(&mut self, shown: &FileKey) -> Option<(String, String)> {
        if !self.held_by_backend(shown) {
            return None;
        }
        self.unset(shown)
    }

    /// How many names the index holds for backends' files and for the gate's own.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.backend_names, self.by_alias.len() - self.backend_names)
    }

    /// Whether `shown` names a backend's file (not the gate's).
    pub(super) fn held_by_backend(&self, shown: &FileKey) -> bool {
        self.by_alias
            .get(shown)
            .is_some_and(|(owner, _)| owner != GATE_OWNER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collisions_get_the_next_counter() {
        let mut idx = AliasIndex::default();
        let key = |n: &str| ("output".to_string(), String::new(), n.to_string());
        let mut shown = |b: &str, n: &str| idx.alias(b, key(n)).0;
        assert_eq!(shown("a", "ComfyUI_00001_.png"), "ComfyUI_00001_.png");
        assert_eq!(shown("b", "ComfyUI_00001_.png"), "ComfyUI_00002_.png");
        assert_eq!(shown("a", "ComfyUI_00002_.png"), "ComfyUI_00003_.png");
        assert_eq!(
            shown("b", "ComfyUI_00001_.png"),
            "ComfyUI_00002_.png",
            "stable"
        );
        assert_eq!(shown("a", "x.webp"), "x.webp");
        assert_eq!(shown("b", "x.webp"), "x (1).webp");
        assert_eq!(
            idx.by_alias[&key("ComfyUI_00003_.png")],
            ("a".into(), "ComfyUI_00002_.png".into())
        );
    }

    #[test]
    fn beyond_the_cap_the_oldest_backend_names_go_and_the_gates_own_stay() {
        let mut idx = AliasIndex::with_cap(3);
        let key = |n: &str| ("output".to_string(), String::new(), n.to_string());
        idx.reserve(key("mine.png"));
        let mut forgotten = Vec::new();
        for i in 0..5 {
            forgotten.extend(idx.alias("a", key(&format!("{i}.png"))).2);
        }
        assert_eq!(forgotten, vec![key("0.png"), key("1.png")]);
        assert_eq!(idx.counts(), (3, 1));
        assert!(idx.by_alias.contains_key(&key("mine.png")));
        assert_eq!(idx.forget(&key("mine.png")), None, "the gate's own stay");
        assert_eq!(
            idx.forget(&key("4.png")),
            Some(("a".into(), "4.png".into()))
        );
        assert_eq!(idx.counts(), (2, 1));
        // A forgotten name is free again, and the real file gets a name anew.
        assert_eq!(idx.alias("a", key("4.png")).0, "4.png");
        for i in 0..5000 {
            idx.alias("b", key(&format!("b{i}.png")));
            idx.forget(&key(&format!("b{i}.png")));
        }
        assert!(
            idx.order.len() < 2 * 3 + 1024 + 2,
            "the order queue stays bounded"
        );
    }
}
