//! The scratch the CUDA backend's fused attention allocates per call, kept
//! outside the feature gate so the memory planner sizes a GPU from any
//! build. The CUDA op (cuda/attention.rs) allocates its buffers from these
//! lengths, and a test there holds `attention_scratch_bytes` equal to the
//! growth of the emulated device's peak.

use super::AttnShape;

/// Keys per block of the CUDA attention: the score block of a sequence's
/// heads is `[heads, seq, GPU_KEY_BLOCK]` f32, and 128 columns keep each
/// GEMM wide enough for the tensor cores.
pub const GPU_KEY_BLOCK: usize = 128;

/// Scratch lengths in values, for one sequence (every sequence reuses it).
pub struct ScratchLens {
    /// A score block for every head: `[heads, rows, kb]`, at most
    /// `[heads, seq, min(GPU_KEY_BLOCK, seq)]` (the first block, which every row sees).
    pub block: usize,
    /// A statistic per row: `[heads, seq]`.
    pub rows: usize,
    /// An accumulator like the sequence's slice: `[seq, heads, head_dim]`.
    pub acc: usize,
}

impl ScratchLens {
    pub fn of(s: &AttnShape) -> ScratchLens {
        let rows = s.heads * s.seq;
        ScratchLens { block: rows * GPU_KEY_BLOCK.min(s.seq), rows, acc: rows * s.head_dim }
    }
}

/// Device bytes of scratch that `attention_fwd` (or, with `backward`,
/// `attention_bwd`) allocates for `s` with activations of `act_bytes` bytes
/// (4 or 2), held for the whole call and freed at its end; independent of
/// the batch.
/// - forward: the score block (f32), a bf16 copy of P with bf16
///   activations, the running max and sum per row (f32), the output
///   accumulator (f32);
/// - backward: the score and dP blocks (f32), bf16 copies of P and dS with
///   bf16 activations, delta per row (f32), the dQ accumulator (f32).
///
/// An op with nothing to do (no rows forward, no values backward)
/// allocates none.
pub fn attention_scratch_bytes(s: &AttnShape, act_bytes: usize, backward: bool) -> u64 {
    if (backward && s.numel() == 0) || s.lse_len() == 0 {
        return 0;
    }
    let l = ScratchLens::of(s);
    let f32s = std::mem::size_of::<f32>();
    let copies = if act_bytes == f32s { 0 } else { act_bytes };
    let (blocks, stats) = if backward { (2, 1) } else { (1, 2) };
    (blocks * l.block * (f32s + copies) + stats * l.rows * f32s + l.acc * f32s) as u64
}

/// The larger of forward's and backward's scratch: what the memory planner counts.
pub fn attention_peak_scratch_bytes(s: &AttnShape, act_bytes: usize) -> u64 {
    attention_scratch_bytes(s, act_bytes, false).max(attention_scratch_bytes(s, act_bytes, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, seq: usize, head_dim: usize, causal: bool) -> AttnShape {
        AttnShape { batch, seq, heads: 3, head_dim, causal, scale: 0.5 }
    }

    /// Scratch grows with seq, never seq^2, and not with the batch.
    #[test]
    fn scratch_is_linear_in_the_sequence() {
        for act_bytes in [4, 2] {
            for backward in [false, true] {
                let bytes = |batch, seq| attention_scratch_bytes(&shape(batch, seq, 64, true), act_bytes, backward);
                assert_eq!(bytes(1, 8192), 2 * bytes(1, 4096));
                assert_eq!(bytes(7, 4096), bytes(1, 4096));
            }
        }
        let s = shape(2, 300, 8, false);
        assert!(attention_peak_scratch_bytes(&s, 2) >= attention_scratch_bytes(&s, 2, false));
        assert_eq!(attention_scratch_bytes(&shape(2, 0, 8, false), 4, false), 0);
    }
}
