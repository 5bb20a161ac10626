//! STUB: being written (kernels/norm.cu).
#![allow(unused_variables)]
use super::backend::Buf;
use super::context::Cuda;

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_fwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    b: &Buf,
    y: &mut Buf,
    mean: &mut Buf,
    rstd: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    todo!()
}
#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_bwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    mean: &Buf,
    rstd: &Buf,
    dy: &Buf,
    dx: &mut Buf,
    dw: &mut Buf,
    db: &mut Buf,
    rows: usize,
    cols: usize,
) {
    todo!()
}
#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_fwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    y: &mut Buf,
    rstd: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    todo!()
}
#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_bwd(
    cu: &Cuda,
    x: &Buf,
    w: &Buf,
    rstd: &Buf,
    dy: &Buf,
    dx: &mut Buf,
    dw: &mut Buf,
    rows: usize,
    cols: usize,
) {
    todo!()
}
