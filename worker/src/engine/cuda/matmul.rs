//! GEMMs through cuBLAS. The backend's matrices are row-major; cuBLAS is
//! column-major, and a row-major `[r, c]` matrix read column-major is its
//! transpose. So `C = op(A) op(B)` (row-major) is computed as
//! `C^T = op(B)^T op(A)^T` (column-major): the operands swap places and
//! keep their transpose flags. TF32 or full f32 is the handle's math mode
//! (context.rs).

use super::backend::Buf;
use super::context::Cuda;
use crate::engine::backend::Gemm;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{GemmConfig, StridedBatchedConfig};
use cudarc::driver::CudaSlice;

/// One operand of a strided-batched GEMM: a row-major matrix at `offset`
/// in `buf` with row length `ld`, matrix `b` of the batch at `offset + b *
/// stride`, read transposed when `trans`.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub buf: &'a CudaSlice<f32>,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
    pub trans: bool,
}

/// The output of a strided-batched GEMM (row-major, never transposed).
pub(super) struct Output<'a> {
    pub buf: &'a mut CudaSlice<f32>,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
}

/// `C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b]` for `b` in
/// `0..batch`, `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C` `[m, n]`.
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
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(b.trans),
            transb: op(a.trans),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: b.ld as i32,
            ldb: a.ld as i32,
            beta,
            ldc: c.ld as i32,
        },
        batch_size: batch as i32,
        stride_a: b.stride as i64,
        stride_b: a.stride as i64,
        stride_c: c.stride as i64,
    };
    let (av, bv) = (a.buf.slice(a.offset..), b.buf.slice(b.offset..));
    let mut cv = c.buf.slice_mut(c.offset..);
    // SAFETY: the callers size every operand for `batch` matrices of the
    // given shapes (checked in `matmul` and by the attention shapes).
    let done = unsafe { cudarc::cublas::Gemm::gemm_strided_batched(&cu.blas, cfg, &bv, &av, &mut cv) };
    cu.record("cuBLAS sgemm", done);
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
            super::elementwise::fill_range(cu, &mut c.data, 0, g.batch * m * n, 0.0);
        }
        return;
    }
    let a_op = Operand { buf: &a.data, offset: 0, ld: if g.trans_a { m } else { k }, stride: m * k, trans: g.trans_a };
    let b_op = Operand { buf: &b.data, offset: 0, ld: if g.trans_b { k } else { n }, stride: k * n, trans: g.trans_b };
    let c_out = Output { buf: &mut c.data, offset: 0, ld: n, stride: m * n };
    let beta = if g.accumulate { 1.0 } else { 0.0 };
    gemm_strided(cu, g.batch, m, n, k, g.alpha, a_op, b_op, beta, c_out);
}
