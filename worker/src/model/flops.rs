//! Model FLOPs of one training step, for MFU. One formula serves both
//! sides of the GPU step benchmark (Tessera and PyTorch are timed on the
//! same shape and divided by the same count).
//!
//! Counted: every GEMM (2 m n k) and the two attention products (QK^T and
//! PV), forward once and backward twice (input and weight gradients),
//! except the patch embedding, whose input (pixels) needs no gradient.
//! Attention counts the full `seq x seq` square, causal or not, as the
//! kernels compute it. Norms, activations and the optimizer are not
//! counted (they are memory-bound and small), as is usual for MFU.

use super::ModelConfig;

/// FLOPs of one forward + backward over `batch` samples of `text_tokens`
/// tokens each (one image placeholder per sample), every module trained.
pub fn train_step_flops(cfg: &ModelConfig, batch: usize, text_tokens: usize) -> f64 {
    let gemm = |m: usize, n: usize, k: usize| 2.0 * m as f64 * n as f64 * k as f64;
    let v = &cfg.vision;
    let (h, t) = (v.hidden_size, v.num_patches());
    let tiles = batch * cfg.s2.tiles_per_image();
    let patch_in = v.num_channels * v.patch_size * v.patch_size;
    let vit_layer = gemm(t, 3 * h, h) + gemm(t, h, h) + 2.0 * gemm(t, v.intermediate_size, h) + 2.0 * gemm(t, t, h);
    let vit = tiles as f64 * (3.0 * v.layers_used() as f64 * vit_layer + 2.0 * gemm(t, h, patch_in));

    let image_tokens = batch * cfg.image_tokens();
    let d = cfg.llm.hidden_size;
    let projector = 3.0 * (gemm(image_tokens, d, cfg.projector_in()) + gemm(image_tokens, d, d));

    let l = &cfg.llm;
    let seq = cfg.spliced_len(text_tokens);
    let kv = l.num_key_value_heads * l.head_dim();
    let llm_layer = batch as f64
        * (gemm(seq, 2 * d + 2 * kv, d) + 3.0 * gemm(seq, l.intermediate_size, d) + 2.0 * gemm(seq, seq, d));
    let llm = 3.0 * (l.num_hidden_layers as f64 * llm_layer + gemm(batch * seq, l.vocab_size, d));
    vit + projector + llm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LLM part against the 6 N T rule of thumb: for VILA-3B-S2 the
    /// GEMM weights dominate, so the count lands within a few percent of
    /// 6 x (LLM GEMM parameters) x tokens plus the attention squares.
    #[test]
    fn vila_3b_count_matches_6nt_plus_attention() {
        let cfg = ModelConfig::vila_3b_s2();
        let (batch, text) = (2, 64);
        let with_images = train_step_flops(&cfg, batch, text);
        let l = &cfg.llm;
        let d = l.hidden_size as f64;
        let seq = cfg.spliced_len(text) as f64;
        let tokens = batch as f64 * seq;
        let layer_params = 4.0 * d * d + 3.0 * d * l.intermediate_size as f64;
        let llm_params = l.num_hidden_layers as f64 * layer_params + d * l.vocab_size as f64;
        let attention = 3.0 * l.num_hidden_layers as f64 * batch as f64 * 4.0 * seq * seq * d;
        let llm_expected = 6.0 * llm_params * tokens + attention;
        // ViT: 5 tiles per image, 26 of 27 layers, 729 tokens per tile.
        let v = &cfg.vision;
        let (h, t) = (v.hidden_size as f64, 729.0);
        let vit_layer_params = 4.0 * h * h + 2.0 * h * v.intermediate_size as f64;
        let vit_expected = 10.0 * (26.0 * (6.0 * vit_layer_params * t + 3.0 * 4.0 * t * t * h) + 4.0 * t * h * 588.0);
        let projector_expected = 6.0 * (batch * 196) as f64 * (9216.0 * d + d * d);
        let want = llm_expected + vit_expected + projector_expected;
        assert!((with_images - want).abs() / want < 1e-9, "{with_images:e} vs {want:e}");
        // S2's five ViT passes per image outweigh the 3B LLM on 259 tokens.
        assert!(vit_expected > llm_expected);
    }
}
