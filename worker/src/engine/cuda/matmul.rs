//! GEMMs through cuBLAS. The backend's matrices are row-major; cuBLAS is
//! column-major, and a row-major `[r, c]` matrix read column-major is its
//! transpose. So `C = op(A) op(B)` (row-major) is computed as
//! `C^T = op(B)^T op(A)^T` (column-major): the operands swap places and
//! keep their transpose flags. Every operand is f32 in memory; the compute
//! type of the backend's `MathMode` says whether the tensor cores round the
//! inputs to TF32 or bf16 (f32 accumulation either way).

use super::backend::Buf;
use super::context::{Cuda, MathMode};
use crate::engine::backend::Gemm;
use cudarc::cublas::sys::cublasComputeType_t::{
    CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_COMPUTE_32F_FAST_TF32,
};
use cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT as CUBLAS_GEMM_DEFAULT;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

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
    let compute = match cu.math {
        MathMode::F32 => CUBLAS_COMPUTE_32F,
        MathMode::Tf32 => CUBLAS_COMPUTE_32F_FAST_TF32,
        MathMode::Bf16 => CUBLAS_COMPUTE_32F_FAST_16BF,
    };
    let (av, bv) = (a.buf.slice(a.offset..), b.buf.slice(b.offset..));
    let mut cv = c.buf.slice_mut(c.offset..);
    let (a_ptr, _a_use) = av.device_ptr(&cu.stream);
    let (b_ptr, _b_use) = bv.device_ptr(&cu.stream);
    let (c_ptr, _c_use) = cv.device_ptr_mut(&cu.stream);
    // SAFETY: the callers size every operand for `batch` matrices of the
    // given shapes (checked in `matmul` and by the attention shapes); the
    // pointers are f32 device memory as the data types say; alpha and beta
    // are host f32, as CUBLAS_COMPUTE_32F* takes them, alive for the call.
    let done = unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *cu.blas.handle(),
            op(b.trans),
            op(a.trans),
            n as i32,
            m as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            b_ptr as *const _,
            CUDA_R_32F,
            b.ld as i32,
            b.stride as i64,
            a_ptr as *const _,
            CUDA_R_32F,
            a.ld as i32,
            a.stride as i64,
            (&beta as *const f32).cast(),
            c_ptr as *mut _,
            CUDA_R_32F,
            c.ld as i32,
            c.stride as i64,
            batch as i32,
            compute,
            CUBLAS_GEMM_DEFAULT,
        )
    };
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
