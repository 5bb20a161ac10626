//! STUB: being written (kernels/image.cu).
#![allow(unused_variables)]
use super::backend::Buf;
use super::context::Cuda;
use crate::engine::backend::ImageShape;

pub(super) fn resize_bicubic(cu: &Cuda, src: &Buf, src_shape: ImageShape, dst: &mut Buf, dst_size: usize) {
    todo!()
}
pub(super) fn tile_split(cu: &Cuda, src: &Buf, src_shape: ImageShape, n: usize, dst: &mut Buf, dst_tile_offset: usize) {
    todo!()
}
pub(super) fn patchify(cu: &Cuda, src: &Buf, shape: ImageShape, patch: usize, dst: &mut Buf) {
    todo!()
}
