//! STUB: being written (kernels/loss.cu).
#![allow(unused_variables)]
use super::backend::{Buf, Idx};
use super::context::Cuda;

pub(super) fn cross_entropy(
    cu: &Cuda,
    logits: &Buf,
    targets: &Idx,
    dlogits: Option<&mut Buf>,
    n: usize,
    vocab: usize,
    grad_scale: f32,
) -> f64 {
    todo!()
}
