//! `y = x W^T + b` with Hugging Face's `[out, in]` weight layout, built from
//! backend ops. Shared by every module.

use crate::engine::{Backend, Gemm};

/// Rows, input width and output width of one linear layer application.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub rows: usize,
    pub din: usize,
    pub dout: usize,
}

pub fn forward<B: Backend>(be: &B, x: &B::Buf, w: &B::Buf, bias: Option<&B::Buf>, y: &mut B::Buf, d: Dims) {
    be.matmul(x, w, y, Gemm::new(d.rows, d.dout, d.din).trans_b());
    if let Some(b) = bias {
        be.bias_add(y, b, d.rows, d.dout);
    }
}

/// Adds `dy W` into `dx` (when given) and `dy^T x`, `colsum(dy)` into the
/// parameter gradients (when given: a frozen module passes `None`).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    x: &B::Buf,
    w: &B::Buf,
    dy: &B::Buf,
    dx: Option<&mut B::Buf>,
    dw: Option<&mut B::Buf>,
    dbias: Option<&mut B::Buf>,
    d: Dims,
) {
    if let Some(dx) = dx {
        be.matmul(dy, w, dx, Gemm::new(d.rows, d.din, d.dout).accumulate());
    }
    if let Some(dw) = dw {
        be.matmul(dy, x, dw, Gemm::new(d.dout, d.din, d.rows).trans_a().accumulate());
    }
    if let Some(db) = dbias {
        be.bias_bwd(dy, db, d.rows, d.dout);
    }
}
