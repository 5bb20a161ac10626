//! STUB: being written (kernels/attention.cu).
#![allow(unused_variables)]
use super::backend::Buf;
use super::context::Cuda;
use crate::engine::backend::AttnShape;

pub(super) fn attention_fwd(cu: &Cuda, q: &Buf, k: &Buf, v: &Buf, out: &mut Buf, probs: &mut Buf, s: AttnShape) {
    todo!()
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
    todo!()
}
