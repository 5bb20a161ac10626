//! Fused softmax attention per (sequence, head), bidirectional or causal,
//! flash-attention style: keys are visited in blocks of [`KEY_BLOCK`] with
//! an online softmax, so no `[seq, seq]` matrix exists; only each query
//! row's log-sum-exp is saved, and backward recomputes the probabilities
//! block by block from it.
//!
//! Inputs are `[batch, seq, heads, head_dim]`; each (b, h) pair is gathered
//! into contiguous `[seq, head_dim]` scratch so the block products are plain
//! GEMMs, and the pairs run in parallel. With `causal`, the queries before a
//! key block see none of it: each block's products start at its first key's
//! row, which skips every block above the diagonal.
use super::matmul::matmul_serial;
use super::Real;
use crate::engine::backend::{AttnShape, Gemm};
use rayon::prelude::*;

/// Keys per block: a `[seq, KEY_BLOCK]` score block of a ViT tile (729
/// queries) is 187 KB in f32, which stays in L2 beside its operands.
pub const KEY_BLOCK: usize = 64;

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

/// One key block `keys` of a (b, h) pair and the query rows that see any of
/// it: all of them, or with `causal` those from the block's first key on.
struct Block {
    keys: std::ops::Range<usize>,
    first_query: usize,
}

impl Block {
    fn all(s: &AttnShape, key_block: usize) -> impl Iterator<Item = Block> + '_ {
        (0..s.seq)
            .step_by(key_block.max(1))
            .map(move |j0| Block { keys: j0..(j0 + key_block).min(s.seq), first_query: if s.causal { j0 } else { 0 } })
    }
    /// `p` = `scale * Q K^T` for this block: its query rows against its keys
    /// (`[rows, keys]`), from the `[seq, head_dim]` gathered `qs` and `ks`.
    fn scores<T: Real>(&self, s: &AttnShape, qs: &[T], ks: &[T], p: &mut [T]) {
        let d = s.head_dim;
        let mut g = Gemm::new(s.seq - self.first_query, self.keys.len(), d).trans_b();
        g.alpha = s.scale;
        matmul_serial(&qs[self.first_query * d..], &ks[self.keys.start * d..], p, g);
    }
    /// Keys of this block that query `i` sees.
    fn visible(&self, causal: bool, i: usize) -> usize {
        if causal {
            (i + 1 - self.keys.start).min(self.keys.len())
        } else {
            self.keys.len()
        }
    }
}

/// Forward over keys in blocks of `key_block` ([`KEY_BLOCK`] in the backend;
/// tests vary it).
pub fn attention_fwd<T: Real>(q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T], s: AttnShape, key_block: usize) {
    let (n, d) = (s.seq, s.head_dim);
    assert!(q.len() >= s.numel() && k.len() >= s.numel() && v.len() >= s.numel() && out.len() >= s.numel());
    assert!(lse.len() >= s.lse_len(), "attention_fwd: lse has {} values, {s:?} needs {}", lse.len(), s.lse_len());
    let out_ptr = Disjoint(out.as_mut_ptr());
    // Scratch is made once per rayon job, not per (b, h) pair.
    let scratch = || {
        let m = || vec![T::zero(); n * d];
        ([m(), m(), m(), m()], vec![T::zero(); n * key_block.min(n)], vec![T::zero(); n])
    };
    lse[..s.lse_len()].par_chunks_mut(n.max(1)).enumerate().for_each_init(scratch, |(bufs, p, mx), (bh, lse)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [qs, ks, vs, o] = bufs;
        gather(q, &s, b, h, qs);
        gather(k, &s, b, h, ks);
        gather(v, &s, b, h, vs);
        o.fill(T::zero());
        mx.fill(T::neg_infinity());
        // `lse` holds each row's running sum until the end.
        lse.fill(T::zero());
        for blk in Block::all(&s, key_block) {
            let (i0, kb) = (blk.first_query, blk.keys.len());
            let rows = n - i0;
            let p = &mut p[..rows * kb];
            blk.scores(&s, qs, ks, p);
            for (r, row) in p.chunks_mut(kb).enumerate() {
                let i = i0 + r;
                let visible = blk.visible(s.causal, i);
                let block_max = row[..visible].iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                let new_max = mx[i].max(block_max);
                // exp(-inf) = 0 rescales the empty start to nothing.
                let correction = (mx[i] - new_max).exp();
                let mut sum = T::zero();
                for x in &mut row[..visible] {
                    *x = (*x - new_max).exp();
                    sum += *x;
                }
                row[visible..].fill(T::zero());
                lse[i] = lse[i] * correction + sum;
                mx[i] = new_max;
                o[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= correction);
            }
            matmul_serial(p, &vs[blk.keys.start * d..], &mut o[i0 * d..], Gemm::new(rows, d, kb).accumulate());
        }
        for i in 0..n {
            let inv = T::one() / lse[i];
            o[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[i] = mx[i] + lse[i].ln();
        }
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

/// Backward of [`attention_fwd`] with the same `key_block`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    s: AttnShape,
    key_block: usize,
) {
    let (n, d) = (s.seq, s.head_dim);
    assert!(out.len() >= s.numel() && dout.len() >= s.numel());
    assert!(dq.len() >= s.numel() && dk.len() >= s.numel() && dv.len() >= s.numel());
    assert!(lse.len() >= s.lse_len(), "attention_bwd: lse has {} values, {s:?} needs {}", lse.len(), s.lse_len());
    let (dq_p, dk_p, dv_p) = (Disjoint(dq.as_mut_ptr()), Disjoint(dk.as_mut_ptr()), Disjoint(dv.as_mut_ptr()));
    let scratch = || {
        let m = || vec![T::zero(); n * d];
        let blk = || vec![T::zero(); n * key_block.min(n)];
        ([m(), m(), m(), m(), m(), m(), m(), m()], [blk(), blk()], vec![T::zero(); n])
    };
    lse[..s.lse_len()].par_chunks(n.max(1)).enumerate().for_each_init(scratch, |(bufs, [p, dp], delta), (bh, lse)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [qs, ks, vs, os, dos, dqs, dks, dvs] = bufs;
        for (src, dst) in [(q, &mut *qs), (k, &mut *ks), (v, &mut *vs), (out, &mut *os), (dout, &mut *dos)] {
            gather(src, &s, b, h, dst);
        }
        // delta_i = rowsum(dO_i * O_i) = rowsum(dP_i * P_i), the softmax
        // backward's correction, without the probabilities.
        for (i, x) in delta.iter_mut().enumerate() {
            *x = (0..d).map(|c| dos[i * d + c] * os[i * d + c]).sum();
        }
        for x in [&mut *dqs, &mut *dks, &mut *dvs] {
            x.fill(T::zero());
        }
        let scale = T::of(s.scale as f64);
        for blk in Block::all(&s, key_block) {
            let (i0, j0, kb) = (blk.first_query, blk.keys.start, blk.keys.len());
            let rows = n - i0;
            let (p, dp) = (&mut p[..rows * kb], &mut dp[..rows * kb]);
            // P = exp(scale * Q K^T - lse), as forward left it.
            blk.scores(&s, qs, ks, p);
            for (r, row) in p.chunks_mut(kb).enumerate() {
                let visible = blk.visible(s.causal, i0 + r);
                row[..visible].iter_mut().for_each(|x| *x = (*x - lse[i0 + r]).exp());
                row[visible..].fill(T::zero());
            }
            // dV += P^T dO
            matmul_serial(p, &dos[i0 * d..], &mut dvs[j0 * d..], Gemm::new(kb, d, rows).trans_a().accumulate());
            // dP = dO V^T, then dS = P * (dP - delta) * scale in place.
            matmul_serial(&dos[i0 * d..], &vs[j0 * d..], dp, Gemm::new(rows, kb, d).trans_b());
            for (r, (pr, dr)) in p.chunks(kb).zip(dp.chunks_mut(kb)).enumerate() {
                for (x, &pv) in dr.iter_mut().zip(pr) {
                    *x = pv * (*x - delta[i0 + r]) * scale;
                }
            }
            // dQ += dS K, dK += dS^T Q
            matmul_serial(dp, &ks[j0 * d..], &mut dqs[i0 * d..], Gemm::new(rows, d, kb).accumulate());
            matmul_serial(dp, &qs[i0 * d..], &mut dks[j0 * d..], Gemm::new(kb, d, rows).trans_a().accumulate());
        }
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

    fn run(q: &[f64], k: &[f64], v: &[f64], s: AttnShape, key_block: usize) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![f64::NAN; s.numel()];
        let mut lse = vec![f64::NAN; s.lse_len()];
        attention_fwd(q, k, v, &mut out, &mut lse, s, key_block);
        (out, lse)
    }

    /// f64 against a direct sum and central differences (h = 1e-6), with
    /// key blocks of 1, 2 and 3 (a partial last block) and one block for all.
    #[test]
    fn fused_attention_matches_naive_and_finite_differences() {
        for causal in [false, true] {
            for (seq, key_block) in [(5, 1), (7, 2), (7, 3), (6, 64)] {
                let s = AttnShape { batch: 2, seq, heads: 3, head_dim: 4, causal, scale: 0.5 };
                let what = format!("causal {causal}, seq {seq}, key block {key_block}");
                let (q, k, v) = (rand_vec(1, s.numel()), rand_vec(2, s.numel()), rand_vec(3, s.numel()));
                let gy = rand_vec(4, s.numel());
                let (out, lse) = run(&q, &k, &v, s, key_block);
                assert_close(&format!("fwd ({what})"), &out, &naive(&q, &k, &v, s), 1e-12);
                let (mut dq, mut dk, mut dv) = (vec![0.0; s.numel()], vec![0.0; s.numel()], vec![0.0; s.numel()]);
                attention_bwd(&q, &k, &v, &out, &lse, &gy, &mut dq, &mut dk, &mut dv, s, key_block);
                let loss = |q: &[f64], k: &[f64], v: &[f64]| dot(&run(q, k, v, s, key_block).0, &gy);
                assert_close(&format!("dq ({what})"), &dq, &fd_grad(&q, 1e-6, |x| loss(x, &k, &v)), 1e-7);
                assert_close(&format!("dk ({what})"), &dk, &fd_grad(&k, 1e-6, |x| loss(&q, x, &v)), 1e-7);
                assert_close(&format!("dv ({what})"), &dv, &fd_grad(&v, 1e-6, |x| loss(&q, &k, x)), 1e-7);
            }
        }
    }

    /// The log-sum-exp is that of each row's visible scaled scores.
    #[test]
    fn saved_log_sum_exp_is_the_rows() {
        let s = AttnShape { batch: 1, seq: 9, heads: 2, head_dim: 3, causal: true, scale: 0.7 };
        let (q, k, v) = (rand_vec(5, s.numel()), rand_vec(6, s.numel()), rand_vec(7, s.numel()));
        let (_, lse) = run(&q, &k, &v, s, 4);
        let idx = |t: usize, h: usize, i: usize| (t * s.heads + h) * s.head_dim + i;
        for h in 0..s.heads {
            for t in 0..s.seq {
                let z: f64 = (0..=t)
                    .map(|u| {
                        ((0..s.head_dim).map(|i| q[idx(t, h, i)] * k[idx(u, h, i)]).sum::<f64>() * s.scale as f64).exp()
                    })
                    .sum();
                let got = lse[h * s.seq + t];
                assert!((got - z.ln()).abs() < 1e-12, "head {h} row {t}: lse {got} vs {}", z.ln());
            }
        }
    }

    /// The attention this op replaced: scores and probabilities materialized
    /// per (b, h), softmax by rows, the probabilities kept for backward.
    fn materialized(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], s: AttnShape) -> [Vec<f32>; 4] {
        let (n, d) = (s.seq, s.head_dim);
        let mut out = vec![0.0; s.numel()];
        let (mut dq, mut dk, mut dv) = (vec![0.0; s.numel()], vec![0.0; s.numel()], vec![0.0; s.numel()]);
        let m = || vec![0.0f32; n * d];
        let (mut qs, mut ks, mut vs, mut dos) = (m(), m(), m(), m());
        let (mut p, mut ds) = (vec![0.0f32; n * n], vec![0.0f32; n * n]);
        for b in 0..s.batch {
            for h in 0..s.heads {
                gather(q, &s, b, h, &mut qs);
                gather(k, &s, b, h, &mut ks);
                gather(v, &s, b, h, &mut vs);
                gather(dout, &s, b, h, &mut dos);
                let mut g = Gemm::new(n, n, d).trans_b();
                g.alpha = s.scale;
                matmul_serial(&qs, &ks, &mut p, g);
                for (i, row) in p.chunks_mut(n).enumerate() {
                    let visible = if s.causal { i + 1 } else { n };
                    let mx = row[..visible].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0.0;
                    for x in &mut row[..visible] {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                    row[..visible].iter_mut().for_each(|x| *x /= sum);
                    row[visible..].fill(0.0);
                }
                let mut o = m();
                matmul_serial(&p, &vs, &mut o, Gemm::new(n, d, n));
                let (mut dqs, mut dks, mut dvs) = (m(), m(), m());
                matmul_serial(&p, &dos, &mut dvs, Gemm::new(n, d, n).trans_a());
                matmul_serial(&dos, &vs, &mut ds, Gemm::new(n, n, d).trans_b());
                for (pr, dr) in p.chunks(n).zip(ds.chunks_mut(n)) {
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(&a, &b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(x, &pv)| *x = pv * (*x - dot) * s.scale);
                }
                matmul_serial(&ds, &ks, &mut dqs, Gemm::new(n, d, n));
                matmul_serial(&ds, &qs, &mut dks, Gemm::new(n, d, n).trans_a());
                let ptr = |x: &mut Vec<f32>| Disjoint(x.as_mut_ptr());
                // SAFETY: one thread; every slice is ours.
                unsafe {
                    scatter_add(&o, &s, b, h, ptr(&mut out));
                    scatter_add(&dqs, &s, b, h, ptr(&mut dq));
                    scatter_add(&dks, &s, b, h, ptr(&mut dk));
                    scatter_add(&dvs, &s, b, h, ptr(&mut dv));
                }
            }
        }
        [out, dq, dk, dv]
    }

    /// f32, against the materialized attention it replaced: within 1e-5 at
    /// shapes of the models (a ViT tile of 27 x 27 patches, head_dim 72; a
    /// causal text) and with partial key blocks.
    #[test]
    fn fused_attention_equals_the_materialized_one_in_f32() {
        let f32s = |seed, n| rand_vec(seed, n).into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        for (causal, batch, seq, heads, head_dim) in
            [(false, 1, 729, 2, 72), (true, 2, 130, 3, 32), (false, 3, 19, 2, 16)]
        {
            let s = AttnShape { batch, seq, heads, head_dim, causal, scale: 1.0 / (head_dim as f32).sqrt() };
            let (q, k, v, dout) = (f32s(1, s.numel()), f32s(2, s.numel()), f32s(3, s.numel()), f32s(4, s.numel()));
            let want = materialized(&q, &k, &v, &dout, s);
            let mut out = vec![f32::NAN; s.numel()];
            let mut lse = vec![0.0f32; s.lse_len()];
            attention_fwd(&q, &k, &v, &mut out, &mut lse, s, KEY_BLOCK);
            let (mut dq, mut dk, mut dv) = (vec![0.0; s.numel()], vec![0.0; s.numel()], vec![0.0; s.numel()]);
            attention_bwd(&q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, s, KEY_BLOCK);
            for (name, got, want) in
                [("out", &out, &want[0]), ("dq", &dq, &want[1]), ("dk", &dk, &want[2]), ("dv", &dv, &want[3])]
            {
                let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-5, "{name} (causal {causal}, seq {seq}): worst difference {worst:.2e}");
                assert!(want.iter().any(|x| *x != 0.0), "{name}: reference is all zeros");
            }
        }
    }
}
