//! `impl Backend for Cuda`: each op is a launch of the kernel(s) in the
//! matching `kernels/<group>.cu`, from the group's module beside this one
//! (the same split as the CPU backend's modules).

use super::buffer::{decode, encode};
use super::context::Cuda;
use super::kernels::Storage;
use super::{activation, attention, columns, elementwise, embedding, image, loss, matmul, norm, optim, rope, s2};
use crate::engine::backend::*;
use crate::model::memory::GPU_RESERVE_BYTES;

pub use super::buffer::{Buf, Idx};

impl Cuda {
    fn upload_as(&self, data: &[f32], storage: Storage) -> Buf {
        let buf = self.buffer(data.len(), storage);
        if !data.is_empty() {
            let copied = self.driver.htod(&encode(data, storage), buf.data.addr());
            self.record("upload", copied);
        }
        buf
    }
}

impl Backend for Cuda {
    type Buf = Buf;
    type Idx = Idx;

    fn name(&self) -> String {
        format!("{}-{}", self.device, self.math.name())
    }

    fn alloc(&self, len: usize) -> Buf {
        self.buffer(len, self.storage)
    }
    fn upload(&self, data: &[f32]) -> Buf {
        self.upload_as(data, self.storage)
    }
    fn alloc_state(&self, len: usize) -> Buf {
        self.buffer(len, Storage::F32)
    }
    fn upload_state(&self, data: &[f32]) -> Buf {
        self.upload_as(data, Storage::F32)
    }
    fn compute_copy(&self, master: &Buf) -> Option<Buf> {
        if self.storage == Storage::F32 {
            return None;
        }
        let mut copy = self.alloc(master.len);
        elementwise::copy(self, master, 0, &mut copy, 0, master.len);
        Some(copy)
    }
    fn upload_f64(&self, data: &[f64]) -> Buf {
        self.upload(&data.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }
    fn download(&self, buf: &Buf) -> Vec<f32> {
        let mut bytes = vec![0u8; buf.len * buf.storage.size()];
        if !bytes.is_empty() {
            let copied = self.driver.dtoh(buf.data.addr(), &mut bytes);
            self.record("download", copied);
        }
        decode(&bytes, buf.storage)
    }
    fn download_f64(&self, buf: &Buf) -> Vec<f64> {
        self.download(buf).into_iter().map(f64::from).collect()
    }
    fn upload_idx(&self, data: &[i32]) -> Idx {
        // A failed copy is recorded for check(); the indices are then zeros.
        let buf = self.upload_values("upload of indices", data).unwrap_or_else(|| self.zeros::<i32>(data.len()));
        Idx { buf, len: data.len() }
    }
    fn buf_len(&self, buf: &Buf) -> usize {
        buf.len
    }
    fn check(&self) -> anyhow::Result<()> {
        Cuda::check(self)
    }
    fn peak_memory_bytes(&self) -> Option<u64> {
        self.driver.peak_bytes()
    }
    fn memory_capacity_bytes(&self) -> Option<u64> {
        let (_, total) = self.driver.mem_info()?;
        // A GPU keeps part of its memory for itself; the emulated device does not.
        let reserve = if self.driver.gpu().is_some() { GPU_RESERVE_BYTES } else { 0 };
        Some((total as u64).saturating_sub(reserve))
    }
    fn mark_ready(&self, buf: &mut Buf) {
        buf.ready = self.record("recording a ready event", self.driver.record_event());
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
        self.roles("bias_add", &[&*y, bias], &[]);
        elementwise::bias_add(self, y, bias, rows, cols)
    }
    fn bias_bwd(&self, dy: &Buf, dbias: &mut Buf, rows: usize, cols: usize) {
        self.roles("bias_bwd", &[dy], &[&*dbias]);
        columns::col_sums_into(self, dy, dbias, rows, cols)
    }
    fn add_broadcast(&self, x: &mut Buf, table: &Buf, batch: usize, rows: usize, cols: usize) {
        self.roles("add_broadcast", &[&*x, table], &[]);
        elementwise::bias_add(self, x, table, batch, rows * cols)
    }
    fn add_broadcast_bwd(&self, dx: &Buf, dtable: &mut Buf, batch: usize, rows: usize, cols: usize) {
        self.roles("add_broadcast_bwd", &[dx], &[&*dtable]);
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
        self.roles("layernorm_fwd", &[x, w, b, &*y], &[&*mean, &*rstd]);
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
        self.roles("add_layernorm_fwd", &[&*x1, residual, w, b, &*y], &[&*mean, &*rstd]);
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
        self.roles("layernorm_bwd", &[x, w, dy, &*dx], &[mean, rstd, &*dw, &*db]);
        norm::layernorm_bwd(self, x, w, mean, rstd, dy, dx, dw, db, rows, cols)
    }
    fn rmsnorm_fwd(&self, x: &Buf, w: &Buf, y: &mut Buf, rstd: &mut Buf, rows: usize, cols: usize, eps: f32) {
        self.roles("rmsnorm_fwd", &[x, w, &*y], &[&*rstd]);
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
        self.roles("rmsnorm_bwd", &[x, w, dy, &*dx], &[rstd, &*dw]);
        norm::rmsnorm_bwd(self, x, w, rstd, dy, dx, dw, rows, cols)
    }

    fn gelu_fwd(&self, x: &Buf, y: &mut Buf, kind: GeluKind) {
        self.roles("gelu_fwd", &[x, &*y], &[]);
        activation::gelu_fwd(self, x, y, kind)
    }
    fn bias_gelu_fwd(&self, y: &mut Buf, bias: &Buf, g: &mut Buf, rows: usize, cols: usize, kind: GeluKind) {
        self.roles("bias_gelu_fwd", &[&*y, bias, &*g], &[]);
        activation::bias_gelu_fwd(self, y, bias, g, rows, cols, kind)
    }
    fn gelu_bwd(&self, x: &Buf, dy: &Buf, dx: &mut Buf, kind: GeluKind) {
        self.roles("gelu_bwd", &[x, dy, &*dx], &[]);
        activation::gelu_bwd(self, x, dy, dx, kind)
    }
    fn swiglu_fwd(&self, gate: &Buf, up: &Buf, out: &mut Buf) {
        self.roles("swiglu_fwd", &[gate, up, &*out], &[]);
        activation::swiglu_fwd(self, gate, up, out)
    }
    fn swiglu_bwd(&self, gate: &Buf, up: &Buf, dout: &Buf, dgate: &mut Buf, dup: &mut Buf) {
        self.roles("swiglu_bwd", &[gate, up, dout, &*dgate, &*dup], &[]);
        activation::swiglu_bwd(self, gate, up, dout, dgate, dup)
    }

    fn attention_fwd(&self, q: &Buf, k: &Buf, v: &Buf, out: &mut Buf, lse: &mut Buf, s: AttnShape) {
        self.roles("attention_fwd", &[q, k, v, &*out], &[&*lse]);
        attention::attention_fwd(self, q, k, v, out, lse, s)
    }
    fn attention_bwd(
        &self,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        out: &Buf,
        lse: &Buf,
        dout: &Buf,
        dq: &mut Buf,
        dk: &mut Buf,
        dv: &mut Buf,
        s: AttnShape,
    ) {
        self.roles("attention_bwd", &[q, k, v, out, dout, &*dq, &*dk, &*dv], &[lse]);
        attention::attention_bwd(self, q, k, v, out, lse, dout, dq, dk, dv, s)
    }
    fn rope_fwd(&self, x: &mut Buf, s: RopeShape) {
        self.roles("rope_fwd", &[&*x], &[]);
        rope::rotate(self, x, s, false)
    }
    fn rope_bwd(&self, dx: &mut Buf, s: RopeShape) {
        self.roles("rope_bwd", &[&*dx], &[]);
        rope::rotate(self, dx, s, true)
    }

    fn embedding_fwd(&self, table: &Buf, ids: &Idx, out: &mut Buf, n: usize, dim: usize) {
        self.roles("embedding_fwd", &[table, &*out], &[]);
        embedding::gather_rows(self, table, ids, out, n, dim)
    }
    fn embedding_bwd(&self, dout: &Buf, ids: &Idx, dtable: &mut Buf, n: usize, dim: usize) {
        self.roles("embedding_bwd", &[dout], &[&*dtable]);
        embedding::scatter_add_rows(self, dout, ids, dtable, n, dim)
    }
    fn scatter_rows(&self, src: &Buf, rows: &Idx, dst: &mut Buf, n: usize, dim: usize) {
        self.roles("scatter_rows", &[src, &*dst], &[]);
        embedding::scatter_rows(self, src, rows, dst, n, dim)
    }
    fn scatter_rows_bwd(&self, ddst: &Buf, rows: &Idx, dsrc: &mut Buf, n: usize, dim: usize) {
        self.roles("scatter_rows_bwd", &[ddst, &*dsrc], &[]);
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
        self.roles("cross_entropy", &[logits], &[]);
        if let Some(d) = &dlogits {
            self.roles("cross_entropy", &[&**d], &[]);
        }
        loss::cross_entropy(self, logits, targets, dlogits, n, vocab, grad_scale)
    }

    fn resize_bicubic(&self, src: &Buf, src_shape: ImageShape, dst: &mut Buf, dst_size: usize) {
        self.roles("resize_bicubic", &[src, &*dst], &[]);
        image::resize_bicubic(self, src, src_shape, dst, dst_size)
    }
    fn tile_split(&self, src: &Buf, src_shape: ImageShape, n: usize, dst: &mut Buf, dst_tile_offset: usize) {
        self.roles("tile_split", &[src, &*dst], &[]);
        image::tile_split(self, src, src_shape, n, dst, dst_tile_offset)
    }
    fn patchify(&self, src: &Buf, shape: ImageShape, patch: usize, dst: &mut Buf) {
        self.roles("patchify", &[src, &*dst], &[]);
        image::patchify(self, src, shape, patch, dst)
    }

    fn tile_merge_fwd(&self, src: &Buf, src_tile_offset: usize, split: TileGrid, out: &mut Buf, out_shape: GridShape) {
        self.roles("tile_merge_fwd", &[src, &*out], &[]);
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
        self.roles("tile_merge_bwd", &[dout, &*dsrc], &[]);
        s2::tile_merge_bwd(self, dout, out_shape, split, dsrc, src_tile_offset)
    }
    fn area_pool_fwd(&self, src: &Buf, src_shape: GridShape, window: TileGrid, dst: &mut Buf) {
        self.roles("area_pool_fwd", &[src, &*dst], &[]);
        s2::area_pool_fwd(self, src, src_shape, window, dst)
    }
    fn area_pool_bwd(&self, ddst: &Buf, src_shape: GridShape, window: TileGrid, dsrc: &mut Buf) {
        self.roles("area_pool_bwd", &[ddst, &*dsrc], &[]);
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
        self.roles("concat_cols_fwd", &[src, &*dst], &[]);
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
        self.roles("concat_cols_bwd", &[ddst, &*dsrc], &[]);
        s2::concat_cols_bwd(self, ddst, dsrc, rows, width, dst_width, col_offset)
    }
    fn downsample2x2_fwd(&self, src: &Buf, src_shape: GridShape, dst: &mut Buf) {
        self.roles("downsample2x2_fwd", &[src, &*dst], &[]);
        s2::downsample2x2_fwd(self, src, src_shape, dst)
    }
    fn downsample2x2_bwd(&self, ddst: &Buf, src_shape: GridShape, dsrc: &mut Buf) {
        self.roles("downsample2x2_bwd", &[ddst, &*dsrc], &[]);
        s2::downsample2x2_bwd(self, ddst, src_shape, dsrc)
    }

    fn adamw(&self, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf, h: AdamW) {
        self.roles("adamw", &[], &[&*param, grad, &*m, &*v]);
        optim::adamw(self, param, grad, m, v, h)
    }
}
