//! Pixel-side S2 ops: bicubic resize, chessboard tile split, patchify
//! (kernels/image.cu). Forward only; the checks are the CPU backend's.

use super::backend::Buf;
use super::context::{launch, Cuda};
use crate::engine::backend::ImageShape;

pub(super) fn resize_bicubic(cu: &Cuda, src: &Buf, src_shape: ImageShape, dst: &mut Buf, dst_size: usize) {
    let s = src_shape.size;
    let d = dst_size;
    let planes = src_shape.batch * src_shape.channels;
    assert_eq!(src.len, src_shape.numel(), "resize_bicubic: src length does not match {src_shape:?}");
    assert_eq!(dst.len, planes * d * d, "resize_bicubic: dst length does not match {planes} planes of {d}x{d}");
    if planes == 0 || d == 0 {
        return;
    }
    assert!(s > 0, "resize_bicubic: empty source image");
    if d == s {
        // Bit for bit, as on the CPU.
        let n = dst.len;
        super::elementwise::copy(cu, src, 0, dst, 0, n);
        return;
    }
    // The source/destination ratio in f64 on the host, as the CPU computes it.
    let scale = s as f64 / d as f64;
    let (planes64, s64, d64) = (planes as u64, s as u64, d as u64);
    launch!(cu, "resize_bicubic_f32", cu.elems(dst.len), &src.data, &mut dst.data, &planes64, &s64, &d64, &scale);
}

pub(super) fn tile_split(cu: &Cuda, src: &Buf, src_shape: ImageShape, n: usize, dst: &mut Buf, dst_tile_offset: usize) {
    let ImageShape { batch, channels, size } = src_shape;
    assert!(n > 0 && size.is_multiple_of(n), "tile_split: image size {size} is not a multiple of the split {n}");
    assert_eq!(src.len, src_shape.numel(), "tile_split: src length does not match {src_shape:?}");
    let s = size / n;
    let tile_len = channels * s * s;
    let tiles = n * n * batch;
    let start = dst_tile_offset * tile_len;
    assert!(
        dst.len >= start + tiles * tile_len,
        "tile_split: dst holds {} values, tiles {dst_tile_offset}..{} need {}",
        dst.len,
        dst_tile_offset + tiles,
        start + tiles * tile_len
    );
    let len = tiles * tile_len;
    if len == 0 {
        return;
    }
    // Only the tiles written: the rest of dst stays as it is.
    let mut out = dst.view_mut(start, len);
    let (b64, c64, size64, n64, len64) = (batch as u64, channels as u64, size as u64, n as u64, len as u64);
    launch!(cu, "tile_split_f32", cu.elems(len), &src.data, &mut out, &b64, &c64, &size64, &n64, &len64);
}

pub(super) fn patchify(cu: &Cuda, src: &Buf, shape: ImageShape, patch: usize, dst: &mut Buf) {
    let ImageShape { batch, channels, size } = shape;
    assert!(patch > 0, "patchify: patch size 0");
    assert_eq!(src.len, shape.numel(), "patchify: src length does not match {shape:?}");
    let p = patch;
    let g = size / p;
    let row_len = channels * p * p;
    assert_eq!(dst.len, batch * g * g * row_len, "patchify: dst length does not match [{batch}, {g}*{g}, {row_len}]");
    if dst.len == 0 {
        return;
    }
    let (c64, size64, p64, len64) = (channels as u64, size as u64, p as u64, dst.len as u64);
    launch!(cu, "patchify_f32", cu.elems(dst.len), &src.data, &mut dst.data, &c64, &size64, &p64, &len64);
}
