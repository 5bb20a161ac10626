//! GEMM through the `gemm` crate (packed, SIMD microkernels, rayon inside).
use super::Real;
use crate::engine::backend::Gemm;
use gemm::Parallelism;
use rayon::prelude::*;

/// Strides `(row, col)` of a row-major `[rows, cols]` matrix read as its
/// transpose when `trans` is set.
fn strides(rows_stored_cols: usize, trans: bool) -> (isize, isize) {
    if trans {
        (1, rows_stored_cols as isize)
    } else {
        (rows_stored_cols as isize, 1)
    }
}

pub fn matmul<T: Real>(a: &[T], b: &[T], c: &mut [T], g: Gemm) {
    matmul_with(a, b, c, g, Parallelism::Rayon(0))
}

/// A product run on the calling thread, for use inside an outer parallel loop.
pub fn matmul_serial<T: Real>(a: &[T], b: &[T], c: &mut [T], g: Gemm) {
    matmul_with(a, b, c, g, Parallelism::None)
}

fn matmul_with<T: Real>(a: &[T], b: &[T], c: &mut [T], g: Gemm, par: Parallelism) {
    let (m, n, k) = (g.m, g.n, g.k);
    let (a_sz, b_sz, c_sz) = (m * k, k * n, m * n);
    assert!(a.len() >= g.batch * a_sz, "matmul: A has {} values, needs {}", a.len(), g.batch * a_sz);
    assert!(b.len() >= g.batch * b_sz, "matmul: B has {} values, needs {}", b.len(), g.batch * b_sz);
    assert!(c.len() >= g.batch * c_sz, "matmul: C has {} values, needs {}", c.len(), g.batch * c_sz);
    if c_sz == 0 {
        return;
    }
    if k == 0 {
        if !g.accumulate {
            c[..g.batch * c_sz].fill(T::zero());
        }
        return;
    }
    // A stored [m,k] (or [k,m]): its stored row length is k (or m).
    let (a_rs, a_cs) = strides(if g.trans_a { m } else { k }, g.trans_a);
    let (b_rs, b_cs) = strides(if g.trans_b { k } else { n }, g.trans_b);
    let alpha = T::of(g.alpha as f64);
    let one = T::one();
    let run = |ai: &[T], bi: &[T], ci: &mut [T], par: Parallelism| unsafe {
        // SAFETY: the asserts above bound every index the strides reach.
        gemm::gemm(
            m,
            n,
            k,
            ci.as_mut_ptr(),
            1,
            n as isize,
            g.accumulate,
            ai.as_ptr(),
            a_cs,
            a_rs,
            bi.as_ptr(),
            b_cs,
            b_rs,
            one,
            alpha,
            false,
            false,
            false,
            par,
        )
    };
    if g.batch == 1 || matches!(par, Parallelism::None) {
        for (i, ci) in c[..g.batch * c_sz].chunks_mut(c_sz).enumerate() {
            run(&a[i * a_sz..(i + 1) * a_sz], &b[i * b_sz..(i + 1) * b_sz], ci, par);
        }
    } else {
        // Many small products: parallel over the batch, serial inside.
        c[..g.batch * c_sz]
            .par_chunks_mut(c_sz)
            .enumerate()
            .for_each(|(i, ci)| run(&a[i * a_sz..(i + 1) * a_sz], &b[i * b_sz..(i + 1) * b_sz], ci, Parallelism::None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, rand_vec};

    fn naive(a: &[f64], b: &[f64], g: Gemm) -> Vec<f64> {
        let (m, n, k) = (g.m, g.n, g.k);
        let mut c = vec![0.0; g.batch * m * n];
        for bt in 0..g.batch {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for p in 0..k {
                        let av = if g.trans_a { a[bt * m * k + p * m + i] } else { a[bt * m * k + i * k + p] };
                        let bv = if g.trans_b { b[bt * k * n + j * k + p] } else { b[bt * k * n + p * n + j] };
                        s += av * bv;
                    }
                    c[bt * m * n + i * n + j] = g.alpha as f64 * s;
                }
            }
        }
        c
    }

    #[test]
    fn matches_naive_for_every_transpose_and_batch() {
        for &(batch, m, n, k) in &[(1, 7, 5, 3), (3, 4, 9, 6), (1, 33, 17, 65)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let mut g = Gemm::new(m, n, k);
                    g.batch = batch;
                    g.trans_a = ta;
                    g.trans_b = tb;
                    g.alpha = 0.5;
                    let a = rand_vec(1, batch * m * k);
                    let b = rand_vec(2, batch * k * n);
                    let want = naive(&a, &b, g);
                    let mut c = vec![7.0; batch * m * n];
                    matmul(&a, &b, &mut c, g);
                    assert_close(&format!("gemm {batch}x{m}x{n}x{k} ta={ta} tb={tb}"), &c, &want, 1e-12);
                    // accumulate adds onto what is there
                    g.accumulate = true;
                    let before = c.clone();
                    matmul(&a, &b, &mut c, g);
                    let twice: Vec<f64> = before.iter().zip(&want).map(|(x, y)| x + y).collect();
                    assert_close("gemm accumulate", &c, &twice, 1e-12);
                }
            }
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let g = Gemm::new(64, 48, 96).trans_b();
        let a = rand_vec(3, 64 * 96);
        let b = rand_vec(4, 48 * 96);
        let want = naive(&a, &b, g);
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        let mut c = vec![0f32; 64 * 48];
        matmul(&a32, &b32, &mut c, g);
        let c64: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        // f32 rounding over k = 96 terms of magnitude <= 1
        assert_close("gemm f32", &c64, &want, 1e-5);
    }
}
