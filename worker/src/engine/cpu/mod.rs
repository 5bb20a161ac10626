//! The CPU backend: f32 (or f64 for gradient checks), GEMMs from the `gemm`
//! crate, and rayon across cores for everything row-parallel.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod image;
mod loss;
mod matmul;
mod norm;
mod optim;
mod rope;
mod s2;

use super::backend::*;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Scalar types the CPU backend computes in.
pub trait Real:
    num_traits::Float
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    fn erf(self) -> Self;
    /// tanh through one `exp`: libm's `tanhf` goes through `expm1f`, which
    /// cost 16% of a CPU training step in GELU. The absolute error stays
    /// under 1e-7 (GELU needs 0.5 * (1 + tanh), so no relative accuracy near
    /// zero is lost that matters). f64 keeps the exact `tanh`.
    fn tanh_fast(self) -> Self;
}

impl Real for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erff(self)
    }
    #[inline]
    fn tanh_fast(self) -> Self {
        let e = (2.0 * self.abs().min(20.0)).exp();
        (1.0 - 2.0 / (e + 1.0)).copysign(self)
    }
}

impl Real for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline]
    fn tanh_fast(self) -> Self {
        self.tanh()
    }
}

/// The CPU backend computing in `T`. `Cpu::<f32>` trains; `Cpu::<f64>` checks.
pub struct Cpu<T: Real = f32> {
    _t: PhantomData<T>,
    /// Keep separate compute copies of the weights (`Backend::compute_copy`),
    /// as a GPU storing bf16 does; here they are exact copies, so results
    /// do not change, and tests run the optimizer's master/copy path.
    compute_copies: bool,
    /// Values allocated so far (`alloc`, `alloc_state`), which the memory
    /// planner's tests hold its size functions to.
    allocated: AtomicUsize,
}

impl<T: Real> Default for Cpu<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Real> Cpu<T> {
    pub fn new() -> Self {
        Cpu { _t: PhantomData, compute_copies: false, allocated: AtomicUsize::new(0) }
    }

    /// A backend whose weights' compute copies are separate buffers.
    pub fn with_compute_copies() -> Self {
        Cpu { _t: PhantomData, compute_copies: true, allocated: AtomicUsize::new(0) }
    }

    /// Values allocated through `alloc` and `alloc_state` since creation.
    pub fn allocated_values(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }
}

/// Rows per rayon task: enough work per task to amortize scheduling.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    (16384 / cols.max(1)).clamp(1, rows.max(1))
}

impl<T: Real> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type Idx = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu-{}", std::any::type_name::<T>())
    }

    fn alloc(&self, len: usize) -> Vec<T> {
        self.allocated.fetch_add(len, Ordering::Relaxed);
        vec![T::zero(); len]
    }
    fn upload(&self, data: &[f32]) -> Vec<T> {
        data.iter().map(|&x| T::of(x as f64)).collect()
    }
    fn upload_f64(&self, data: &[f64]) -> Vec<T> {
        data.iter().map(|&x| T::of(x)).collect()
    }
    fn download(&self, buf: &Vec<T>) -> Vec<f32> {
        buf.iter().map(|x| x.f64() as f32).collect()
    }
    fn download_f64(&self, buf: &Vec<T>) -> Vec<f64> {
        buf.iter().map(|x| x.f64()).collect()
    }
    fn upload_idx(&self, data: &[i32]) -> Vec<i32> {
        data.to_vec()
    }
    fn buf_len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn fill(&self, buf: &mut Vec<T>, value: f32) {
        elementwise::fill(buf, T::of(value as f64))
    }
    fn copy(&self, src: &Vec<T>, src_off: usize, dst: &mut Vec<T>, dst_off: usize, len: usize) {
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
    }
    fn axpy(&self, alpha: f32, x: &Vec<T>, y: &mut Vec<T>) {
        elementwise::axpy(T::of(alpha as f64), x, y)
    }
    fn scale(&self, x: &mut Vec<T>, s: f32) {
        elementwise::scale(x, T::of(s as f64))
    }
    fn compute_copy(&self, master: &Vec<T>) -> Option<Vec<T>> {
        self.compute_copies.then(|| master.clone())
    }
    fn sum_squares(&self, xs: &[&Vec<T>]) -> f64 {
        xs.iter().map(|x| elementwise::sum_squares(x)).sum()
    }

    fn matmul(&self, a: &Vec<T>, b: &Vec<T>, c: &mut Vec<T>, g: Gemm) {
        matmul::matmul(a, b, c, g)
    }
    fn bias_add(&self, y: &mut Vec<T>, bias: &Vec<T>, rows: usize, cols: usize) {
        elementwise::bias_add(y, bias, rows, cols)
    }
    fn bias_bwd(&self, dy: &Vec<T>, dbias: &mut Vec<T>, rows: usize, cols: usize) {
        elementwise::col_sums_into(dy, dbias, rows, cols)
    }
    fn add_broadcast(&self, x: &mut Vec<T>, table: &Vec<T>, batch: usize, rows: usize, cols: usize) {
        elementwise::bias_add(x, table, batch, rows * cols)
    }
    fn add_broadcast_bwd(&self, dx: &Vec<T>, dtable: &mut Vec<T>, batch: usize, rows: usize, cols: usize) {
        elementwise::col_sums_into(dx, dtable, batch, rows * cols)
    }

    fn layernorm_fwd(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        norm::layernorm_fwd(x, w, b, y, mean, rstd, rows, cols, eps as f64)
    }
    fn add_layernorm_fwd(
        &self,
        x1: &mut Vec<T>,
        residual: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        norm::add_layernorm_fwd(x1, residual, w, b, y, mean, rstd, rows, cols, eps as f64)
    }
    fn layernorm_bwd(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        mean: &Vec<T>,
        rstd: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
        rows: usize,
        cols: usize,
    ) {
        norm::layernorm_bwd(x, w, mean, rstd, dy, dx, dw, db, rows, cols)
    }
    fn rmsnorm_fwd(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        y: &mut Vec<T>,
        rstd: &mut Vec<T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        norm::rmsnorm_fwd(x, w, y, rstd, rows, cols, eps as f64)
    }
    fn rmsnorm_bwd(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        rstd: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        rows: usize,
        cols: usize,
    ) {
        norm::rmsnorm_bwd(x, w, rstd, dy, dx, dw, rows, cols)
    }

    fn gelu_fwd(&self, x: &Vec<T>, y: &mut Vec<T>, kind: GeluKind) {
        activation::gelu_fwd(x, y, kind)
    }
    fn bias_gelu_fwd(&self, y: &mut Vec<T>, bias: &Vec<T>, g: &mut Vec<T>, rows: usize, cols: usize, kind: GeluKind) {
        activation::bias_gelu_fwd(y, bias, g, rows, cols, kind)
    }
    fn gelu_bwd(&self, x: &Vec<T>, dy: &Vec<T>, dx: &mut Vec<T>, kind: GeluKind) {
        activation::gelu_bwd(x, dy, dx, kind)
    }
    fn swiglu_fwd(&self, gate: &Vec<T>, up: &Vec<T>, out: &mut Vec<T>) {
        activation::swiglu_fwd(gate, up, out)
    }
    fn swiglu_bwd(&self, gate: &Vec<T>, up: &Vec<T>, dout: &Vec<T>, dgate: &mut Vec<T>, dup: &mut Vec<T>) {
        activation::swiglu_bwd(gate, up, dout, dgate, dup)
    }

    fn attention_fwd(&self, q: &Vec<T>, k: &Vec<T>, v: &Vec<T>, out: &mut Vec<T>, lse: &mut Vec<T>, s: AttnShape) {
        attention::attention_fwd(q, k, v, out, lse, s, attention::KEY_BLOCK)
    }
    fn attention_bwd(
        &self,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        dout: &Vec<T>,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        s: AttnShape,
    ) {
        attention::attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, s, attention::KEY_BLOCK)
    }
    fn rope_fwd(&self, x: &mut Vec<T>, s: RopeShape) {
        rope::rotate(x, s, false)
    }
    fn rope_bwd(&self, dx: &mut Vec<T>, s: RopeShape) {
        rope::rotate(dx, s, true)
    }

    fn embedding_fwd(&self, table: &Vec<T>, ids: &Vec<i32>, out: &mut Vec<T>, n: usize, dim: usize) {
        embedding::gather_rows(table, ids, out, n, dim)
    }
    fn embedding_bwd(&self, dout: &Vec<T>, ids: &Vec<i32>, dtable: &mut Vec<T>, n: usize, dim: usize) {
        embedding::scatter_add_rows(dout, ids, dtable, n, dim)
    }
    fn scatter_rows(&self, src: &Vec<T>, rows: &Vec<i32>, dst: &mut Vec<T>, n: usize, dim: usize) {
        embedding::scatter_rows(src, rows, dst, n, dim)
    }
    fn scatter_rows_bwd(&self, ddst: &Vec<T>, rows: &Vec<i32>, dsrc: &mut Vec<T>, n: usize, dim: usize) {
        embedding::gather_rows_add(ddst, rows, dsrc, n, dim)
    }

    fn cross_entropy(
        &self,
        logits: &Vec<T>,
        targets: &Vec<i32>,
        dlogits: Option<&mut Vec<T>>,
        n: usize,
        vocab: usize,
        grad_scale: f32,
    ) -> f64 {
        loss::cross_entropy(logits, targets, dlogits.map(|d| d.as_mut_slice()), n, vocab, grad_scale as f64)
    }

    fn resize_bicubic(&self, src: &Vec<T>, src_shape: ImageShape, dst: &mut Vec<T>, dst_size: usize) {
        image::resize_bicubic(src, src_shape, dst, dst_size)
    }
    fn tile_split(&self, src: &Vec<T>, src_shape: ImageShape, n: usize, dst: &mut Vec<T>, dst_tile_offset: usize) {
        image::tile_split(src, src_shape, n, dst, dst_tile_offset)
    }
    fn patchify(&self, src: &Vec<T>, shape: ImageShape, patch: usize, dst: &mut Vec<T>) {
        image::patchify(src, shape, patch, dst)
    }

    fn tile_merge_fwd(
        &self,
        src: &Vec<T>,
        src_tile_offset: usize,
        split: TileGrid,
        out: &mut Vec<T>,
        out_shape: GridShape,
    ) {
        s2::tile_merge_fwd(src, src_tile_offset, split, out, out_shape)
    }
    fn tile_merge_bwd(
        &self,
        dout: &Vec<T>,
        out_shape: GridShape,
        split: TileGrid,
        dsrc: &mut Vec<T>,
        src_tile_offset: usize,
    ) {
        s2::tile_merge_bwd(dout, out_shape, split, dsrc, src_tile_offset)
    }
    fn area_pool_fwd(&self, src: &Vec<T>, src_shape: GridShape, window: TileGrid, dst: &mut Vec<T>) {
        s2::area_pool_fwd(src, src_shape, window, dst)
    }
    fn area_pool_bwd(&self, ddst: &Vec<T>, src_shape: GridShape, window: TileGrid, dsrc: &mut Vec<T>) {
        s2::area_pool_bwd(ddst, src_shape, window, dsrc)
    }
    fn concat_cols_fwd(
        &self,
        src: &Vec<T>,
        dst: &mut Vec<T>,
        rows: usize,
        width: usize,
        dst_width: usize,
        col_offset: usize,
    ) {
        s2::concat_cols_fwd(src, dst, rows, width, dst_width, col_offset)
    }
    fn concat_cols_bwd(
        &self,
        ddst: &Vec<T>,
        dsrc: &mut Vec<T>,
        rows: usize,
        width: usize,
        dst_width: usize,
        col_offset: usize,
    ) {
        s2::concat_cols_bwd(ddst, dsrc, rows, width, dst_width, col_offset)
    }
    fn downsample2x2_fwd(&self, src: &Vec<T>, src_shape: GridShape, dst: &mut Vec<T>) {
        s2::downsample2x2_fwd(src, src_shape, dst)
    }
    fn downsample2x2_bwd(&self, ddst: &Vec<T>, src_shape: GridShape, dsrc: &mut Vec<T>) {
        s2::downsample2x2_bwd(ddst, src_shape, dsrc)
    }

    fn adamw(&self, param: &mut Vec<T>, grad: &Vec<T>, m: &mut Vec<T>, v: &mut Vec<T>, h: AdamW) {
        optim::adamw(param, grad, m, v, h)
    }
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn fast_tanh_is_within_1e7_of_tanh() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((x.tanh_fast() as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 1.5e-7, "max abs error {worst}");
        assert_eq!(0f32.tanh_fast(), 0.0);
        assert_eq!(100f32.tanh_fast(), 1.0);
    }
}
