//! The scratch the CUDA backend's fused attention allocates per call,
//! outside the feature gate so the memory planner sizes a GPU from any
//! build. The CUDA op allocates exactly these buffers (cuda/attention.rs).
//!
//! Per call, reused sequence after sequence: the scores of one key block
//! for every head and query row (f32), their bf16 copy as a GEMM operand in
//! mixed precision, the f32 output accumulator, and the running max and
//! sum per row; backward adds dP beside the scores, dS's bf16 copy, an f32
//! dQ accumulator and the per-row correction term.

use super::AttnShape;

/// Keys per block of the CUDA attention.
pub const GPU_KEY_BLOCK: usize = 128;

/// Values of each scratch buffer for one sequence of `s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionScratch {
    /// Scores of one key block `[heads, seq, block]`, f32 (also dP in backward).
    pub block: usize,
    /// `[seq, heads, head_dim]` f32 (forward's output, backward's dQ).
    pub rows: usize,
    /// One value per (head, row): running max, sum, correction term.
    pub per_row: usize,
}

impl AttentionScratch {
    pub fn of(s: &AttnShape) -> Self {
        AttentionScratch {
            block: s.heads * s.seq * GPU_KEY_BLOCK.min(s.seq),
            rows: s.seq * s.heads * s.head_dim,
            per_row: s.heads * s.seq,
        }
    }

    /// Bytes of the larger of forward and backward, with activations of
    /// `act_bytes` (a bf16 copy of a block exists only when they are 2).
    pub fn bytes(&self, act_bytes: usize) -> u64 {
        let staging = if act_bytes == 4 { 0 } else { self.block * act_bytes };
        let forward = self.block * 4 + staging + self.rows * 4 + 2 * self.per_row * 4;
        let backward = 2 * self.block * 4 + 2 * staging + self.rows * 4 + self.per_row * 4;
        forward.max(backward) as u64
    }
}

/// Bytes of scratch one attention call of shape `s` allocates on a GPU.
pub fn attention_scratch_bytes(s: &AttnShape, act_bytes: usize) -> u64 {
    AttentionScratch::of(s).bytes(act_bytes)
}
