//! STUB: being written (kernels/rope.cu).
#![allow(unused_variables)]
use super::backend::Buf;
use super::context::Cuda;
use crate::engine::backend::RopeShape;

pub(super) fn rotate(cu: &Cuda, x: &mut Buf, s: RopeShape, inverse: bool) {
    todo!()
}
