//! The node classes comfy-sim knows, with the same `/object_info` entries as ComfyUI 0.8.
//!
//! One table drives three things: the `/object_info` listing, prompt validation and the
//! simulated execution. Combo inputs are filled with this instance's files at request time.

use serde_json::{Map, Value, json};

use super::config::SimConfig;

/// ComfyUI's `MAX_RESOLUTION`.
pub const MAX_RESOLUTION: i64 = 16384;

/// Samplers of `comfy.samplers.KSampler.SAMPLERS`.
pub const SAMPLERS: &[&str] = &[
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "exp_heun_2_x0",
    "exp_heun_2_x0_sde",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
];

/// Schedulers of `comfy.samplers.KSampler.SCHEDULERS`.
pub const SCHEDULERS: &[&str] = &[
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
];

/// Where a combo input's options come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ComboSource {
    Samplers,
    Schedulers,
    /// A model folder of this instance.
    Folder(&'static str),
    /// Image files in this instance's `input/`.
    InputImages,
}

/// The type of one input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InputType {
    Int,
    Float,
    String,
    Boolean,
    Combo(ComboSource),
    /// A link-only input of this type (`MODEL`, `IMAGE` …).
    Link(&'static str),
}

impl InputType {
    /// The type name used in `return_type_mismatch` and `invalid_input_type` messages.
    pub fn name(&self) -> &'static str {
        match self {
            InputType::Int => "INT",
            InputType::Float => "FLOAT",
            InputType::String => "STRING",
            InputType::Boolean => "BOOLEAN",
            InputType::Combo(_) => "COMBO",
            InputType::Link(t) => t,
        }
    }
}

/// One input of a node class.
#[derive(Clone, Debug)]
pub struct InputDef {
    pub name: &'static str,
    pub ty: InputType,
    pub required: bool,
    /// The options dict of `/object_info` (`default`, `min`, `max`, `tooltip` …); `None` when
    /// ComfyUI declares the input as a bare 1-tuple.
    pub options: Option<Value>,
}

impl InputDef {
    pub fn min(&self) -> Option<f64> {
        self.options.as_ref()?.get("min")?.as_f64()
    }
    pub fn max(&self) -> Option<f64> {
        self.options.as_ref()?.get("max")?.as_f64()
    }
}

/// One node class.
#[derive(Clone, Debug)]
pub struct NodeDef {
    pub class: &'static str,
    pub display_name: &'static str,
    pub category: &'static str,
    pub description: &'static str,
    pub python_module: &'static str,
    pub inputs: Vec<InputDef>,
    pub hidden: Vec<(&'static str, &'static str)>,
    pub outputs: Vec<&'static str>,
    pub output_tooltips: Option<Vec<&'static str>>,
    pub output_node: bool,
    /// Written with ComfyUI's V3 schema API (adds the V3 keys to `/object_info`).
    pub v3: bool,
    /// Defines `VALIDATE_INPUTS` over these inputs (skipping the combo check for them).
    pub custom_validated: &'static [&'static str],
}

fn input(name: &'static str, ty: InputType, options: Value) -> InputDef {
    InputDef {
        name,
        ty,
        required: true,
        options: Some(options),
    }
}

fn bare(name: &'static str, ty: InputType) -> InputDef {
    InputDef {
        name,
        ty,
        required: true,
        options: None,
    }
}

fn tip(text: &str) -> Value {
    json!({ "tooltip": text })
}

/// The core node classes, in `/object_info` order (the utility nodes of
/// [`crate::utility_nodes`] follow them; `Instance` puts the two together).
pub fn catalogue() -> Vec<NodeDef> {
    use ComboSource::*;
    use InputType::*;
    vec![
        NodeDef {
            class: "KSampler",
            display_name: "KSampler",
            category: "sampling",
            description: "Uses the provided model, positive and negative conditioning to denoise the latent image.",
            python_module: "nodes",
            inputs: vec![
                input(
                    "model",
                    Link("MODEL"),
                    tip("The model used for denoising the input latent."),
                ),
                input(
                    "seed",
                    Int,
                    json!({"default": 0, "min": 0, "max": u64::MAX, "control_after_generate": true, "tooltip": "The random seed used for creating the noise."}),
                ),
                input(
                    "steps",
                    Int,
                    json!({"default": 20, "min": 1, "max": 10000, "tooltip": "The number of steps used in the denoising process."}),
                ),
                input(
                    "cfg",
                    Float,
                    json!({"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values result in images more closely matching the prompt however too high values will negatively impact quality."}),
                ),
                input(
                    "sampler_name",
                    Combo(Samplers),
                    tip(
                        "The algorithm used when sampling, this can affect the quality, speed, and style of the generated output.",
                    ),
                ),
                input(
                    "scheduler",
                    Combo(Schedulers),
                    tip("The scheduler controls how noise is gradually removed to form the image."),
                ),
                input(
                    "positive",
                    Link("CONDITIONING"),
                    tip(
                        "The conditioning describing the attributes you want to include in the image.",
                    ),
                ),
                input(
                    "negative",
                    Link("CONDITIONING"),
                    tip(
                        "The conditioning describing the attributes you want to exclude from the image.",
                    ),
                ),
                input(
                    "latent_image",
                    Link("LATENT"),
                    tip("The latent image to denoise."),
                ),
                input(
                    "denoise",
                    Float,
                    json!({"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "The amount of denoising applied, lower values will maintain the structure of the initial image allowing for image to image sampling."}),
                ),
            ],
            hidden: vec![],
            outputs: vec!["LATENT"],
            output_tooltips: Some(vec!["The denoised latent."]),
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "CheckpointLoaderSimple",
            display_name: "Load Checkpoint",
            category: "loaders",
            description: "Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
            python_module: "nodes",
            inputs: vec![input(
                "ckpt_name",
                Combo(Folder("checkpoints")),
                tip("The name of the checkpoint (model) to load."),
            )],
            hidden: vec![],
            outputs: vec!["MODEL", "CLIP", "VAE"],
            output_tooltips: Some(vec![
                "The model used for denoising latents.",
                "The CLIP model used for encoding text prompts.",
                "The VAE model used for encoding and decoding images to and from latent space.",
            ]),
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "CLIPTextEncode",
            display_name: "CLIP Text Encode (Prompt)",
            category: "conditioning",
            description: "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model towards generating specific images.",
            python_module: "nodes",
            inputs: vec![
                input(
                    "text",
                    String,
                    json!({"multiline": true, "dynamicPrompts": true, "tooltip": "The text to be encoded."}),
                ),
                input(
                    "clip",
                    Link("CLIP"),
                    tip("The CLIP model used for encoding the text."),
                ),
            ],
            hidden: vec![],
            outputs: vec!["CONDITIONING"],
            output_tooltips: Some(vec![
                "A conditioning containing the embedded text used to guide the diffusion model.",
            ]),
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "VAEDecode",
            display_name: "VAE Decode",
            category: "latent",
            description: "Decodes latent images back into pixel space images.",
            python_module: "nodes",
            inputs: vec![
                input("samples", Link("LATENT"), tip("The latent to be decoded.")),
                input(
                    "vae",
                    Link("VAE"),
                    tip("The VAE model used for decoding the latent."),
                ),
            ],
            hidden: vec![],
            outputs: vec!["IMAGE"],
            output_tooltips: Some(vec!["The decoded image."]),
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "EmptyLatentImage",
            display_name: "Empty Latent Image",
            category: "latent",
            description: "Create a new batch of empty latent images to be denoised via sampling.",
            python_module: "nodes",
            inputs: vec![
                input(
                    "width",
                    Int,
                    json!({"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8, "tooltip": "The width of the latent images in pixels."}),
                ),
                input(
                    "height",
                    Int,
                    json!({"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8, "tooltip": "The height of the latent images in pixels."}),
                ),
                input(
                    "batch_size",
                    Int,
                    json!({"default": 1, "min": 1, "max": 4096, "tooltip": "The number of latent images in the batch."}),
                ),
            ],
            hidden: vec![],
            outputs: vec!["LATENT"],
            output_tooltips: Some(vec!["The empty latent image batch."]),
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "SaveImage",
            display_name: "Save Image",
            category: "image",
            description: "Saves the input images to your ComfyUI output directory.",
            python_module: "nodes",
            inputs: vec![
                input("images", Link("IMAGE"), tip("The images to save.")),
                input(
                    "filename_prefix",
                    String,
                    json!({"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}),
                ),
            ],
            hidden: vec![("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO")],
            outputs: vec![],
            output_tooltips: None,
            output_node: true,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "PreviewImage",
            display_name: "Preview Image",
            category: "image",
            description: "Saves the input images to your ComfyUI output directory.",
            python_module: "nodes",
            inputs: vec![bare("images", Link("IMAGE"))],
            hidden: vec![("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO")],
            outputs: vec![],
            output_tooltips: None,
            output_node: true,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "LoadImage",
            display_name: "Load Image",
            category: "image",
            description: "",
            python_module: "nodes",
            inputs: vec![input(
                "image",
                Combo(InputImages),
                json!({"image_upload": true}),
            )],
            hidden: vec![],
            outputs: vec!["IMAGE", "MASK"],
            output_tooltips: None,
            output_node: false,
            v3: false,
            custom_validated: &["image"],
        },
        NodeDef {
            class: "ImageInvert",
            display_name: "Invert Image",
            category: "image",
            description: "",
            python_module: "nodes",
            inputs: vec![bare("image", Link("IMAGE"))],
            hidden: vec![],
            outputs: vec!["IMAGE"],
            output_tooltips: None,
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "EmptyImage",
            display_name: "EmptyImage",
            category: "image",
            description: "",
            python_module: "nodes",
            inputs: vec![
                input(
                    "width",
                    Int,
                    json!({"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                ),
                input(
                    "height",
                    Int,
                    json!({"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                ),
                input(
                    "batch_size",
                    Int,
                    json!({"default": 1, "min": 1, "max": 4096}),
                ),
                input(
                    "color",
                    Int,
                    json!({"default": 0, "min": 0, "max": 0xFF_FFFF, "step": 1, "display": "color"}),
                ),
            ],
            hidden: vec![],
            outputs: vec!["IMAGE"],
            output_tooltips: None,
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "LoraLoader",
            display_name: "Load LoRA",
            category: "loaders",
            description: "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised such as applying styles. Multiple LoRA nodes can be linked together.",
            python_module: "nodes",
            inputs: vec![
                input(
                    "model",
                    Link("MODEL"),
                    tip("The diffusion model the LoRA will be applied to."),
                ),
                input(
                    "clip",
                    Link("CLIP"),
                    tip("The CLIP model the LoRA will be applied to."),
                ),
                input(
                    "lora_name",
                    Combo(Folder("loras")),
                    tip("The name of the LoRA."),
                ),
                input(
                    "strength_model",
                    Float,
                    json!({"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "How strongly to modify the diffusion model. This value can be negative."}),
                ),
                input(
                    "strength_clip",
                    Float,
                    json!({"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "How strongly to modify the CLIP model. This value can be negative."}),
                ),
            ],
            hidden: vec![],
            outputs: vec!["MODEL", "CLIP"],
            output_tooltips: Some(vec![
                "The modified diffusion model.",
                "The modified CLIP model.",
            ]),
            output_node: false,
            v3: false,
            custom_validated: &[],
        },
        NodeDef {
            class: "ImageBlur",
            display_name: "ImageBlur",
            category: "image/postprocessing",
            description: "",
            python_module: "comfy_extras.nodes_post_processing",
            inputs: vec![
                bare("image", Link("IMAGE")),
                input(
                    "blur_radius",
                    Int,
                    json!({"default": 1, "min": 1, "max": 31, "step": 1}),
                ),
                input(
                    "sigma",
                    Float,
                    json!({"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
                ),
            ],
            hidden: vec![],
            outputs: vec!["IMAGE"],
            output_tooltips: None,
            output_node: false,
            v3: true,
            custom_validated: &[],
        },
    ]
}

/// What a combo input offers on this instance.
pub fn combo_options(
    source: ComboSource,
    config: &SimConfig,
    input_images: &[String],
) -> Vec<String> {
    match source {
        ComboSource::Samplers => SAMPLERS.iter().map(|s| s.to_string()).collect(),
        ComboSource::Schedulers => SCHEDULERS.iter().map(|s| s.to_string()).collect(),
        ComboSource::Folder(folder) => config.files(folder),
        ComboSource::InputImages => input_images.to_vec(),
    }
}

/// The `/object_info` entry of one class.
pub fn object_info(def: &NodeDef, config: &SimConfig, input_images: &[String]) -> Value {
    let spec = |i: &InputDef| -> Value {
        let ty = match i.ty {
            InputType::Combo(src) => json!(combo_options(src, config, input_images)),
            other => json!(other.name()),
        };
        match (&i.options, def.v3) {
            (Some(opts), _) => json!([ty, opts]),
            (None, true) => json!([ty, {}]),
            (None, false) => json!([ty]),
        }
    };
    let mut required = Map::new();
    let mut optional = Map::new();
    for i in &def.inputs {
        let target = if i.required {
            &mut required
        } else {
            &mut optional
        };
        target.insert(i.name.to_string(), spec(i));
    }
    let mut input = Map::new();
    input.insert("required".into(), Value::Object(required.clone()));
    if !optional.is_empty() {
        input.insert("optional".into(), Value::Object(optional.clone()));
    }
    let mut order = Map::new();
    order.insert(
        "required".into(),
        json!(required.keys().collect::<Vec<_>>()),
    );
    if !optional.is_empty() {
        order.insert(
            "optional".into(),
            json!(optional.keys().collect::<Vec<_>>()),
        );
    }
    if !def.hidden.is_empty() {
        let hidden: Map<String, Value> = def
            .hidden
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        order.insert("hidden".into(), json!(hidden.keys().collect::<Vec<_>>()));
        input.insert("hidden".into(), Value::Object(hidden));
    }
    if def.v3 {
        // V3 schema nodes (`GET_NODE_INFO_V1`): nulls instead of omissions, in their key order.
        return json!({
            "input": input,
            "input_order": order,
            "output": def.outputs,
            "output_is_list": vec![false; def.outputs.len()],
            "output_name": def.outputs,
            "output_tooltips": vec![Value::Null; def.outputs.len()],
            "output_matchtypes": null,
            "name": def.class,
            "display_name": v3_display_name(def),
            "description": def.description,
            "python_module": def.python_module,
            "category": def.category,
            "output_node": def.output_node,
            "deprecated": false,
            "experimental": false,
            "api_node": false,
        });
    }
    let mut info = json!({
        "input": input,
        "input_order": order,
        "output": def.outputs,
        "output_is_list": vec![false; def.outputs.len()],
        "output_name": def.outputs,
        "name": def.class,
        "display_name": def.display_name,
        "description": def.description,
        "python_module": def.python_module,
        "category": def.category,
        "output_node": def.output_node,
    });
    if let Some(tips) = &def.output_tooltips {
        info["output_tooltips"] = json!(tips);
    }
    info
}

/// A V3 schema's display name: null when the schema sets none (the sim's table then repeats
/// the class name).
fn v3_display_name(def: &NodeDef) -> Value {
    if def.display_name == def.class {
        Value::Null
    } else {
        json!(def.display_name)
    }
}

/// Looks up a class by name.
pub fn find<'a>(defs: &'a [NodeDef], class: &str) -> Option<&'a NodeDef> {
    defs.iter().find(|d| d.class == class)
}
