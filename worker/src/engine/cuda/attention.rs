//! Softmax attention (kernels/attention.cu): the four products are cuBLAS
//! GEMMs over the heads of one sequence, the softmax and its backward are
//! row kernels. Scores, probabilities, dP and dS are f32 in every mode (the
//! probabilities are a state buffer): with bf16 activations the GEMMs
//! write their f32 outputs from bf16 operands, and only the operands that
//! enter a GEMM beside a bf16 tensor (P for PV and dV, dS for dQ and dK)
//! get a bf16 copy, as the tensor cores take them.

use super::backend::Buf;
use super::context::{launch, Cuda, THREADS};

/// Threads per softmax row of `seq` scores: whole warps (the kernels'
/// reductions need a multiple of 32), no more than the row has values, at
/// most THREADS. A short row (a ViT tile or a short text) leaves no warps
/// idle.
fn row_threads(seq: usize) -> u32 {
    (seq.next_multiple_of(32)).clamp(32, THREADS as usize) as u32
}
use super::elementwise::{copy, fill_range};
use super::kernels::Storage;
use super::matmul::{gemm_strided, Operand, Output};
use crate::engine::backend::AttnShape;

/// Checks the lengths of the `[batch, seq, heads, head_dim]` tensors and the
/// probabilities, as the CPU backend does.
fn check(op: &str, s: &AttnShape, tensors: &[&Buf], probs: &Buf) {
    for (i, t) in tensors.iter().enumerate() {
        assert!(t.len >= s.numel(), "{op}: tensor {i} has {} values, {s:?} needs {}", t.len, s.numel());
    }
    assert!(probs.len >= s.probs_len(), "{op}: probs has {} values, {s:?} needs {}", probs.len, s.probs_len());
    // One block per score row; a grid is at most 2^31 - 1 blocks wide.
    assert!(s.batch * s.heads * s.seq < 1 << 31, "{op}: {s:?} has too many score rows for one launch");
}

/// Head `h` of sequence `b` in a `[batch, seq, heads, head_dim]` tensor: a
/// `[seq, head_dim]` matrix with rows `heads * head_dim` apart, and the
/// heads `head_dim` apart, so one strided-batched GEMM covers them all.
fn heads<'a>(buf: &'a Buf, s: &AttnShape, b: usize, trans: bool) -> Operand<'a> {
    let row = s.heads * s.head_dim;
    Operand { buf, offset: b * s.seq * row, ld: row, stride: s.head_dim, trans }
}

fn heads_out<'a>(buf: &'a mut Buf, s: &AttnShape, b: usize) -> Output<'a> {
    let row = s.heads * s.head_dim;
    Output { buf, offset: b * s.seq * row, ld: row, stride: s.head_dim }
}

/// `[heads, seq, seq]` score matrices starting at `offset` of `buf`.
fn scores(buf: &Buf, offset: usize, n: usize, trans: bool) -> Operand<'_> {
    Operand { buf, offset, ld: n, stride: n * n, trans }
}

/// The f32 score matrices `src[offset..offset + len]` as a GEMM operand
/// beside bf16 tensors: a bf16 copy in `staging` (rounded to nearest even),
/// or `src` itself when activations are f32.
fn as_operand<'a>(
    cu: &Cuda,
    src: &'a Buf,
    offset: usize,
    len: usize,
    staging: &'a mut Option<Buf>,
) -> (&'a Buf, usize) {
    if cu.storage == Storage::F32 {
        return (src, offset);
    }
    let dst = staging.get_or_insert_with(|| cu.buffer(len, cu.storage));
    copy(cu, src, offset, dst, 0, len);
    (dst, 0)
}

pub(super) fn attention_fwd(cu: &Cuda, q: &Buf, k: &Buf, v: &Buf, out: &mut Buf, probs: &mut Buf, s: AttnShape) {
    check("attention_fwd", &s, &[q, k, v, out], probs);
    let (n, d, h) = (s.seq, s.head_dim, s.heads);
    if s.probs_len() == 0 {
        return;
    }
    let nn = n * n;
    if d == 0 {
        // Empty dot products: the scores are 0, as the CPU's k == 0 GEMM leaves them.
        let len = s.probs_len();
        fill_range(cu, probs, 0, len, 0.0);
    } else {
        for b in 0..s.batch {
            // S = scale * Q K^T, the heads of sequence b at once, into f32.
            let out_s = Output { buf: &mut *probs, offset: b * h * nn, ld: n, stride: nn };
            gemm_strided(cu, h, n, n, d, s.scale, heads(q, &s, b, false), heads(k, &s, b, true), 0.0, out_s);
        }
    }
    let (seq, causal) = (n as u64, i32::from(s.causal));
    let rows = cu.rows(s.batch * h * n, row_threads(n));
    launch!(cu, storage = Storage::F32, "softmax_rows_f32", rows, &probs.data, &seq, &causal);
    if d == 0 {
        return;
    }
    let mut staging = None;
    for b in 0..s.batch {
        // out = P V, overwritten (beta 0).
        let (p, off) = as_operand(cu, probs, b * h * nn, h * nn, &mut staging);
        gemm_strided(cu, h, n, d, n, 1.0, scores(p, off, n, false), heads(v, &s, b, false), 0.0, heads_out(out, &s, b));
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    cu: &Cuda,
    q: &Buf,
    k: &Buf,
    v: &Buf,
    probs: &Buf,
    dout: &Buf,
    dq: &mut Buf,
    dk: &mut Buf,
    dv: &mut Buf,
    s: AttnShape,
) {
    check("attention_bwd", &s, &[q, k, v, dout, dq, dk, dv], probs);
    let (n, d, h) = (s.seq, s.head_dim, s.heads);
    if s.numel() == 0 {
        return;
    }
    let nn = n * n;
    // dP, then dS in place (f32), for the heads of one sequence; reused by
    // every sequence (one stream, so the GEMMs of b are done before b + 1
    // writes).
    let mut ds = cu.buffer(h * nn, Storage::F32);
    let (mut p_staging, mut ds_staging) = (None, None);
    let (seq, scale) = (n as u64, s.scale);
    for b in 0..s.batch {
        // dV += P^T dO
        let (p, off) = as_operand(cu, probs, b * h * nn, h * nn, &mut p_staging);
        gemm_strided(
            cu,
            h,
            n,
            d,
            n,
            1.0,
            scores(p, off, n, true),
            heads(dout, &s, b, false),
            1.0,
            heads_out(dv, &s, b),
        );
        // dP = dO V^T
        let dp = Output { buf: &mut ds, offset: 0, ld: n, stride: nn };
        gemm_strided(cu, h, n, n, d, 1.0, heads(dout, &s, b, false), heads(v, &s, b, true), 0.0, dp);
        // dS = P * (dP - rowsum(dP * P)) * scale, in place, f32.
        let p_b = probs.view(b * h * nn, h * nn);
        let rows = cu.rows(h * n, row_threads(n));
        launch!(cu, storage = Storage::F32, "softmax_bwd_rows_f32", rows, &p_b, &ds.data, &seq, &scale);
        let (ds_op, ds_off) = as_operand(cu, &ds, 0, h * nn, &mut ds_staging);
        // dQ += dS K
        let dsk = scores(ds_op, ds_off, n, false);
        gemm_strided(cu, h, n, d, n, 1.0, dsk, heads(k, &s, b, false), 1.0, heads_out(dq, &s, b));
        // dK += dS^T Q
        let dsq = scores(ds_op, ds_off, n, true);
        gemm_strided(cu, h, n, d, n, 1.0, dsq, heads(q, &s, b, false), 1.0, heads_out(dk, &s, b));
    }
}
