//! Model shapes: presets, derived sizes and validation.
//!
//! A config comes from a preset (`tiny`, `small`, `vila-3b-s2`) or from the
//! Hugging Face config.json files of a model directory (see [`crate::hf_config`]).
//! Every config passes `validate` before a model is built from it.

use serde::{Deserialize, Serialize};

/// `rows x cols` blocks: the tile grid of one S2 scale (`n x n` for static
/// S2, aspect-ratio-aware at the largest scale of dynamic S2), or the window
/// of an area pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileGrid {
    pub rows: usize,
    pub cols: usize,
}

impl TileGrid {
    pub fn square(n: usize) -> Self {
        TileGrid { rows: n, cols: n }
    }

    pub fn count(&self) -> usize {
        self.rows * self.cols
    }
}

/// The three parts of the model, each a folder of the model directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    VisionTower,
    Projector,
    Llm,
}

impl Module {
    pub const ALL: [Module; 3] = [Module::VisionTower, Module::Projector, Module::Llm];

    /// The model-directory folder (and name prefix) of this module.
    pub fn folder(self) -> &'static str {
        match self {
            Module::VisionTower => "vision_tower",
            Module::Projector => "mm_projector",
            Module::Llm => "llm",
        }
    }
}

/// Which modules receive gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trainable {
    pub vision_tower: bool,
    pub projector: bool,
    pub llm: bool,
}

impl Trainable {
    pub const ALL: Trainable = Trainable { vision_tower: true, projector: true, llm: true };

    pub fn get(&self, m: Module) -> bool {
        match m {
            Module::VisionTower => self.vision_tower,
            Module::Projector => self.projector,
            Module::Llm => self.llm,
        }
    }
}

/// SigLIP vision tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    /// VILA's `mm_vision_select_layer`: an index into `hidden_states`
    /// (embeddings first, then each layer's output); -2 is the output of the
    /// second-to-last layer.
    pub select_layer: i32,
}

/// Scaling on Scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct S2Config {
    /// Ascending image sizes; the first is the ViT's own input size.
    pub scales: Vec<usize>,
    /// Tile size every scale is cut into.
    pub max_split_size: usize,
}

/// `mlp_downsample` projector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    pub layer_norm_eps: f32,
}

/// LLaMA decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlmConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vision: VisionConfig,
    pub s2: S2Config,
    pub projector: ProjectorConfig,
    pub llm: LlmConfig,
}

/// The placeholder token id that marks where an image's tokens go.
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// Label value that takes no part in the loss.
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, thiserror::Error)]
#[error("invalid model config: {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn bad(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), problem: problem.into() }
}

impl VisionConfig {
    /// Patches per side of one tile.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Encoder layers that run: those up to the selected hidden state. Later
    /// layers (and post_layernorm) get no gradient.
    pub fn layers_used(&self) -> usize {
        if self.select_layer < 0 {
            (self.num_hidden_layers as i64 + 1 + self.select_layer as i64) as usize
        } else {
            self.select_layer as usize
        }
    }
}

impl S2Config {
    /// Tiles per side at each scale.
    pub fn splits(&self) -> Vec<usize> {
        self.scales.iter().map(|s| s / self.max_split_size).collect()
    }
    /// ViT passes per image (VILA-3B-S2: 1 + 4 = 5).
    pub fn tiles_per_image(&self) -> usize {
        self.splits().iter().map(|n| n * n).sum()
    }
    pub fn max_scale(&self) -> usize {
        *self.scales.last().unwrap_or(&0)
    }
    /// Dynamic S2: the tile grid of every scale for an image whose largest
    /// scale is cut into `last` (the smaller scales stay `n x n`).
    pub fn dynamic_grids(&self, last: TileGrid) -> Vec<TileGrid> {
        let mut grids: Vec<TileGrid> = self.splits().into_iter().map(TileGrid::square).collect();
        if let Some(g) = grids.last_mut() {
            *g = last;
        }
        grids
    }
    /// Dynamic S2: ViT passes for an image whose largest scale is cut into `last`.
    pub fn dynamic_tiles(&self, last: TileGrid) -> usize {
        self.dynamic_grids(last).iter().map(TileGrid::count).sum()
    }
}

impl LlmConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl ModelConfig {
    /// Channels after the S2 concat (`mm_hidden_size`).
    pub fn mm_hidden(&self) -> usize {
        self.vision.hidden_size * self.s2.scales.len()
    }
    /// Side of the token grid after the 2x2 merge (27 -> 14).
    pub fn merged_side(&self) -> usize {
        self.vision.grid().div_ceil(2)
    }
    /// LLM tokens per image (VILA-3B-S2: 196).
    pub fn image_tokens(&self) -> usize {
        self.merged_side() * self.merged_side()
    }
    /// Decoder positions of a sample of `text_tokens` tokens whose one
    /// image placeholder is spliced into `image_tokens()` tokens.
    pub fn spliced_len(&self, text_tokens: usize) -> usize {
        text_tokens.saturating_sub(1) + self.image_tokens()
    }
    /// The most text tokens a sample with an image may have: spliced, it
    /// must fit the LLM's positions.
    pub fn max_text_tokens(&self) -> usize {
        self.llm.max_position_embeddings.saturating_sub(self.image_tokens() - 1)
    }
    /// Projector input width (4 x mm_hidden).
    pub fn projector_in(&self) -> usize {
        4 * self.mm_hidden()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let v = &self.vision;
        for (key, val) in [
            ("vision_tower.hidden_size", v.hidden_size),
            ("vision_tower.intermediate_size", v.intermediate_size),
            ("vision_tower.num_hidden_layers", v.num_hidden_layers),
            ("vision_tower.num_attention_heads", v.num_attention_heads),
            ("vision_tower.num_channels", v.num_channels),
            ("vision_tower.patch_size", v.patch_size),
            ("vision_tower.image_size", v.image_size),
            ("llm.hidden_size", self.llm.hidden_size),
            ("llm.intermediate_size", self.llm.intermediate_size),
            ("llm.num_hidden_layers", self.llm.num_hidden_layers),
            ("llm.num_attention_heads", self.llm.num_attention_heads),
            ("llm.num_key_value_heads", self.llm.num_key_value_heads),
            ("llm.vocab_size", self.llm.vocab_size),
            ("llm.max_position_embeddings", self.llm.max_position_embeddings),
            ("s2_max_split_size", self.s2.max_split_size),
        ] {
            if val == 0 {
                return Err(bad(key, "must be positive"));
            }
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(bad(
                "vision_tower.num_attention_heads",
                format!("{} heads do not divide hidden_size {}", v.num_attention_heads, v.hidden_size),
            ));
        }
        // Like Conv2d with stride = kernel, pixels past the last whole patch are
        // dropped (SigLIP: 384 px / 14 = 27 patches, 6 px unused).
        if v.patch_size > v.image_size {
            return Err(bad(
                "vision_tower.patch_size",
                format!("patch {} is larger than image_size {}", v.patch_size, v.image_size),
            ));
        }
        let hs = v.num_hidden_layers as i64 + 1;
        if (v.select_layer as i64) >= hs || (v.select_layer as i64) < -hs || self.vision.layers_used() == 0 {
            return Err(bad(
                "mm_vision_select_layer",
                format!("{} selects no encoder layer of {}", v.select_layer, v.num_hidden_layers),
            ));
        }
        let l = &self.llm;
        if !l.hidden_size.is_multiple_of(l.num_attention_heads) {
            return Err(bad(
                "llm.num_attention_heads",
                format!("{} heads do not divide hidden_size {}", l.num_attention_heads, l.hidden_size),
            ));
        }
        if l.num_key_value_heads != l.num_attention_heads {
            return Err(bad(
                "llm.num_key_value_heads",
                format!(
                    "{} differs from num_attention_heads {}; grouped-query attention is not supported",
                    l.num_key_value_heads, l.num_attention_heads
                ),
            ));
        }
        if !l.head_dim().is_multiple_of(2) {
            return Err(bad("llm.num_attention_heads", format!("head_dim {} must be even for RoPE", l.head_dim())));
        }
        let s2 = &self.s2;
        if s2.scales.is_empty() {
            return Err(bad("s2_scales", "needs at least one scale"));
        }
        if s2.max_split_size != v.image_size {
            return Err(bad(
                "s2_max_split_size",
                format!(
                    "{} must equal the vision tower's image_size {} (tiles are ViT inputs)",
                    s2.max_split_size, v.image_size
                ),
            ));
        }
        if s2.scales[0] != v.image_size {
            return Err(bad(
                "s2_scales",
                format!("the first scale {} must be the vision tower's image_size {}", s2.scales[0], v.image_size),
            ));
        }
        for w in s2.scales.windows(2) {
            if w[1] <= w[0] {
                return Err(bad("s2_scales", format!("{:?} must be strictly ascending", s2.scales)));
            }
        }
        for &s in &s2.scales {
            if s % s2.max_split_size != 0 {
                return Err(bad(
                    "s2_scales",
                    format!("scale {s} is not a multiple of s2_max_split_size {}", s2.max_split_size),
                ));
            }
        }
        Ok(())
    }

    /// Tiny shape for tests and the demo: seconds per step on 2 cores. Its 5x5
    /// patch grid is odd on purpose, like the real 27x27, so padding is exercised.
    pub fn tiny() -> Self {
        ModelConfig {
            vision: VisionConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                num_channels: 3,
                image_size: 20,
                patch_size: 4,
                layer_norm_eps: 1e-6,
                select_layer: -2,
            },
            s2: S2Config { scales: vec![20, 40], max_split_size: 20 },
            projector: ProjectorConfig { layer_norm_eps: 1e-5 },
            llm: LlmConfig {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 4,
                vocab_size: 256,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 512,
            },
        }
    }

    /// Benchmark shape: ViT 6 x 256 at 224 px (16 x 16 patches), two S2
    /// scales, LLM 6 x 512.
    pub fn small() -> Self {
        ModelConfig {
            vision: VisionConfig {
                hidden_size: 256,
                intermediate_size: 1024,
                num_hidden_layers: 7,
                num_attention_heads: 4,
                num_channels: 3,
                image_size: 224,
                patch_size: 14,
                layer_norm_eps: 1e-6,
                select_layer: -2,
            },
            s2: S2Config { scales: vec![224, 448], max_split_size: 224 },
            projector: ProjectorConfig { layer_norm_eps: 1e-5 },
            llm: LlmConfig {
                hidden_size: 512,
                intermediate_size: 1376,
                num_hidden_layers: 6,
                num_attention_heads: 8,
                num_key_value_heads: 8,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 4096,
            },
        }
    }

    /// The real VILA-3B-S2 shape (docs/DESIGN.md section 1).
    pub fn vila_3b_s2() -> Self {
        ModelConfig {
            vision: VisionConfig {
                hidden_size: 1152,
                intermediate_size: 4304,
                num_hidden_layers: 27,
                num_attention_heads: 16,
                num_channels: 3,
                image_size: 384,
                patch_size: 14,
                layer_norm_eps: 1e-6,
                select_layer: -2,
            },
            s2: S2Config { scales: vec![384, 768], max_split_size: 384 },
            projector: ProjectorConfig { layer_norm_eps: 1e-5 },
            llm: LlmConfig {
                hidden_size: 2560,
                intermediate_size: 6912,
                num_hidden_layers: 32,
                num_attention_heads: 20,
                num_key_value_heads: 20,
                vocab_size: 32000,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 4096,
            },
        }
    }

    /// A preset by name, or an error that lists the names.
    pub fn named_preset(name: &str) -> anyhow::Result<Self> {
        Self::preset(name).ok_or_else(|| anyhow::anyhow!("unknown preset `{name}`; expected tiny, small or vila-3b-s2"))
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "vila-3b-s2" => Some(Self::vila_3b_s2()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_vila_shape_matches_design() {
        for name in ["tiny", "small", "vila-3b-s2"] {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        let c = ModelConfig::vila_3b_s2();
        assert_eq!(c.vision.grid(), 27);
        assert_eq!(c.vision.layers_used(), 26);
        assert_eq!(c.s2.tiles_per_image(), 5);
        assert_eq!(c.mm_hidden(), 2304);
        assert_eq!(c.projector_in(), 9216);
        assert_eq!(c.image_tokens(), 196);
    }

    #[test]
    fn head_count_that_does_not_divide_hidden_is_refused_by_name() {
        let mut c = ModelConfig::tiny();
        c.llm.num_attention_heads = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("llm.num_attention_heads") && e.contains("do not divide"), "{e}");
        let mut c = ModelConfig::tiny();
        c.vision.num_attention_heads = 3;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("vision_tower.num_attention_heads"), "{e}");
    }

    #[test]
    fn bad_s2_scales_are_refused() {
        let mut c = ModelConfig::tiny();
        c.s2.scales = vec![20, 30];
        assert!(c.validate().unwrap_err().to_string().contains("s2_scales"));
        c.s2.scales = vec![40, 20];
        assert!(c.validate().is_err());
    }
}
