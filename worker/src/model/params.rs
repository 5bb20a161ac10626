//! The parameter list of the model: checkpoint names, shapes and modules.
//!
//! Names are the checkpoint names of docs/DESIGN.md section 3 with their folder as
//! prefix (`vision_tower.`, `mm_projector.`, `llm.`), the same names
//! `debug-step` writes gradients under.

use tessera_job::model::ModelConfig;

pub use tessera_job::model::Module;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Full name, folder prefix included.
    pub name: String,
    pub shape: Vec<usize>,
    pub module: Module,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The name inside the module's safetensors file (prefix stripped).
    pub fn file_name(&self) -> &str {
        &self.name[self.module.folder().len() + 1..]
    }
}

fn push(out: &mut Vec<ParamSpec>, module: Module, name: String, shape: &[usize]) {
    out.push(ParamSpec { name: format!("{}.{}", module.folder(), name), shape: shape.to_vec(), module });
}

/// Every parameter of the model, in a fixed canonical order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    let v = &cfg.vision;
    let (d, i) = (v.hidden_size, v.intermediate_size);
    let vt = Module::VisionTower;
    let p = v.patch_size;
    push(&mut out, vt, "vision_model.embeddings.patch_embedding.weight".into(), &[d, v.num_channels, p, p]);
    push(&mut out, vt, "vision_model.embeddings.patch_embedding.bias".into(), &[d]);
    push(&mut out, vt, "vision_model.embeddings.position_embedding.weight".into(), &[v.num_patches(), d]);
    for l in 0..v.num_hidden_layers {
        let pre = format!("vision_model.encoder.layers.{l}");
        for (n, shape) in [
            ("layer_norm1.weight", vec![d]),
            ("layer_norm1.bias", vec![d]),
            ("self_attn.q_proj.weight", vec![d, d]),
            ("self_attn.q_proj.bias", vec![d]),
            ("self_attn.k_proj.weight", vec![d, d]),
            ("self_attn.k_proj.bias", vec![d]),
            ("self_attn.v_proj.weight", vec![d, d]),
            ("self_attn.v_proj.bias", vec![d]),
            ("self_attn.out_proj.weight", vec![d, d]),
            ("self_attn.out_proj.bias", vec![d]),
            ("layer_norm2.weight", vec![d]),
            ("layer_norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![i, d]),
            ("mlp.fc1.bias", vec![i]),
            ("mlp.fc2.weight", vec![d, i]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            push(&mut out, vt, format!("{pre}.{n}"), &shape);
        }
    }
    push(&mut out, vt, "vision_model.post_layernorm.weight".into(), &[d]);
    push(&mut out, vt, "vision_model.post_layernorm.bias".into(), &[d]);

    let pj = Module::Projector;
    let (pin, h) = (cfg.projector_in(), cfg.llm.hidden_size);
    push(&mut out, pj, "layers.1.weight".into(), &[pin]);
    push(&mut out, pj, "layers.1.bias".into(), &[pin]);
    push(&mut out, pj, "layers.2.weight".into(), &[h, pin]);
    push(&mut out, pj, "layers.2.bias".into(), &[h]);
    push(&mut out, pj, "layers.4.weight".into(), &[h, h]);
    push(&mut out, pj, "layers.4.bias".into(), &[h]);

    let l = &cfg.llm;
    let (h, im, kv) = (l.hidden_size, l.intermediate_size, l.num_key_value_heads * l.head_dim());
    let lm = Module::Llm;
    push(&mut out, lm, "model.embed_tokens.weight".into(), &[l.vocab_size, h]);
    for n in 0..l.num_hidden_layers {
        let pre = format!("model.layers.{n}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![im, h]),
            ("mlp.up_proj.weight", vec![im, h]),
            ("mlp.down_proj.weight", vec![h, im]),
        ] {
            push(&mut out, lm, format!("{pre}.{name}"), &shape);
        }
    }
    push(&mut out, lm, "model.norm.weight".into(), &[h]);
    push(&mut out, lm, "lm_head.weight".into(), &[l.vocab_size, h]);
    out
}

/// Whether a vision-tower parameter takes part in the forward pass (layers
/// after the selected hidden state and post_layernorm do not).
pub fn is_used(cfg: &ModelConfig, spec: &ParamSpec) -> bool {
    if spec.module != Module::VisionTower {
        return true;
    }
    if spec.name.contains("post_layernorm") {
        return false;
    }
    match spec.name.strip_prefix("vision_tower.vision_model.encoder.layers.") {
        Some(rest) => {
            let layer: usize = rest.split('.').next().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
            layer < cfg.vision.layers_used()
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vila_3b_s2_parameter_count_is_about_3_billion() {
        let cfg = ModelConfig::vila_3b_s2();
        let specs = param_specs(&cfg);
        let total: usize = specs.iter().map(|s| s.numel()).sum();
        let vit: usize = specs.iter().filter(|s| s.module == Module::VisionTower).map(|s| s.numel()).sum();
        // SigLIP so400m (~0.43B without head) + Sheared-LLaMA 2.7B + projector.
        assert!((400_000_000..440_000_000).contains(&vit), "vit {vit}");
        assert!((3_100_000_000..3_250_000_000).contains(&total), "total {total}");
        let names: std::collections::HashSet<_> = specs.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), specs.len(), "duplicate parameter names");
        assert!(names.contains(&"vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight".to_string()));
        assert!(names.contains(&"llm.lm_head.weight".to_string()));
        let last = specs.iter().find(|s| s.name.contains("layers.26.mlp")).unwrap();
        assert!(!is_used(&cfg, last));
        assert_eq!(specs[0].file_name(), "vision_model.embeddings.patch_embedding.weight");
    }
}
