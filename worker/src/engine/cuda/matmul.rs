//! GEMMs through cuBLAS. The backend's matrices are row-major; cuBLAS is
//! column-major, and a row-major `[r, c]` matrix read column-major is its
//! transpose. So `C = op(A) op(B)` (row-major) is computed as
//! `C^T = op(B)^T op(A)^T` (column-major): the operands swap places and
//! keep their transpose flags. Operands are f32 or bf16 in memory (the
//! buffers' storage); for f32 operands the compute type of the backend's
//! `MathMode` says whether the tensor cores round them to TF32 or bf16, and
//! bf16 operands go to the tensor cores as they are. Accumulation is f32.

use super::backend::Buf;
use super::context::{Cuda, MathMode};
use super::driver::{Compute, GemmDesc, GemmMatrix};
use super::kernels::Storage;
use crate::engine::backend::Gemm;

/// One operand of a strided-batched GEMM: a row-major matrix at `offset`
/// (in values) in `buf` with row length `ld`, matrix `b` of the batch at
/// `offset + b * stride`, read transposed when `trans`.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub buf: &'a Buf,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
    pub trans: bool,
}

/// The output of a strided-batched GEMM (row-major, never transposed).
pub(super) struct Output<'a> {
    pub buf: &'a mut Buf,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
}

/// `C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b]` for `b` in
/// `0..batch`, `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C` `[m, n]`. A and B
/// share a storage type; C may differ (a weight's f32 gradient from bf16
/// activations). f32 operands compute in the backend's `MathMode`; bf16
/// operands on the tensor cores, accumulating in f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_strided(
    cu: &Cuda,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: Output,
) {
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    assert_eq!(
        a.buf.storage, b.buf.storage,
        "GEMM operands in different storage types (a state buffer passed as an activation?)"
    );
    let compute = match (a.buf.storage, cu.math) {
        (Storage::Bf16, _) => Compute::F32,
        (Storage::F32, MathMode::F32) => Compute::F32,
        (Storage::F32, MathMode::Tf32) => Compute::FastTf32,
        (Storage::F32, MathMode::Bf16) => Compute::Fast16Bf,
    };
    let matrix = |buf: &Buf, offset: usize, ld: usize, stride: usize| GemmMatrix {
        addr: buf.view(offset, buf.len - offset).addr,
        storage: buf.storage,
        ld,
        stride,
    };
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T:
    // cuBLAS's first operand is B.
    let desc = GemmDesc {
        trans_a: b.trans,
        trans_b: a.trans,
        m: n,
        n: m,
        k,
        alpha,
        a: matrix(b.buf, b.offset, b.ld, b.stride),
        b: matrix(a.buf, a.offset, a.ld, a.stride),
        beta,
        c: matrix(c.buf, c.offset, c.ld, c.stride),
        batch,
        compute,
    };
    let done = cu.driver.gemm(&desc);
    cu.record("cuBLAS GEMM", done);
}

/// The Backend's `matmul`: contiguous batches, `k == 0` clears C (or
/// leaves it, when accumulating), as on the CPU.
pub(super) fn matmul(cu: &Cuda, a: &Buf, b: &Buf, c: &mut Buf, g: Gemm) {
    let (m, n, k) = (g.m, g.n, g.k);
    assert!(a.len >= g.batch * m * k, "matmul: A has {} values, needs {}", a.len, g.batch * m * k);
    assert!(b.len >= g.batch * k * n, "matmul: B has {} values, needs {}", b.len, g.batch * k * n);
    assert!(c.len >= g.batch * m * n, "matmul: C has {} values, needs {}", c.len, g.batch * m * n);
    if g.batch * m * n == 0 {
        return;
    }
    if k == 0 {
        if !g.accumulate {
            super::elementwise::fill_range(cu, c, 0, g.batch * m * n, 0.0);
        }
        return;
    }
    let a_op = Operand { buf: a, offset: 0, ld: if g.trans_a { m } else { k }, stride: m * k, trans: g.trans_a };
    let b_op = Operand { buf: b, offset: 0, ld: if g.trans_b { k } else { n }, stride: k * n, trans: g.trans_b };
    let c_out = Output { buf: c, offset: 0, ld: n, stride: m * n };
    let beta = if g.accumulate { 1.0 } else { 0.0 };
    gemm_strided(cu, g.batch, m, n, k, g.alpha, a_op, b_op, beta, c_out);
}
