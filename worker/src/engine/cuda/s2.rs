//! Token-grid S2 ops with gradients: tile merge, area pooling, channel
//! concat, 2x2 downsample (kernels/s2.cu). The checks are the CPU backend's.

use super::backend::Buf;
use super::context::{launch, Cuda};
use crate::engine::backend::{GridShape, TileGrid};
use crate::engine::s2_checks::{check_cols, check_downsample, check_merge, check_pool};

pub(super) fn tile_merge_fwd(
    cu: &Cuda,
    src: &Buf,
    src_tile_offset: usize,
    split: TileGrid,
    out: &mut Buf,
    out_shape: GridShape,
) {
    let GridShape { batch, rows, cols, channels } = out_shape;
    let (th, tw, tile_len) = check_merge("tile_merge_fwd", out_shape, split, out.len, src.len, src_tile_offset);
    if out.len == 0 {
        return;
    }
    let start = src_tile_offset * tile_len;
    let tiles = src.view(start, split.count() * batch * tile_len);
    let [b, r, c, ch, th, tw, sc] = [batch, rows, cols, channels, th, tw, split.cols].map(|v| v as u64);
    launch!(cu, "tile_merge_fwd_f32", cu.elems(out.len), &tiles, &mut out.data, &b, &r, &c, &ch, &th, &tw, &sc);
}

pub(super) fn tile_merge_bwd(
    cu: &Cuda,
    dout: &Buf,
    out_shape: GridShape,
    split: TileGrid,
    dsrc: &mut Buf,
    src_tile_offset: usize,
) {
    let GridShape { batch, rows, cols, channels } = out_shape;
    let (th, tw, tile_len) = check_merge("tile_merge_bwd", out_shape, split, dout.len, dsrc.len, src_tile_offset);
    let start = src_tile_offset * tile_len;
    let len = split.count() * batch * tile_len;
    if len == 0 {
        return;
    }
    // Only the merged tiles get gradient; the rest of dsrc stays as it is.
    let mut tiles = dsrc.view_mut(start, len);
    let [b, r, c, ch, th, tw, sc, n] = [batch, rows, cols, channels, th, tw, split.cols, len].map(|v| v as u64);
    launch!(cu, "tile_merge_bwd_f32", cu.elems(len), &dout.data, &mut tiles, &b, &r, &c, &ch, &th, &tw, &sc, &n);
}

pub(super) fn area_pool_fwd(cu: &Cuda, src: &Buf, src_shape: GridShape, window: TileGrid, dst: &mut Buf) {
    let (o_r, o_c) = check_pool("area_pool_fwd", src.len, dst.len, src_shape, window);
    if dst.len == 0 {
        return;
    }
    // The divisor as the CPU's f32 backend has it.
    let count = window.count() as f32;
    let [o_r, o_c, ch, wr, wc, n] = [o_r, o_c, src_shape.channels, window.rows, window.cols, dst.len].map(|v| v as u64);
    launch!(
        cu,
        "area_pool_fwd_f32",
        cu.elems(dst.len),
        &src.data,
        &mut dst.data,
        &o_r,
        &o_c,
        &ch,
        &wr,
        &wc,
        &count,
        &n
    );
}

pub(super) fn area_pool_bwd(cu: &Cuda, ddst: &Buf, src_shape: GridShape, window: TileGrid, dsrc: &mut Buf) {
    check_pool("area_pool_bwd", dsrc.len, ddst.len, src_shape, window);
    if dsrc.len == 0 {
        return;
    }
    let count = window.count() as f32;
    let GridShape { rows, cols, channels, .. } = src_shape;
    let [r, c, ch, wr, wc, n] = [rows, cols, channels, window.rows, window.cols, dsrc.len].map(|v| v as u64);
    launch!(cu, "area_pool_bwd_f32", cu.elems(dsrc.len), &ddst.data, &mut dsrc.data, &r, &c, &ch, &wr, &wc, &count, &n);
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
    check_cols("concat_cols_fwd", src.len, dst.len, rows, width, dst_width, col_offset);
    if width == 0 || rows == 0 {
        return;
    }
    let [w, dw, off, n] = [width, dst_width, col_offset, rows * width].map(|v| v as u64);
    launch!(cu, "concat_cols_fwd_f32", cu.elems(rows * width), &src.data, &mut dst.data, &w, &dw, &off, &n);
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
    check_cols("concat_cols_bwd", dsrc.len, ddst.len, rows, width, dst_width, col_offset);
    if width == 0 || rows == 0 {
        return;
    }
    let [w, dw, off, n] = [width, dst_width, col_offset, rows * width].map(|v| v as u64);
    launch!(cu, "concat_cols_bwd_f32", cu.elems(rows * width), &ddst.data, &mut dsrc.data, &w, &dw, &off, &n);
}

pub(super) fn downsample2x2_fwd(cu: &Cuda, src: &Buf, src_shape: GridShape, dst: &mut Buf) {
    let (side, h, c) = check_downsample("downsample2x2_fwd", src_shape, src.len, dst.len);
    if dst.len == 0 {
        return;
    }
    let [side, h, c, n] = [side, h, c, dst.len].map(|v| v as u64);
    launch!(cu, "downsample2x2_fwd_f32", cu.elems(dst.len), &src.data, &mut dst.data, &side, &h, &c, &n);
}

pub(super) fn downsample2x2_bwd(cu: &Cuda, ddst: &Buf, src_shape: GridShape, dsrc: &mut Buf) {
    let (side, h, c) = check_downsample("downsample2x2_bwd", src_shape, dsrc.len, ddst.len);
    if dsrc.len == 0 {
        return;
    }
    let [side, h, c, n] = [side, h, c, dsrc.len].map(|v| v as u64);
    launch!(cu, "downsample2x2_bwd_f32", cu.elems(dsrc.len), &ddst.data, &mut dsrc.data, &side, &h, &c, &n);
}
