//! LayerNorm and RMSNorm over the last axis, forward and backward.
use super::{rows_per_task, Real};
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd<T: Real>(
    x: &[T],
    w: &[T],
    b: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    rows: usize,
    cols: usize,
    eps: f64,
) {
    assert_eq!(x.len(), rows * cols);
    let per = rows_per_task(rows, cols);
    y[..rows * cols]
        .par_chunks_mut(per * cols)
        .zip(mean[..rows].par_chunks_mut(per).zip(rstd[..rows].par_chunks_mut(per)))
        .enumerate()
        .for_each(|(ci, (yc, (mc, rc)))| {
            for (r, yr) in yc.chunks_mut(cols).enumerate() {
                let row = ci * per + r;
                (mc[r], rc[r]) = layernorm_row(&x[row * cols..(row + 1) * cols], w, b, yr, eps);
            }
        });
}

/// `x1 += residual`, then `layernorm_fwd` of `x1`, row by row: each row is
/// added and normalized while it is in cache. Bitwise the same as `axpy(1,
/// residual, x1)` followed by `layernorm_fwd` (`1 * r` is exact).
#[allow(clippy::too_many_arguments)]
pub fn add_layernorm_fwd<T: Real>(
    x1: &mut [T],
    residual: &[T],
    w: &[T],
    b: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    rows: usize,
    cols: usize,
    eps: f64,
) {
    assert_eq!(x1.len(), rows * cols);
    assert_eq!(residual.len(), rows * cols, "add_layernorm_fwd: residual length mismatch");
    let per = rows_per_task(rows, cols);
    x1.par_chunks_mut(per * cols)
        .zip(y[..rows * cols].par_chunks_mut(per * cols))
        .zip(mean[..rows].par_chunks_mut(per).zip(rstd[..rows].par_chunks_mut(per)))
        .enumerate()
        .for_each(|(ci, ((xc, yc), (mc, rc)))| {
            for (r, (xr, yr)) in xc.chunks_mut(cols).zip(yc.chunks_mut(cols)).enumerate() {
                let row = ci * per + r;
                for (v, &res) in xr.iter_mut().zip(&residual[row * cols..(row + 1) * cols]) {
                    *v += res;
                }
                (mc[r], rc[r]) = layernorm_row(xr, w, b, yr, eps);
            }
        });
}

/// One row of LayerNorm: mean and variance in f64 (two passes), `yr =
/// (xr - mean) * rstd * w + b`; returns `(mean, rstd)` for backward.
#[inline]
fn layernorm_row<T: Real>(xr: &[T], w: &[T], b: &[T], yr: &mut [T], eps: f64) -> (T, T) {
    let cols = xr.len();
    let mu = xr.iter().map(|v| v.f64()).sum::<f64>() / cols as f64;
    let var = xr.iter().map(|v| (v.f64() - mu).powi(2)).sum::<f64>() / cols as f64;
    let rs = 1.0 / (var + eps).sqrt();
    let (mu_t, rs_t) = (T::of(mu), T::of(rs));
    for i in 0..cols {
        yr[i] = (xr[i] - mu_t) * rs_t * w[i] + b[i];
    }
    (mu_t, rs_t)
}

/// Two passes, no allocation: `dx` in parallel over rows, then the parameter
/// gradients in parallel over column blocks, each summing its rows in order
/// (deterministic whatever the scheduling).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd<T: Real>(
    x: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    rows: usize,
    cols: usize,
) {
    let per = rows_per_task(rows, cols);
    let inv_n = T::one() / T::of(cols as f64);
    dx[..rows * cols].par_chunks_mut(per * cols).enumerate().for_each(|(ci, dxc)| {
        for (r, dxr) in dxc.chunks_mut(cols).enumerate() {
            let row = ci * per + r;
            let xr = &x[row * cols..(row + 1) * cols];
            let dyr = &dy[row * cols..(row + 1) * cols];
            let (mu, rs) = (mean[row], rstd[row]);
            // xhat = (x - mu) * rs; dxhat = dy * w
            let (mut sum_dxhat, mut sum_dxhat_xhat) = (T::zero(), T::zero());
            for i in 0..cols {
                let dxhat = dyr[i] * w[i];
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * (xr[i] - mu) * rs;
            }
            for i in 0..cols {
                let xhat = (xr[i] - mu) * rs;
                dxr[i] += rs * (dyr[i] * w[i] - inv_n * sum_dxhat - xhat * inv_n * sum_dxhat_xhat);
            }
        }
    });
    param_grads(cols, dw, Some(db), |c0, dwc, mut dbc| {
        for row in 0..rows {
            let (mu, rs) = (mean[row], rstd[row]);
            for (k, dwk) in dwc.iter_mut().enumerate() {
                let i = row * cols + c0 + k;
                *dwk += dy[i] * (x[i] - mu) * rs;
                if let Some(dbc) = dbc.as_deref_mut() {
                    dbc[k] += dy[i];
                }
            }
        }
    });
}

/// Runs `f(first_column, dw_block, db_block)` in parallel over column blocks
/// of the parameter gradients.
fn param_grads<T: Real>(
    cols: usize,
    dw: &mut [T],
    db: Option<&mut [T]>,
    f: impl Fn(usize, &mut [T], Option<&mut [T]>) + Sync + Send,
) {
    let block = 64.max(cols.div_ceil(rayon::current_num_threads() * 4));
    match db {
        Some(db) => dw[..cols]
            .par_chunks_mut(block)
            .zip(db[..cols].par_chunks_mut(block))
            .enumerate()
            .for_each(|(bi, (dwc, dbc))| f(bi * block, dwc, Some(dbc))),
        None => dw[..cols].par_chunks_mut(block).enumerate().for_each(|(bi, dwc)| f(bi * block, dwc, None)),
    }
}

pub fn rmsnorm_fwd<T: Real>(x: &[T], w: &[T], y: &mut [T], rstd: &mut [T], rows: usize, cols: usize, eps: f64) {
    assert_eq!(x.len(), rows * cols);
    let per = rows_per_task(rows, cols);
    y[..rows * cols].par_chunks_mut(per * cols).zip(rstd[..rows].par_chunks_mut(per)).enumerate().for_each(
        |(ci, (yc, rc))| {
            for (r, yr) in yc.chunks_mut(cols).enumerate() {
                let row = ci * per + r;
                let xr = &x[row * cols..(row + 1) * cols];
                let ms = xr.iter().map(|v| v.f64() * v.f64()).sum::<f64>() / cols as f64;
                let rs = T::of(1.0 / (ms + eps).sqrt());
                for i in 0..cols {
                    yr[i] = w[i] * (xr[i] * rs);
                }
                rc[r] = rs;
            }
        },
    );
}

/// Same two-pass scheme as `layernorm_bwd`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<T: Real>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dw: &mut [T],
    rows: usize,
    cols: usize,
) {
    let per = rows_per_task(rows, cols);
    dx[..rows * cols].par_chunks_mut(per * cols).enumerate().for_each(|(ci, dxc)| {
        for (r, dxr) in dxc.chunks_mut(cols).enumerate() {
            let row = ci * per + r;
            let xr = &x[row * cols..(row + 1) * cols];
            let dyr = &dy[row * cols..(row + 1) * cols];
            let rs = rstd[row];
            // y = w * x * rs, rs = (mean(x^2) + eps)^-1/2
            let dot: T = (0..cols).map(|i| dyr[i] * w[i] * xr[i]).sum();
            let c = dot * rs * rs * rs / T::of(cols as f64);
            for i in 0..cols {
                dxr[i] += dyr[i] * w[i] * rs - xr[i] * c;
            }
        }
    });
    param_grads(cols, dw, None, |c0, dwc, _| {
        for (row, &rs) in rstd[..rows].iter().enumerate() {
            for (k, dwk) in dwc.iter_mut().enumerate() {
                let i = row * cols + c0 + k;
                *dwk += dy[i] * x[i] * rs;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    const R: usize = 5;
    const C: usize = 7;
    // f64 central differences, h = 1e-6: agreement to ~1e-9 is expected.
    const TOL: f64 = 1e-7;

    fn ln(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        let (mut y, mut m, mut r) = (vec![0.0; R * C], vec![0.0; R], vec![0.0; R]);
        layernorm_fwd(x, w, b, &mut y, &mut m, &mut r, R, C, 1e-5);
        y
    }

    #[test]
    fn layernorm_matches_definition_and_finite_differences() {
        let x: Vec<f64> = rand_vec(1, R * C).iter().map(|v| 3.0 * v + 0.5).collect();
        let w: Vec<f64> = rand_vec(2, C).iter().map(|v| 1.0 + 0.3 * v).collect();
        let b = rand_vec(3, C);
        let gy = rand_vec(4, R * C);
        let y = ln(&x, &w, &b);
        // forward against the textbook formula
        for r in 0..R {
            let xr = &x[r * C..(r + 1) * C];
            let mu = xr.iter().sum::<f64>() / C as f64;
            let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / C as f64;
            for i in 0..C {
                let want = (xr[i] - mu) / (var + 1e-5).sqrt() * w[i] + b[i];
                assert!((y[r * C + i] - want).abs() < 1e-12);
            }
        }
        let (mut m, mut rs, mut yy) = (vec![0.0; R], vec![0.0; R], vec![0.0; R * C]);
        layernorm_fwd(&x, &w, &b, &mut yy, &mut m, &mut rs, R, C, 1e-5);
        let (mut dx, mut dw, mut db) = (vec![0.0; R * C], vec![0.0; C], vec![0.0; C]);
        layernorm_bwd(&x, &w, &m, &rs, &gy, &mut dx, &mut dw, &mut db, R, C);
        assert_close("layernorm dx", &dx, &fd_grad(&x, 1e-6, |x| dot(&ln(x, &w, &b), &gy)), TOL);
        assert_close("layernorm dw", &dw, &fd_grad(&w, 1e-6, |w| dot(&ln(&x, w, &b), &gy)), TOL);
        assert_close("layernorm db", &db, &fd_grad(&b, 1e-6, |b| dot(&ln(&x, &w, b), &gy)), TOL);
    }

    /// The fused residual add + LayerNorm is bitwise the unfused `axpy(1, residual, x1)`
    /// then `layernorm_fwd`, in f32 and f64, over several row-chunk layouts.
    #[test]
    fn add_layernorm_is_bitwise_axpy_then_layernorm() {
        fn check<T: Real>(rows: usize, cols: usize, seed: u64) {
            let v = |s: u64, n: usize, k: f64, o: f64| -> Vec<T> {
                rand_vec(s, n).iter().map(|x| T::of(k * x + o)).collect()
            };
            let (x1, res) = (v(seed, rows * cols, 3.0, 0.5), v(seed + 1, rows * cols, 2.0, -0.25));
            let (w, b) = (v(seed + 2, cols, 0.3, 1.0), v(seed + 3, cols, 1.0, 0.0));
            let eps = 1e-6;
            let mut want_x1 = x1.clone();
            crate::engine::cpu::elementwise::axpy(T::of(1.0), &res, &mut want_x1);
            let (mut want_y, mut want_m, mut want_r) =
                (vec![T::zero(); rows * cols], vec![T::zero(); rows], vec![T::zero(); rows]);
            layernorm_fwd(&want_x1, &w, &b, &mut want_y, &mut want_m, &mut want_r, rows, cols, eps);
            let mut got_x1 = x1;
            let nan = T::nan();
            let (mut y, mut m, mut r) = (vec![nan; rows * cols], vec![nan; rows], vec![nan; rows]);
            add_layernorm_fwd(&mut got_x1, &res, &w, &b, &mut y, &mut m, &mut r, rows, cols, eps);
            let bits = |a: &[T]| a.iter().map(|v| v.f64().to_bits()).collect::<Vec<_>>();
            let name = std::any::type_name::<T>();
            assert_eq!(bits(&got_x1), bits(&want_x1), "{name} [{rows}, {cols}] x1");
            assert_eq!(bits(&y), bits(&want_y), "{name} [{rows}, {cols}] y");
            assert_eq!(bits(&m), bits(&want_m), "{name} [{rows}, {cols}] mean");
            assert_eq!(bits(&r), bits(&want_r), "{name} [{rows}, {cols}] rstd");
        }
        // one row per task (cols > 16384), many rows per task, a ragged last task
        for (rows, cols, seed) in [(R, C, 10), (67, 96, 20), (3, 20_000, 30), (1000, 33, 40)] {
            check::<f32>(rows, cols, seed);
            check::<f64>(rows, cols, seed);
        }
    }

    fn rms(x: &[f64], w: &[f64]) -> Vec<f64> {
        let (mut y, mut r) = (vec![0.0; R * C], vec![0.0; R]);
        rmsnorm_fwd(x, w, &mut y, &mut r, R, C, 1e-5);
        y
    }

    #[test]
    fn rmsnorm_matches_finite_differences() {
        let x = rand_vec(5, R * C);
        let w: Vec<f64> = rand_vec(6, C).iter().map(|v| 1.0 + 0.3 * v).collect();
        let gy = rand_vec(7, R * C);
        let (mut y, mut rs) = (vec![0.0; R * C], vec![0.0; R]);
        rmsnorm_fwd(&x, &w, &mut y, &mut rs, R, C, 1e-5);
        let ms0 = x[..C].iter().map(|v| v * v).sum::<f64>() / C as f64;
        assert!((y[0] - w[0] * x[0] / (ms0 + 1e-5).sqrt()).abs() < 1e-12);
        let (mut dx, mut dw) = (vec![0.0; R * C], vec![0.0; C]);
        rmsnorm_bwd(&x, &w, &rs, &gy, &mut dx, &mut dw, R, C);
        assert_close("rmsnorm dx", &dx, &fd_grad(&x, 1e-6, |x| dot(&rms(x, &w), &gy)), TOL);
        assert_close("rmsnorm dw", &dw, &fd_grad(&w, 1e-6, |w| dot(&rms(&x, w), &gy)), TOL);
    }
}
