//! The one namespace of output and temp names across backends (design §2 "Files follow
//! prompts"). Output names collide across backends (`ComfyUI_00001_.png` on every fresh
//! ComfyUI, `folder_paths.get_save_image_path`), so the first file seen under a name keeps it and
//! a later one from another backend is shown under the next free counter. A file the gate holds
//! itself (an upload of type output or temp) reserves its name the same way, under the owner
//! [`GATE_OWNER`].

use std::collections::HashMap;

use super::FileKey;

/// The owner recorded for files the gate's own store holds (not a backend name: config names
/// cannot contain a NUL).
pub const GATE_OWNER: &str = "\0gate";

/// Shown name ↔ (owner, real name).
#[derive(Default)]
pub(super) struct AliasIndex {
    by_real: HashMap<(String, FileKey), String>,
    pub(super) by_alias: HashMap<FileKey, (String, String)>,
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
    pub(super) fn insert(&mut self, shown: FileKey, backend: String, real: String) {
        let (kind, sub, name) = shown.clone();
        self.by_real
            .insert((backend.clone(), (kind, sub, real.clone())), name);
        self.by_alias.insert(shown, (backend, real));
    }

    /// The shown name of a backend's file; `Some(new)` when it was just assigned.
    pub(super) fn alias(&mut self, backend: &str, key: FileKey) -> (String, bool) {
        if let Some(a) = self.by_real.get(&(backend.to_string(), key.clone())) {
            return (a.clone(), false);
        }
        let (kind, sub, name) = key.clone();
        let mut shown = name.clone();
        let mut n = 0;
        while self
            .by_alias
            .contains_key(&(kind.clone(), sub.clone(), shown.clone()))
        {
            n += 1;
            shown = bump(&name, n);
        }
        self.by_alias
            .insert((kind, sub, shown.clone()), (backend.to_string(), name));
        self.by_real
            .insert((backend.to_string(), key), shown.clone());
        (shown, true)
    }
}

impl AliasIndex {
    /// The gate's own file `shown` takes its name (an upload stored under it, possibly over a
    /// backend file shown under that name, as an overwrite on one ComfyUI would).
    pub(super) fn reserve(&mut self, shown: FileKey) {
        if let Some(old) = self.by_alias.get(&shown).cloned() {
            let (kind, sub, _) = shown.clone();
            self.by_real.remove(&(old.0, (kind, sub, old.1)));
        }
        self.insert(shown.clone(), GATE_OWNER.to_string(), shown.2);
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
}
