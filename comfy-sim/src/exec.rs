//! The prompt worker: ComfyUI's `prompt_worker` + `PromptExecutor`, with simulated time.
//!
//! Messages are produced in ComfyUI's order (execution.py / main.py): `execution_start`,
//! `execution_cached`, then per node `progress_state` (running), `executing`, per step
//! `progress_state` + `progress` (+ preview), `executed`, `progress_state` (finished); then
//! `execution_success` | `execution_error` | `execution_interrupted`, the history write, a
//! `status` broadcast and the final `executing {node: null}`.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use indexmap::IndexMap;
use serde_json::{Map, Value, json};

use super::cost;
use super::graph::ExecutionList;
use super::instance::{Instance, lock};
use super::nodes::find;
use super::queue::QueueItem;
use comfy_wire::files::images::Image;
use comfy_wire::protocol::frames;
use comfy_wire::protocol::now_ms;

mod pixels;
mod utility;

/// A value flowing between simulated nodes.
#[derive(Clone, Debug)]
enum Val {
    Model {
        ckpt: String,
        loras: Vec<String>,
    },
    Clip {
        ckpt: String,
    },
    Vae,
    Conditioning(u64),
    Latent {
        width: u32,
        height: u32,
        batch: u32,
        seed: u64,
    },
    Image(Arc<Vec<Image>>),
    Mask,
    /// A `STRING` output (StringConcatenate).
    Text(Arc<String>),
}

impl Val {
    /// How ComfyUI's `format_value` prints a non-primitive input in `current_inputs`.
    fn python_repr(&self) -> String {
        match self {
            Val::Model { .. } => {
                "<comfy.model_patcher.ModelPatcher object at 0x7f3a2c1d0e50>".into()
            }
            Val::Clip { .. } => "<comfy.sd.CLIP object at 0x7f3a2c1d0f10>".into(),
            Val::Vae => "<comfy.sd.VAE object at 0x7f3a2c1d1090>".into(),
            Val::Conditioning(_) => "[[tensor(...), {'pooled_output': tensor(...)}]]".into(),
            Val::Latent { .. } => "{'samples': tensor(...)}".into(),
            Val::Image(_) | Val::Mask => "tensor(...)".into(),
            Val::Text(t) => t.to_string(),
        }
    }
}

#[derive(Clone, Debug)]
struct CacheEntry {
    /// `{"meta": …, "output": …}` for nodes with UI output.
    ui: Option<Value>,
    outputs: Vec<Val>,
}

/// The classic output cache: entries keyed by input signature, pruned to the current prompt.
#[derive(Default)]
pub struct OutputCache {
    entries: HashMap<u64, CacheEntry>,
}

/// Why a node failed.
enum NodeError {
    Interrupted,
    Died,
    Failed {
        exception_type: String,
        message: String,
    },
}

/// Per-prompt execution state.
struct Run<'a> {
    inst: &'a Instance,
    item: &'a QueueItem,
    prompt: &'a Map<String, Value>,
    client_id: Option<String>,
    messages: Vec<Value>,
    progress: IndexMap<String, (&'static str, Value, Value)>,
    previews: bool,
}

impl Run<'_> {
    fn target(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// `PromptExecutor.add_message`.
    fn add_message(&mut self, event: &str, mut data: Value, broadcast: bool) {
        data["timestamp"] = json!(now_ms());
        self.messages.push(json!([event, data.clone()]));
        if self.client_id.is_some() || broadcast {
            self.inst
                .hub
                .send_json(event, data, self.client_id.as_deref());
        }
    }

    /// ComfyUI sends every started node's state on each change (a message grows with the
    /// prompt); it is built only when some socket will receive it.
    fn send_progress_state(&self) {
        if !self.inst.hub.has_listener(self.target()) {
            return;
        }
        let nodes: Map<String, Value> = self
            .progress
            .iter()
            .map(|(id, (state, value, max))| {
                (
                    id.clone(),
                    json!({
                        "value": value, "max": max, "state": state, "node_id": id,
                        "prompt_id": self.item.prompt_id, "display_node_id": id,
                        "parent_node_id": null, "real_node_id": id,
                    }),
                )
            })
            .collect();
        self.inst.hub.send_json(
            "progress_state",
            json!({ "prompt_id": self.item.prompt_id, "nodes": nodes }),
            self.target(),
        );
    }

    /// `start_progress` (floats 0.0 / 1.0) or `update_progress` (the hook's own numbers:
    /// integers from a ProgressBar), as ComfyUI's registry keeps them.
    fn set_progress(&mut self, id: &str, state: &'static str, value: Value, max: Value) {
        self.progress.insert(id.to_string(), (state, value, max));
        self.send_progress_state();
    }

    /// `finish_progress`: value = max. A node never started (a cache hit) keeps the registry's
    /// integer default `max = 1`, as ComfyUI reports it.
    fn finish_progress(&mut self, id: &str) {
        let max = self
            .progress
            .get(id)
            .map(|p| p.2.clone())
            .unwrap_or(json!(1));
        self.progress
            .insert(id.to_string(), ("finished", max.clone(), max));
        self.send_progress_state();
    }

    /// ComfyUI's progress hook (`main.py::hijack_progress`): interrupt check, `progress_state`
    /// (+ type 4 to a client that negotiated metadata), `progress` (+ type 1 to one that did
    /// not). `preview` is an encoded image and its type 1 format number: latent previews are
    /// JPEG, `SaveImageWebsocket` sends full-size PNGs through the same hook.
    fn progress_hook(
        &mut self,
        id: &str,
        value: u32,
        max: u32,
        preview: Option<(u32, Vec<u8>)>,
    ) -> Result<(), NodeError> {
        if self.inst.interrupted() {
            return Err(NodeError::Interrupted);
        }
        self.set_progress(id, "running", json!(value), json!(max));
        let preview = preview.map(|(format, bytes)| {
            let mime = if format == frames::FORMAT_PNG {
                "image/png"
            } else {
                "image/jpeg"
            };
            (format, mime, bytes)
        });
        self.send_progress(id, value, max, preview);
        Ok(())
    }

    /// `progress`, with a binary preview (format, mime type, bytes): before `progress` as a
    /// type 4 frame with metadata for clients that negotiated `supports_preview_metadata`,
    /// after it as a type 1 frame for the others (ComfyUI's order).
    fn send_progress(&self, id: &str, value: u32, max: u32, preview: Option<(u32, &str, Vec<u8>)>) {
        let metadata = self.inst.hub.supports_preview_metadata(self.target());
        if let (Some((_, mime, bytes)), true) = (&preview, metadata) {
            let meta = json!({
                "node_id": id, "prompt_id": self.item.prompt_id, "display_node_id": id,
                "parent_node_id": null, "real_node_id": id, "image_type": mime,
            });
            self.inst.hub.send_bytes(
                frames::encode_preview_with_metadata(&meta, bytes),
                self.target(),
            );
        }
        self.inst.hub.send_json(
            "progress",
            json!({ "value": value, "max": max, "prompt_id": self.item.prompt_id, "node": id }),
            self.target(),
        );
        if let (Some((format, _, bytes)), false) = (&preview, metadata) {
            self.inst
                .hub
                .send_bytes(frames::encode_preview(*format, bytes), self.target());
        }
    }
}

fn is_link(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.len() == 2 && a[0].is_string() && a[1].is_number())
}

/// Input signatures per node (class, literal inputs, linked signatures, LoadImage's file hash),
/// computed depth-first without recursion: each node once, after the nodes it links to. A link
/// back into the path being walked (a cycle, which validation keeps from running) is hashed by
/// the id it names.
fn signatures(inst: &Instance, prompt: &Map<String, Value>) -> HashMap<String, u64> {
    let links = |id: &str| -> Vec<&str> {
        prompt[id]["inputs"]
            .as_object()
            .into_iter()
            .flat_map(|inputs| inputs.values())
            .filter(|v| is_link(v))
            .filter_map(|v| v[0].as_str())
            .filter(|from| prompt.contains_key(*from))
            .collect()
    };
    let mut memo: HashMap<String, u64> = HashMap::with_capacity(prompt.len());
    let mut walking: HashSet<&str> = HashSet::new();
    for root in prompt.keys() {
        let mut stack: Vec<(&str, bool)> = vec![(root.as_str(), false)];
        while let Some((id, inputs_done)) = stack.pop() {
            if inputs_done {
                walking.remove(id);
                let s = signature(inst, prompt, id, &memo);
                memo.insert(id.to_string(), s);
                continue;
            }
            if memo.contains_key(id) || walking.contains(id) {
                continue;
            }
            walking.insert(id);
            stack.push((id, true));
            for from in links(id) {
                if !memo.contains_key(from) && !walking.contains(from) {
                    stack.push((from, false));
                }
            }
        }
    }
    memo
}

/// One node's signature, given those of the nodes it links to.
fn signature(
    inst: &Instance,
    prompt: &Map<String, Value>,
    id: &str,
    memo: &HashMap<String, u64>,
) -> u64 {
    let mut h = DefaultHasher::new();
    let node = &prompt[id];
    node["class_type"].to_string().hash(&mut h);
    if let Some(inputs) = node["inputs"].as_object() {
        let mut names: Vec<&String> = inputs.keys().collect();
        names.sort();
        for name in names {
            name.hash(&mut h);
            let v = &inputs[name];
            if is_link(v) {
                let from = v[0].as_str().unwrap_or("");
                match memo.get(from) {
                    Some(s) => s.hash(&mut h),
                    None => from.hash(&mut h),
                }
                v[1].to_string().hash(&mut h);
            } else {
                v.to_string().hash(&mut h);
            }
        }
    }
    if let Some(class) = node["class_type"].as_str()
        && crate::utility_nodes::NEVER_CACHED.contains(&class)
    {
        rand::random::<u64>().hash(&mut h);
    }
    if node["class_type"] == "LoadImage" {
        let name = comfy_wire::protocol::errors::python_str(&node["inputs"]["image"]);
        if let Ok(bytes) = std::fs::read(inst.dirs.annotated_path(&name)) {
            bytes.hash(&mut h);
        }
    }
    h.finish()
}

/// Runs the worker until the instance dies.
pub async fn run_worker(inst: Arc<Instance>) {
    let mut cache = OutputCache::default();
    loop {
        let item = loop {
            if inst.stop.is_cancelled() {
                return;
            }
            let next = (!inst.faults.frozen())
                .then(|| lock(&inst.queue).start_next())
                .flatten();
            if let Some(item) = next {
                break item;
            }
            tokio::select! {
                _ = inst.stop.cancelled() => return,
                _ = inst.wake.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
        };
        inst.broadcast_status();
        if inst.free_memory.swap(false, Ordering::SeqCst) {
            cache.entries.clear();
        }
        let Some((success, messages, outputs, meta)) = execute(&inst, &mut cache, &item).await
        else {
            return;
        };
        let entry = json!({
            "prompt": item.to_json(),
            "outputs": outputs,
            "status": { "status_str": if success { "success" } else { "error" }, "completed": success, "messages": messages },
            "meta": meta,
        });
        lock(&inst.queue).finish(&item.prompt_id, entry);
        inst.stats.prompts_finished.fetch_add(1, Ordering::SeqCst);
        if success {
            inst.stats.prompts_succeeded.fetch_add(1, Ordering::SeqCst);
        }
        inst.broadcast_status();
        if let Some(cid) = item.client_id() {
            inst.hub.send_json(
                "executing",
                json!({ "node": null, "prompt_id": item.prompt_id }),
                Some(&cid),
            );
        }
    }
}

type Outcome = (bool, Vec<Value>, Map<String, Value>, Map<String, Value>);

/// `PromptExecutor.execute_async`; `None` when the instance died mid-run.
async fn execute(inst: &Instance, cache: &mut OutputCache, item: &QueueItem) -> Option<Outcome> {
    let empty = Map::new();
    let prompt = item.prompt.as_object().unwrap_or(&empty);
    let client_id = item.client_id();
    inst.interrupt.store(false, Ordering::SeqCst);
    lock(&inst.exec).client_id = client_id.clone();
    let preview_method = item
        .extra_data
        .get("preview_method")
        .and_then(Value::as_str);
    let previews = match preview_method {
        Some("none") => false,
        Some("auto") | Some("latent2rgb") | Some("taesd") => true,
        _ => inst.config.previews,
    };
    let mut run = Run {
        inst,
        item,
        prompt,
        client_id,
        messages: Vec::new(),
        progress: IndexMap::new(),
        previews,
    };
    run.add_message(
        "execution_start",
        json!({ "prompt_id": item.prompt_id }),
        false,
    );

    let sigs = signatures(inst, prompt);
    let live: HashSet<u64> = sigs.values().copied().collect();
    cache.entries.retain(|k, _| live.contains(k));
    let cached_ids: Vec<String> = prompt
        .keys()
        .filter(|id| cache.entries.contains_key(&sigs[*id]))
        .cloned()
        .collect();
    run.add_message(
        "execution_cached",
        json!({ "nodes": cached_ids, "prompt_id": item.prompt_id }),
        false,
    );
    let is_cached = |id: &str| sigs.get(id).is_some_and(|s| cache.entries.contains_key(s));
    let is_output_class = |c: &str| find(&inst.defs, c).is_some_and(|d| d.output_node);
    let mut list = ExecutionList::new(prompt, &is_output_class);
    for o in &item.outputs {
        list.add_node(o, &is_cached);
    }
    let current_outputs = cached_ids.clone();
    let mut results: HashMap<String, Vec<Val>> = HashMap::new();
    let mut ui_outputs: IndexMap<String, Value> = IndexMap::new();
    let mut executed: Vec<String> = Vec::new();
    let mut success = true;

    while let Some(id) = list.stage() {
        // Other requests are answered between nodes, however many nodes there are.
        tokio::task::yield_now().await;
        let class = prompt[&id]["class_type"].as_str().unwrap_or("").to_string();
        let sig = sigs[&id];
        if let Some(hit) = cache.entries.get(&sig).cloned() {
            if run.client_id.is_some() {
                let output = hit.ui.as_ref().and_then(|u| u.get("output")).cloned();
                inst.hub.send_json(
                    "executed",
                    json!({ "node": id, "display_node": id, "output": output, "prompt_id": item.prompt_id }),
                    run.target(),
                );
                if let Some(ui) = &hit.ui {
                    ui_outputs.insert(id.clone(), ui.clone());
                }
            }
            run.finish_progress(&id);
            results.insert(id.clone(), hit.outputs);
            list.complete(&id);
            continue;
        }
        run.set_progress(&id, "running", json!(0.0), json!(1.0));
        if run.client_id.is_some() {
            lock(&inst.exec).last_node_id = Some(id.clone());
            inst.hub.send_json(
                "executing",
                json!({ "node": id, "display_node": id, "prompt_id": item.prompt_id }),
                run.target(),
            );
        }
        // Resolve inputs: linked outputs from this run or the cache, literals as given.
        let mut inputs: IndexMap<String, Result<Val, Value>> = IndexMap::new();
        if let Some(raw) = prompt[&id]["inputs"].as_object() {
            for (name, v) in raw {
                if is_link(v) {
                    let from = v[0].as_str().unwrap_or("");
                    let slot = v[1].as_u64().unwrap_or(0) as usize;
                    let val = results
                        .get(from)
                        .cloned()
                        .or_else(|| {
                            sigs.get(from)
                                .and_then(|s| cache.entries.get(s))
                                .map(|e| e.outputs.clone())
                        })
                        .and_then(|outs| outs.get(slot).cloned());
                    if let Some(val) = val {
                        inputs.insert(name.clone(), Ok(val));
                    }
                } else {
                    inputs.insert(name.clone(), Err(v.clone()));
                }
            }
        }
        let outcome = if inst.interrupted() {
            Err(NodeError::Interrupted)
        } else {
            run_node(&mut run, &id, &class, &inputs).await
        };
        match outcome {
            Ok((outputs, ui)) => {
                let ui_entry = ui.map(|output| {
                    json!({
                        "meta": { "node_id": id, "display_node": id, "parent_node": null, "real_node_id": id },
                        "output": output,
                    })
                });
                if let Some(entry) = &ui_entry {
                    ui_outputs.insert(id.clone(), entry.clone());
                    if run.client_id.is_some() {
                        inst.hub.send_json(
                            "executed",
                            json!({ "node": id, "display_node": id, "output": entry["output"], "prompt_id": item.prompt_id }),
                            run.target(),
                        );
                    }
                }
                cache.entries.insert(
                    sig,
                    CacheEntry {
                        ui: ui_entry,
                        outputs: outputs.clone(),
                    },
                );
                results.insert(id.clone(), outputs);
                run.finish_progress(&id);
                executed.push(id.clone());
                list.complete(&id);
            }
            Err(NodeError::Died) => return None,
            Err(NodeError::Interrupted) => {
                success = false;
                run.add_message(
                    "execution_interrupted",
                    json!({ "prompt_id": item.prompt_id, "node_id": id, "node_type": class, "executed": executed }),
                    true,
                );
                break;
            }
            Err(NodeError::Failed {
                exception_type,
                message,
            }) => {
                success = false;
                let current_inputs: Map<String, Value> = inputs
                    .iter()
                    .map(|(k, v)| {
                        let shown = match v {
                            Ok(val) => json!(val.python_repr()),
                            Err(lit) => lit.clone(),
                        };
                        (k.clone(), json!([shown]))
                    })
                    .collect();
                run.add_message(
                    "execution_error",
                    json!({
                        "prompt_id": item.prompt_id, "node_id": id, "node_type": class,
                        "executed": executed, "exception_message": message,
                        "exception_type": exception_type,
                        "traceback": [
                            "  File \"comfy-sim/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(...)\n",
                            format!("  File \"comfy-sim/nodes.py\", in {class}\n    (simulated)\n"),
                        ],
                        "current_inputs": current_inputs,
                        "current_outputs": current_outputs,
                    }),
                    false,
                );
                break;
            }
        }
    }
    if success {
        run.add_message(
            "execution_success",
            json!({ "prompt_id": item.prompt_id }),
            false,
        );
    }
    lock(&inst.exec).last_node_id = None;
    let mut outputs = Map::new();
    let mut meta = Map::new();
    for (id, ui) in ui_outputs {
        outputs.insert(id.clone(), ui["output"].clone());
        meta.insert(id, ui["meta"].clone());
    }
    Some((success, run.messages, outputs, meta))
}

fn literal<'a>(inputs: &'a IndexMap<String, Result<Val, Value>>, name: &str) -> Option<&'a Value> {
    inputs.get(name).and_then(|v| v.as_ref().err())
}

fn int(inputs: &IndexMap<String, Result<Val, Value>>, name: &str, default: i64) -> i64 {
    literal(inputs, name)
        .and_then(Value::as_i64)
        .unwrap_or(default)
}

fn linked<'a>(inputs: &'a IndexMap<String, Result<Val, Value>>, name: &str) -> Option<&'a Val> {
    inputs.get(name).and_then(|v| v.as_ref().ok())
}

fn hash_of(parts: &[&dyn std::fmt::Debug]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        format!("{p:?}").hash(&mut h);
    }
    h.finish()
}

fn missing(name: &str) -> NodeError {
    NodeError::Failed {
        exception_type: "TypeError".into(),
        message: format!("missing required positional argument: '{name}'"),
    }
}

fn oom() -> NodeError {
    NodeError::Failed {
        exception_type: "torch.OutOfMemoryError".into(),
        message: format!("Allocation on device \n{}", cost::OOM_TIPS),
    }
}

/// Whether a node reports `progress` while it runs (ComfyUI's progress bar); only the sampler
/// does here. The `Silent` fault lengthens every other node.
fn sends_progress(class: &str) -> bool {
    class == "KSampler"
}

type NodeResult = Result<(Vec<Val>, Option<Value>), NodeError>;

/// Simulates one node: its time, its VRAM and its (real) pixels.
async fn run_node(
    run: &mut Run<'_>,
    id: &str,
    class: &str,
    inputs: &IndexMap<String, Result<Val, Value>>,
) -> NodeResult {
    let inst = run.inst;
    let speed = inst.config.speed.max(1e-6);
    let sleep = |secs: f64| async move {
        if inst.sim_sleep(secs).await {
            Ok(())
        } else {
            Err(NodeError::Died)
        }
    };
    // The `Silent` fault: a long node with no progress bar, so no event until it ends.
    if !sends_progress(class) && !inst.fault_wait(true, |f| f.silent()).await {
        return Err(NodeError::Died);
    }
    match class {
        "CheckpointLoaderSimple" => {
            let name = literal(inputs, "ckpt_name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let size = inst
                .config
                .model_size_gb("checkpoints", &name)
                .ok_or_else(|| NodeError::Failed {
                    exception_type: "FileNotFoundError".into(),
                    message: format!(
                        "Model in folder 'checkpoints' with filename '{name}' not found."
                    ),
                })?;
            load_model(inst, &name, size)?;
            sleep(size * cost::LOAD_SECONDS_PER_GB).await?;
            inst.stats.checkpoint_loads.fetch_add(1, Ordering::SeqCst);
            Ok((
                vec![
                    Val::Model {
                        ckpt: name.clone(),
                        loras: vec![],
                    },
                    Val::Clip { ckpt: name },
                    Val::Vae,
                ],
                None,
            ))
        }
        "LoraLoader" => {
            let (Some(Val::Model { ckpt, loras }), Some(clip)) =
                (linked(inputs, "model"), linked(inputs, "clip"))
            else {
                return Err(missing("model"));
            };
            let lora = literal(inputs, "lora_name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let size = inst.config.model_size_gb("loras", &lora).unwrap_or(0.1);
            sleep(size * cost::LOAD_SECONDS_PER_GB).await?;
            let mut loras = loras.clone();
            loras.push(lora);
            Ok((
                vec![
                    Val::Model {
                        ckpt: ckpt.clone(),
                        loras,
                    },
                    clip.clone(),
                ],
                None,
            ))
        }
        "CLIPTextEncode" => {
            let Some(Val::Clip { ckpt }) = linked(inputs, "clip") else {
                return Err(NodeError::Failed {
                    exception_type: "RuntimeError".into(),
                    message: "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint does not contain a valid clip or text encoder model.".into(),
                });
            };
            sleep(cost::TEXT_ENCODE_SECONDS / speed).await?;
            let text = literal(inputs, "text").cloned().unwrap_or(Value::Null);
            Ok((vec![Val::Conditioning(hash_of(&[&text, ckpt]))], None))
        }
        "EmptyLatentImage" => {
            let (w, h, b) = (
                int(inputs, "width", 512),
                int(inputs, "height", 512),
                int(inputs, "batch_size", 1),
            );
            sleep(cost::TRIVIAL_NODE_SECONDS).await?;
            Ok((
                vec![Val::Latent {
                    width: w as u32,
                    height: h as u32,
                    batch: b as u32,
                    seed: 0,
                }],
                None,
            ))
        }
        "KSampler" => {
            let Some(Val::Model { ckpt, loras }) = linked(inputs, "model") else {
                return Err(missing("model"));
            };
            let Some(Val::Latent {
                width,
                height,
                batch,
                seed: latent_seed,
            }) = linked(inputs, "latent_image").cloned()
            else {
                return Err(missing("latent_image"));
            };
            let (pos, neg) = (linked(inputs, "positive"), linked(inputs, "negative"));
            let steps = int(inputs, "steps", 20).max(1) as u32;
            let seed = literal(inputs, "seed").cloned().unwrap_or(json!(0));
            let megapixels = width as f64 * height as f64 / 1e6;
            let working = cost::sampling_working_gb(megapixels, batch);
            if inst.faults.oom_next.swap(false, Ordering::SeqCst) || !fits(inst, working) {
                lock(&inst.gpu).resident.clear();
                return Err(oom());
            }
            lock(&inst.gpu).working_gb = working;
            let step_secs =
                cost::SAMPLER_SECONDS_PER_STEP_MEGAPIXEL * megapixels * batch as f64 / speed;
            let cond = |v: Option<&Val>| match v {
                Some(Val::Conditioning(h)) => *h,
                _ => 0,
            };
            let (pos, neg) = (cond(pos), cond(neg));
            let out_seed = hash_of(&[
                &seed,
                &pos,
                &neg,
                ckpt,
                loras,
                &steps,
                &literal(inputs, "cfg"),
                &literal(inputs, "sampler_name"),
                &literal(inputs, "scheduler"),
                &latent_seed,
            ]);
            let preview_img = run
                .previews
                .then(|| Image::synthesize((width / 8).max(1), (height / 8).max(1), out_seed));
            let result = async {
                for step in 1..=steps {
                    sleep(step_secs).await?;
                    let preview = preview_img
                        .as_ref()
                        .map(|i| (frames::FORMAT_JPEG, i.to_jpeg()));
                    run.progress_hook(id, step, steps, preview)?;
                }
                Ok(())
            }
            .await;
            lock(&inst.gpu).working_gb = 0.0;
            result?;
            Ok((
                vec![Val::Latent {
                    width,
                    height,
                    batch,
                    seed: out_seed,
                }],
                None,
            ))
        }
        "VAEDecode" => {
            let Some(Val::Latent {
                width,
                height,
                batch,
                seed,
            }) = linked(inputs, "samples").cloned()
            else {
                return Err(missing("samples"));
            };
            guard_pixels(width, height, batch)?;
            sleep(
                cost::VAE_SECONDS_PER_MEGAPIXEL * width as f64 * height as f64 * batch as f64
                    / 1e6
                    / speed,
            )
            .await?;
            let images = (0..batch)
                .map(|i| {
                    let seed = seed.wrapping_add(i as u64);
                    pixels::decoded(width, height, seed, inst.config.fast_images)
                })
                .collect();
            Ok((vec![Val::Image(Arc::new(images))], None))
        }
        "EmptyImage" => {
            let (w, h, b) = (
                int(inputs, "width", 512) as u32,
                int(inputs, "height", 512) as u32,
                int(inputs, "batch_size", 1) as u32,
            );
            guard_pixels(w, h, b)?;
            sleep(cost::TRIVIAL_NODE_SECONDS).await?;
            let img = Image::solid(w, h, int(inputs, "color", 0) as u32);
            Ok((vec![Val::Image(Arc::new(vec![img; b as usize]))], None))
        }
        "ImageBlur" | "ImageInvert" => {
            let Some(Val::Image(images)) = linked(inputs, "image") else {
                return Err(missing("image"));
            };
            let radius = int(inputs, "blur_radius", 1).clamp(0, 31) as u32;
            let mut seconds = cost::TRIVIAL_NODE_SECONDS;
            if class == "ImageBlur" {
                let megapixels: f64 = images
                    .iter()
                    .map(|i| f64::from(i.width) * f64::from(i.height) / 1e6)
                    .sum();
                let taps = f64::from(2 * radius + 1).powi(2);
                seconds += megapixels * taps * cost::BLUR_SECONDS_PER_MEGAPIXEL_TAP / speed;
            }
            sleep(seconds).await?;
            let out = images
                .iter()
                .map(|i| {
                    if class == "ImageBlur" {
                        i.blur(radius)
                    } else {
                        i.invert()
                    }
                })
                .collect();
            Ok((vec![Val::Image(Arc::new(out))], None))
        }
        "ImageAddNoise" => {
            let Some(Val::Image(images)) = linked(inputs, "image").cloned() else {
                return Err(missing("image"));
            };
            let seed = literal(inputs, "seed").and_then(Value::as_u64).unwrap_or(0);
            let strength = literal(inputs, "strength")
                .and_then(Value::as_f64)
                .unwrap_or(0.5);
            sleep(cost::TRIVIAL_NODE_SECONDS).await?;
            let out = images
                .iter()
                .enumerate()
                .map(|(i, img)| img.add_noise(seed.wrapping_add(i as u64), strength))
                .collect();
            Ok((vec![Val::Image(Arc::new(out))], None))
        }
        "LoadImage" => {
            let name = comfy_wire::protocol::errors::python_str(
                literal(inputs, "image").unwrap_or(&Value::Null),
            );
            let path = inst.dirs.annotated_path(&name);
            let bytes = std::fs::read(&path).map_err(|e| NodeError::Failed {
                exception_type: "FileNotFoundError".into(),
                message: format!(
                    "[Errno 2] No such file or directory: '{}' ({e})",
                    path.display()
                ),
            })?;
            let (img, _) = Image::from_png(&bytes).map_err(|_| NodeError::Failed {
                exception_type: "PIL.UnidentifiedImageError".into(),
                message: format!("cannot identify image file '{}'", path.display()),
            })?;
            sleep(cost::TRIVIAL_NODE_SECONDS).await?;
            Ok((vec![Val::Image(Arc::new(vec![img])), Val::Mask], None))
        }
        "SaveImage" | "PreviewImage" => {
            let Some(Val::Image(images)) = linked(inputs, "images").cloned() else {
                return Err(missing("images"));
            };
            let temp = class == "PreviewImage";
            let mut prefix = literal(inputs, "filename_prefix")
                .map(comfy_wire::protocol::errors::python_str)
                .unwrap_or_else(|| "ComfyUI".into());
            if temp {
                let suffix: String = (0..5)
                    .map(|_| {
                        let letters = b"abcdefghijklmnopqrstupvxyz";
                        letters[rand::random::<usize>() % letters.len()] as char
                    })
                    .collect();
                prefix = format!("ComfyUI_temp_{suffix}");
            }
            let base = if temp {
                inst.dirs.temp.clone()
            } else {
                inst.dirs.output.clone()
            };
            let (folder, stem, mut counter, subfolder) = inst
                .dirs
                .save_path(&base, &prefix)
                .map_err(|message| NodeError::Failed {
                    exception_type: "Exception".into(),
                    message,
                })?;
            let mut text = vec![(
                "prompt".to_string(),
                Value::Object(run.prompt.clone()).to_string(),
            )];
            if let Some(Value::Object(extra)) = run.item.extra_data.get("extra_pnginfo") {
                for (k, v) in extra {
                    text.push((k.clone(), v.to_string()));
                }
            }
            let mut results = Vec::new();
            for (batch_number, image) in images.iter().enumerate() {
                let name = format!(
                    "{}_{counter:05}_.png",
                    stem.replace("%batch_num%", &batch_number.to_string())
                );
                let png = image.to_png(&text, temp || inst.config.fast_images);
                std::fs::write(folder.join(&name), png).map_err(|e| NodeError::Failed {
                    exception_type: "OSError".into(),
                    message: e.to_string(),
                })?;
                results.push(json!({ "filename": name, "subfolder": subfolder, "type": if temp { "temp" } else { "output" } }));
                counter += 1;
            }
            Ok((vec![], Some(json!({ "images": results }))))
        }
        "StringConcatenate" | "PreviewAny" | "SaveImageWebsocket" => {
            utility::run_node(run, id, class, inputs).await
        }
        other => Err(NodeError::Failed {
            exception_type: "KeyError".into(),
            message: format!("'{other}'"),
        }),
    }
}

/// Refuses images the host could not hold (the sim's stand-in for a CPU-side OOM).
fn guard_pixels(w: u32, h: u32, batch: u32) -> Result<(), NodeError> {
    if (w as u64) * (h as u64) * (batch as u64) > cost::MAX_SIM_PIXELS {
        return Err(oom());
    }
    Ok(())
}

/// Whether `working` GB fits beside the resident models.
fn fits(inst: &Instance, working: f64) -> bool {
    lock(&inst.gpu).used_gb() + working <= inst.config.vram_total_gb
}

/// Makes a checkpoint resident, evicting least recently used models to make room.
fn load_model(inst: &Instance, name: &str, size: f64) -> Result<(), NodeError> {
    let mut gpu = lock(&inst.gpu);
    if let Some(pos) = gpu.resident.iter().position(|(n, _)| n == name) {
        let entry = gpu.resident.remove(pos);
        gpu.resident.push(entry);
        return Ok(());
    }
    if size + super::instance::BASELINE_VRAM_GB > inst.config.vram_total_gb {
        return Err(oom());
    }
    while gpu.used_gb() + size > inst.config.vram_total_gb && !gpu.resident.is_empty() {
        gpu.resident.remove(0);
    }
    gpu.resident.push((name.to_string(), size));
    Ok(())
}
