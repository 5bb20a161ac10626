//! Cross-entropy with ignore index, fused forward and backward.
use super::{rows_per_task, Real};
use rayon::prelude::*;

/// `-log softmax(row)[target]` for one row, with max subtraction and the sum of
/// exponentials in f64. With `drow`, also writes `scale * (softmax - onehot)`.
fn row_loss<T: Real>(row: &[T], target: usize, drow: Option<&mut [T]>, scale: f64) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.f64()));
    match drow {
        None => {
            let sum: f64 = row.iter().map(|&v| (v.f64() - max).exp()).sum();
            sum.ln() + max - row[target].f64()
        }
        Some(d) => {
            // Keep the exponentials in the gradient row, then normalize in place.
            let mut sum = 0.0f64;
            for (g, &v) in d.iter_mut().zip(row) {
                let e = (v.f64() - max).exp();
                sum += e;
                *g = T::of(e);
            }
            let k = scale / sum;
            for g in d.iter_mut() {
                *g = T::of(g.f64() * k);
            }
            let p_target = (row[target].f64() - max).exp() / sum;
            d[target] = T::of(scale * (p_target - 1.0));
            sum.ln() + max - row[target].f64()
        }
    }
}

/// Cross-entropy over `[n, vocab]` logits; a negative target ignores its row.
/// Returns the loss summed over the rows that count (per-row values in f64,
/// added in row order, so the result is deterministic). With `dlogits`, it is
/// overwritten with `grad_scale * (softmax - onehot)` for those rows and zeros
/// for ignored rows. A target `>= vocab` panics (the model validates labels).
pub fn cross_entropy<T: Real>(
    logits: &[T],
    targets: &[i32],
    dlogits: Option<&mut [T]>,
    n: usize,
    vocab: usize,
    grad_scale: f64,
) -> f64 {
    assert!(vocab > 0, "cross_entropy: vocab is 0");
    assert!(logits.len() >= n * vocab, "cross_entropy: {} logits, [{n}, {vocab}] needs more", logits.len());
    let logits = &logits[..n * vocab];
    assert!(targets.len() >= n, "cross_entropy: {} targets for {n} rows", targets.len());
    let targets = &targets[..n];
    if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t >= 0 && t as usize >= vocab) {
        panic!("cross_entropy: target {t} at row {i} is out of range for vocab {vocab}");
    }
    let min_len = rows_per_task(n, vocab);
    let per_row: Vec<f64> = match dlogits {
        None => logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .with_min_len(min_len)
            .map(|(row, &t)| if t < 0 { 0.0 } else { row_loss::<T>(row, t as usize, None, grad_scale) })
            .collect(),
        Some(d) => {
            assert!(d.len() >= n * vocab, "cross_entropy: {} dlogits, [{n}, {vocab}] needs more", d.len());
            d[..n * vocab]
                .par_chunks_mut(vocab)
                .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
                .with_min_len(min_len)
                .map(|(drow, (row, &t))| {
                    if t < 0 {
                        drow.fill(T::zero());
                        0.0
                    } else {
                        row_loss(row, t as usize, Some(drow), grad_scale)
                    }
                })
                .collect()
        }
    };
    per_row.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, fd_grad, rand_vec};

    /// Direct definition: -log(exp(x_t) / sum exp(x)), no max subtraction.
    fn naive(logits: &[f64], targets: &[i32], vocab: usize) -> f64 {
        let mut total = 0.0;
        for (row, &t) in logits.chunks(vocab).zip(targets) {
            if t >= 0 {
                let z: f64 = row.iter().map(|v| v.exp()).sum();
                total -= (row[t as usize].exp() / z).ln();
            }
        }
        total
    }

    fn logits(seed: u64, len: usize) -> Vec<f64> {
        rand_vec(seed, len).iter().map(|v| 3.0 * v).collect()
    }

    /// Against the naive formula, 1e-12 relative (f64), with ignored rows;
    /// the result does not depend on whether a gradient is asked for.
    #[test]
    fn matches_naive() {
        let (n, vocab) = (6, 11);
        let x = logits(1, n * vocab);
        let t = [3, -100, 0, 10, -1, 7];
        let want = naive(&x, &t, vocab);
        let got = cross_entropy(&x, &t, None, n, vocab, 1.0);
        assert!((got - want).abs() < 1e-12 * want.abs(), "{got} vs {want}");
        let mut d = vec![0.0; n * vocab];
        let got2 = cross_entropy(&x, &t, Some(&mut d), n, vocab, 1.0);
        assert_eq!(got, got2);
        // All rows ignored: zero loss, zero gradient.
        let mut d = vec![5.0; n * vocab];
        assert_eq!(cross_entropy(&x, &[-100; 6], Some(&mut d), n, vocab, 1.0), 0.0);
        assert!(d.iter().all(|&v| v == 0.0));
    }

    /// Large logits stay finite thanks to max subtraction.
    #[test]
    fn stable_for_large_logits() {
        let x = [1000.0f32, 999.0, 998.0];
        let got = cross_entropy(&x, &[0], None, 1, 3, 1.0);
        let want = (1.0f64 + (-1.0f64).exp() + (-2.0f64).exp()).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// dlogits against central differences of grad_scale * loss (h = 1e-6),
    /// ignored rows included (zero gradient, overwriting what was there).
    /// Tolerance 1e-7 relative (f64; the truncation error is ~h^2).
    #[test]
    fn gradient_matches_fd() {
        let (n, vocab, scale) = (5, 9, 0.37);
        let x = logits(2, n * vocab);
        let t = [8, -100, 0, 4, -1];
        let want = fd_grad(&x, 1e-6, |xp| scale * cross_entropy(xp, &t, None, n, vocab, 1.0));
        let mut d = rand_vec(3, n * vocab);
        cross_entropy(&x, &t, Some(&mut d), n, vocab, scale);
        assert_close("cross_entropy dlogits", &d, &want, 1e-7);
        assert!(d[vocab..2 * vocab].iter().chain(&d[4 * vocab..]).all(|&v| v == 0.0));
    }

    /// The f32 path agrees with f64 (loss 1e-6, gradient 1e-5 relative) and the
    /// sum is deterministic across runs on a size that spans many tasks.
    #[test]
    fn f32_agrees_with_f64_and_is_deterministic() {
        let (n, vocab) = (64, 3000);
        let x = logits(4, n * vocab);
        let t: Vec<i32> = (0..n).map(|i| if i % 5 == 0 { -100 } else { ((i * 577) % vocab) as i32 }).collect();
        let mut d64 = vec![0.0; n * vocab];
        let l64 = cross_entropy(&x, &t, Some(&mut d64), n, vocab, 0.5);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut d32 = vec![0.0f32; n * vocab];
        let l32 = cross_entropy(&x32, &t, Some(&mut d32), n, vocab, 0.5);
        assert!((l32 - l64).abs() < 1e-6 * l64.abs(), "{l32} vs {l64}");
        let d32: Vec<f64> = d32.iter().map(|&v| v as f64).collect();
        assert_close("cross_entropy f32 grad", &d32, &d64, 1e-5);
        for _ in 0..3 {
            let mut again = vec![0.0f32; n * vocab];
            assert_eq!(cross_entropy(&x32, &t, Some(&mut again), n, vocab, 0.5), l32);
            assert_eq!(cross_entropy(&x32, &t, None, n, vocab, 0.5), l32);
        }
    }

    #[test]
    #[should_panic(expected = "target 9 at row 1 is out of range for vocab 9")]
    fn target_out_of_range_panics() {
        let x = vec![0.0f64; 18];
        cross_entropy(&x, &[0, 9], None, 2, 9, 1.0);
    }
}
