//! Fused softmax attention (kernels/attention.cu), flash-attention style as
//! on the CPU (cpu/attention.rs): per sequence, the keys are visited in
//! blocks of [`KEY_BLOCK`], each block's products are cuBLAS GEMMs over the
//! sequence's heads and its online-softmax update is a row kernel. No
//! `[seq, seq]` matrix exists: scratch is O(heads * seq * KEY_BLOCK), reused
//! by every sequence ([`attention_scratch_bytes`](crate::engine::attention_scratch::attention_scratch_bytes)). Only the log-sum-exp of
//! each query row is saved; backward recomputes the probabilities block by
//! block from it. With `causal`, key blocks wholly above the diagonal are
//! never touched: a block's GEMMs start at its first key's query row.
//!
//! Precision: scores, the running max and sum, the output and dQ
//! accumulators, dP and dS are f32 in every mode. With bf16 activations the
//! GEMMs take bf16 operands and write f32, and the row kernels write P and
//! dS, the operands that meet bf16 tensors in a GEMM, as bf16 copies.

use super::backend::Buf;
use super::context::{launch, Cuda, THREADS};
use super::elementwise::fill_range;
use super::kernels::Storage;
use super::matmul::{gemm_strided, Operand, Output};
use crate::engine::attention_scratch::{ScratchLens as Lens, GPU_KEY_BLOCK as KEY_BLOCK};
use crate::engine::backend::AttnShape;

/// Threads per row of `len` values: whole warps (the kernels' reductions
/// need a multiple of 32), no more than the row has values, at most
/// THREADS. A short row leaves no warps idle.
fn row_threads(len: usize) -> u32 {
    (len.next_multiple_of(32)).clamp(32, THREADS as usize) as u32
}

/// Checks the lengths of the `[batch, seq, heads, head_dim]` tensors and the
/// log-sum-exp, as the CPU backend does.
fn check(op: &str, s: &AttnShape, tensors: &[&Buf], lse: &Buf) {
    for (i, t) in tensors.iter().enumerate() {
        assert!(t.len >= s.numel(), "{op}: tensor {i} has {} values, {s:?} needs {}", t.len, s.numel());
    }
    assert!(lse.len >= s.lse_len(), "{op}: lse has {} values, {s:?} needs {}", lse.len, s.lse_len());
    // One block per row of a sequence's heads; a grid is at most 2^31 - 1 blocks wide.
    assert!(s.heads * s.seq < 1 << 31, "{op}: {s:?} has too many rows per sequence for one launch");
}

/// Where a row kernel writes P or dS: a buffer of the activations' storage
/// with bf16 activations; None with f32 ones, where it overwrites its f32
/// input in place.
fn operand_copy(cu: &Cuda, len: usize) -> Option<Buf> {
    (cu.storage != Storage::F32).then(|| cu.buffer(len, cu.storage))
}

/// Key block `j0..j0 + kb` and the query rows `i0..seq` that see any of it
/// (from the block's first key with `causal`), as the CPU's `Block`.
struct KeyBlock {
    j0: usize,
    kb: usize,
    i0: usize,
}

impl KeyBlock {
    fn all(s: &AttnShape) -> impl Iterator<Item = KeyBlock> + '_ {
        (0..s.seq).step_by(KEY_BLOCK).map(move |j0| KeyBlock {
            j0,
            kb: KEY_BLOCK.min(s.seq - j0),
            i0: if s.causal { j0 } else { 0 },
        })
    }

    fn rows(&self, s: &AttnShape) -> usize {
        s.seq - self.i0
    }

    /// The first block: every query row sees it, so it initializes the
    /// accumulators rather than adding to them.
    fn first(&self) -> bool {
        self.j0 == 0
    }

    /// The beta of a GEMM into an f32 accumulator: 0 (overwrite) first.
    fn acc_beta(&self) -> f32 {
        if self.first() {
            0.0
        } else {
            1.0
        }
    }

    /// `[heads, rows, kb]` score-shaped matrices at the start of `buf`.
    fn operand<'a>(&self, s: &AttnShape, buf: &'a Buf, trans: bool) -> Operand<'a> {
        Operand { buf, offset: 0, ld: self.kb, stride: self.rows(s) * self.kb, trans }
    }

    fn output<'a>(&self, s: &AttnShape, buf: &'a mut Buf) -> Output<'a> {
        Output { buf, offset: 0, ld: self.kb, stride: self.rows(s) * self.kb }
    }
}

/// Rows `row0..` of sequence `b` of a `[batch, seq, heads, head_dim]`
/// tensor (`b` = 0 for a one-sequence accumulator), per head: matrices with
/// rows `heads * head_dim` apart and the heads `head_dim` apart, so one
/// strided-batched GEMM covers every head.
fn heads<'a>(buf: &'a Buf, s: &AttnShape, b: usize, row0: usize, trans: bool) -> Operand<'a> {
    let row = s.heads * s.head_dim;
    Operand { buf, offset: (b * s.seq + row0) * row, ld: row, stride: s.head_dim, trans }
}

fn heads_out<'a>(buf: &'a mut Buf, s: &AttnShape, b: usize, row0: usize) -> Output<'a> {
    let row = s.heads * s.head_dim;
    Output { buf, offset: (b * s.seq + row0) * row, ld: row, stride: s.head_dim }
}

/// S = scale * Q K^T of key block `blk` of sequence `b`, into `sc`
/// (`[heads, rows, kb]`, f32).
fn scores(cu: &Cuda, s: &AttnShape, q: &Buf, k: &Buf, b: usize, blk: &KeyBlock, sc: &mut Buf) {
    let rows = blk.rows(s);
    if s.head_dim == 0 {
        // Empty dot products: the scores are 0, as the CPU's k == 0 GEMM
        // leaves them (and cuBLAS takes no ld of 0).
        fill_range(cu, sc, 0, s.heads * rows * blk.kb, 0.0);
        return;
    }
    let (qo, ko) = (heads(q, s, b, blk.i0, false), heads(k, s, b, blk.j0, true));
    gemm_strided(cu, s.heads, rows, blk.kb, s.head_dim, s.scale, qo, ko, 0.0, blk.output(s, sc));
}

pub(super) fn attention_fwd(cu: &Cuda, q: &Buf, k: &Buf, v: &Buf, out: &mut Buf, lse: &mut Buf, s: AttnShape) {
    check("attention_fwd", &s, &[q, k, v, out], lse);
    if s.lse_len() == 0 {
        return;
    }
    let (n, d, h) = (s.seq, s.head_dim, s.heads);
    let len = Lens::of(&s);
    let mut sc = cu.buffer(len.block, Storage::F32);
    let p_copy = operand_copy(cu, len.block);
    // Running max and sum per row, and the unnormalized output.
    let (mut m, mut l) = (cu.buffer(len.rows, Storage::F32), cu.buffer(len.rows, Storage::F32));
    let mut acc = cu.buffer(len.acc, Storage::F32);
    let (seq, heads_u, dim, causal) = (n as u64, h as u64, d as u64, i32::from(s.causal));
    // Values of one sequence in the [batch, seq, heads, head_dim] tensors.
    let per_seq = n * h * d;
    for b in 0..s.batch {
        for blk in KeyBlock::all(&s) {
            let rows = blk.rows(&s);
            scores(cu, &s, q, k, b, &blk, &mut sc);
            let p = p_copy.as_ref().unwrap_or(&sc);
            let (j0, kb, first) = (blk.j0 as u64, blk.kb as u64, i32::from(blk.first()));
            let cfg = cu.rows(h * rows, row_threads(blk.kb));
            launch!(
                cu,
                "attn_fwd_block_rows",
                cfg,
                &sc.data,
                &p.data,
                &mut m.data,
                &mut l.data,
                &mut acc.data,
                &seq,
                &heads_u,
                &dim,
                &j0,
                &kb,
                &causal,
                &first
            );
            // O += P V_blk (the first block overwrites).
            let (po, vo) = (blk.operand(&s, p, false), heads(v, &s, b, blk.j0, false));
            gemm_strided(cu, h, rows, d, blk.kb, 1.0, po, vo, blk.acc_beta(), heads_out(&mut acc, &s, 0, blk.i0));
        }
        let mut lse_b = lse.view_mut(b * h * n, h * n);
        let mut out_b = out.view_mut(b * per_seq, per_seq);
        let cfg = cu.rows(n * h, row_threads(d));
        launch!(
            cu,
            "attn_fwd_finish_rows",
            cfg,
            &acc.data,
            &m.data,
            &l.data,
            &mut lse_b,
            &mut out_b,
            &seq,
            &heads_u,
            &dim
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    cu: &Cuda,
    q: &Buf,
    k: &Buf,
    v: &Buf,
    out: &Buf,
    lse: &Buf,
    dout: &Buf,
    dq: &mut Buf,
    dk: &mut Buf,
    dv: &mut Buf,
    s: AttnShape,
) {
    check("attention_bwd", &s, &[q, k, v, out, dout, dq, dk, dv], lse);
    if s.numel() == 0 {
        return;
    }
    let (n, d, h) = (s.seq, s.head_dim, s.heads);
    let len = Lens::of(&s);
    // S then P, and dP then dS (in place with f32 activations).
    let (mut sc, mut dp) = (cu.buffer(len.block, Storage::F32), cu.buffer(len.block, Storage::F32));
    let (p_copy, ds_copy) = (operand_copy(cu, len.block), operand_copy(cu, len.block));
    let mut delta = cu.buffer(len.rows, Storage::F32);
    let mut dq_acc = cu.buffer(len.acc, Storage::F32);
    let (seq, heads_u, dim, causal, scale) = (n as u64, h as u64, d as u64, i32::from(s.causal), s.scale);
    let per_seq = n * h * d;
    for b in 0..s.batch {
        let (dout_b, out_b) = (dout.view(b * per_seq, per_seq), out.view(b * per_seq, per_seq));
        launch!(
            cu,
            "attn_bwd_delta_rows",
            cu.rows(n * h, row_threads(d)),
            &dout_b,
            &out_b,
            &mut delta.data,
            &seq,
            &heads_u,
            &dim
        );
        let lse_b = lse.view(b * h * n, h * n);
        for blk in KeyBlock::all(&s) {
            let rows = blk.rows(&s);
            scores(cu, &s, q, k, b, &blk, &mut sc);
            // dP = dO V_blk^T
            let (doo, vo) = (heads(dout, &s, b, blk.i0, false), heads(v, &s, b, blk.j0, true));
            gemm_strided(cu, h, rows, blk.kb, d, 1.0, doo, vo, 0.0, blk.output(&s, &mut dp));
            let (p, ds) = (p_copy.as_ref().unwrap_or(&sc), ds_copy.as_ref().unwrap_or(&dp));
            let (j0, kb) = (blk.j0 as u64, blk.kb as u64);
            let cfg = cu.rows(h * rows, row_threads(blk.kb));
            launch!(
                cu,
                "attn_bwd_block_rows",
                cfg,
                &sc.data,
                &dp.data,
                &lse_b,
                &delta.data,
                &p.data,
                &ds.data,
                &seq,
                &j0,
                &kb,
                &causal,
                &scale
            );
            // dV_blk += P^T dO
            let (pt, doo) = (blk.operand(&s, p, true), heads(dout, &s, b, blk.i0, false));
            gemm_strided(cu, h, blk.kb, d, rows, 1.0, pt, doo, 1.0, heads_out(dv, &s, b, blk.j0));
            // dQ += dS K_blk, in f32 (the first block overwrites).
            let (dso, ko) = (blk.operand(&s, ds, false), heads(k, &s, b, blk.j0, false));
            let dq_out = heads_out(&mut dq_acc, &s, 0, blk.i0);
            gemm_strided(cu, h, rows, d, blk.kb, 1.0, dso, ko, blk.acc_beta(), dq_out);
            // dK_blk += dS^T Q
            let (dst, qo) = (blk.operand(&s, ds, true), heads(q, &s, b, blk.i0, false));
            gemm_strided(cu, h, blk.kb, d, rows, 1.0, dst, qo, 1.0, heads_out(dk, &s, b, blk.j0));
        }
        let mut dq_b = dq.view_mut(b * per_seq, per_seq);
        let len_u = per_seq as u64;
        launch!(cu, "attn_add_f32", cu.elems(per_seq), &dq_acc.data, &mut dq_b, &len_u);
    }
}

/// On the emulated device: what a test without a GPU can run.
#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::engine::attention_scratch::attention_scratch_bytes;
    use crate::engine::backend::Backend;
    use crate::engine::cpu::Cpu;
    use crate::engine::cuda::MathMode;

    fn shape(batch: usize, seq: usize, head_dim: usize, causal: bool) -> AttnShape {
        AttnShape { batch, seq, heads: 3, head_dim, causal, scale: 0.5 }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) / 8.0).collect()
    }

    /// `attention_scratch_bytes` is what each op allocates: the growth
    /// of the emulated device's peak over a fresh device holding only
    /// the op's buffers (nothing freed yet, so the peak is in use).
    #[test]
    fn scratch_bytes_are_what_the_ops_allocate() {
        // Three key blocks, the last partial.
        let s = shape(2, 300, 8, true);
        for mode in [MathMode::F32, MathMode::Bf16] {
            for backward in [false, true] {
                let cu = Cuda::emulated(mode).unwrap();
                let n = s.numel();
                let [q, k, v, mut out, dout, mut dq, mut dk, mut dv] =
                    std::array::from_fn(|i| cu.upload(&values(n, i)));
                let mut lse = cu.upload_state(&vec![1.0; s.lse_len()]);
                let before = cu.peak_memory_bytes().unwrap();
                if backward {
                    cu.attention_bwd(&q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, s);
                } else {
                    cu.attention_fwd(&q, &k, &v, &mut out, &mut lse, s);
                }
                cu.check().unwrap();
                let grown = cu.peak_memory_bytes().unwrap() - before;
                let want = attention_scratch_bytes(&s, cu.storage.size(), backward);
                assert_eq!(grown, want, "{mode:?}, backward {backward}");
            }
        }
    }

    /// No queries, or no head dimensions, as on the CPU: with head_dim
    /// 0 the scores are 0, so lse is the log of the visible keys.
    #[test]
    fn empty_shapes_behave_as_on_the_cpu() {
        let cu = Cuda::emulated(MathMode::F32).unwrap();
        let cpu = Cpu::<f32>::new();
        for causal in [false, true] {
            for s in [shape(2, 0, 8, causal), shape(2, 130, 0, causal)] {
                let n = s.numel();
                let mut out = cu.alloc(n);
                let mut lse = cu.alloc_state(s.lse_len());
                cu.fill(&mut lse, f32::NAN);
                let e = cu.alloc(n);
                cu.attention_fwd(&e, &e, &e, &mut out, &mut lse, s);
                let (mut dq, mut dk, mut dv) = (cu.alloc(n), cu.alloc(n), cu.alloc(n));
                cu.attention_bwd(&e, &e, &e, &out, &lse, &e, &mut dq, &mut dk, &mut dv, s);
                cu.check().unwrap();
                let mut want = vec![0.0; s.lse_len()];
                let ec = vec![0.0; n];
                cpu.attention_fwd(&ec, &ec, &ec, &mut vec![0.0; n], &mut want, s);
                let got = cu.download(&lse);
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 1e-6, "{s:?}: lse differs from the CPU's by {worst:e}");
            }
        }
    }
}
