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
