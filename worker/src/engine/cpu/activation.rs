//! GELU (tanh and erf forms) and the SiLU-gated product of LLaMA's MLP.
use super::Real;
use crate::engine::backend::GeluKind;
use rayon::prelude::*;

const CHUNK: usize = 1 << 13;
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline]
fn gelu<T: Real>(x: T, kind: GeluKind) -> T {
    let half = T::of(0.5);
    match kind {
        GeluKind::Tanh => {
            let u = T::of(SQRT_2_OVER_PI) * (x + T::of(0.044715) * x * x * x);
            half * x * (T::one() + u.tanh_fast())
        }
        GeluKind::Erf => half * x * (T::one() + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf()),
    }
}

#[inline]
fn gelu_grad<T: Real>(x: T, kind: GeluKind) -> T {
    let half = T::of(0.5);
    match kind {
        GeluKind::Tanh => {
            let u = T::of(SQRT_2_OVER_PI) * (x + T::of(0.044715) * x * x * x);
            let t = u.tanh_fast();
            let du = T::of(SQRT_2_OVER_PI) * (T::one() + T::of(3.0 * 0.044715) * x * x);
            half * (T::one() + t) + half * x * (T::one() - t * t) * du
        }
        GeluKind::Erf => {
            let cdf = half * (T::one() + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
            cdf + x * T::of(FRAC_1_SQRT_2PI) * (-(x * x) * half).exp()
        }
    }
}

pub fn gelu_fwd<T: Real>(x: &[T], y: &mut [T], kind: GeluKind) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (yi, &xi) in yc.iter_mut().zip(xc) {
            *yi = gelu(xi, kind);
        }
    });
}

/// `y[r, :] += bias`, then `g = gelu(y)`, row chunks in parallel: bitwise
/// the same as `bias_add` followed by `gelu_fwd`, with one pass over `y`.
pub fn bias_gelu_fwd<T: Real>(y: &mut [T], bias: &[T], g: &mut [T], rows: usize, cols: usize, kind: GeluKind) {
    assert_eq!(y.len(), rows * cols);
    assert_eq!(bias.len(), cols);
    assert!(g.len() >= rows * cols, "bias_gelu_fwd: output shorter than [{rows}, {cols}]");
    let per = super::rows_per_task(rows, cols);
    y.par_chunks_mut(per * cols).zip(g[..rows * cols].par_chunks_mut(per * cols)).for_each(|(yc, gc)| {
        for (yr, gr) in yc.chunks_mut(cols).zip(gc.chunks_mut(cols)) {
            for ((yi, gi), &b) in yr.iter_mut().zip(gr.iter_mut()).zip(bias) {
                *yi += b;
                *gi = gelu(*yi, kind);
            }
        }
    });
}

pub fn gelu_bwd<T: Real>(x: &[T], dy: &[T], dx: &mut [T], kind: GeluKind) {
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dc, (xc, gc))| {
        for i in 0..dc.len() {
            dc[i] += gc[i] * gelu_grad(xc[i], kind);
        }
    });
}

#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

pub fn swiglu_fwd<T: Real>(gate: &[T], up: &[T], out: &mut [T]) {
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(oc, (gc, uc))| {
        for i in 0..oc.len() {
            oc[i] = gc[i] * sigmoid(gc[i]) * uc[i];
        }
    });
}

pub fn swiglu_bwd<T: Real>(gate: &[T], up: &[T], dout: &[T], dgate: &mut [T], dup: &mut [T]) {
    dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).enumerate().for_each(|(ci, (dgc, duc))| {
        let base = ci * CHUNK;
        for i in 0..dgc.len() {
            let (g, u, d) = (gate[base + i], up[base + i], dout[base + i]);
            let s = sigmoid(g);
            duc[i] += d * g * s;
            dgc[i] += d * u * s * (T::one() + g * (T::one() - s));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    // f64 central differences, h = 1e-6.
    const TOL: f64 = 1e-7;

    #[test]
    fn gelu_forms_match_reference_values_and_finite_differences() {
        // torch.nn.functional.gelu(torch.tensor([-2., -0.5, 0.3, 1.7]), approximate=...) in float64
        let x: [f64; 4] = [-2.0, -0.5, 0.3, 1.7];
        let tanh_ref = [-0.04540230591222494, -0.15428599017485606, 0.18537092354275922, 1.624105895551156];
        let erf_ref = [-0.04550026389635842, -0.15426876936299344, 0.1853734266566858, 1.6242387133104768];
        for (kind, want) in [(GeluKind::Tanh, tanh_ref), (GeluKind::Erf, erf_ref)] {
            let mut y = vec![0.0f64; 4];
            gelu_fwd(&x, &mut y, kind);
            for i in 0..4 {
                assert!((y[i] - want[i]).abs() < 1e-12, "{kind:?} gelu({}) = {} want {}", x[i], y[i], want[i]);
            }
            let xs: Vec<f64> = rand_vec(1, 50).iter().map(|v| 4.0 * v).collect();
            let gy = rand_vec(2, 50);
            let mut dx = vec![0.0; 50];
            gelu_bwd(&xs, &gy, &mut dx, kind);
            let num = fd_grad(&xs, 1e-6, |x| {
                let mut y = vec![0.0; 50];
                gelu_fwd(x, &mut y, kind);
                dot(&y, &gy)
            });
            assert_close(&format!("gelu {kind:?}"), &dx, &num, TOL);
        }
    }

    /// The fused bias + GELU is bitwise the unfused `bias_add` then
    /// `gelu_fwd`, in f32 and f64, for both GELU forms.
    #[test]
    fn bias_gelu_is_bitwise_bias_add_then_gelu() {
        fn check<T: Real>(rows: usize, cols: usize, seed: u64, kind: GeluKind) {
            let v = |s: u64, n: usize, k: f64| -> Vec<T> { rand_vec(s, n).iter().map(|x| T::of(k * x)).collect() };
            let (y0, bias) = (v(seed, rows * cols, 4.0), v(seed + 1, cols, 1.0));
            let mut want_y = y0.clone();
            crate::engine::cpu::elementwise::bias_add(&mut want_y, &bias, rows, cols);
            let mut want_g = vec![T::zero(); rows * cols];
            gelu_fwd(&want_y, &mut want_g, kind);
            let mut y = y0;
            let mut g = vec![T::nan(); rows * cols];
            bias_gelu_fwd(&mut y, &bias, &mut g, rows, cols, kind);
            let bits = |a: &[T]| a.iter().map(|v| v.f64().to_bits()).collect::<Vec<_>>();
            let name = std::any::type_name::<T>();
            assert_eq!(bits(&y), bits(&want_y), "{name} {kind:?} [{rows}, {cols}] y");
            assert_eq!(bits(&g), bits(&want_g), "{name} {kind:?} [{rows}, {cols}] g");
        }
        // one row per task (cols > 16384), many rows per task, a ragged last task
        for (rows, cols, seed) in [(5, 7, 10), (301, 77, 20), (3, 20_000, 30), (1000, 45, 40)] {
            for kind in [GeluKind::Tanh, GeluKind::Erf] {
                check::<f32>(rows, cols, seed, kind);
                check::<f64>(rows, cols, seed, kind);
            }
        }
    }

    #[test]
    fn swiglu_matches_finite_differences() {
        let n = 40;
        let g: Vec<f64> = rand_vec(3, n).iter().map(|v| 3.0 * v).collect();
        let u = rand_vec(4, n);
        let gy = rand_vec(5, n);
        let f = |g: &[f64], u: &[f64]| {
            let mut o = vec![0.0; n];
            swiglu_fwd(g, u, &mut o);
            dot(&o, &gy)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_bwd(&g, &u, &gy, &mut dg, &mut du);
        assert_close("swiglu dgate", &dg, &fd_grad(&g, 1e-6, |g| f(g, &u)), TOL);
        assert_close("swiglu dup", &du, &fd_grad(&u, 1e-6, |u| f(&g, u)), TOL);
    }
}
