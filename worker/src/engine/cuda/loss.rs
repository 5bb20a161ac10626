//! Cross-entropy with ignore index, fused forward and backward
//! (kernels/loss.cu): one block per row, then a fixed-order sum of the rows.

use super::backend::{Buf, Idx};
use super::context::{launch, Cuda};

/// Threads per row block (`#define CE_THREADS` in kernels/loss.cu, checked
/// by a test below); `sum_rows_f64` runs one block of as many.
const CE_THREADS: u32 = 256;

/// Cross-entropy over `[n, vocab]` logits; a negative target ignores its
/// row. Returns the loss summed over the rows that count; with `dlogits`,
/// overwrites it with `grad_scale * (softmax - onehot)` for those rows and
/// zeros for ignored rows. A target `>= vocab` panics, as on the CPU.
pub(super) fn cross_entropy(
    cu: &Cuda,
    logits: &Buf,
    targets: &Idx,
    dlogits: Option<&mut Buf>,
    n: usize,
    vocab: usize,
    grad_scale: f32,
) -> f64 {
    assert!(vocab > 0, "cross_entropy: vocab is 0");
    assert!(logits.len >= n * vocab, "cross_entropy: {} logits, [{n}, {vocab}] needs more", logits.len);
    assert!(targets.len >= n, "cross_entropy: {} targets for {n} rows", targets.len);
    if let Some(d) = &dlogits {
        assert!(d.len >= n * vocab, "cross_entropy: {} dlogits, [{n}, {vocab}] needs more", d.len);
    }
    if n == 0 {
        return 0.0;
    }
    let row_loss = cu.zeros::<f64>(n);
    // n - (first row with a target past the vocab), 0 when there is none.
    let bad = cu.zeros::<u64>(1);
    let total = cu.zeros::<f64>(1);
    let (n64, v64) = (n as u64, vocab as u64);
    let cfg = cu.rows(n, CE_THREADS);
    match dlogits {
        None => launch!(cu, "cross_entropy_f32", cfg, &logits.data, &targets.buf, &row_loss, &bad, &n64, &v64),
        Some(d) => launch!(
            cu,
            "cross_entropy_grad_f32",
            cfg,
            &logits.data,
            &targets.buf,
            &mut d.data,
            &row_loss,
            &bad,
            &n64,
            &v64,
            &grad_scale
        ),
    }
    launch!(cu, "sum_rows_f64", cu.rows(1, CE_THREADS), &row_loss, &total, &n64);
    let loss = cu.read::<f64>("cross entropy (download)", &total, 0, 1).map_or(f64::NAN, |v| v[0]);
    if loss.is_nan() {
        // A bad target makes its row NaN; NaN logits can too, and are returned.
        let flag = cu.read::<u64>("cross entropy (download)", &bad, 0, 1);
        if let Some(&b) = flag.as_ref().and_then(|v| v.first()) {
            if b > 0 {
                let row = n - b as usize;
                let t = cu.read::<i32>("cross entropy (download)", &targets.buf, row, 1).map_or(i32::MIN, |v| v[0]);
                panic!("cross_entropy: target {t} at row {row} is out of range for vocab {vocab}");
            }
        }
    }
    loss
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_block_size_matches_the_kernels() {
        let src = include_str!("kernels/loss.cu");
        assert!(src.contains(&format!("#define CE_THREADS {CE_THREADS}\n")));
    }
}
