//! `impl Backend for Cuda`: each op is a launch of the kernel(s) in the
//! matching `kernels/<group>.cu`, from the group's module beside this one
//! (the same split as the CPU backend's modules).

use super::context::Cuda;
use super::{activation, attention, columns, elementwise, embedding, image, loss, matmul, norm, optim, rope, s2};
use crate::engine::backend::*;
use cudarc::driver::{CudaEvent, CudaSlice};

/// A device buffer of f32. Buffers are allocated at least one element long
/// (CUDA cannot allocate zero bytes), so the length the model asked for is
/// kept beside the allocation.
pub struct Buf {
    pub(crate) data: CudaSlice<f32>,
    pub(crate) len: usize,
    /// Set by `mark_ready`: recorded on the compute stream once the ops
    /// writing this buffer were queued (a gradient bucket's copies), for
    /// the NCCL stream to wait on.
    pub(crate) ready: Option<CudaEvent>,
}

/// A device buffer of i32 indices.
pub struct Idx {
    pub(super) buf: CudaSlice<i32>,
    pub(crate) len: usize,
}

impl Backend for Cuda {
    type Buf = Buf;
    type Idx = Idx;

    fn name(&self) -> String {
        format!("cuda:{}-{}", self.ordinal, self.math.name())
    }

    fn alloc(&self, len: usize) -> Buf {
        Buf { data: self.zeros(len), len, ready: None }
    }
    fn upload(&self, data: &[f32]) -> Buf {
        let mut buf = self.alloc(data.len());
        if !data.is_empty() {
            let copied = self.stream.memcpy_htod(data, &mut buf.data);
            self.record("upload", copied);
        }
        buf
    }
    fn upload_f64(&self, data: &[f64]) -> Buf {
        self.upload(&data.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }
    fn download(&self, buf: &Buf) -> Vec<f32> {
        let mut host = vec![0f32; buf.len];
        if !host.is_empty() {
            let copied = self.stream.memcpy_dtoh(&buf.data.slice(..buf.len), &mut host);
            self.record("download", copied);
            let synced = self.stream.synchronize();
            self.record("download (synchronize)", synced);
        }
        host
    }
    fn download_f64(&self, buf: &Buf) -> Vec<f64> {
        self.download(buf).into_iter().map(f64::from).collect()
    }
    fn upload_idx(&self, data: &[i32]) -> Idx {
        let mut buf = self.zeros::<i32>(data.len());
        if !data.is_empty() {
            let copied = self.stream.memcpy_htod(data, &mut buf);
            self.record("upload of indices", copied);
        }
        Idx { buf, len: data.len() }
    }
    fn buf_len(&self, buf: &Buf) -> usize {
        buf.len
    }
    fn check(&self) -> anyhow::Result<()> {
        Cuda::check(self)
    }
    fn peak_memory_bytes(&self) -> Option<u64> {
        self.pool_used_high()
    }
    fn mark_ready(&self, buf: &mut Buf) {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        buf.ready = self.record("recording a ready event", self.stream.record_event(flags));
    }

    fn fill(&self, buf: &mut Buf, value: f32) {
        elementwise::fill(self, buf, value)
    }
    fn copy(&self, src: &Buf, src_off: usize, dst: &mut Buf, dst_off: usize, len: usize) {
        elementwise::copy(self, src, src_off, dst, dst_off, len)
    }
    fn axpy(&self, alpha: f32, x: &Buf, y: &mut Buf) {
        elementwise::axpy(self, alpha, x, y)
    }
    fn scale(&self, x: &mut Buf, s: f32) {
        elementwise::scale(self, x, s)
    }
    fn sum_squares(&self, xs: &[&Buf]) -> f64 {
        elementwise::sum_squares(self, xs)
    }

    fn matmul(&self, a: &Buf, b: &Buf, c: &mut Buf, g: Gemm) {
        matmul::matmul(self, a, b, c, g)
    }
    fn bias_add(&self, y: &mut Buf, bias: &Buf, rows: usize, cols: usize) {
        elementwise::bias_add(self, y, bias, rows, cols)
    }
    fn bias_bwd(&self, dy: &Buf, dbias: &mut Buf, rows: usize, cols: usize) {
        columns::col_sums_into(self, dy, dbias, rows, cols)
    }
    fn add_broadcast(&self, x: &mut Buf, table: &Buf, batch: usize, rows: usize, cols: usize) {
        elementwise::bias_add(self, x, table, batch, rows * cols)
    }
    fn add_broadcast_bwd(&self, dx: &Buf, dtable: &mut Buf, batch: usize, rows: usize, cols: usize) {
        columns::col_sums_into(self, dx, dtable, batch, rows * cols)
    }

    fn layernorm_fwd(
        &self,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        y: &mut Buf,
        mean: &mut Buf,
        rstd: &mut Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        norm::layernorm_fwd(self, x, w, b, y, mean, rstd, rows, cols, eps)
    }
    fn add_layernorm_fwd(
        &self,
        x1: &mut Buf,
        residual: &Buf,
        w: &Buf,
        b: &Buf,
        y: &mut Buf,
        mean: &mut Buf,
        rstd: &mut Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        norm::add_layernorm_fwd(self, x1, residual, w, b, y, mean, rstd, rows, cols, eps)
    }
    fn layernorm_bwd(
        &self,
        x: &Buf,
        w: &Buf,
        mean: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        dw: &mut Buf,
        db: &mut Buf,
        rows: usize,
        cols: usize,
    ) {
        norm::layernorm_bwd(self, x, w, mean, rstd, dy, dx, dw, db, rows, cols)
    }
    fn rmsnorm_fwd(&self, x: &Buf, w: &Buf, y: &mut Buf, rstd: &mut Buf, rows: usize, cols: usize, eps: f32) {
        norm::rmsnorm_fwd(self, x, w, y, rstd, rows, cols, eps)
    }
    fn rmsnorm_bwd(
        &self,
        x: &Buf,
        w: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        dw: &mut Buf,
        rows: usize,
        cols: usize,
    ) {
        norm::rmsnorm_bwd(self, x, w, rstd, dy, dx, dw, rows, cols)
    }

    fn gelu_fwd(&self, x: &Buf, y: &mut Buf, kind: GeluKind) {
        activation::gelu_fwd(self, x, y, kind)
    }
    fn bias_gelu_fwd(&self, y: &mut Buf, bias: &Buf, g: &mut Buf, rows: usize, cols: usize, kind: GeluKind) {
        activation::bias_gelu_fwd(self, y, bias, g, rows, cols, kind)
    }
    fn gelu_bwd(&self, x: &Buf, dy: &Buf, dx: &mut Buf, kind: GeluKind) {
        activation::gelu_bwd(self, x, dy, dx, kind)
    }
    fn swiglu_fwd(&self, gate: &Buf, up: &Buf, out: &mut Buf) {
        activation::swiglu_fwd(self, gate, up, out)
    }
    fn swiglu_bwd(&self, gate: &Buf, up: &Buf, dout: &Buf, dgate: &mut Buf, dup: &mut Buf) {
        activation::swiglu_bwd(self, gate, up, dout, dgate, dup)
    }

    fn attention_fwd(&self, q: &Buf, k: &Buf, v: &Buf, out: &mut Buf, probs: &mut Buf, s: AttnShape) {
        attention::attention_fwd(self, q, k, v, out, probs, s)
    }
    fn attention_bwd(
        &self,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        probs: &Buf,
        dout: &Buf,
        dq: &mut Buf,
        dk: &mut Buf,
        dv: &mut Buf,
        s: AttnShape,
    ) {
        attention::attention_bwd(self, q, k, v, probs, dout, dq, dk, dv, s)
    }
    fn rope_fwd(&self, x: &mut Buf, s: RopeShape) {
        rope::rotate(self, x, s, false)
    }
    fn rope_bwd(&self, dx: &mut Buf, s: RopeShape) {
        rope::rotate(self, dx, s, true)
    }

    fn embedding_fwd(&self, table: &Buf, ids: &Idx, out: &mut Buf, n: usize, dim: usize) {
        embedding::gather_rows(self, table, ids, out, n, dim)
    }
    fn embedding_bwd(&self, dout: &Buf, ids: &Idx, dtable: &mut Buf, n: usize, dim: usize) {
        embedding::scatter_add_rows(self, dout, ids, dtable, n, dim)
    }
    fn scatter_rows(&self, src: &Buf, rows: &Idx, dst: &mut Buf, n: usize, dim: usize) {
        embedding::scatter_rows(self, src, rows, dst, n, dim)
    }
    fn scatter_rows_bwd(&self, ddst: &Buf, rows: &Idx, dsrc: &mut Buf, n: usize, dim: usize) {
        embedding::gather_rows_add(self, ddst, rows, dsrc, n, dim)
    }

    fn cross_entropy(
        &self,
        logits: &Buf,
        targets: &Idx,
        dlogits: Option<&mut Buf>,
        n: usize,
        vocab: usize,
        grad_scale: f32,
    ) -> f64 {
        loss::cross_entropy(self, logits, targets, dlogits, n, vocab, grad_scale)
    }

    fn resize_bicubic(&self, src: &Buf, src_shape: ImageShape, dst: &mut Buf, dst_size: usize) {
        image::resize_bicubic(self, src, src_shape, dst, dst_size)
    }
    fn tile_split(&self, src: &Buf, src_shape: ImageShape, n: usize, dst: &mut Buf, dst_tile_offset: usize) {
        image::tile_split(self, src, src_shape, n, dst, dst_tile_offset)
    }
    fn patchify(&self, src: &Buf, shape: ImageShape, patch: usize, dst: &mut Buf) {
        image::patchify(self, src, shape, patch, dst)
    }

    fn tile_merge_fwd(&self, src: &Buf, src_tile_offset: usize, split: TileGrid, out: &mut Buf, out_shape: GridShape) {
        s2::tile_merge_fwd(self, src, src_tile_offset, split, out, out_shape)
    }
    fn tile_merge_bwd(
        &self,
        dout: &Buf,
        out_shape: GridShape,
        split: TileGrid,
        dsrc: &mut Buf,
        src_tile_offset: usize,
    ) {
        s2::tile_merge_bwd(self, dout, out_shape, split, dsrc, src_tile_offset)
    }
    fn area_pool_fwd(&self, src: &Buf, src_shape: GridShape, window: TileGrid, dst: &mut Buf) {
        s2::area_pool_fwd(self, src, src_shape, window, dst)
    }
    fn area_pool_bwd(&self, ddst: &Buf, src_shape: GridShape, window: TileGrid, dsrc: &mut Buf) {
        s2::area_pool_bwd(self, ddst, src_shape, window, dsrc)
    }
    fn concat_cols_fwd(
        &self,
        src: &Buf,
        dst: &mut Buf,
        rows: usize,
        width: usize,
        dst_width: usize,
        col_offset: usize,
    ) {
        s2::concat_cols_fwd(self, src, dst, rows, width, dst_width, col_offset)
    }
    fn concat_cols_bwd(
        &self,
        ddst: &Buf,
        dsrc: &mut Buf,
        rows: usize,
        width: usize,
        dst_width: usize,
        col_offset: usize,
    ) {
        s2::concat_cols_bwd(self, ddst, dsrc, rows, width, dst_width, col_offset)
    }
    fn downsample2x2_fwd(&self, src: &Buf, src_shape: GridShape, dst: &mut Buf) {
        s2::downsample2x2_fwd(self, src, src_shape, dst)
    }
    fn downsample2x2_bwd(&self, ddst: &Buf, src_shape: GridShape, dsrc: &mut Buf) {
        s2::downsample2x2_bwd(self, ddst, src_shape, dsrc)
    }

    fn adamw(&self, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf, h: AdamW) {
        optim::adamw(self, param, grad, m, v, h)
    }
}
