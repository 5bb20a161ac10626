//! Learning-rate schedule: linear warmup then cosine decay to zero, as
//! Hugging Face's `get_cosine_schedule_with_warmup` (VILA's `cosine`).

/// Multiplier of the base learning rate at optimizer step `step` (0-based).
pub fn cosine_with_warmup(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// Warmup steps for a ratio of the total (VILA: 0.03), rounded up as HF does.
pub fn warmup_steps(ratio: f64, total: u64) -> u64 {
    (ratio * total as f64).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        assert_eq!(cosine_with_warmup(0, 10, 110), 0.0);
        assert!((cosine_with_warmup(5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((cosine_with_warmup(10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((cosine_with_warmup(60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(cosine_with_warmup(110, 10, 110).abs() < 1e-12);
        assert!(cosine_with_warmup(200, 10, 110) >= 0.0);
        assert_eq!(warmup_steps(0.03, 1000), 30);
        assert_eq!(warmup_steps(0.03, 10), 1);
    }
}
