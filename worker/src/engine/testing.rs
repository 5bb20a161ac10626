//! Finite-difference helpers for gradient checks (tests only).
//!
//! Checks run the CPU backend in f64, where central differences with
//! `h = 1e-6` agree with an exact gradient to about 1e-8 relative; every op
//! test states its tolerance against that.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Deterministic uniform values in `[-1, 1)`.
pub fn rand_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// Central-difference gradient of `f` at `x`.
pub fn fd_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// `|a - b| / max(|b|, tiny)` over whole vectors (relative norm error).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

/// Asserts a relative norm error under `tol`, naming what was compared.
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:.3e} exceeds {tol:.1e}");
    assert!(want.iter().any(|v| *v != 0.0), "{what}: reference is all zeros, the check would prove nothing");
}

/// `sum(out * weights)`: a scalar loss whose gradient w.r.t. `out` is `weights`.
pub fn dot(out: &[f64], weights: &[f64]) -> f64 {
    out.iter().zip(weights).map(|(a, b)| a * b).sum()
}
