//! What a sample costs to train on, and what a rank's share of a step costs:
//! the coordinator balances ranks by `tiles * per_tile + tokens * per_token`
//! (forward FLOPs), known without decoding any image.

use crate::model::ModelConfig;

/// What a sample costs to train on, known without decoding its image: the
/// coordinator balances ranks by `tiles * vit_cost + tokens * llm_cost`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleCost {
    /// ViT passes (S2 tiles); 0 for a text-only sample.
    pub tiles: usize,
    /// LLM positions after the image tokens are spliced in.
    pub tokens: usize,
}

/// Forward FLOPs of one ViT tile and one LLM token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    pub per_tile: f64,
    pub per_token: f64,
}

impl CostModel {
    /// Matmul FLOPs (2 per multiply-add) of the layers that run. Attention
    /// scores add 4 x seq x hidden per token and layer; for the LLM the
    /// sequence length is not known per sample, so its attention is left out
    /// (it is small next to the weights at VILA's lengths).
    pub fn of(cfg: &ModelConfig) -> Self {
        let v = &cfg.vision;
        let grid = v.grid() as f64;
        let patches = grid * grid;
        let (h, i) = (v.hidden_size as f64, v.intermediate_size as f64);
        let layers = cfg.vision.layers_used() as f64;
        let vit_layer_per_patch = 2.0 * (4.0 * h * h + 2.0 * h * i) + 4.0 * patches * h;
        let patch_embed = 2.0 * (v.num_channels * v.patch_size * v.patch_size) as f64 * h;
        let per_tile = patches * (layers * vit_layer_per_patch + patch_embed);
        let l = &cfg.llm;
        let (lh, li) = (l.hidden_size as f64, l.intermediate_size as f64);
        let kv = (l.num_key_value_heads * l.head_dim()) as f64;
        let llm_layer = 2.0 * (2.0 * lh * lh + 2.0 * lh * kv + 3.0 * lh * li);
        let per_token = l.num_hidden_layers as f64 * llm_layer + 2.0 * lh * l.vocab_size as f64;
        CostModel { per_tile, per_token }
    }

    pub fn cost(&self, c: SampleCost) -> f64 {
        c.tiles as f64 * self.per_tile + c.tokens as f64 * self.per_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vila_shape_costs_a_tile_like_many_tokens() {
        let m = CostModel::of(&ModelConfig::named_preset("vila-3b-s2").unwrap());
        // A 729-patch tile through a 400M ViT against one token through a
        // 2.7B LLM: a tile costs a few hundred tokens.
        let ratio = m.per_tile / m.per_token;
        assert!((100.0..1000.0).contains(&ratio), "tile/token cost ratio {ratio}");
        let image = m.cost(SampleCost { tiles: 5, tokens: 300 });
        let text = m.cost(SampleCost { tiles: 0, tokens: 300 });
        assert!(image > 3.0 * text);
    }
}
