//! Token-grid S2 ops with gradients: tile merge, area pooling, channel concat, 2x2 downsample.
use super::{rows_per_task, Real};
use crate::engine::backend::{GridShape, TileGrid};
use crate::engine::s2_checks::{check_cols, check_downsample, check_merge, check_pool};
use rayon::prelude::*;

/// Stitches `split.rows x split.cols` token-grid tiles back into one grid per
/// image (s2wrapper's and NVILA's `merge_chessboard`). Tile `(i, j)` of image
/// `b` is tile `src_tile_offset + (i * split.cols + j) * out.batch + b` of
/// `src`, a stack of `[th * tw, C]` grids (`th = out.rows / split.rows`, `tw =
/// out.cols / split.cols`); `out` is `[batch, rows * cols, C]`.
pub fn tile_merge_fwd<T: Real>(
    src: &[T],
    src_tile_offset: usize,
    split: TileGrid,
    out: &mut [T],
    out_shape: GridShape,
) {
    let GridShape { batch, rows, cols, channels } = out_shape;
    let (th, tw, tile_len) = check_merge("tile_merge_fwd", out_shape, split, out.len(), src.len(), src_tile_offset);
    if out.is_empty() {
        return;
    }
    let seg = tw * channels;
    // One task per output grid row: split.cols contiguous segments, one from each tile.
    out.par_chunks_mut(cols * channels).enumerate().for_each(|(gr, row)| {
        let (b, r) = (gr / rows, gr % rows);
        let (i, y) = (r / th, r % th);
        for (j, dst) in row.chunks_exact_mut(seg).enumerate() {
            let tile = src_tile_offset + (i * split.cols + j) * batch + b;
            let from = tile * tile_len + y * seg;
            dst.copy_from_slice(&src[from..from + seg]);
        }
    });
}

/// Backward of [`tile_merge_fwd`]: adds each image's grid gradient back into its tiles.
pub fn tile_merge_bwd<T: Real>(
    dout: &[T],
    out_shape: GridShape,
    split: TileGrid,
    dsrc: &mut [T],
    src_tile_offset: usize,
) {
    let GridShape { batch, rows, cols, channels } = out_shape;
    let (th, tw, tile_len) = check_merge("tile_merge_bwd", out_shape, split, dout.len(), dsrc.len(), src_tile_offset);
    let start = src_tile_offset * tile_len;
    let tiles = split.count() * batch;
    if tile_len == 0 {
        return;
    }
    let seg = tw * channels;
    dsrc[start..start + tiles * tile_len].par_chunks_mut(tile_len).enumerate().for_each(|(t, tile)| {
        let b = t % batch;
        let (i, j) = ((t / batch) / split.cols, (t / batch) % split.cols);
        for (y, dst) in tile.chunks_exact_mut(seg).enumerate() {
            let from = ((b * rows + i * th + y) * cols + j * tw) * channels;
            for (d, &g) in dst.iter_mut().zip(&dout[from..from + seg]) {
                *d += g;
            }
        }
    });
}

/// Area interpolation by integer factors (PyTorch `mode='area'`, i.e.
/// adaptive average pooling, for sides that are multiples of the window):
/// `[B, rows * cols, C]` to `[B, (rows / window.rows) * (cols / window.cols),
/// C]`, each output the mean of a `window.rows x window.cols` window.
pub fn area_pool_fwd<T: Real>(src: &[T], src_shape: GridShape, window: TileGrid, dst: &mut [T]) {
    let (o_r, o_c) = check_pool("area_pool_fwd", src.len(), dst.len(), src_shape, window);
    let GridShape { rows, cols, channels, .. } = src_shape;
    if dst.is_empty() {
        return;
    }
    let count = T::of(window.count() as f64);
    // One task per output grid row.
    dst.par_chunks_mut(o_c * channels).enumerate().for_each(|(gr, row)| {
        let (b, r) = (gr / o_r, gr % o_r);
        row.fill(T::zero());
        for dy in 0..window.rows {
            let line = &src[(b * rows + r * window.rows + dy) * cols * channels..][..cols * channels];
            for (q, acc) in row.chunks_exact_mut(channels).enumerate() {
                for dx in 0..window.cols {
                    let px = &line[(q * window.cols + dx) * channels..][..channels];
                    for (a, &v) in acc.iter_mut().zip(px) {
                        *a += v;
                    }
                }
            }
        }
        row.iter_mut().for_each(|v| *v = *v / count);
    });
}

/// Backward of [`area_pool_fwd`]: each source token gets `ddst / window size` added.
pub fn area_pool_bwd<T: Real>(ddst: &[T], src_shape: GridShape, window: TileGrid, dsrc: &mut [T]) {
    let (o_r, o_c) = check_pool("area_pool_bwd", dsrc.len(), ddst.len(), src_shape, window);
    let GridShape { rows, cols, channels, .. } = src_shape;
    if dsrc.is_empty() {
        return;
    }
    let count = T::of(window.count() as f64);
    // One task per source grid row.
    dsrc.par_chunks_mut(cols * channels).enumerate().for_each(|(gr, row)| {
        let (b, r) = (gr / rows, gr % rows);
        let grow = &ddst[(b * o_r + r / window.rows) * o_c * channels..][..o_c * channels];
        for (c, px) in row.chunks_exact_mut(channels).enumerate() {
            let g = &grow[(c / window.cols) * channels..][..channels];
            for (d, &v) in px.iter_mut().zip(g) {
                *d += v / count;
            }
        }
    });
}

/// Writes `src` (`[rows, width]`) into columns `col_offset..col_offset + width`
/// of `dst` (`[rows, dst_width]`), leaving the other columns as they are.
pub fn concat_cols_fwd<T: Real>(
    src: &[T],
    dst: &mut [T],
    rows: usize,
    width: usize,
    dst_width: usize,
    col_offset: usize,
) {
    check_cols("concat_cols_fwd", src.len(), dst.len(), rows, width, dst_width, col_offset);
    if width == 0 || rows == 0 {
        return;
    }
    let per = rows_per_task(rows, width);
    dst.par_chunks_mut(per * dst_width).zip(src.par_chunks(per * width)).for_each(|(d, s)| {
        for (drow, srow) in d.chunks_exact_mut(dst_width).zip(s.chunks_exact(width)) {
            drow[col_offset..col_offset + width].copy_from_slice(srow);
        }
    });
}

/// Backward of [`concat_cols_fwd`]: `dsrc += ddst[:, col_offset..col_offset + width]`.
pub fn concat_cols_bwd<T: Real>(
    ddst: &[T],
    dsrc: &mut [T],
    rows: usize,
    width: usize,
    dst_width: usize,
    col_offset: usize,
) {
    check_cols("concat_cols_bwd", dsrc.len(), ddst.len(), rows, width, dst_width, col_offset);
    if width == 0 || rows == 0 {
        return;
    }
    let per = rows_per_task(rows, width);
    dsrc.par_chunks_mut(per * width).zip(ddst.par_chunks(per * dst_width)).for_each(|(s, d)| {
        for (srow, drow) in s.chunks_exact_mut(width).zip(d.chunks_exact(dst_width)) {
            for (a, &g) in srow.iter_mut().zip(&drow[col_offset..col_offset + width]) {
                *a += g;
            }
        }
    });
}

/// VILA 1.5 `DownSampleBlock` (docs/DESIGN.md 1): pad an odd side with a zero row and
/// column at the end (`R = side` rounded up to even, `h = R / 2`), then output
/// token `k * h + q` (column pair `k` outer, row pair `q` inner: the grid comes
/// out transposed) holds `x[2q][2k], x[2q][2k+1], x[2q+1][2k], x[2q+1][2k+1]`
/// concatenated. `src` is `[B, side^2, C]`, `dst` is `[B, h^2, 4C]`.
pub fn downsample2x2_fwd<T: Real>(src: &[T], src_shape: GridShape, dst: &mut [T]) {
    let (side, h, c) = check_downsample("downsample2x2_fwd", src_shape, src.len(), dst.len());
    if dst.is_empty() {
        return;
    }
    // One task per column pair k of one image: tokens k*h .. k*h + h.
    dst.par_chunks_mut(h * 4 * c).enumerate().for_each(|(bk, out)| {
        let (b, k) = (bk / h, bk % h);
        for (q, tok) in out.chunks_exact_mut(4 * c).enumerate() {
            for (slot, part) in tok.chunks_exact_mut(c).enumerate() {
                let (r, col) = (2 * q + slot / 2, 2 * k + slot % 2);
                if r < side && col < side {
                    part.copy_from_slice(&src[((b * side + r) * side + col) * c..][..c]);
                } else {
                    part.fill(T::zero());
                }
            }
        }
    });
}

/// Backward of [`downsample2x2_fwd`]: adds each token's four parts back into
/// their source tokens; the gradients of padding positions are dropped.
pub fn downsample2x2_bwd<T: Real>(ddst: &[T], src_shape: GridShape, dsrc: &mut [T]) {
    let (side, h, c) = check_downsample("downsample2x2_bwd", src_shape, dsrc.len(), ddst.len());
    if dsrc.is_empty() {
        return;
    }
    // One task per source grid row; every source token has exactly one destination.
    dsrc.par_chunks_mut(side * c).enumerate().for_each(|(br, row)| {
        let (b, r) = (br / side, br % side);
        let q = r / 2;
        for (col, px) in row.chunks_exact_mut(c).enumerate() {
            let (k, slot) = (col / 2, (r % 2) * 2 + col % 2);
            let g = &ddst[((b * h * h + k * h + q) * 4 + slot) * c..][..c];
            for (d, &v) in px.iter_mut().zip(g) {
                *d += v;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    /// Central differences with h = 1e-6 on these linear ops are exact up to
    /// rounding (~1e-10 relative); every backward is held to 1e-7 relative.
    const TOL: f64 = 1e-7;
    const H: f64 = 1e-6;

    /// Checks `bwd` (which must *add*) against finite differences of
    /// `dot(fwd(x), w)`, starting the gradient buffer from nonzero values.
    fn check_bwd(
        what: &str,
        in_len: usize,
        out_len: usize,
        fwd: impl Fn(&[f64], &mut [f64]),
        bwd: impl Fn(&[f64], &mut [f64]),
    ) {
        let x = rand_vec(11, in_len);
        let w = rand_vec(12, out_len);
        let want = fd_grad(&x, H, |xp| {
            let mut out = vec![0.0; out_len];
            fwd(xp, &mut out);
            dot(&out, &w)
        });
        let start = rand_vec(13, in_len);
        let mut got = start.clone();
        bwd(&w, &mut got);
        let got: Vec<f64> = got.iter().zip(&start).map(|(g, s)| g - s).collect();
        assert_close(what, &got, &want, TOL);
    }

    #[test]
    fn tile_merge_bwd_matches_fd() {
        // Square (static S2) and non-square (dynamic S2) tile grids, with
        // tiles of side 3 and extra tiles before and after whose gradient
        // must stay zero.
        for split in [TileGrid::square(2), TileGrid { rows: 2, cols: 3 }, TileGrid { rows: 3, cols: 1 }] {
            let offset = 3;
            let out_shape = GridShape { batch: 2, rows: 3 * split.rows, cols: 3 * split.cols, channels: 3 };
            let tile_len = 3 * 3 * 3;
            let in_len = (offset + split.count() * 2 + 1) * tile_len;
            check_bwd(
                &format!("tile_merge {split:?}"),
                in_len,
                out_shape.numel(),
                |x, out| tile_merge_fwd(x, offset, split, out, out_shape),
                |g, dx| tile_merge_bwd(g, out_shape, split, dx, offset),
            );
        }
    }

    /// A hand-checked merge: four 1x1-channel tiles of side 2, batch 1.
    #[test]
    fn tile_merge_layout() {
        let shape = GridShape::square(1, 4, 1);
        let src: Vec<f64> = (0..16).map(|v| v as f64).collect(); // tile t holds 4t..4t+3
        let mut out = vec![0.0; 16];
        tile_merge_fwd(&src, 0, TileGrid::square(2), &mut out, shape);
        let want = [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.];
        assert_eq!(out, want);
    }

    /// A hand-checked non-square merge (NVILA's `merge_chessboard` with
    /// `num_split_h = 1, num_split_w = 3`): three tiles of side 2 side by side.
    #[test]
    fn tile_merge_layout_one_row_of_three() {
        let shape = GridShape { batch: 1, rows: 2, cols: 6, channels: 1 };
        let src: Vec<f64> = (0..12).map(|v| v as f64).collect(); // tile t holds 4t..4t+3
        let mut out = vec![0.0; 12];
        tile_merge_fwd(&src, 0, TileGrid { rows: 1, cols: 3 }, &mut out, shape);
        let want = [0., 1., 4., 5., 8., 9., 2., 3., 6., 7., 10., 11.];
        assert_eq!(out, want);
    }

    #[test]
    fn area_pool_forward_and_bwd() {
        let (rows, cols) = (6, 12);
        let shape = GridShape { batch: 2, rows, cols, channels: 2 };
        let windows = [(1, 1), (2, 2), (3, 3), (2, 3), (3, 4), (1, 6)];
        for (wr, wc) in windows {
            let window = TileGrid { rows: wr, cols: wc };
            let (o_r, o_c) = (rows / wr, cols / wc);
            let x = rand_vec(21, shape.numel());
            let mut y = vec![0.0; 2 * o_r * o_c * 2];
            area_pool_fwd(&x, shape, window, &mut y);
            let mut want = vec![0.0; y.len()];
            for b in 0..2 {
                for r in 0..o_r {
                    for q in 0..o_c {
                        for ch in 0..2 {
                            let mut s = 0.0;
                            for dy in 0..wr {
                                for dx in 0..wc {
                                    s += x[((b * rows + r * wr + dy) * cols + q * wc + dx) * 2 + ch];
                                }
                            }
                            want[((b * o_r + r) * o_c + q) * 2 + ch] = s / (wr * wc) as f64;
                        }
                    }
                }
            }
            assert_close(&format!("area_pool fwd {window:?}"), &y, &want, 1e-14);
            if window.count() == 1 {
                assert_eq!(x, y, "a 1 x 1 window is the identity");
            }
            check_bwd(
                &format!("area_pool {window:?}"),
                shape.numel(),
                y.len(),
                |x, out| area_pool_fwd(x, shape, window, out),
                |g, dx| area_pool_bwd(g, shape, window, dx),
            );
        }
    }

    #[test]
    fn concat_cols_fwd_and_bwd() {
        let (rows, width, dst_width, off) = (5, 3, 8, 2);
        let src = rand_vec(31, rows * width);
        let mut dst = vec![9.0; rows * dst_width];
        concat_cols_fwd(&src, &mut dst, rows, width, dst_width, off);
        for r in 0..rows {
            for c in 0..dst_width {
                let want = if (off..off + width).contains(&c) { src[r * width + c - off] } else { 9.0 };
                assert_eq!(dst[r * dst_width + c], want);
            }
        }
        check_bwd(
            "concat_cols",
            rows * width,
            rows * dst_width,
            |x, out| concat_cols_fwd(x, out, rows, width, dst_width, off),
            |g, dx| concat_cols_bwd(g, dx, rows, width, dst_width, off),
        );
    }

    /// Hand-worked 3x3 grid, 1 channel, values x[r][c] = 10r + c + 1. Padded to
    /// 4x4 with zeros; h = 2; token k*2 + q = [x[2q][2k], x[2q][2k+1], x[2q+1][2k], x[2q+1][2k+1]].
    #[test]
    fn downsample2x2_hand_worked_3x3() {
        let shape = GridShape::square(1, 3, 1);
        let x = [1., 2., 3., 11., 12., 13., 21., 22., 23.];
        let mut y = vec![f64::NAN; 4 * 4];
        downsample2x2_fwd(&x, shape, &mut y);
        let want = [
            1., 2., 11., 12., // k=0, q=0
            21., 22., 0., 0., // k=0, q=1: row 3 is padding
            3., 0., 13., 0., // k=1, q=0: column 3 is padding
            23., 0., 0., 0., // k=1, q=1
        ];
        assert_eq!(y, want);
        // Two channels: each part carries the token's channels in order.
        let shape2 = GridShape::square(1, 3, 2);
        let x2: Vec<f64> = x.iter().flat_map(|&v| [v, -v]).collect();
        let mut y2 = vec![f64::NAN; 4 * 8];
        downsample2x2_fwd(&x2, shape2, &mut y2);
        let want2: Vec<f64> = want.iter().flat_map(|&v| [v, -v]).collect();
        assert_eq!(y2, want2);
    }

    /// The transposed token order on an even 4x4 grid (no padding).
    #[test]
    fn downsample2x2_even_order() {
        let shape = GridShape::square(1, 4, 1);
        let x: Vec<f64> = (0..16).map(|v| v as f64).collect();
        let mut y = vec![0.0; 16];
        downsample2x2_fwd(&x, shape, &mut y);
        let want = [0., 1., 4., 5., 8., 9., 12., 13., 2., 3., 6., 7., 10., 11., 14., 15.];
        assert_eq!(y, want);
    }

    #[test]
    fn downsample2x2_bwd_matches_fd() {
        for side in [3, 4, 5] {
            let shape = GridShape::square(2, side, 3);
            let h = side.div_ceil(2);
            check_bwd(
                "downsample2x2",
                shape.numel(),
                2 * h * h * 12,
                |x, out| downsample2x2_fwd(x, shape, out),
                |g, dx| downsample2x2_bwd(g, shape, dx),
            );
        }
    }
}
