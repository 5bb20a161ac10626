//! Softmax attention per (sequence, head), bidirectional or causal.
//!
//! Inputs are `[batch, seq, heads, head_dim]`; each (b, h) pair is gathered
//! into contiguous `[seq, head_dim]` scratch so the products are plain GEMMs,
//! and the pairs run in parallel.
use super::matmul::matmul_serial;
use super::Real;
use crate::engine::backend::{AttnShape, Gemm};
use rayon::prelude::*;

/// A raw pointer that parallel tasks may share because each task writes a
/// disjoint set of indices (one (batch, head) pair).
#[derive(Clone, Copy)]
struct Disjoint<T>(*mut T);
unsafe impl<T> Send for Disjoint<T> {}
unsafe impl<T> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

fn gather<T: Real>(src: &[T], s: &AttnShape, b: usize, h: usize, dst: &mut [T]) {
    let d = s.head_dim;
    for t in 0..s.seq {
        let off = ((b * s.seq + t) * s.heads + h) * d;
        dst[t * d..(t + 1) * d].copy_from_slice(&src[off..off + d]);
    }
}

/// Adds `src` (`[seq, head_dim]`) into the (b, h) slice of `dst`.
///
/// # Safety
/// No other thread may touch the (b, h) slice of `dst` at the same time.
unsafe fn scatter_add<T: Real>(src: &[T], s: &AttnShape, b: usize, h: usize, dst: Disjoint<T>) {
    let d = s.head_dim;
    for t in 0..s.seq {
        let off = ((b * s.seq + t) * s.heads + h) * d;
        for i in 0..d {
            *dst.get().add(off + i) += src[t * d + i];
        }
    }
}

pub fn attention_fwd<T: Real>(q: &[T], k: &[T], v: &[T], out: &mut [T], probs: &mut [T], s: AttnShape) {
    let (n, d) = (s.seq, s.head_dim);
    assert!(q.len() >= s.numel() && k.len() >= s.numel() && v.len() >= s.numel() && out.len() >= s.numel());
    assert!(probs.len() >= s.probs_len());
    let out_ptr = Disjoint(out.as_mut_ptr());
    // Scratch is made once per rayon job, not per (b, h) pair.
    let scratch = || (vec![T::zero(); n * d], vec![T::zero(); n * d], vec![T::zero(); n * d], vec![T::zero(); n * d]);
    probs[..s.probs_len()].par_chunks_mut(n * n).enumerate().for_each_init(scratch, |(qs, ks, vs, o), (bh, p)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        gather(q, &s, b, h, qs);
        gather(k, &s, b, h, ks);
        gather(v, &s, b, h, vs);
        let mut g = Gemm::new(n, n, d).trans_b();
        g.alpha = s.scale;
        matmul_serial(qs, ks, p, g);
        for (i, row) in p.chunks_mut(n).enumerate() {
            let visible = if s.causal { i + 1 } else { n };
            let mx = row[..visible].iter().fold(T::neg_infinity(), |a, &b| a.max(b));
            let mut sum = T::zero();
            for x in &mut row[..visible] {
                *x = (*x - mx).exp();
                sum += *x;
            }
            let inv = T::one() / sum;
            row[..visible].iter_mut().for_each(|x| *x *= inv);
            row[visible..].fill(T::zero());
        }
        matmul_serial(p, vs, o, Gemm::new(n, d, n));
        // SAFETY: each task owns the (b, h) slice of `out`; it is zeroed first
        // because scatter_add adds.
        unsafe {
            for t in 0..n {
                let off = ((b * n + t) * s.heads + h) * d;
                std::ptr::write_bytes(out_ptr.get().add(off), 0, d);
            }
            scatter_add(o, &s, b, h, out_ptr);
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    s: AttnShape,
) {
    let (n, d) = (s.seq, s.head_dim);
    assert!(dq.len() >= s.numel() && dk.len() >= s.numel() && dv.len() >= s.numel());
    let (dq_p, dk_p, dv_p) = (Disjoint(dq.as_mut_ptr()), Disjoint(dk.as_mut_ptr()), Disjoint(dv.as_mut_ptr()));
    let scratch = || {
        let v = || vec![T::zero(); n * d];
        ([v(), v(), v(), v(), v(), v(), v()], vec![T::zero(); n * n])
    };
    probs[..s.probs_len()].par_chunks(n * n).enumerate().for_each_init(scratch, |(bufs, ds), (bh, p)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [qs, ks, vs, dos, dvs, dqs, dks] = bufs;
        gather(q, &s, b, h, qs);
        gather(k, &s, b, h, ks);
        gather(v, &s, b, h, vs);
        gather(dout, &s, b, h, dos);
        // dV = P^T dO
        matmul_serial(p, dos, dvs, Gemm::new(n, d, n).trans_a());
        // dP = dO V^T, then dS = P * (dP - rowsum(dP * P)) * scale
        matmul_serial(dos, vs, ds, Gemm::new(n, n, d).trans_b());
        let scale = T::of(s.scale as f64);
        for (pr, dr) in p.chunks(n).zip(ds.chunks_mut(n)) {
            let dot: T = pr.iter().zip(dr.iter()).map(|(&a, &b)| a * b).sum();
            for (x, &pv) in dr.iter_mut().zip(pr) {
                *x = pv * (*x - dot) * scale;
            }
        }
        // dQ = dS K, dK = dS^T Q
        matmul_serial(ds, ks, dqs, Gemm::new(n, d, n));
        matmul_serial(ds, qs, dks, Gemm::new(n, d, n).trans_a());
        // SAFETY: each task owns the (b, h) slices of dq, dk and dv.
        unsafe {
            scatter_add(dqs, &s, b, h, dq_p);
            scatter_add(dks, &s, b, h, dk_p);
            scatter_add(dvs, &s, b, h, dv_p);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{assert_close, dot, fd_grad, rand_vec};

    fn shape(causal: bool) -> AttnShape {
        AttnShape { batch: 2, seq: 5, heads: 3, head_dim: 4, causal, scale: 0.5 }
    }

    fn naive(q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> Vec<f64> {
        let mut out = vec![0.0; s.numel()];
        let idx = |b: usize, t: usize, h: usize, i: usize| ((b * s.seq + t) * s.heads + h) * s.head_dim + i;
        for b in 0..s.batch {
            for h in 0..s.heads {
                for t in 0..s.seq {
                    let vis = if s.causal { t + 1 } else { s.seq };
                    let sc: Vec<f64> = (0..vis)
                        .map(|u| {
                            (0..s.head_dim).map(|i| q[idx(b, t, h, i)] * k[idx(b, u, h, i)]).sum::<f64>()
                                * s.scale as f64
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for u in 0..vis {
                        let p = (sc[u] - mx).exp() / z;
                        for i in 0..s.head_dim {
                            out[idx(b, t, h, i)] += p * v[idx(b, u, h, i)];
                        }
                    }
                }
            }
        }
        out
    }

    fn run(q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> Vec<f64> {
        let mut out = vec![f64::NAN; s.numel()];
        let mut p = vec![0.0; s.probs_len()];
        attention_fwd(q, k, v, &mut out, &mut p, s);
        out
    }

    #[test]
    fn attention_matches_naive_and_finite_differences() {
        // f64 central differences, h = 1e-6.
        for causal in [false, true] {
            let s = shape(causal);
            let (q, k, v) = (rand_vec(1, s.numel()), rand_vec(2, s.numel()), rand_vec(3, s.numel()));
            let gy = rand_vec(4, s.numel());
            let out = run(&q, &k, &v, s);
            assert_close("attention fwd", &out, &naive(&q, &k, &v, s), 1e-12);
            let mut p = vec![0.0; s.probs_len()];
            let mut o = vec![0.0; s.numel()];
            attention_fwd(&q, &k, &v, &mut o, &mut p, s);
            let (mut dq, mut dk, mut dv) = (vec![0.0; s.numel()], vec![0.0; s.numel()], vec![0.0; s.numel()]);
            attention_bwd(&q, &k, &v, &p, &gy, &mut dq, &mut dk, &mut dv, s);
            assert_close("attention dq", &dq, &fd_grad(&q, 1e-6, |x| dot(&run(x, &k, &v, s), &gy)), 1e-7);
            assert_close("attention dk", &dk, &fd_grad(&k, 1e-6, |x| dot(&run(&q, x, &v, s), &gy)), 1e-7);
            assert_close("attention dv", &dv, &fd_grad(&v, 1e-6, |x| dot(&run(&q, &k, x, s), &gy)), 1e-7);
        }
    }
}
