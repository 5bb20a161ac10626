//! STUB: being written (kernels/s2.cu).
#![allow(unused_variables)]
use super::backend::Buf;
use super::context::Cuda;
use crate::engine::backend::{GridShape, TileGrid};

pub(super) fn tile_merge_fwd(
    cu: &Cuda,
    src: &Buf,
    src_tile_offset: usize,
    split: TileGrid,
    out: &mut Buf,
    out_shape: GridShape,
) {
    todo!()
}
pub(super) fn tile_merge_bwd(
    cu: &Cuda,
    dout: &Buf,
    out_shape: GridShape,
    split: TileGrid,
    dsrc: &mut Buf,
    src_tile_offset: usize,
) {
    todo!()
}
pub(super) fn area_pool_fwd(cu: &Cuda, src: &Buf, src_shape: GridShape, window: TileGrid, dst: &mut Buf) {
    todo!()
}
pub(super) fn area_pool_bwd(cu: &Cuda, ddst: &Buf, src_shape: GridShape, window: TileGrid, dsrc: &mut Buf) {
    todo!()
}
#[allow(clippy::too_many_arguments)]
pub(super) fn concat_cols_fwd(
    cu: &Cuda,
    src: &Buf,
    dst: &mut Buf,
    rows: usize,
    width: usize,
    dst_width: usize,
    col_offset: usize,
) {
    todo!()
}
#[allow(clippy::too_many_arguments)]
pub(super) fn concat_cols_bwd(
    cu: &Cuda,
    ddst: &Buf,
    dsrc: &mut Buf,
    rows: usize,
    width: usize,
    dst_width: usize,
    col_offset: usize,
) {
    todo!()
}
pub(super) fn downsample2x2_fwd(cu: &Cuda, src: &Buf, src_shape: GridShape, dst: &mut Buf) {
    todo!()
}
pub(super) fn downsample2x2_bwd(cu: &Cuda, ddst: &Buf, src_shape: GridShape, dsrc: &mut Buf) {
    todo!()
}
