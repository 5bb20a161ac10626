//! Rotary position embedding, Hugging Face LLaMA style (rotate_half).
use super::Real;
use crate::engine::backend::RopeShape;
use rayon::prelude::*;

/// Rotates each head of `x` (`[batch, seq, heads, head_dim]`) by its position's
/// angles; `inverse` rotates the other way (the backward pass).
pub fn rotate<T: Real>(x: &mut [T], s: RopeShape, inverse: bool) {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    assert!(d % 2 == 0, "rope needs an even head_dim, got {d}");
    assert!(x.len() >= s.batch * s.seq * s.heads * d);
    // Angles in f64; HF computes inv_freq = 1 / theta^(2i/d) the same way.
    let table: Vec<(T, T)> = (0..s.seq)
        .flat_map(|t| {
            (0..half).map(move |i| {
                let inv_freq = 1.0 / (s.theta as f64).powf((2 * i) as f64 / d as f64);
                let a = t as f64 * inv_freq;
                (T::of(a.cos()), T::of(if inverse { -a.sin() } else { a.sin() }))
            })
        })
        .collect();
    x[..s.batch * s.seq * s.heads * d].par_chunks_mut(s.heads * d).enumerate().for_each(|(bt, row)| {
        let t = bt % s.seq;
        let angles = &table[t * half..(t + 1) * half];
        for head in row.chunks_mut(d) {
            for (i, &(c, sn)) in angles.iter().enumerate() {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c - x2 * sn;
                head[i + half] = x2 * c + x1 * sn;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    #[test]
    fn rope_matches_hf_formula_and_inverse_is_its_gradient() {
        let s = RopeShape { batch: 2, seq: 4, heads: 2, head_dim: 6, theta: 10000.0 };
        let n = 2 * 4 * 2 * 6;
        let x = rand_vec(1, n);
        let mut y = x.clone();
        rotate(&mut y, s, false);
        // q * cos + rotate_half(q) * sin with cos/sin = cat(freqs, freqs)
        for b in 0..2 {
            for t in 0..4 {
                for h in 0..2 {
                    let base = ((b * 4 + t) * 2 + h) * 6;
                    for j in 0..6 {
                        let i = j % 3;
                        let a = t as f64 / 10000f64.powf(2.0 * i as f64 / 6.0);
                        let rot = if j < 3 { -x[base + j + 3] } else { x[base + j - 3] };
                        let want = x[base + j] * a.cos() + rot * a.sin();
                        assert!((y[base + j] - want).abs() < 1e-12);
                    }
                }
            }
        }
        // backward: inverse rotation applied to the upstream gradient
        let gy = rand_vec(2, n);
        let mut g = gy.clone();
        rotate(&mut g, s, true);
        let num = fd_grad(&x, 1e-6, |x| {
            let mut y = x.to_vec();
            rotate(&mut y, s, false);
            dot(&y, &gy)
        });
        assert_close("rope grad", &g, &num, 1e-8);
    }
}
