//! Reading and writing the Hugging Face / VILA config.json files of a model
//! directory (docs/DESIGN.md section 3).
//!
//! A model directory holds four config files:
//! - `config.json`: VILA's top level (`s2_scales`, `s2_max_split_size`,
//!   `mm_vision_select_layer`, `mm_projector_type`, ...);
//! - `vision_tower/config.json`: a `SiglipVisionConfig` (or a full
//!   `SiglipConfig` with a nested `vision_config`);
//! - `llm/config.json`: a `LlamaConfig` (transformers 4 `rope_theta` /
//!   `rope_scaling` or transformers 5 `rope_parameters`);
//! - `mm_projector/config.json` (optional on read).
//!
//! Every error names the file and the key.

use crate::fs::write_atomic;
use crate::model::{ConfigError, LlmConfig, ModelConfig, ProjectorConfig, S2Config, VisionConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The projector's LayerNorm eps when `mm_projector/config.json` does not say
/// (VILA's `mlp_downsample` uses `nn.LayerNorm`'s default).
pub const PROJECTOR_LAYER_NORM_EPS: f32 = 1e-5;

pub const TOP_CONFIG: &str = "config.json";
pub const VISION_CONFIG: &str = "vision_tower/config.json";
pub const PROJECTOR_CONFIG: &str = "mm_projector/config.json";
pub const LLM_CONFIG: &str = "llm/config.json";

/// One JSON object of a config file, with the file path and a key prefix
/// (`vision_config.` for a nested SigLIP vision config) for error messages.
struct Section<'a> {
    path: &'a str,
    prefix: &'a str,
    map: &'a Map<String, Value>,
    /// Defaults for keys that are normally required (nested SigLIP configs
    /// are saved as a diff against `SiglipVisionConfig()`).
    hf_defaults: bool,
}

impl<'a> Section<'a> {
    fn err(&self, key: &str, problem: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: `{}{}` {}", self.path, self.prefix, key, problem)
    }

    /// A key's value; JSON null counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> anyhow::Error {
        anyhow!("{}: key `{}{}` is missing", self.path, self.prefix, key)
    }

    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("must be a non-negative integer, found {v}")))
    }

    fn req_usize(&self, key: &str, hf_default: usize) -> Result<usize> {
        match self.get(key) {
            Some(v) => self.usize_of(key, v),
            None if self.hf_defaults => Ok(hf_default),
            None => Err(self.missing(key)),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_of(key, v)).transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(key, format!("must be a number, found {v}"))),
            },
        }
    }

    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| self.err(key, format!("must be an integer, found {v}"))))
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.err(key, format!("must be a string, found {v}"))))
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.err(key, format!("must be true or false, found {v}"))))
            .transpose()
    }

    fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        self.get(key)
            .map(|v| v.as_object().ok_or_else(|| self.err(key, format!("must be an object, found {v}"))))
            .transpose()
    }
}

/// Reads one JSON object file; `None` when the file does not exist.
fn read_json(dir: &Path, rel: &str) -> Result<Option<(String, Map<String, Value>)>> {
    let path = dir.join(rel);
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("{shown}: cannot read: {e}")),
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{shown}: not valid JSON: {e}"))?;
    match value {
        Value::Object(map) => Ok(Some((shown, map))),
        other => bail!("{shown}: expected a JSON object, found {}", json_kind(&other)),
    }
}

fn read_required_json(dir: &Path, rel: &str) -> Result<(String, Map<String, Value>)> {
    read_json(dir, rel)?.ok_or_else(|| anyhow!("model directory {} has no {rel}", dir.display()))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn to_f32(sec: &Section, key: &str, x: f64) -> Result<f32> {
    let y = x as f32;
    if !y.is_finite() {
        return Err(sec.err(key, format!("{x} does not fit in f32")));
    }
    Ok(y)
}

fn to_i32(sec: &Section, key: &str, x: i64) -> Result<i32> {
    i32::try_from(x).map_err(|_| sec.err(key, format!("{x} is out of range")))
}

/// VILA writes `s2_scales` as a comma-separated string ("384,768,1152");
/// a JSON list (or a single integer) is accepted too.
fn parse_s2_scales(sec: &Section, v: &Value) -> Result<Vec<usize>> {
    const KEY: &str = "s2_scales";
    match v {
        Value::String(s) => s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| sec.err(KEY, format!("{v} is not a comma-separated list of image sizes"))),
        Value::Array(items) => items.iter().map(|x| sec.usize_of(KEY, x)).collect(),
        Value::Number(_) => Ok(vec![sec.usize_of(KEY, v)?]),
        other => Err(sec.err(KEY, format!("must be a string like \"384,768\" or a list, found {other}"))),
    }
}

/// Maps a `ConfigError` of `validate()` to the file and key it came from.
fn locate_config_error(dir: &Path, e: &ConfigError) -> anyhow::Error {
    let (rel, key) = if let Some(k) = e.key.strip_prefix("vision_tower.") {
        (VISION_CONFIG, k)
    } else if let Some(k) = e.key.strip_prefix("llm.") {
        (LLM_CONFIG, k)
    } else if let Some(k) = e.key.strip_prefix("mm_projector.") {
        (PROJECTOR_CONFIG, k)
    } else {
        (TOP_CONFIG, e.key.as_str())
    };
    anyhow!("{}: `{key}`: {}", dir.join(rel).display(), e.problem)
}

/// Reads the model config of a VILA-layout model directory and validates it.
pub fn read_model_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist or is not a directory", dir.display());
    }
    let (top_path, top_map) = read_required_json(dir, TOP_CONFIG)?;
    let (vis_path, vis_map) = read_required_json(dir, VISION_CONFIG)?;
    let (llm_path, llm_map) = read_required_json(dir, LLM_CONFIG)?;
    let proj = read_json(dir, PROJECTOR_CONFIG)?;

    let top = Section { path: &top_path, prefix: "", map: &top_map, hf_defaults: false };
    let vision = read_vision(&vis_path, &vis_map)?;
    let llm = read_llm(&Section { path: &llm_path, prefix: "", map: &llm_map, hf_defaults: false })?;

    // Projector: type (top level or its own config) and LayerNorm eps.
    let mut layer_norm_eps = PROJECTOR_LAYER_NORM_EPS;
    let mut projector_type_seen = false;
    if let Some((p_path, p_map)) = &proj {
        let sec = Section { path: p_path, prefix: "", map: p_map, hf_defaults: false };
        if let Some(t) = sec.opt_str("mm_projector_type")? {
            check_projector_type(&sec, t)?;
            projector_type_seen = true;
        }
        if let Some(x) = sec.opt_f64("layer_norm_eps")? {
            layer_norm_eps = to_f32(&sec, "layer_norm_eps", x)?;
        }
    }
    match top.opt_str("mm_projector_type")? {
        Some(t) => check_projector_type(&top, t)?,
        None if !projector_type_seen => return Err(top.missing("mm_projector_type")),
        None => {}
    }

    if let Some(f) = top.opt_str("mm_vision_select_feature")? {
        if f != "cls_patch" && f != "patch" {
            return Err(top.err(
                "mm_vision_select_feature",
                format!("{f:?} is not supported (expected \"cls_patch\" or \"patch\")"),
            ));
        }
    }
    if top.opt_bool("s2")? == Some(false) {
        return Err(top.err("s2", "is false; Tessera trains S2 models only"));
    }
    if let Some(i) = top.opt_i64("s2_resize_output_to_scale_idx")? {
        if i != 0 {
            return Err(top.err(
                "s2_resize_output_to_scale_idx",
                format!("{i} is not supported (only 0: outputs are resized to the first scale)"),
            ));
        }
    }
    let scales = match top.get("s2_scales") {
        Some(v) => parse_s2_scales(&top, v)?,
        None => return Err(top.missing("s2_scales")),
    };
    let max_split_size = top.req_usize("s2_max_split_size", 0)?;
    let select_layer = match top.opt_i64("mm_vision_select_layer")? {
        Some(x) => to_i32(&top, "mm_vision_select_layer", x)?,
        None => -2,
    };

    let cfg = ModelConfig {
        vision: VisionConfig { select_layer, ..vision },
        s2: S2Config { scales, max_split_size },
        projector: ProjectorConfig { layer_norm_eps },
        llm,
    };
    cfg.validate().map_err(|e| locate_config_error(dir, &e))?;

    // Derived sizes VILA also records at the top level must agree.
    if let Some(h) = top.opt_usize("hidden_size")? {
        if h != cfg.llm.hidden_size {
            return Err(
                top.err("hidden_size", format!("{h} differs from {LLM_CONFIG} hidden_size {}", cfg.llm.hidden_size))
            );
        }
    }
    if let Some(m) = top.opt_usize("mm_hidden_size")? {
        if m != cfg.mm_hidden() {
            return Err(top.err(
                "mm_hidden_size",
                format!(
                    "{m} differs from the vision hidden_size {} x {} S2 scales = {}",
                    cfg.vision.hidden_size,
                    cfg.s2.scales.len(),
                    cfg.mm_hidden()
                ),
            ));
        }
    }
    Ok(cfg)
}

fn check_projector_type(sec: &Section, t: &str) -> Result<()> {
    if t != "mlp_downsample" {
        return Err(sec.err("mm_projector_type", format!("{t:?} is not supported (only \"mlp_downsample\")")));
    }
    Ok(())
}

/// Reads a SiglipVisionConfig (or the `vision_config` of a SiglipConfig).
/// `select_layer` is left at -2; the caller sets it from the top config.
fn read_vision(path: &str, map: &Map<String, Value>) -> Result<VisionConfig> {
    let outer = Section { path, prefix: "", map, hf_defaults: false };
    let nested = outer.opt_object("vision_config")?;
    let sec = match nested {
        // transformers saves nested configs as a diff against the class
        // defaults, so missing keys take SiglipVisionConfig's defaults.
        Some(m) => Section { path, prefix: "vision_config.", map: m, hf_defaults: true },
        None => outer,
    };
    if let Some(t) = sec.opt_str("model_type")? {
        if t != "siglip_vision_model" && t != "siglip" {
            return Err(
                sec.err("model_type", format!("{t:?} is not a SigLIP vision model (expected \"siglip_vision_model\")"))
            );
        }
    }
    if let Some(act) = sec.opt_str("hidden_act")? {
        if act != "gelu_pytorch_tanh" {
            return Err(sec.err("hidden_act", format!("{act:?} is not supported (only \"gelu_pytorch_tanh\")")));
        }
    }
    let layer_norm_eps = match sec.opt_f64("layer_norm_eps")? {
        Some(x) => to_f32(&sec, "layer_norm_eps", x)?,
        None => 1e-6,
    };
    Ok(VisionConfig {
        hidden_size: sec.req_usize("hidden_size", 768)?,
        intermediate_size: sec.req_usize("intermediate_size", 3072)?,
        num_hidden_layers: sec.req_usize("num_hidden_layers", 12)?,
        num_attention_heads: sec.req_usize("num_attention_heads", 12)?,
        num_channels: sec.opt_usize("num_channels")?.unwrap_or(3),
        image_size: sec.req_usize("image_size", 224)?,
        patch_size: sec.req_usize("patch_size", 16)?,
        layer_norm_eps,
        select_layer: -2,
    })
}

/// Refuses a RoPE scaling dict unless its type is "default".
fn check_rope_type(sec: &Section, key: &str, m: &Map<String, Value>) -> Result<()> {
    let ty = m.get("rope_type").or_else(|| m.get("type")).filter(|v| !v.is_null());
    match ty {
        None => Ok(()),
        Some(Value::String(s)) if s == "default" => Ok(()),
        Some(v) => Err(sec.err(key, format!("has rope type {v}; only the default (unscaled) RoPE is supported"))),
    }
}

fn read_llm(sec: &Section) -> Result<LlmConfig> {
    if let Some(t) = sec.opt_str("model_type")? {
        if t != "llama" {
            return Err(sec.err("model_type", format!("{t:?} is not supported (expected \"llama\")")));
        }
    }
    if let Some(act) = sec.opt_str("hidden_act")? {
        if act != "silu" {
            return Err(sec.err("hidden_act", format!("{act:?} is not supported (only \"silu\")")));
        }
    }
    for key in ["attention_bias", "mlp_bias"] {
        if sec.opt_bool(key)? == Some(true) {
            return Err(sec.err(key, "is true; LLaMA projections with biases are not supported"));
        }
    }
    if sec.opt_bool("tie_word_embeddings")? == Some(true) {
        return Err(sec.err("tie_word_embeddings", "is true; tied input/output embeddings are not supported"));
    }

    // RoPE: transformers 4 `rope_theta` + `rope_scaling`, transformers 5
    // `rope_parameters: {rope_theta, rope_type}`.
    if let Some(m) = sec.opt_object("rope_scaling")? {
        check_rope_type(sec, "rope_scaling", m)?;
    }
    let legacy_theta = sec.opt_f64("rope_theta")?;
    let mut theta = legacy_theta;
    if let Some(m) = sec.opt_object("rope_parameters")? {
        check_rope_type(sec, "rope_parameters", m)?;
        let sub = Section { path: sec.path, prefix: "rope_parameters.", map: m, hf_defaults: false };
        if let Some(t) = sub.opt_f64("rope_theta")? {
            if let Some(l) = legacy_theta {
                if l != t {
                    return Err(sub.err("rope_theta", format!("{t} differs from the top-level rope_theta {l}")));
                }
            }
            theta = Some(t);
        }
    }
    let rope_theta = to_f32(sec, "rope_theta", theta.unwrap_or(10000.0))?;

    let hidden_size = sec.req_usize("hidden_size", 0)?;
    let num_attention_heads = sec.req_usize("num_attention_heads", 0)?;
    if let Some(hd) = sec.opt_usize("head_dim")? {
        if num_attention_heads == 0 || hd * num_attention_heads != hidden_size {
            return Err(sec.err(
                "head_dim",
                format!("{hd} is not hidden_size {hidden_size} / num_attention_heads {num_attention_heads}"),
            ));
        }
    }
    let rms_norm_eps = match sec.opt_f64("rms_norm_eps")? {
        Some(x) => to_f32(sec, "rms_norm_eps", x)?,
        None => 1e-6,
    };
    Ok(LlmConfig {
        hidden_size,
        intermediate_size: sec.req_usize("intermediate_size", 0)?,
        num_hidden_layers: sec.req_usize("num_hidden_layers", 0)?,
        num_attention_heads,
        num_key_value_heads: sec.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads),
        vocab_size: sec.req_usize("vocab_size", 0)?,
        rms_norm_eps,
        rope_theta,
        max_position_embeddings: sec.opt_usize("max_position_embeddings")?.unwrap_or(4096),
    })
}

/// An f32 as the JSON number with its shortest decimal form (1e-5, not
/// 9.999999747378752e-6), which reads back as the same f32.
fn f32_json(x: f32) -> Value {
    let shortest: f64 = x.to_string().parse().unwrap_or(x as f64);
    json!(shortest)
}

fn write_json(dir: &Path, rel: &str, value: &Value) -> Result<()> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())
}

/// The top-level `config.json` of a model directory as a JSON object.
pub fn read_top_config(dir: &Path) -> Result<(String, Map<String, Value>)> {
    read_required_json(dir, TOP_CONFIG)
}

/// Rewrites the top-level `config.json` of a model directory with `edit`
/// applied (for settings that live outside `ModelConfig`, such as how images
/// are prepared).
pub fn update_top_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) -> Result<()> {
    let (_, mut top) = read_top_config(dir)?;
    edit(&mut top);
    write_json(dir, TOP_CONFIG, &Value::Object(top))
}

/// Writes the four config.json files of a model directory (creating the
/// folders) so that VILA and Hugging Face transformers can load them.
pub fn write_model_config(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    cfg.validate().map_err(|e| anyhow!("refusing to write the config to {}: {e}", dir.display()))?;
    let v = &cfg.vision;
    let l = &cfg.llm;
    let scales: Vec<String> = cfg.s2.scales.iter().map(|s| s.to_string()).collect();

    let vision = json!({
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "layer_norm_eps": f32_json(v.layer_norm_eps),
        "hidden_act": "gelu_pytorch_tanh",
        "attention_dropout": 0.0,
        // No attention-pooling head: VILA does not use it and it is not saved.
        "vision_use_head": false,
        "torch_dtype": "float32",
    });
    let llm = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": l.hidden_size,
        "intermediate_size": l.intermediate_size,
        "num_hidden_layers": l.num_hidden_layers,
        "num_attention_heads": l.num_attention_heads,
        "num_key_value_heads": l.num_key_value_heads,
        "head_dim": l.head_dim(),
        "vocab_size": l.vocab_size,
        "rms_norm_eps": f32_json(l.rms_norm_eps),
        "rope_theta": f32_json(l.rope_theta),
        "max_position_embeddings": l.max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    });
    let mut projector = json!({
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": "mlp_downsample",
    });
    if cfg.projector.layer_norm_eps != PROJECTOR_LAYER_NORM_EPS {
        projector["layer_norm_eps"] = f32_json(cfg.projector.layer_norm_eps);
    }
    let top = json!({
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "s2": true,
        "s2_scales": scales.join(","),
        "s2_max_split_size": cfg.s2.max_split_size,
        "s2_resize_output_to_scale_idx": 0,
        "mm_vision_select_layer": v.select_layer,
        "mm_vision_select_feature": "cls_patch",
        "mm_projector_type": "mlp_downsample",
        "image_aspect_ratio": "resize",
        "hidden_size": l.hidden_size,
        "mm_hidden_size": cfg.mm_hidden(),
    });

    write_json(dir, VISION_CONFIG, &vision)?;
    write_json(dir, LLM_CONFIG, &llm)?;
    write_json(dir, PROJECTOR_CONFIG, &projector)?;
    write_json(dir, TOP_CONFIG, &top)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, v: &Value) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    }

    fn read(dir: &Path, rel: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(rel)).unwrap()).unwrap()
    }

    /// Writes the tiny config, lets `edit` change one file, and reads it back.
    fn read_edited(rel: &str, edit: impl FnOnce(&mut Value)) -> Result<ModelConfig> {
        let d = tempfile::tempdir().unwrap();
        write_model_config(d.path(), &ModelConfig::tiny()).unwrap();
        let mut v = read(d.path(), rel);
        edit(&mut v);
        write(d.path(), rel, &v);
        read_model_config(d.path())
    }

    fn err_of(r: Result<ModelConfig>) -> String {
        format!("{:#}", r.expect_err("expected an error"))
    }

    #[test]
    fn presets_round_trip() {
        for name in ["tiny", "small", "vila-3b-s2"] {
            let cfg = ModelConfig::preset(name).unwrap();
            let d = tempfile::tempdir().unwrap();
            write_model_config(d.path(), &cfg).unwrap();
            assert_eq!(read_model_config(d.path()).unwrap(), cfg, "{name}");
            for rel in [TOP_CONFIG, VISION_CONFIG, LLM_CONFIG, PROJECTOR_CONFIG] {
                assert!(d.path().join(rel).is_file(), "{rel}");
            }
            let top = read(d.path(), TOP_CONFIG);
            assert_eq!(top["mm_hidden_size"], json!(cfg.mm_hidden()));
            assert!(top["s2_scales"].is_string());
        }
        let d = tempfile::tempdir().unwrap();
        write_model_config(d.path(), &ModelConfig::vila_3b_s2()).unwrap();
        assert_eq!(read(d.path(), TOP_CONFIG)["s2_scales"], json!("384,768"));
        assert_eq!(read(d.path(), LLM_CONFIG)["rms_norm_eps"], json!(1e-5));
        assert_eq!(read(d.path(), VISION_CONFIG)["layer_norm_eps"], json!(1e-6));
    }

    #[test]
    fn non_default_values_round_trip() {
        let mut cfg = ModelConfig::tiny();
        cfg.projector.layer_norm_eps = 1e-6;
        cfg.vision.select_layer = 2;
        cfg.llm.rope_theta = 500000.0;
        cfg.llm.rms_norm_eps = 3.3e-7;
        let d = tempfile::tempdir().unwrap();
        write_model_config(d.path(), &cfg).unwrap();
        assert_eq!(read_model_config(d.path()).unwrap(), cfg);
    }

    #[test]
    fn s2_scales_as_string_or_list() {
        let tiny = ModelConfig::tiny();
        let c = read_edited(TOP_CONFIG, |v| v["s2_scales"] = json!(" 20, 40 ")).unwrap();
        assert_eq!(c, tiny);
        let c = read_edited(TOP_CONFIG, |v| v["s2_scales"] = json!([20, 40])).unwrap();
        assert_eq!(c, tiny);
        let e = err_of(read_edited(TOP_CONFIG, |v| v["s2_scales"] = json!("20,forty")));
        assert!(e.contains("config.json") && e.contains("`s2_scales`"), "{e}");
        let e = err_of(read_edited(TOP_CONFIG, |v| v["s2_scales"] = json!([20, 30])));
        assert!(e.contains("config.json: `s2_scales`") && e.contains("not a multiple"), "{e}");
    }

    #[test]
    fn transformers5_rope_parameters_and_defaults() {
        let c = read_edited(LLM_CONFIG, |v| {
            let m = v.as_object_mut().unwrap();
            m.remove("rope_theta");
            m.remove("rope_scaling");
            m.insert("rope_parameters".into(), json!({"rope_theta": 500000.0, "rope_type": "default"}));
        })
        .unwrap();
        assert_eq!(c.llm.rope_theta, 500000.0);
        // Defaults: rope_theta 10000, num_key_value_heads = heads,
        // max_position_embeddings 4096, rms_norm_eps 1e-6.
        let c = read_edited(LLM_CONFIG, |v| {
            let m = v.as_object_mut().unwrap();
            for k in ["rope_theta", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "head_dim"] {
                m.remove(k);
            }
        })
        .unwrap();
        assert_eq!(c.llm.rope_theta, 10000.0);
        assert_eq!(c.llm.num_key_value_heads, 4);
        assert_eq!(c.llm.max_position_embeddings, 4096);
        assert_eq!(c.llm.rms_norm_eps, 1e-6);
        // Vision defaults and top-level defaults.
        let c = read_edited(VISION_CONFIG, |v| {
            let m = v.as_object_mut().unwrap();
            m.remove("num_channels");
            m.remove("layer_norm_eps");
            m.remove("hidden_act");
        })
        .unwrap();
        assert_eq!(c, ModelConfig::tiny());
        let c = read_edited(TOP_CONFIG, |v| {
            let m = v.as_object_mut().unwrap();
            m.remove("mm_vision_select_layer");
            m.remove("mm_vision_select_feature");
        })
        .unwrap();
        assert_eq!(c.vision.select_layer, -2);
    }

    #[test]
    fn rope_scaling_and_unsupported_llm_features_are_refused() {
        let e = err_of(read_edited(LLM_CONFIG, |v| {
            v["rope_parameters"] = json!({"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0})
        }));
        assert!(e.contains("llm/config.json: `rope_parameters`") && e.contains("llama3"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["rope_scaling"] = json!({"type": "linear", "factor": 2.0})));
        assert!(e.contains("llm/config.json: `rope_scaling`") && e.contains("linear"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["rope_parameters"] = json!({"rope_theta": 20000.0})));
        assert!(e.contains("`rope_parameters.rope_theta` 20000 differs"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["hidden_act"] = json!("gelu")));
        assert!(e.contains("llm/config.json: `hidden_act` \"gelu\" is not supported"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["attention_bias"] = json!(true)));
        assert!(e.contains("llm/config.json: `attention_bias` is true"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["mlp_bias"] = json!(true)));
        assert!(e.contains("llm/config.json: `mlp_bias` is true"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["tie_word_embeddings"] = json!(true)));
        assert!(e.contains("`tie_word_embeddings`"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["head_dim"] = json!(32)));
        assert!(e.contains("llm/config.json: `head_dim` 32"), "{e}");
        let e = err_of(read_edited(VISION_CONFIG, |v| v["hidden_act"] = json!("gelu")));
        assert!(e.contains("vision_tower/config.json: `hidden_act`"), "{e}");
        let e = err_of(read_edited(VISION_CONFIG, |v| v["model_type"] = json!("clip_vision_model")));
        assert!(e.contains("vision_tower/config.json: `model_type`"), "{e}");
    }

    #[test]
    fn missing_keys_and_files_are_named() {
        let e = err_of(read_edited(LLM_CONFIG, |v| {
            v.as_object_mut().unwrap().remove("hidden_size");
        }));
        assert!(e.contains("llm/config.json: key `hidden_size` is missing"), "{e}");
        let e = err_of(read_edited(VISION_CONFIG, |v| {
            v.as_object_mut().unwrap().remove("patch_size");
        }));
        assert!(e.contains("vision_tower/config.json: key `patch_size` is missing"), "{e}");
        let e = err_of(read_edited(TOP_CONFIG, |v| {
            v.as_object_mut().unwrap().remove("s2_max_split_size");
        }));
        assert!(e.contains("config.json: key `s2_max_split_size` is missing"), "{e}");
        let e = err_of(read_edited(LLM_CONFIG, |v| v["hidden_size"] = json!("64")));
        assert!(e.contains("llm/config.json: `hidden_size` must be a non-negative integer"), "{e}");

        for rel in [TOP_CONFIG, VISION_CONFIG, LLM_CONFIG] {
            let d = tempfile::tempdir().unwrap();
            write_model_config(d.path(), &ModelConfig::tiny()).unwrap();
            std::fs::remove_file(d.path().join(rel)).unwrap();
            let e = err_of(read_model_config(d.path()));
            assert_eq!(e, format!("model directory {} has no {rel}", d.path().display()));
        }
        // mm_projector/config.json is optional.
        let d = tempfile::tempdir().unwrap();
        write_model_config(d.path(), &ModelConfig::tiny()).unwrap();
        std::fs::remove_file(d.path().join(PROJECTOR_CONFIG)).unwrap();
        assert_eq!(read_model_config(d.path()).unwrap(), ModelConfig::tiny());

        let d = tempfile::tempdir().unwrap();
        write_model_config(d.path(), &ModelConfig::tiny()).unwrap();
        std::fs::write(d.path().join(LLM_CONFIG), "{ not json").unwrap();
        let e = err_of(read_model_config(d.path()));
        assert!(e.contains("llm/config.json: not valid JSON"), "{e}");
    }

    #[test]
    fn validation_errors_name_file_and_key() {
        let e = err_of(read_edited(LLM_CONFIG, |v| {
            v["num_attention_heads"] = json!(5);
            v.as_object_mut().unwrap().remove("num_key_value_heads");
            v.as_object_mut().unwrap().remove("head_dim");
        }));
        assert!(e.contains("llm/config.json: `num_attention_heads`: 5 heads do not divide hidden_size 64"), "{e}");
        let e = err_of(read_edited(VISION_CONFIG, |v| v["num_attention_heads"] = json!(3)));
        assert!(e.contains("vision_tower/config.json: `num_attention_heads`: 3 heads"), "{e}");
        let e = err_of(read_edited(TOP_CONFIG, |v| v["mm_vision_select_layer"] = json!(-9)));
        assert!(e.contains("config.json: `mm_vision_select_layer`: -9"), "{e}");
        let e = err_of(read_edited(TOP_CONFIG, |v| v["mm_hidden_size"] = json!(96)));
        assert!(e.contains("config.json: `mm_hidden_size` 96 differs"), "{e}");
    }

    #[test]
    fn projector_and_feature_checks() {
        let e = err_of(read_edited(TOP_CONFIG, |v| v["mm_projector_type"] = json!("mlp2x_gelu")));
        assert!(e.contains("config.json: `mm_projector_type` \"mlp2x_gelu\" is not supported"), "{e}");
        let e = err_of(read_edited(PROJECTOR_CONFIG, |v| v["mm_projector_type"] = json!("linear")));
        assert!(e.contains("mm_projector/config.json: `mm_projector_type` \"linear\""), "{e}");
        let e = err_of(read_edited(TOP_CONFIG, |v| v["mm_vision_select_feature"] = json!("cls")));
        assert!(e.contains("config.json: `mm_vision_select_feature` \"cls\""), "{e}");
        let c = read_edited(TOP_CONFIG, |v| v["mm_vision_select_feature"] = json!("patch")).unwrap();
        assert_eq!(c, ModelConfig::tiny());
        let e = err_of(read_edited(TOP_CONFIG, |v| v["s2"] = json!(false)));
        assert!(e.contains("config.json: `s2` is false"), "{e}");
        let c = read_edited(PROJECTOR_CONFIG, |v| v["layer_norm_eps"] = json!(1e-6)).unwrap();
        assert_eq!(c.projector.layer_norm_eps, 1e-6);
    }

    #[test]
    fn nested_siglip_config_is_accepted() {
        // A full SiglipConfig as google/siglip-so400m-patch14-384 ships it:
        // defaults (num_channels, layer_norm_eps, ...) are left out.
        let c = read_edited(VISION_CONFIG, |v| {
            *v = json!({
                "model_type": "siglip",
                "text_config": {"hidden_size": 1152, "model_type": "siglip_text_model"},
                "vision_config": {
                    "hidden_size": 32, "image_size": 20, "intermediate_size": 64,
                    "model_type": "siglip_vision_model", "num_attention_heads": 4,
                    "num_hidden_layers": 3, "patch_size": 4
                }
            })
        })
        .unwrap();
        assert_eq!(c, ModelConfig::tiny());
        let e = err_of(read_edited(VISION_CONFIG, |v| {
            *v = json!({"vision_config": {"hidden_size": 32, "num_attention_heads": 3}})
        }));
        assert!(e.contains("vision_tower/config.json"), "{e}");
        let e = err_of(read_edited(VISION_CONFIG, |v| *v = json!({"vision_config": {"patch_size": "4"}})));
        assert!(e.contains("vision_tower/config.json: `vision_config.patch_size` must be"), "{e}");
    }

    #[test]
    fn invalid_config_is_not_written() {
        let mut cfg = ModelConfig::tiny();
        cfg.llm.num_attention_heads = 5;
        let d = tempfile::tempdir().unwrap();
        assert!(write_model_config(d.path(), &cfg).is_err());
        assert!(!d.path().join(TOP_CONFIG).exists());
    }

    #[test]
    fn tiny_fixture_config_reads_as_tiny() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/model");
        if !dir.join(TOP_CONFIG).exists() {
            eprintln!("skipping: {} not generated", dir.display());
            return;
        }
        assert_eq!(read_model_config(&dir).unwrap(), ModelConfig::tiny());
    }
}
