use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::*;
use crate::files::{AliasStore, FileKey};

struct NoStore;
impl AliasStore for NoStore {
    fn save_alias(&self, _: &FileKey, _: &(String, String)) -> Result<(), String> {
        Ok(())
    }
    fn remove_aliases(&self, _: &[FileKey]) -> Result<(), String> {
        Ok(())
    }
}

fn files() -> (tempfile::TempDir, Arc<Files>) {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::open(dir.path(), Arc::new(NoStore), Vec::new(), usize::MAX).unwrap();
    (dir, Arc::new(files))
}

fn body(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn graph(seed: Value) -> Value {
    json!({
        "1": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 20, "model": ["2", 0]}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}}
    })
}

#[test]
fn the_same_graph_written_differently_has_one_key() {
    let (_dir, files) = files();
    let a = body(json!({"prompt": graph(json!(5))}));
    // Other key order, a UI title, another client and workflow.
    let b = body(json!({
        "prompt": {
            "2": {"inputs": {"ckpt_name": "a.safetensors"}, "class_type": "CheckpointLoaderSimple",
                  "_meta": {"title": "Load"}},
            "1": {"inputs": {"model": ["2", 0], "steps": 20, "seed": 5}, "class_type": "KSampler"}
        },
        "client_id": "other",
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}
    }));
    assert_eq!(key_of("", &a, &files), key_of("", &b, &files));
    // Numbers count as sent: ComfyUI makes a STRING input `str(value)`, so 1 and 1.0 differ.
    let mut float = graph(json!(5));
    float["1"]["inputs"]["steps"] = json!(20.0);
    assert_ne!(
        key_of("", &a, &files),
        key_of("", &body(json!({"prompt": float})), &files)
    );
}

#[test]
fn a_seed_a_checkpoint_targets_or_scope_change_the_key() {
    let (_dir, files) = files();
    let base = key_of("", &body(json!({"prompt": graph(json!(5))})), &files);
    assert_ne!(
        base,
        key_of("", &body(json!({"prompt": graph(json!(6))})), &files)
    );
    // Seeds past 2^53 keep every digit.
    let big = |s: u64| key_of("", &body(json!({"prompt": graph(json!(s))})), &files);
    assert_ne!(
        big(18_446_744_073_709_551_615),
        big(18_446_744_073_709_551_614)
    );
    let mut other = graph(json!(5));
    other["2"]["inputs"]["ckpt_name"] = json!("b.safetensors");
    assert_ne!(base, key_of("", &body(json!({"prompt": other})), &files));
    let partial = body(json!({"prompt": graph(json!(5)), "partial_execution_targets": ["1"]}));
    assert_ne!(base, key_of("", &partial, &files));
    assert_ne!(
        base,
        key_of(
            "user:alice",
            &body(json!({"prompt": graph(json!(5))})),
            &files
        )
    );
}

#[test]
fn an_input_file_is_keyed_by_its_contents() {
    let (_dir, files) = files();
    let load = body(json!({"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}
    }}));
    let unknown = key_of("", &load, &files);
    let write = |bytes: &[u8]| {
        std::fs::write(files.dirs.input.join("cat.png"), bytes).unwrap();
        files.note_upload(&json!({"name": "cat.png", "subfolder": "", "type": "input"}));
    };
    write(b"one");
    let one = key_of("", &load, &files);
    assert_ne!(unknown, one, "a file the gate holds counts by content");
    assert_eq!(one, key_of("", &load, &files));
    write(b"two");
    assert_ne!(one, key_of("", &load, &files), "new contents, new key");
    write(b"one");
    assert_eq!(one, key_of("", &load, &files));
}

#[test]
fn the_opt_out_is_extra_data_comfy_gate_cache_false() {
    assert!(opted_out(&body(
        json!({"extra_data": {"comfy_gate": {"cache": false}}})
    )));
    assert!(!opted_out(&body(
        json!({"extra_data": {"comfy_gate": {"cache": true}}})
    )));
    assert!(!opted_out(&body(json!({"extra_data": {}}))));
    assert!(!opted_out(&body(json!({}))));
}

fn entry(name: &str) -> Value {
    json!({
        "prompt": [1, "p", {}, {}, ["9"]],
        "outputs": {"9": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}},
        "meta": {"9": {"node_id": "9", "display_node": "9"}},
    })
}

fn cache(files: &Arc<Files>, max_entries: usize, max_age_s: u64) -> ResultCache {
    let cfg = CacheConfig {
        enabled: true,
        max_entries,
        max_age_s,
        ..CacheConfig::default()
    };
    ResultCache::new(cfg, files.clone())
}

#[test]
fn the_least_recently_used_goes_first() {
    let (_dir, files) = files();
    let c = cache(&files, 2, 3600);
    let k = |seed: u64| key_of("", &body(json!({"prompt": graph(json!(seed))})), &files);
    c.remember(k(1), "p1", &entry("a.png"));
    c.remember(k(2), "p2", &entry("b.png"));
    let hit = c.get(&k(1)).expect("remembered");
    c.release(&hit);
    assert_eq!(hit.from, "p1");
    assert_eq!(hit.outputs_to_execute, vec!["9".to_string()]);
    assert_eq!(hit.outputs["9"]["images"][0]["filename"], "a.png");
    c.remember(k(3), "p3", &entry("c.png"));
    assert_eq!(c.len(), 2);
    assert!(c.get(&k(2)).is_none(), "2 was the least recently used");
    for seed in [1, 3] {
        let hit = c.get(&k(seed)).expect("kept");
        c.release(&hit);
    }
}

#[test]
fn an_expired_run_is_not_served() {
    let (_dir, files) = files();
    let c = cache(&files, 10, 1);
    let k = key_of("", &body(json!({"prompt": graph(json!(1))})), &files);
    c.remember(k, "p1", &entry("a.png"));
    let hit = c.get(&k).expect("fresh");
    c.release(&hit);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(c.get(&k).is_none());
    assert!(c.is_empty(), "forgotten once found expired");
}

#[test]
fn the_names_of_remembered_outputs_are_held_until_forgotten() {
    let (_dir, files) = files();
    let mut shown =
        json!({"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]});
    files.alias_outputs("a", &mut shown);
    let name = shown["images"][0]["filename"].as_str().unwrap().to_string();
    let held = |files: &Files| files.counts()["backend_aliases"].as_u64().unwrap();
    // A history entry lists it, the cache too; the entry goes.
    let listed = json!({"outputs": {"9": shown.clone()}});
    files.hold_outputs(&listed);
    let c = cache(&files, 1, 3600);
    let k = |seed: u64| key_of("", &body(json!({"prompt": graph(json!(seed))})), &files);
    c.remember(k(1), "p1", &entry(&name));
    files.forget_outputs(&listed);
    assert_eq!(held(&files), 1, "the cache still shows it");
    // A hit holds it until its own entry does, whatever the cache forgets meanwhile.
    let hit = c.get(&k(1)).unwrap();
    c.remember(k(2), "p2", &entry("other.png"));
    assert_eq!(held(&files), 1, "the hit's hold");
    c.release(&hit);
    assert_eq!(held(&files), 0, "forgotten with the last hold");
}

#[test]
fn a_run_with_a_temp_output_or_over_max_bytes_is_not_remembered() {
    let (_dir, files) = files();
    let mut c = cache(&files, 10, 3600);
    let k = key_of("", &body(json!({"prompt": graph(json!(1))})), &files);
    let mut preview = entry("a.png");
    preview["outputs"]["9"]["images"][0]["type"] = json!("temp");
    c.remember(k, "p1", &preview);
    assert!(c.is_empty(), "previews vanish when a ComfyUI restarts");
    c.cfg.max_bytes = 10;
    c.remember(k, "p1", &entry("a.png"));
    assert!(c.is_empty());
}
