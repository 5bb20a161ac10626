//! Pixel-side S2 ops: bicubic resize, chessboard tile split, patchify. Forward only.
use super::Real;
use crate::engine::backend::ImageShape;
use rayon::prelude::*;

/// PyTorch's bicubic coefficient `A`.
const CUBIC_A: f64 = -0.75;

/// Cubic convolution kernel for `|x| <= 1` (PyTorch `cubic_convolution1`).
#[inline]
fn cubic1(x: f64) -> f64 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

/// Cubic convolution kernel for `1 < |x| < 2` (PyTorch `cubic_convolution2`).
#[inline]
fn cubic2(x: f64) -> f64 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// The four source indices (clamped to `[0, in_size - 1]`) and weights of each
/// output position along one axis, as PyTorch computes them for
/// `align_corners=False`: source coordinate `(i + 0.5) * in / out - 0.5`,
/// not clamped at zero for cubic.
fn cubic_taps<T: Real>(in_size: usize, out_size: usize) -> Vec<([usize; 4], [T; 4])> {
    let scale = in_size as f64 / out_size as f64;
    let last = in_size as i64 - 1;
    (0..out_size)
        .map(|i| {
            let real = scale * (i as f64 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let base = base as i64;
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let idx = [0, 1, 2, 3].map(|k| (base - 1 + k as i64).clamp(0, last) as usize);
            (idx, w.map(T::of))
        })
        .collect()
}

/// Bicubic resize of `[B, C, S, S]` to `[B, C, D, D]`, exactly PyTorch's
/// `F.interpolate(mode='bicubic', align_corners=False, antialias=False)` (up to
/// rounding: separable, rows then columns). `D == S` copies.
pub fn resize_bicubic<T: Real>(src: &[T], src_shape: ImageShape, dst: &mut [T], dst_size: usize) {
    let s = src_shape.size;
    let d = dst_size;
    let planes = src_shape.batch * src_shape.channels;
    assert_eq!(src.len(), src_shape.numel(), "resize_bicubic: src length does not match {src_shape:?}");
    assert_eq!(dst.len(), planes * d * d, "resize_bicubic: dst length does not match {planes} planes of {d}x{d}");
    if planes == 0 || d == 0 {
        return;
    }
    assert!(s > 0, "resize_bicubic: empty source image");
    if d == s {
        dst.copy_from_slice(src);
        return;
    }
    let taps = cubic_taps::<T>(s, d);
    dst.par_chunks_mut(d * d).zip(src.par_chunks(s * s)).for_each_init(
        // Horizontal pass output: S rows of D columns.
        || vec![T::zero(); s * d],
        |tmp, (out, img)| {
            for (trow, irow) in tmp.chunks_exact_mut(d).zip(img.chunks_exact(s)) {
                for (o, (idx, w)) in trow.iter_mut().zip(&taps) {
                    *o = w[0] * irow[idx[0]] + w[1] * irow[idx[1]] + w[2] * irow[idx[2]] + w[3] * irow[idx[3]];
                }
            }
            for (orow, (idx, w)) in out.chunks_exact_mut(d).zip(&taps) {
                let r = [0, 1, 2, 3].map(|k| &tmp[idx[k] * d..(idx[k] + 1) * d]);
                for (x, o) in orow.iter_mut().enumerate() {
                    *o = w[0] * r[0][x] + w[1] * r[1][x] + w[2] * r[2][x] + w[3] * r[3][x];
                }
            }
        },
    );
}

/// Cuts each `[C, S, S]` image into `n x n` tiles of side `S / n` in
/// s2wrapper's chessboard order: tile `(i, j)` (row `i`, column `j`) of image
/// `b` becomes image `dst_tile_offset + (i * n + j) * batch + b` of `dst`, a
/// stack of `[C, S/n, S/n]` images. Other images of `dst` are left as they are.
pub fn tile_split<T: Real>(src: &[T], src_shape: ImageShape, n: usize, dst: &mut [T], dst_tile_offset: usize) {
    let ImageShape { batch, channels, size } = src_shape;
    assert!(n > 0 && size.is_multiple_of(n), "tile_split: image size {size} is not a multiple of the split {n}");
    assert_eq!(src.len(), src_shape.numel(), "tile_split: src length does not match {src_shape:?}");
    let s = size / n;
    let tile_len = channels * s * s;
    let tiles = n * n * batch;
    let start = dst_tile_offset * tile_len;
    assert!(
        dst.len() >= start + tiles * tile_len,
        "tile_split: dst holds {} values, tiles {dst_tile_offset}..{} need {}",
        dst.len(),
        dst_tile_offset + tiles,
        start + tiles * tile_len
    );
    if tile_len == 0 {
        return;
    }
    dst[start..start + tiles * tile_len].par_chunks_mut(tile_len).enumerate().for_each(|(t, tile)| {
        let b = t % batch;
        let (i, j) = ((t / batch) / n, (t / batch) % n);
        for c in 0..channels {
            let plane = &src[(b * channels + c) * size * size..(b * channels + c + 1) * size * size];
            for (y, row) in tile[c * s * s..(c + 1) * s * s].chunks_exact_mut(s).enumerate() {
                let from = (i * s + y) * size + j * s;
                row.copy_from_slice(&plane[from..from + s]);
            }
        }
    });
}

/// Patch-embedding input: `[B, C, S, S]` to `[B, g*g, C*p*p]` with `g = S / p`
/// (floored: trailing pixels are dropped, as a stride-`p` Conv2d drops them, e.g.
/// 384 / 14 = 27). Patch `(r, c)` is row `r * g + c`; each row is laid out
/// `[C][p][p]` like a Conv2d weight, so the conv is `rows @ W^T`.
pub fn patchify<T: Real>(src: &[T], shape: ImageShape, patch: usize, dst: &mut [T]) {
    let ImageShape { batch, channels, size } = shape;
    assert!(patch > 0, "patchify: patch size 0");
    assert_eq!(src.len(), shape.numel(), "patchify: src length does not match {shape:?}");
    let p = patch;
    let g = size / p;
    let row_len = channels * p * p;
    assert_eq!(dst.len(), batch * g * g * row_len, "patchify: dst length does not match [{batch}, {g}*{g}, {row_len}]");
    if dst.is_empty() {
        return;
    }
    // One task per band of patches (one patch row of one image).
    dst.par_chunks_mut(g * row_len).enumerate().for_each(|(band, out)| {
        let (b, r) = (band / g, band % g);
        for (c, prow) in out.chunks_exact_mut(row_len).enumerate() {
            for ch in 0..channels {
                let plane = &src[(b * channels + ch) * size * size..(b * channels + ch + 1) * size * size];
                for (y, dst_line) in prow[ch * p * p..(ch + 1) * p * p].chunks_exact_mut(p).enumerate() {
                    let from = (r * p + y) * size + c * p;
                    dst_line.copy_from_slice(&plane[from..from + p]);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, rand_vec};

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// Against PyTorch (tools/make_op_fixtures.py, float64 reference): 10 -> 4,
    /// 7 (down) and 13 (up). Tolerance 1e-5 max abs in f32, 1e-12 in f64.
    #[test]
    fn bicubic_matches_torch() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/ops/bicubic.json")).unwrap();
        let dims: Vec<usize> =
            doc["input_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let shape = ImageShape { batch: dims[0], channels: dims[1], size: dims[2] };
        assert_eq!(dims[2], dims[3]);
        let input: Vec<f64> = doc["input"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        // The input is (i * 0.37) mod 1.3; regenerate it to be sure what was resized.
        let regen: Vec<f64> = (0..shape.numel()).map(|i| (i as f64 * 0.37) % 1.3).collect();
        assert!(max_abs_diff(&input, &regen) < 1e-15);
        let cases = doc["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        for case in cases {
            let d = case["size"].as_u64().unwrap() as usize;
            let want: Vec<f64> = case["output"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let mut got = vec![0.0f64; shape.batch * shape.channels * d * d];
            resize_bicubic::<f64>(&input, shape, &mut got, d);
            let e64 = max_abs_diff(&got, &want);
            assert!(e64 < 1e-12, "bicubic f64 10 -> {d}: max abs error {e64:.3e}");

            let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
            let mut got32 = vec![0.0f32; got.len()];
            resize_bicubic::<f32>(&input32, shape, &mut got32, d);
            let got32: Vec<f64> = got32.iter().map(|&v| v as f64).collect();
            let e32 = max_abs_diff(&got32, &want);
            assert!(e32 < 1e-5, "bicubic f32 10 -> {d}: max abs error {e32:.3e}");
        }
    }

    /// Same size is the identity, bit for bit.
    #[test]
    fn bicubic_same_size_is_identity() {
        let shape = ImageShape { batch: 2, channels: 3, size: 9 };
        let x: Vec<f32> = rand_vec(1, shape.numel()).iter().map(|&v| v as f32).collect();
        let mut y = vec![0.0f32; x.len()];
        resize_bicubic(&x, shape, &mut y, 9);
        assert_eq!(x, y);
    }

    /// The taps themselves reproduce the identity at scale 1 (weights 0, 1, 0, 0
    /// exactly), so the copy shortcut changes nothing.
    #[test]
    fn bicubic_unit_scale_weights_are_exact() {
        for (i, (idx, w)) in cubic_taps::<f64>(6, 6).iter().enumerate() {
            assert_eq!(*w, [0.0, 1.0, 0.0, 0.0]);
            assert_eq!(idx[1], i);
        }
    }

    /// Batches and planes are resized independently (checked plane by plane
    /// against single-plane calls), and a constant image stays constant.
    #[test]
    fn bicubic_planes_independent_and_constant_preserved() {
        let shape = ImageShape { batch: 2, channels: 3, size: 8 };
        let x = rand_vec(2, shape.numel());
        for d in [3, 5, 12] {
            let mut y = vec![0.0; 6 * d * d];
            resize_bicubic::<f64>(&x, shape, &mut y, d);
            for p in 0..6 {
                let one = ImageShape { batch: 1, channels: 1, size: 8 };
                let mut y1 = vec![0.0; d * d];
                resize_bicubic::<f64>(&x[p * 64..(p + 1) * 64], one, &mut y1, d);
                assert_eq!(&y[p * d * d..(p + 1) * d * d], &y1[..]);
            }
            let c = vec![0.25; 64];
            let mut yc = vec![0.0; d * d];
            resize_bicubic::<f64>(&c, ImageShape { batch: 1, channels: 1, size: 8 }, &mut yc, d);
            assert!(yc.iter().all(|v| (v - 0.25).abs() < 1e-15));
        }
    }

    /// Hand-checked chessboard placement on a 4x4 image split 2x2, batch 2,
    /// written after one pre-existing tile that must stay untouched.
    #[test]
    fn tile_split_chessboard_order() {
        let shape = ImageShape { batch: 2, channels: 1, size: 4 };
        let x: Vec<f64> = (0..32).map(|v| v as f64).collect();
        let mut dst = vec![-1.0; 4 * 9];
        tile_split::<f64>(&x, shape, 2, &mut dst, 1);
        assert_eq!(&dst[0..4], &[-1.0; 4]);
        // Tile (i, j) of image b sits at 1 + (i*2 + j)*2 + b.
        let tile = |t: usize| &dst[t * 4..(t + 1) * 4];
        assert_eq!(tile(1), &[0.0, 1.0, 4.0, 5.0]); // (0,0) b0
        assert_eq!(tile(2), &[16.0, 17.0, 20.0, 21.0]); // (0,0) b1
        assert_eq!(tile(3), &[2.0, 3.0, 6.0, 7.0]); // (0,1) b0
        assert_eq!(tile(5), &[8.0, 9.0, 12.0, 13.0]); // (1,0) b0
        assert_eq!(tile(8), &[26.0, 27.0, 30.0, 31.0]); // (1,1) b1
    }

    /// tile_split then tile_merge gives the image back (channels moved last, as
    /// a ViT's token grid has them), with tiles at an offset inside a larger stack.
    #[test]
    fn tile_split_then_merge_round_trip() {
        let (batch, channels, size, n, offset) = (2, 3, 12, 3, 5);
        let shape = ImageShape { batch, channels, size };
        let x = rand_vec(3, shape.numel());
        let s = size / n;
        let total_tiles = offset + n * n * batch + 2;
        let mut tiles = vec![7.0; total_tiles * channels * s * s];
        tile_split::<f64>(&x, shape, n, &mut tiles, offset);
        assert!(tiles[..offset * channels * s * s].iter().all(|&v| v == 7.0));
        assert!(tiles[(offset + n * n * batch) * channels * s * s..].iter().all(|&v| v == 7.0));
        // [C, s, s] tiles -> [s*s, C] token grids.
        let mut grids = vec![0.0; tiles.len()];
        for t in 0..total_tiles {
            for c in 0..channels {
                for k in 0..s * s {
                    grids[t * channels * s * s + k * channels + c] = tiles[t * channels * s * s + c * s * s + k];
                }
            }
        }
        let gs = crate::engine::backend::GridShape::square(batch, size, channels);
        let mut merged = vec![0.0; gs.numel()];
        let split = crate::engine::backend::TileGrid::square(n);
        super::super::s2::tile_merge_fwd::<f64>(&grids, offset, split, &mut merged, gs);
        for b in 0..batch {
            for c in 0..channels {
                for k in 0..size * size {
                    assert_eq!(merged[(b * size * size + k) * channels + c], x[(b * channels + c) * size * size + k]);
                }
            }
        }
    }

    /// patchify rows times the flattened Conv2d weight equal a direct stride-p
    /// convolution, including a size that is not a multiple of the patch
    /// (11 / 3: the last 2 pixels are dropped). Tolerance 1e-12 relative (f64).
    #[test]
    fn patchify_gemm_equals_conv() {
        for (batch, channels, size, p, outc) in [(2, 3, 11, 3, 4), (1, 2, 8, 4, 3), (1, 1, 5, 1, 2)] {
            let shape = ImageShape { batch, channels, size };
            let x = rand_vec(4, shape.numel());
            let w = rand_vec(5, outc * channels * p * p); // [outc, C, p, p]
            let g = size / p;
            let row = channels * p * p;
            let mut rows = vec![f64::NAN; batch * g * g * row];
            patchify::<f64>(&x, shape, p, &mut rows);
            let mut got = vec![0.0; batch * g * g * outc];
            let mut want = vec![0.0; batch * g * g * outc];
            for b in 0..batch {
                for r in 0..g {
                    for c in 0..g {
                        let tok = b * g * g + r * g + c;
                        for o in 0..outc {
                            got[tok * outc + o] = (0..row).map(|k| rows[tok * row + k] * w[o * row + k]).sum::<f64>();
                            let mut acc = 0.0;
                            for ch in 0..channels {
                                for y in 0..p {
                                    for xx in 0..p {
                                        acc += w[((o * channels + ch) * p + y) * p + xx]
                                            * x[((b * channels + ch) * size + r * p + y) * size + c * p + xx];
                                    }
                                }
                            }
                            want[tok * outc + o] = acc;
                        }
                    }
                }
            }
            assert_close("patchify conv", &got, &want, 1e-12);
        }
    }
}
