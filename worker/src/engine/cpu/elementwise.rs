//! Elementwise and row-broadcast ops, parallel over chunks.
use super::Real;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn fill<T: Real>(buf: &mut [T], v: T) {
    buf.par_chunks_mut(CHUNK).for_each(|c| c.fill(v));
}

pub fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "axpy length mismatch");
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (yi, &xi) in yc.iter_mut().zip(xc) {
            *yi += alpha * xi;
        }
    });
}

pub fn scale<T: Real>(x: &mut [T], s: T) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Accumulates in f64 per chunk and sums chunks in a fixed order, so the
/// result does not depend on thread scheduling.
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|v| v.f64() * v.f64()).sum()).collect();
    parts.iter().sum()
}

/// `y[r, :] += bias` for every row.
pub fn bias_add<T: Real>(y: &mut [T], bias: &[T], rows: usize, cols: usize) {
    assert_eq!(y.len(), rows * cols);
    assert_eq!(bias.len(), cols);
    let per = super::rows_per_task(rows, cols);
    y.par_chunks_mut(per * cols).for_each(|c| {
        for row in c.chunks_mut(cols) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// `out += column sums of x` (`x` is `[rows, cols]`), parallel over column blocks.
pub fn col_sums_into<T: Real>(x: &[T], out: &mut [T], rows: usize, cols: usize) {
    assert_eq!(x.len(), rows * cols);
    assert_eq!(out.len(), cols);
    let block = 256.max(cols.div_ceil(rayon::current_num_threads() * 4));
    out.par_chunks_mut(block).enumerate().for_each(|(bi, oc)| {
        let c0 = bi * block;
        for r in 0..rows {
            let row = &x[r * cols + c0..r * cols + c0 + oc.len()];
            for (o, &v) in oc.iter_mut().zip(row) {
                *o += v;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    // f64 central differences, h = 1e-6; these ops are linear, so agreement
    // is limited only by rounding (~1e-10).
    const TOL: f64 = 1e-8;

    #[test]
    fn bias_add_and_its_backward_match_finite_differences() {
        let (rows, cols) = (5, 7);
        let x = rand_vec(1, rows * cols);
        let bias = rand_vec(2, cols);
        let gy = rand_vec(3, rows * cols);
        let f = |b: &[f64]| {
            let mut y = x.clone();
            bias_add(&mut y, b, rows, cols);
            dot(&y, &gy)
        };
        // starts non-zero: the backward must add, not overwrite
        let mut db = vec![0.5; cols];
        col_sums_into(&gy, &mut db, rows, cols);
        let want: Vec<f64> = fd_grad(&bias, 1e-6, f).iter().map(|g| g + 0.5).collect();
        assert_close("bias grad", &db, &want, TOL);
    }

    #[test]
    fn axpy_scale_and_sum_squares() {
        let x = rand_vec(4, 40_000);
        let mut y = rand_vec(5, 40_000);
        let y0 = y.clone();
        axpy(0.25, &x, &mut y);
        for i in [0, 12_345, 39_999] {
            assert!((y[i] - (y0[i] + 0.25 * x[i])).abs() < 1e-15);
        }
        scale(&mut y, 2.0);
        assert!((y[7] - 2.0 * (y0[7] + 0.25 * x[7])).abs() < 1e-15);
        let want: f64 = x.iter().map(|v| v * v).sum();
        assert!((sum_squares(&x) - want).abs() < 1e-9 * want);
        let mut z = vec![1.0; 100];
        fill(&mut z, 3.0);
        assert!(z.iter().all(|&v| v == 3.0));
    }
}
