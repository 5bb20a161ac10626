//! Op parity: every op of the Backend trait, run on a backend under test
//! and on a reference backend with the same fresh random inputs, outputs
//! compared. `worker device-check ops` runs it for CUDA against the CPU in
//! f64 (scripts/device-check.sh); the unit test runs the CPU in f32 against
//! f64, so the harness itself is checked on every machine.
//!
//! Outputs an op overwrites are poisoned with NaN on the tested backend
//! first, so an element the op forgets to write fails the check. Gradient
//! buffers, which ops add into, start from the same random values on both
//! sides, so a kernel that overwrites instead of adding fails too.
//!
//! Error measure: `max |tested - reference| / max |reference|` over the
//! output (norm-wise relative error, not per element: per element it is
//! meaningless where the reference is near zero).

use super::backend::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Allowed relative errors: for ops without a GEMM, for ops whose products
/// run in the GEMM precision (TF32 or bf16 on the tensor cores), and for
/// f32 state outputs (gradients of parameters, statistics, optimizer
/// state) computed from inputs both backends hold alike: those stay f32
/// in every precision, so 1e-5 holds for them even in bf16.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub plain: f64,
    pub gemm: f64,
    pub state: f64,
    /// Attention's log-sum-exp from the tested backend's own inputs: the
    /// scores and the online softmax are f32 in every mode, so only TF32's
    /// rounding of the score GEMM's inputs loosens this.
    pub scores: f64,
    /// Outputs of two GEMMs in a row (attention's output and gradients):
    /// each rounds its inputs, so with TF32 the error is up to twice a
    /// single GEMM's (TF32's unit roundoff is 2^-11 = 4.9e-4).
    pub chained: f64,
}

impl Tolerance {
    /// f32 everywhere (limit 1e-5).
    pub const F32: Tolerance = Tolerance { plain: 1e-5, gemm: 1e-5, state: 1e-5, scores: 1e-5, chained: 1e-5 };
    /// TF32 GEMMs (limit 3e-4), everything else f32.
    pub const TF32: Tolerance = Tolerance { plain: 1e-5, gemm: 3e-4, state: 1e-5, scores: 3e-4, chained: 1e-3 };
    /// bf16 storage of activations and bf16 GEMMs (limit 1e-2): every
    /// output that is an activation is rounded to bf16.
    /// bf16 inputs multiply exactly in f32, so attention's log-sum-exp
    /// keeps the f32 limit.
    pub const BF16: Tolerance = Tolerance { plain: 1e-2, gemm: 1e-2, state: 1e-5, scores: 1e-5, chained: 1e-2 };

    /// The limits for a GPU computing in `precision`.
    pub fn of(precision: super::device::Precision) -> Tolerance {
        use super::device::Precision;
        match precision {
            Precision::F32 => Tolerance::F32,
            Precision::Tf32 => Tolerance::TF32,
            Precision::Bf16 => Tolerance::BF16,
        }
    }
}

#[derive(Clone, Debug)]
pub struct OpResult {
    pub op: String,
    pub rel_error: f64,
    pub tolerance: f64,
}

impl OpResult {
    /// NaN (an unwritten output, or a NaN the op made) fails.
    pub fn passed(&self) -> bool {
        self.rel_error <= self.tolerance
    }
}

/// What a test buffer holds: activations (the backend's storage type) or
/// f32 state (gradients of parameters, statistics, optimizer state).
#[derive(Clone, Copy)]
enum Kind {
    Activation,
    State,
}

impl Kind {
    fn upload<B: Backend>(self, be: &B, host: &[f32]) -> B::Buf {
        match self {
            Kind::Activation => be.upload(host),
            Kind::State => be.upload_state(host),
        }
    }

    fn alloc<B: Backend>(self, be: &B, n: usize) -> B::Buf {
        match self {
            Kind::Activation => be.alloc(n),
            Kind::State => be.alloc_state(n),
        }
    }
}

struct Harness<'a, R: Backend, T: Backend> {
    r: &'a R,
    t: &'a T,
    rng: ChaCha8Rng,
    tol: Tolerance,
    results: Vec<OpResult>,
}

impl<'a, R: Backend, T: Backend> Harness<'a, R, T> {
    fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// The same values on both backends: the reference gets what the
    /// tested backend holds (rounded to its storage type), so only the op
    /// itself is compared.
    fn both_as(&self, kind: Kind, host: &[f32]) -> (R::Buf, T::Buf) {
        let t = kind.upload(self.t, host);
        (kind.upload(self.r, &self.t.download(&t)), t)
    }

    /// An output the op overwrites: zeros on the reference, NaN on the
    /// tested backend.
    fn out_as(&self, kind: Kind, n: usize) -> (R::Buf, T::Buf) {
        let mut t = kind.alloc(self.t, n);
        self.t.fill(&mut t, f32::NAN);
        (kind.alloc(self.r, n), t)
    }

    fn both(&self, host: &[f32]) -> (R::Buf, T::Buf) {
        self.both_as(Kind::Activation, host)
    }

    fn rand_both(&mut self, n: usize) -> (R::Buf, T::Buf) {
        let h = self.rand(n);
        self.both(&h)
    }

    fn out(&self, n: usize) -> (R::Buf, T::Buf) {
        self.out_as(Kind::Activation, n)
    }

    fn state_both(&self, host: &[f32]) -> (R::Buf, T::Buf) {
        self.both_as(Kind::State, host)
    }

    fn state_rand(&mut self, n: usize) -> (R::Buf, T::Buf) {
        let h = self.rand(n);
        self.state_both(&h)
    }

    fn state_out(&self, n: usize) -> (R::Buf, T::Buf) {
        self.out_as(Kind::State, n)
    }

    fn idx(&self, ids: &[i32]) -> (R::Idx, T::Idx) {
        (self.r.upload_idx(ids), self.t.upload_idx(ids))
    }

    fn buf_error(&self, r: &R::Buf, t: &T::Buf) -> f64 {
        let (rv, tv) = (self.r.download_f64(r), self.t.download_f64(t));
        if rv.len() != tv.len() {
            f64::INFINITY
        } else {
            rel_error(&rv, &tv)
        }
    }

    fn compare(&mut self, op: &str, r: &R::Buf, t: &T::Buf, gemm: bool) {
        let rel = self.buf_error(r, t);
        self.push(op, rel, if gemm { self.tol.gemm } else { self.tol.plain });
    }

    /// An output held to `limit` (one of the `Tolerance` fields).
    fn compare_at(&mut self, op: &str, r: &R::Buf, t: &T::Buf, limit: f64) {
        let rel = self.buf_error(r, t);
        self.push(op, rel, limit);
    }

    /// An output of two GEMMs in a row (see `Tolerance::chained`).
    fn compare_chained(&mut self, op: &str, r: &R::Buf, t: &T::Buf) {
        self.compare_at(op, r, t, self.tol.chained);
    }

    /// An f32 state output (see `Tolerance::state`).
    fn compare_state(&mut self, op: &str, r: &R::Buf, t: &T::Buf) {
        self.compare_at(op, r, t, self.tol.state);
    }

    fn compare_scalar(&mut self, op: &str, r: f64, t: f64, gemm: bool) {
        self.push(op, rel_error(&[r], &[t]), if gemm { self.tol.gemm } else { self.tol.plain });
    }

    fn push(&mut self, op: &str, rel_error: f64, tolerance: f64) {
        self.results.push(OpResult { op: op.to_string(), rel_error, tolerance });
    }
}

/// `max |t - r| / max |r|`; NaN anywhere gives NaN (which fails).
pub fn rel_error(r: &[f64], t: &[f64]) -> f64 {
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (a, b) in r.iter().zip(t) {
        if a.is_nan() || b.is_nan() {
            return f64::NAN;
        }
        diff = diff.max((a - b).abs());
        scale = scale.max(a.abs());
    }
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Runs every op on both backends and returns one result per output.
pub fn check_ops<R: Backend, T: Backend>(reference: &R, tested: &T, tol: Tolerance, seed: u64) -> Vec<OpResult> {
    let mut h = Harness { r: reference, t: tested, rng: ChaCha8Rng::seed_from_u64(seed), tol, results: Vec::new() };
    elementwise(&mut h);
    linear(&mut h);
    norms(&mut h);
    activations(&mut h);
    attention(&mut h);
    rope(&mut h);
    rows(&mut h);
    loss(&mut h);
    images(&mut h);
    s2(&mut h);
    optimizer(&mut h);
    h.results
}

fn elementwise<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    // Longer than one grid-stride pass of a large GPU (132 SMs x 32 x 256).
    let n = 1_500_007;
    let (mut r, mut t) = h.out(n);
    h.r.fill(&mut r, 0.375);
    h.t.fill(&mut t, 0.375);
    h.compare("fill", &r, &t, false);
    let (x, xt) = h.rand_both(n);
    let (mut y, mut yt) = h.rand_both(n);
    h.r.axpy(-0.7, &x, &mut y);
    h.t.axpy(-0.7, &xt, &mut yt);
    h.compare("axpy", &y, &yt, false);
    h.r.scale(&mut y, 1.3);
    h.t.scale(&mut yt, 1.3);
    h.compare("scale", &y, &yt, false);
    // Several buffers, one of them empty, reduce together.
    let (z, zt) = h.rand_both(0);
    let (a, b) = (h.r.sum_squares(&[&x, &z, &y]), h.t.sum_squares(&[&xt, &zt, &yt]));
    h.compare_scalar("sum_squares", a, b, false);
    let (mut c, mut ct) = h.rand_both(1000);
    h.r.copy(&x, 17, &mut c, 100, 800);
    h.t.copy(&xt, 17, &mut ct, 100, 800);
    h.compare("copy", &c, &ct, false);
    // The same ops on state buffers (f32 whatever the backend stores), and
    // copies between the two kinds (a master weight into its compute copy).
    let (gs, gst) = h.state_rand(n);
    let (mut s, mut st) = h.state_rand(n);
    h.r.axpy(0.25, &gs, &mut s);
    h.t.axpy(0.25, &gst, &mut st);
    h.r.scale(&mut s, -1.5);
    h.t.scale(&mut st, -1.5);
    h.compare_state("axpy, scale (state)", &s, &st);
    let (a, b) = (h.r.sum_squares(&[&s, &x]), h.t.sum_squares(&[&st, &xt]));
    h.compare_scalar("sum_squares (state and activations)", a, b, false);
    let (mut act, mut actt) = h.out(1000);
    h.r.copy(&s, 5, &mut act, 0, 1000);
    h.t.copy(&st, 5, &mut actt, 0, 1000);
    h.compare("copy (state to activations)", &act, &actt, false);
    let (mut back, mut backt) = h.state_out(1000);
    h.r.copy(&act, 0, &mut back, 0, 1000);
    h.t.copy(&actt, 0, &mut backt, 0, 1000);
    h.compare("copy (activations to state)", &back, &backt, false);
}

fn linear<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    let (m, n, k, batch) = (37, 29, 45, 3);
    for (ta, tb, acc) in [(false, false, false), (true, false, true), (false, true, false), (true, true, true)] {
        let g = Gemm { batch, m, n, k, trans_a: ta, trans_b: tb, alpha: 0.8, accumulate: acc };
        let (a, at) = h.rand_both(batch * m * k);
        let (b, bt) = h.rand_both(batch * k * n);
        let (mut c, mut ct) = if acc { h.rand_both(batch * m * n) } else { h.out(batch * m * n) };
        h.r.matmul(&a, &b, &mut c, g);
        h.t.matmul(&at, &bt, &mut ct, g);
        h.compare(&format!("matmul (trans_a {ta}, trans_b {tb}, accumulate {acc})"), &c, &ct, true);
    }
    // A weight's gradient: activations in, accumulated into f32 state (the
    // only GEMM whose output type differs from its inputs' in bf16).
    let g = Gemm { batch: 1, m, n, k, trans_a: true, trans_b: false, alpha: 1.0, accumulate: true };
    let (a, at) = h.rand_both(m * k);
    let (b, bt) = h.rand_both(k * n);
    let (mut c, mut ct) = h.state_rand(m * n);
    h.r.matmul(&a, &b, &mut c, g);
    h.t.matmul(&at, &bt, &mut ct, g);
    h.compare("matmul into an f32 gradient (trans_a, accumulate)", &c, &ct, true);
    let (rows, cols) = (301, 77);
    let (mut y, mut yt) = h.rand_both(rows * cols);
    let (bias, biast) = h.rand_both(cols);
    h.r.bias_add(&mut y, &bias, rows, cols);
    h.t.bias_add(&mut yt, &biast, rows, cols);
    h.compare("bias_add", &y, &yt, false);
    // Backward from fresh inputs (the same values on both), so the f32
    // gradient is held to the state limit.
    let (dy, dyt) = h.rand_both(rows * cols);
    let (mut db, mut dbt) = h.state_rand(cols);
    h.r.bias_bwd(&dy, &mut db, rows, cols);
    h.t.bias_bwd(&dyt, &mut dbt, rows, cols);
    h.compare_state("bias_bwd", &db, &dbt);
    let (batch, r2) = (5, 9);
    let (mut x, mut xt) = h.rand_both(batch * r2 * cols);
    let (tab, tabt) = h.rand_both(r2 * cols);
    h.r.add_broadcast(&mut x, &tab, batch, r2, cols);
    h.t.add_broadcast(&mut xt, &tabt, batch, r2, cols);
    h.compare("add_broadcast", &x, &xt, false);
    let (dx, dxt) = h.rand_both(batch * r2 * cols);
    let (mut dtab, mut dtabt) = h.state_rand(r2 * cols);
    h.r.add_broadcast_bwd(&dx, &mut dtab, batch, r2, cols);
    h.t.add_broadcast_bwd(&dxt, &mut dtabt, batch, r2, cols);
    h.compare_state("add_broadcast_bwd", &dtab, &dtabt);
}

fn norms<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    for (rows, cols) in [(67, 96), (5, 1152)] {
        let (x, xt) = h.rand_both(rows * cols);
        let (w, wt) = h.rand_both(cols);
        let (b, bt) = h.rand_both(cols);
        let (dy, dyt) = h.rand_both(rows * cols);
        let (mut y, mut yt) = h.out(rows * cols);
        let (mut mean, mut meant) = h.state_out(rows);
        let (mut rstd, mut rstdt) = h.state_out(rows);
        h.r.layernorm_fwd(&x, &w, &b, &mut y, &mut mean, &mut rstd, rows, cols, 1e-6);
        h.t.layernorm_fwd(&xt, &wt, &bt, &mut yt, &mut meant, &mut rstdt, rows, cols, 1e-6);
        h.compare(&format!("layernorm_fwd [{rows}, {cols}] y"), &y, &yt, false);
        h.compare_state(&format!("layernorm_fwd [{rows}, {cols}] mean"), &mean, &meant);
        h.compare_state(&format!("layernorm_fwd [{rows}, {cols}] rstd"), &rstd, &rstdt);
        let (mut dx, mut dxt) = h.rand_both(rows * cols);
        let (mut dw, mut dwt) = h.state_rand(cols);
        let (mut db, mut dbt) = h.state_rand(cols);
        h.r.layernorm_bwd(&x, &w, &mean, &rstd, &dy, &mut dx, &mut dw, &mut db, rows, cols);
        h.t.layernorm_bwd(&xt, &wt, &meant, &rstdt, &dyt, &mut dxt, &mut dwt, &mut dbt, rows, cols);
        h.compare(&format!("layernorm_bwd [{rows}, {cols}] dx"), &dx, &dxt, false);
        h.compare_state(&format!("layernorm_bwd [{rows}, {cols}] dw"), &dw, &dwt);
        h.compare_state(&format!("layernorm_bwd [{rows}, {cols}] db"), &db, &dbt);

        // Fused residual add: x1 is updated in place, y, mean and rstd overwritten.
        let (mut x1, mut x1t) = h.rand_both(rows * cols);
        let (mut y, mut yt) = h.out(rows * cols);
        let (mut mean, mut meant) = h.state_out(rows);
        let (mut rstd, mut rstdt) = h.state_out(rows);
        h.r.add_layernorm_fwd(&mut x1, &x, &w, &b, &mut y, &mut mean, &mut rstd, rows, cols, 1e-6);
        h.t.add_layernorm_fwd(&mut x1t, &xt, &wt, &bt, &mut yt, &mut meant, &mut rstdt, rows, cols, 1e-6);
        h.compare(&format!("add_layernorm_fwd [{rows}, {cols}] x1"), &x1, &x1t, false);
        h.compare(&format!("add_layernorm_fwd [{rows}, {cols}] y"), &y, &yt, false);
        h.compare(&format!("add_layernorm_fwd [{rows}, {cols}] mean"), &mean, &meant, false);
        h.compare(&format!("add_layernorm_fwd [{rows}, {cols}] rstd"), &rstd, &rstdt, false);

        let (mut y, mut yt) = h.out(rows * cols);
        let (mut rstd, mut rstdt) = h.state_out(rows);
        h.r.rmsnorm_fwd(&x, &w, &mut y, &mut rstd, rows, cols, 1e-5);
        h.t.rmsnorm_fwd(&xt, &wt, &mut yt, &mut rstdt, rows, cols, 1e-5);
        h.compare(&format!("rmsnorm_fwd [{rows}, {cols}] y"), &y, &yt, false);
        h.compare_state(&format!("rmsnorm_fwd [{rows}, {cols}] rstd"), &rstd, &rstdt);
        let (mut dx, mut dxt) = h.rand_both(rows * cols);
        let (mut dw, mut dwt) = h.state_rand(cols);
        h.r.rmsnorm_bwd(&x, &w, &rstd, &dy, &mut dx, &mut dw, rows, cols);
        h.t.rmsnorm_bwd(&xt, &wt, &rstdt, &dyt, &mut dxt, &mut dwt, rows, cols);
        h.compare(&format!("rmsnorm_bwd [{rows}, {cols}] dx"), &dx, &dxt, false);
        h.compare_state(&format!("rmsnorm_bwd [{rows}, {cols}] dw"), &dw, &dwt);
    }
}

fn activations<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    let n = 10_001;
    let x: Vec<f32> = h.rand(n).iter().map(|v| 4.0 * v).collect();
    let (x, xt) = h.both(&x);
    let (dy, dyt) = h.rand_both(n);
    for kind in [GeluKind::Tanh, GeluKind::Erf] {
        let (mut y, mut yt) = h.out(n);
        h.r.gelu_fwd(&x, &mut y, kind);
        h.t.gelu_fwd(&xt, &mut yt, kind);
        h.compare(&format!("gelu_fwd ({kind:?})"), &y, &yt, false);
        let (mut dx, mut dxt) = h.rand_both(n);
        h.r.gelu_bwd(&x, &dy, &mut dx, kind);
        h.t.gelu_bwd(&xt, &dyt, &mut dxt, kind);
        h.compare(&format!("gelu_bwd ({kind:?})"), &dx, &dxt, false);
    }
    // Fused bias + GELU over more values than one grid-stride pass of a
    // large GPU: y is updated in place, g overwritten.
    let (rows, cols) = (1031, 1153);
    let y0: Vec<f32> = h.rand(rows * cols).iter().map(|v| 4.0 * v).collect();
    let (bias, biast) = h.rand_both(cols);
    for kind in [GeluKind::Tanh, GeluKind::Erf] {
        let (mut y, mut yt) = h.both(&y0);
        let (mut g, mut gt) = h.out(rows * cols);
        h.r.bias_gelu_fwd(&mut y, &bias, &mut g, rows, cols, kind);
        h.t.bias_gelu_fwd(&mut yt, &biast, &mut gt, rows, cols, kind);
        h.compare(&format!("bias_gelu_fwd ({kind:?}) y"), &y, &yt, false);
        h.compare(&format!("bias_gelu_fwd ({kind:?}) g"), &g, &gt, false);
    }
    let (up, upt) = h.rand_both(n);
    let (mut o, mut ot) = h.out(n);
    h.r.swiglu_fwd(&x, &up, &mut o);
    h.t.swiglu_fwd(&xt, &upt, &mut ot);
    h.compare("swiglu_fwd", &o, &ot, false);
    let (mut dg, mut dgt) = h.rand_both(n);
    let (mut du, mut dut) = h.rand_both(n);
    h.r.swiglu_bwd(&x, &up, &dy, &mut dg, &mut du);
    h.t.swiglu_bwd(&xt, &upt, &dyt, &mut dgt, &mut dut);
    h.compare("swiglu_bwd dgate", &dg, &dgt, false);
    h.compare("swiglu_bwd dup", &du, &dut, false);
}

fn attention<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    // A short sequence (one partial key block) and one of three key blocks
    // at CUDA's KEY_BLOCK of 128 (the CPU's is 64), the last partial, each
    // causal and bidirectional.
    let shapes = [(false, 2, 19, 3, 16), (true, 2, 19, 3, 16), (false, 1, 300, 2, 8), (true, 1, 300, 2, 8)];
    for (causal, batch, seq, heads, head_dim) in shapes {
        let s = AttnShape { batch, seq, heads, head_dim, causal, scale: 0.25 };
        let n = s.numel();
        let (q, qt) = h.rand_both(n);
        let (k, kt) = h.rand_both(n);
        let (v, vt) = h.rand_both(n);
        let (mut o, mut ot) = h.out(n);
        let (mut lse, mut lset) = h.state_out(s.lse_len());
        h.r.attention_fwd(&q, &k, &v, &mut o, &mut lse, s);
        h.t.attention_fwd(&qt, &kt, &vt, &mut ot, &mut lset, s);
        h.compare_chained(&format!("attention_fwd (causal {causal}, seq {seq}) out"), &o, &ot);
        // The inputs are the tested backend's own values (rounded to its
        // storage), so the online softmax's f32 precision shows here.
        let limit = h.tol.scores;
        h.compare_at(&format!("attention_fwd (causal {causal}, seq {seq}) lse, f32 softmax"), &lse, &lset, limit);
        let (dout, doutt) = h.rand_both(n);
        let (mut dq, mut dqt) = h.rand_both(n);
        let (mut dk, mut dkt) = h.rand_both(n);
        let (mut dv, mut dvt) = h.rand_both(n);
        // The backward from the output and log-sum-exp the tested backend
        // holds, so only the backward is compared.
        let (o, lse) = (h.r.upload(&h.t.download(&ot)), h.r.upload(&h.t.download(&lset)));
        h.r.attention_bwd(&q, &k, &v, &o, &lse, &dout, &mut dq, &mut dk, &mut dv, s);
        h.t.attention_bwd(&qt, &kt, &vt, &ot, &lset, &doutt, &mut dqt, &mut dkt, &mut dvt, s);
        h.compare_chained(&format!("attention_bwd (causal {causal}, seq {seq}) dq"), &dq, &dqt);
        h.compare_chained(&format!("attention_bwd (causal {causal}, seq {seq}) dk"), &dk, &dkt);
        h.compare_chained(&format!("attention_bwd (causal {causal}, seq {seq}) dv"), &dv, &dvt);
    }
}

fn rope<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    let s = RopeShape { batch: 2, seq: 33, heads: 3, head_dim: 16, theta: 10000.0 };
    let (mut x, mut xt) = h.rand_both(s.batch * s.seq * s.heads * s.head_dim);
    h.r.rope_fwd(&mut x, s);
    h.t.rope_fwd(&mut xt, s);
    h.compare("rope_fwd", &x, &xt, false);
    h.r.rope_bwd(&mut x, s);
    h.t.rope_bwd(&mut xt, s);
    h.compare("rope_bwd", &x, &xt, false);
}

fn rows<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    let (vocab, dim, n) = (50, 24, 40);
    // Repeated ids (the backward must sum them) and skipped rows.
    let ids: Vec<i32> = (0..n).map(|i| if i % 7 == 3 { -1 } else { ((i * 13) % 11) as i32 }).collect();
    let (ids_r, ids_t) = h.idx(&ids);
    let (table, tablet) = h.rand_both(vocab * dim);
    let (mut out, mut outt) = h.rand_both(n * dim);
    h.r.embedding_fwd(&table, &ids_r, &mut out, n, dim);
    h.t.embedding_fwd(&tablet, &ids_t, &mut outt, n, dim);
    h.compare("embedding_fwd", &out, &outt, false);
    let (dout, doutt) = h.rand_both(n * dim);
    let (mut dt, mut dtt) = h.state_rand(vocab * dim);
    h.r.embedding_bwd(&dout, &ids_r, &mut dt, n, dim);
    h.t.embedding_bwd(&doutt, &ids_t, &mut dtt, n, dim);
    h.compare_state("embedding_bwd", &dt, &dtt);
    // Image tokens go to distinct rows of a longer sequence.
    let (src_n, dst_n) = (9, 30);
    let rows: Vec<i32> = (0..src_n).map(|i| (3 * i + 1) as i32).collect();
    let (rows_r, rows_t) = h.idx(&rows);
    let (src, srct) = h.rand_both(src_n * dim);
    let (mut dst, mut dstt) = h.rand_both(dst_n * dim);
    h.r.scatter_rows(&src, &rows_r, &mut dst, src_n, dim);
    h.t.scatter_rows(&srct, &rows_t, &mut dstt, src_n, dim);
    h.compare("scatter_rows", &dst, &dstt, false);
    let (mut dsrc, mut dsrct) = h.rand_both(src_n * dim);
    h.r.scatter_rows_bwd(&dst, &rows_r, &mut dsrc, src_n, dim);
    h.t.scatter_rows_bwd(&dstt, &rows_t, &mut dsrct, src_n, dim);
    h.compare("scatter_rows_bwd", &dsrc, &dsrct, false);
}

fn loss<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    for (n, vocab) in [(23, 1000), (4, 151_936)] {
        let logits: Vec<f32> = h.rand(n * vocab).iter().map(|v| 8.0 * v).collect();
        let (lg, lgt) = h.both(&logits);
        let targets: Vec<i32> = (0..n).map(|i| if i % 5 == 2 { -100 } else { ((i * 7919) % vocab) as i32 }).collect();
        let (tg, tgt) = h.idx(&targets);
        let (mut d, mut dt) = h.out(n * vocab);
        let a = h.r.cross_entropy(&lg, &tg, Some(&mut d), n, vocab, 0.125);
        let b = h.t.cross_entropy(&lgt, &tgt, Some(&mut dt), n, vocab, 0.125);
        h.compare_scalar(&format!("cross_entropy [{n}, {vocab}] loss"), a, b, false);
        h.compare(&format!("cross_entropy [{n}, {vocab}] dlogits"), &d, &dt, false);
        let (a, b) =
            (h.r.cross_entropy(&lg, &tg, None, n, vocab, 1.0), h.t.cross_entropy(&lgt, &tgt, None, n, vocab, 1.0));
        h.compare_scalar(&format!("cross_entropy [{n}, {vocab}] loss without gradient"), a, b, false);
    }
}

fn images<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    let shape = ImageShape { batch: 2, channels: 3, size: 24 };
    let (img, imgt) = h.rand_both(shape.numel());
    for dst_size in [40, 16] {
        let out_n = shape.batch * shape.channels * dst_size * dst_size;
        let (mut o, mut ot) = h.out(out_n);
        h.r.resize_bicubic(&img, shape, &mut o, dst_size);
        h.t.resize_bicubic(&imgt, shape, &mut ot, dst_size);
        h.compare(&format!("resize_bicubic 24 -> {dst_size}"), &o, &ot, false);
    }
    // Tiles land after 5 other tiles in the destination batch.
    let n = 3;
    let tile = ImageShape { batch: 1, channels: 3, size: shape.size / n }.numel();
    let (mut tiles, mut tilest) = h.rand_both((5 + n * n * shape.batch) * tile);
    h.r.tile_split(&img, shape, n, &mut tiles, 5);
    h.t.tile_split(&imgt, shape, n, &mut tilest, 5);
    h.compare("tile_split", &tiles, &tilest, false);
    let patch = 4;
    let (mut p, mut pt) = h.out(shape.numel());
    h.r.patchify(&img, shape, patch, &mut p);
    h.t.patchify(&imgt, shape, patch, &mut pt);
    h.compare("patchify", &p, &pt, false);
}

fn s2<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    // A 2 x 3 split of a 6 x 9 grid (dynamic S2), tiles after 4 others.
    let split = TileGrid { rows: 2, cols: 3 };
    let out_shape = GridShape { batch: 2, rows: 6, cols: 9, channels: 5 };
    let tile = out_shape.numel() / (out_shape.batch * split.count());
    let offset = 4;
    let src_n = (offset + split.count() * out_shape.batch) * tile;
    let (src, srct) = h.rand_both(src_n);
    let (mut out, mut outt) = h.out(out_shape.numel());
    h.r.tile_merge_fwd(&src, offset, split, &mut out, out_shape);
    h.t.tile_merge_fwd(&srct, offset, split, &mut outt, out_shape);
    h.compare("tile_merge_fwd", &out, &outt, false);
    let (dout, doutt) = h.rand_both(out_shape.numel());
    let (mut dsrc, mut dsrct) = h.rand_both(src_n);
    h.r.tile_merge_bwd(&dout, out_shape, split, &mut dsrc, offset);
    h.t.tile_merge_bwd(&doutt, out_shape, split, &mut dsrct, offset);
    h.compare("tile_merge_bwd", &dsrc, &dsrct, false);

    let window = TileGrid { rows: 2, cols: 3 };
    let pooled = out_shape.numel() / window.count();
    let (mut p, mut pt) = h.out(pooled);
    h.r.area_pool_fwd(&out, out_shape, window, &mut p);
    h.t.area_pool_fwd(&outt, out_shape, window, &mut pt);
    h.compare("area_pool_fwd", &p, &pt, false);
    let (dp, dpt) = h.rand_both(pooled);
    let (mut dx, mut dxt) = h.rand_both(out_shape.numel());
    h.r.area_pool_bwd(&dp, out_shape, window, &mut dx);
    h.t.area_pool_bwd(&dpt, out_shape, window, &mut dxt);
    h.compare("area_pool_bwd", &dx, &dxt, false);

    let (rows, width, dst_width, col_offset) = (31, 7, 20, 9);
    let (src, srct) = h.rand_both(rows * width);
    let (mut dst, mut dstt) = h.rand_both(rows * dst_width);
    h.r.concat_cols_fwd(&src, &mut dst, rows, width, dst_width, col_offset);
    h.t.concat_cols_fwd(&srct, &mut dstt, rows, width, dst_width, col_offset);
    h.compare("concat_cols_fwd", &dst, &dstt, false);
    let (mut ds, mut dst2) = h.rand_both(rows * width);
    h.r.concat_cols_bwd(&dst, &mut ds, rows, width, dst_width, col_offset);
    h.t.concat_cols_bwd(&dstt, &mut dst2, rows, width, dst_width, col_offset);
    h.compare("concat_cols_bwd", &ds, &dst2, false);

    for side in [6, 7] {
        let g = GridShape::square(2, side, 5);
        let half = side.div_ceil(2);
        let out_n = 2 * half * half * 4 * 5;
        let (x, xt) = h.rand_both(g.numel());
        let (mut y, mut yt) = h.out(out_n);
        h.r.downsample2x2_fwd(&x, g, &mut y);
        h.t.downsample2x2_fwd(&xt, g, &mut yt);
        h.compare(&format!("downsample2x2_fwd (side {side})"), &y, &yt, false);
        let (dy, dyt) = h.rand_both(out_n);
        let (mut dx, mut dxt) = h.rand_both(g.numel());
        h.r.downsample2x2_bwd(&dy, g, &mut dx);
        h.t.downsample2x2_bwd(&dyt, g, &mut dxt);
        h.compare(&format!("downsample2x2_bwd (side {side})"), &dx, &dxt, false);
    }
}

fn optimizer<R: Backend, T: Backend>(h: &mut Harness<R, T>) {
    let n = 4099;
    let (mut p, mut pt) = h.state_rand(n);
    let (g, gt) = h.state_rand(n);
    let (mut m, mut mt) = h.state_rand(n);
    let v: Vec<f32> = h.rand(n).iter().map(|x| x.abs()).collect();
    let (mut v, mut vt) = h.state_both(&v);
    let a = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 7, grad_scale: 0.5 };
    h.r.adamw(&mut p, &g, &mut m, &mut v, a);
    h.t.adamw(&mut pt, &gt, &mut mt, &mut vt, a);
    h.compare_state("adamw param", &p, &pt);
    h.compare_state("adamw m", &m, &mt);
    h.compare_state("adamw v", &v, &vt);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;

    /// The CPU in f32 against the CPU in f64: every op within 1e-5, every
    /// op of the trait covered.
    #[test]
    fn cpu_f32_matches_f64_on_every_op() {
        let results = check_ops(&Cpu::<f64>::new(), &Cpu::<f32>::new(), Tolerance::F32, 7);
        for r in &results {
            assert!(r.passed(), "{}: relative error {:e} > {:e}", r.op, r.rel_error, r.tolerance);
        }
        let names: String = results.iter().map(|r| r.op.clone() + "\n").collect();
        for op in [
            "fill",
            "copy",
            "axpy",
            "scale",
            "sum_squares",
            "matmul",
            "bias_add",
            "bias_bwd",
            "add_broadcast",
            "layernorm_fwd",
            "add_layernorm_fwd",
            "layernorm_bwd",
            "rmsnorm_fwd",
            "rmsnorm_bwd",
            "gelu_fwd",
            "bias_gelu_fwd",
            "gelu_bwd",
            "swiglu_fwd",
            "swiglu_bwd",
            "attention_fwd",
            "attention_bwd",
            "rope_fwd",
            "rope_bwd",
            "embedding_fwd",
            "embedding_bwd",
            "scatter_rows",
            "scatter_rows_bwd",
            "cross_entropy",
            "resize_bicubic",
            "tile_split",
            "patchify",
            "tile_merge_fwd",
            "tile_merge_bwd",
            "area_pool_fwd",
            "area_pool_bwd",
            "concat_cols_fwd",
            "concat_cols_bwd",
            "downsample2x2_fwd",
            "downsample2x2_bwd",
            "adamw",
        ] {
            assert!(names.lines().any(|l| l.starts_with(op)), "no parity check for {op}");
        }
    }

    /// The check can fail: NaN fails, and f32 is not f64 to 1e-12.
    #[test]
    fn errors_and_unwritten_outputs_fail() {
        assert!(rel_error(&[1.0, 2.0], &[1.0, f64::NAN]).is_nan());
        assert!(!OpResult { op: "x".into(), rel_error: f64::NAN, tolerance: 1.0 }.passed());
        assert_eq!(rel_error(&[2.0, -4.0], &[2.0, -3.0]), 0.25);
        let strict = Tolerance { plain: 1e-12, gemm: 1e-12, state: 1e-12, scores: 1e-12, chained: 1e-12 };
        let results = check_ops(&Cpu::<f64>::new(), &Cpu::<f32>::new(), strict, 7);
        assert!(results.iter().filter(|r| !r.passed()).count() > 10);
    }
}
