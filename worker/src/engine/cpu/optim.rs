//! AdamW with decoupled weight decay and bias correction (PyTorch semantics).
use super::Real;
use crate::engine::backend::AdamW;
use rayon::prelude::*;

const CHUNK: usize = 1 << 13;

pub fn adamw<T: Real>(param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T], h: AdamW) {
    assert!(h.step >= 1, "AdamW step count is 1-based");
    let lr = h.lr as f64;
    let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
    let bc1 = 1.0 - b1.powi(h.step as i32);
    let bc2 = 1.0 - b2.powi(h.step as i32);
    let decay = T::of(1.0 - lr * h.weight_decay as f64);
    let step_size = T::of(lr / bc1);
    let inv_sqrt_bc2 = T::of(1.0 / bc2.sqrt());
    let (b1t, b2t, eps, gs) = (T::of(b1), T::of(b2), T::of(h.eps as f64), T::of(h.grad_scale as f64));
    let (one_b1, one_b2) = (T::one() - b1t, T::one() - b2t);
    param.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).enumerate().for_each(
        |(ci, (pc, (mc, vc)))| {
            let gc = &grad[ci * CHUNK..ci * CHUNK + pc.len()];
            for i in 0..pc.len() {
                let g = gc[i] * gs;
                mc[i] = b1t * mc[i] + one_b1 * g;
                vc[i] = b2t * vc[i] + one_b2 * g * g;
                let denom = vc[i].sqrt() * inv_sqrt_bc2 + eps;
                pc[i] = pc[i] * decay - step_size * mc[i] / denom;
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_hand_computed_steps() {
        // Two steps on one value, written out from the PyTorch AdamW algorithm.
        // Hyper-parameters travel as f32 (0.1f32 != 0.1), hence 1e-7 and not 1e-15.
        let h = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 0.5 };
        let (mut p, mut m, mut v) = (vec![2.0f64], vec![0.0], vec![0.0]);
        adamw(&mut p, &[4.0], &mut m, &mut v, h);
        // g = 2: m = 0.2, v = 0.04; mhat = 2, vhat = 4; p = 2*(1-0.001) - 0.1*2/(2+1e-8)
        let p1 = 2.0 * (1.0 - 0.001) - 0.1 * 2.0 / (2.0 + 1e-8);
        assert!((p[0] - p1).abs() < 1e-7, "{} vs {}", p[0], p1);
        adamw(&mut p, &[-2.0], &mut m, &mut v, AdamW { step: 2, ..h });
        // g = -1: m = 0.18 - 0.1 = 0.08, v = 0.0396 + 0.01 = 0.0496
        let (m2, v2): (f64, f64) = (0.08, 0.0496);
        let p2 = p1 * (1.0 - 0.001) - (0.1 / (1.0 - 0.81)) * m2 / (v2.sqrt() / (1.0f64 - 0.9801).sqrt() + 1e-8);
        assert!((m[0] - m2).abs() < 1e-7 && (v[0] - v2).abs() < 1e-7);
        assert!((p[0] - p2).abs() < 1e-7, "{} vs {}", p[0], p2);
    }
}
