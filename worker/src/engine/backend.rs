//! The op list every compute backend implements. Model code is written against
//! this trait alone, so it never knows whether the CPU or a GPU runs it.
//!
//! Conventions, shared by every op:
//! - Buffers are flat and row-major; each op takes its dimensions explicitly.
//! - Forward ops overwrite their outputs.
//! - Backward ops *add* into every gradient buffer they are given, so callers
//!   can sum contributions (residual branches, shared weights) without copies.
//!   Zero a gradient buffer before its first contribution.
//! - Index buffers hold i32; a negative index means "no row" (skipped).
//! - Scalars cross the trait as f32 (hyper-parameters) or f64 (reductions), so
//!   a backend may compute in any precision (the CPU backend also runs in f64
//!   for finite-difference checks).

/// `C[b] = alpha * op(A[b]) @ op(B[b]) (+ C[b] if accumulate)` for `b` in `0..batch`.
/// `A[b]` is `[m, k]` (`[k, m]` when `trans_a`), `B[b]` is `[k, n]` (`[n, k]` when
/// `trans_b`), `C[b]` is `[m, n]`. A batch stride of 0 broadcasts one matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub accumulate: bool,
}

impl Gemm {
    /// A single `[m, k] @ [k, n]` product that overwrites C.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm { batch: 1, m, n, k, trans_a: false, trans_b: false, alpha: 1.0, accumulate: false }
    }
    pub fn trans_a(mut self) -> Self {
        self.trans_a = true;
        self
    }
    pub fn trans_b(mut self) -> Self {
        self.trans_b = true;
        self
    }
    pub fn accumulate(mut self) -> Self {
        self.accumulate = true;
        self
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Multi-head attention over `[batch, seq, heads, head_dim]` tensors (the
/// layout a `[tokens, heads * head_dim]` projection produces).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

impl AttnShape {
    pub fn numel(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }
    /// Size of the saved log-sum-exp `[batch, heads, seq]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }
}

/// Rotary position embedding as Hugging Face LLaMA applies it: rotate_half over
/// the two halves of each head, positions `0..seq` in every sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub theta: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    /// `gelu_pytorch_tanh`, the SigLIP MLP activation.
    Tanh,
    /// Exact GELU with erf, the projector activation.
    Erf,
}

/// A stack of square images `[batch, channels, size, size]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    pub batch: usize,
    pub channels: usize,
    pub size: usize,
}

impl ImageShape {
    pub fn numel(&self) -> usize {
        self.batch * self.channels * self.size * self.size
    }
}

/// A stack of token grids `[batch, rows * cols, channels]`, row-major over
/// the grid, as a ViT emits them (square, `rows == cols`, except where
/// dynamic S2 stitches a non-square tile grid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridShape {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub channels: usize,
}

impl GridShape {
    pub fn square(batch: usize, side: usize, channels: usize) -> Self {
        GridShape { batch, rows: side, cols: side, channels }
    }

    pub fn numel(&self) -> usize {
        self.batch * self.rows * self.cols * self.channels
    }
}

pub use tessera_job::model::TileGrid;

/// One AdamW step's hyper-parameters (decoupled weight decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count used for bias correction.
    pub step: u64,
    /// Multiplies the gradient before use (gradient clipping folds in here).
    pub grad_scale: f32,
}

pub trait Backend: Send + Sync + 'static {
    /// A buffer of floating-point values on the device.
    type Buf: Send + Sync;
    /// A buffer of i32 indices on the device.
    type Idx: Send + Sync;

    fn name(&self) -> String;

    // ---- memory ----
    /// A zero-filled buffer of `len` values, for activations: stored in
    /// the backend's storage type (bf16 on a GPU with `precision = "bf16"`).
    fn alloc(&self, len: usize) -> Self::Buf;
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// A zero-filled buffer that stays f32 whatever the storage type:
    /// master weights, gradients of parameters, optimizer state and
    /// normalization statistics ("state").
    fn alloc_state(&self, len: usize) -> Self::Buf {
        self.alloc(len)
    }
    fn upload_state(&self, data: &[f32]) -> Self::Buf {
        self.upload(data)
    }
    /// The copy of a master weight (a state buffer) that ops read, when
    /// the backend computes in a storage type of its own; None where ops
    /// read the master itself. `copy` from the master refreshes it.
    fn compute_copy(&self, _master: &Self::Buf) -> Option<Self::Buf> {
        None
    }
    fn upload_f64(&self, data: &[f64]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn download_f64(&self, buf: &Self::Buf) -> Vec<f64>;
    fn upload_idx(&self, data: &[i32]) -> Self::Idx;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// Waits for queued work and returns the first device error since the
    /// last check (a GPU backend queues ops and reports faults late; the
    /// training loop checks at every step boundary). The CPU has none.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Marks the point where every op writing `buf` so far has been queued,
    /// so that work on another stream (the gradient all-reduce) waits for
    /// exactly that and not for whatever is queued after it. Ops on the CPU
    /// are done when they return: nothing to mark.
    fn mark_ready(&self, _buf: &mut Self::Buf) {}
    /// The most memory this backend's buffers held at once, where the
    /// device keeps count (a GPU's memory pool); the CPU does not.
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// Memory the backend's buffers may use, where a job's plan must fit
    /// it before it starts: a GPU's total less what the device needs for
    /// itself (`GPU_RESERVE_BYTES`: context, cuBLAS, NCCL, pool slack), or
    /// the emulated device's size when it is given one. None where the
    /// backend does not plan (the CPU).
    fn memory_capacity_bytes(&self) -> Option<u64> {
        None
    }

    // ---- elementwise ----
    fn fill(&self, buf: &mut Self::Buf, value: f32);
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize);
    /// `y += alpha * x`
    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf);
    /// `x *= s`
    fn scale(&self, x: &mut Self::Buf, s: f32);
    /// `sum(x^2)` over every buffer of `xs`, for the gradient norm: one
    /// reduction and one device-to-host wait for all of them, not one per
    /// tensor (a LLaMA-3B has hundreds).
    fn sum_squares(&self, xs: &[&Self::Buf]) -> f64;

    // ---- linear algebra ----
    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: Gemm);
    /// `y[r, :] += bias` for each of `rows` rows of width `cols`.
    fn bias_add(&self, y: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize);
    /// `dbias += sum over rows of dy`.
    fn bias_bwd(&self, dy: &Self::Buf, dbias: &mut Self::Buf, rows: usize, cols: usize);
    /// `x[b, r, :] += table[r, :]` for `b` in `0..batch` (learned position embedding).
    fn add_broadcast(&self, x: &mut Self::Buf, table: &Self::Buf, batch: usize, rows: usize, cols: usize);
    /// `dtable += sum over b of dx[b]`.
    fn add_broadcast_bwd(&self, dx: &Self::Buf, dtable: &mut Self::Buf, batch: usize, rows: usize, cols: usize);

    // ---- normalization ----
    /// LayerNorm over the last axis; saves `mean` and `rstd` per row for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    );
    /// Residual add fused with the LayerNorm after it: `x1 += residual`,
    /// then `layernorm_fwd` of the new `x1` into `y`, `mean`, `rstd`, one
    /// pass per row. `x1` keeps the sum (backward and the next residual read
    /// it). Same arithmetic as `axpy(1.0, residual, x1)` then `layernorm_fwd`.
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_fwd(
        &self,
        x1: &mut Self::Buf,
        residual: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        rows: usize,
        cols: usize,
    );
    /// RMSNorm over the last axis; saves `rstd` per row.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    );
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        rows: usize,
        cols: usize,
    );

    // ---- activations ----
    fn gelu_fwd(&self, x: &Self::Buf, y: &mut Self::Buf, kind: GeluKind);
    /// A linear layer's bias fused with the GELU after it: `y[r, :] += bias`
    /// for each of `rows` rows of width `cols`, then `g = gelu(y)`, in one
    /// pass. `y` keeps the pre-activation (`gelu_bwd` reads it). Same
    /// arithmetic as `bias_add` then `gelu_fwd`.
    fn bias_gelu_fwd(
        &self,
        y: &mut Self::Buf,
        bias: &Self::Buf,
        g: &mut Self::Buf,
        rows: usize,
        cols: usize,
        kind: GeluKind,
    );
    fn gelu_bwd(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf, kind: GeluKind);
    /// SiLU-gated MLP core: `out = silu(gate) * up`.
    fn swiglu_fwd(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    fn swiglu_bwd(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    );

    // ---- attention ----
    /// Fused softmax attention, flash-attention style: keys are visited in
    /// blocks with an online softmax (a running max and sum per query row,
    /// in f32 whatever the activations' storage), so no `[seq, seq]` matrix
    /// is ever held; with `causal`, key blocks wholly above the diagonal are
    /// skipped. Saves only the log-sum-exp of each query row's scaled scores
    /// in `lse` (`[batch, heads, seq]`, a state buffer: `alloc_state`).
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        s: AttnShape,
    );
    /// Backward of `attention_fwd`: the probabilities are recomputed block
    /// by block from `lse`; `out` is the forward's output (each row's dot
    /// with `dout` is the softmax backward's correction term).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        s: AttnShape,
    );
    /// Rotates `x` in place.
    fn rope_fwd(&self, x: &mut Self::Buf, s: RopeShape);
    /// Applies the inverse rotation to the gradient in place (the rotation is
    /// orthogonal, so its transpose is its inverse).
    fn rope_bwd(&self, dx: &mut Self::Buf, s: RopeShape);

    // ---- embeddings and token routing ----
    /// `out[i, :] = table[ids[i], :]`; rows with a negative id are left as they are.
    fn embedding_fwd(&self, table: &Self::Buf, ids: &Self::Idx, out: &mut Self::Buf, n: usize, dim: usize);
    /// `dtable[ids[i], :] += dout[i, :]` (scatter-add), skipping negative ids.
    fn embedding_bwd(&self, dout: &Self::Buf, ids: &Self::Idx, dtable: &mut Self::Buf, n: usize, dim: usize);
    /// `dst[rows[i], :] = src[i, :]` for `i` in `0..n`: splices image tokens into a sequence.
    fn scatter_rows(&self, src: &Self::Buf, rows: &Self::Idx, dst: &mut Self::Buf, n: usize, dim: usize);
    /// `dsrc[i, :] += ddst[rows[i], :]`, the backward of `scatter_rows`.
    fn scatter_rows_bwd(&self, ddst: &Self::Buf, rows: &Self::Idx, dsrc: &mut Self::Buf, n: usize, dim: usize);

    // ---- loss ----
    /// Cross-entropy over `[n, vocab]` logits with targets (negative = ignore);
    /// the buffers may be longer (a chunk buffer reused for a shorter last chunk).
    /// Returns the loss *sum* over non-ignored rows. When `dlogits` is given it
    /// receives `grad_scale * (softmax - onehot)` for non-ignored rows and zero
    /// for ignored rows (overwritten, not accumulated: the loss is the start of
    /// backward).
    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &Self::Idx,
        dlogits: Option<&mut Self::Buf>,
        n: usize,
        vocab: usize,
        grad_scale: f32,
    ) -> f64;

    // ---- images and S2 (pixels need no gradient) ----
    /// Bicubic resize as PyTorch `F.interpolate(mode='bicubic', align_corners=False)`
    /// without antialias: A = -0.75, taps clamped to the border.
    fn resize_bicubic(&self, src: &Self::Buf, src_shape: ImageShape, dst: &mut Self::Buf, dst_size: usize);
    /// Cuts each image into `n x n` tiles of `size / n`, chessboard order: tile
    /// `(i, j)` of image `b` goes to batch index `dst_tile_offset + (i * n + j) * batch + b`.
    fn tile_split(&self, src: &Self::Buf, src_shape: ImageShape, n: usize, dst: &mut Self::Buf, dst_tile_offset: usize);
    /// Patch embedding input: `[batch, C, S, S]` -> `[batch, (S/p)^2, C*p*p]`, each
    /// row laid out as a Conv2d weight `[C, p, p]` is, so the conv becomes a GEMM.
    fn patchify(&self, src: &Self::Buf, shape: ImageShape, patch: usize, dst: &mut Self::Buf);

    // ---- S2 merge on token grids (with gradients) ----
    /// Inverse of `tile_split` on ViT outputs: the `split.rows x split.cols`
    /// tiles of every image, starting at tile index `src_tile_offset` (tile
    /// `(i, j)` of image `b` is `src_tile_offset + (i * split.cols + j) *
    /// out.batch + b`, each a `[rows / split.rows, cols / split.cols]` grid),
    /// are stitched into `out`, one `[rows, cols]` grid per image.
    fn tile_merge_fwd(
        &self,
        src: &Self::Buf,
        src_tile_offset: usize,
        split: TileGrid,
        out: &mut Self::Buf,
        out_shape: GridShape,
    );
    fn tile_merge_bwd(
        &self,
        dout: &Self::Buf,
        out_shape: GridShape,
        split: TileGrid,
        dsrc: &mut Self::Buf,
        src_tile_offset: usize,
    );
    /// Area interpolation by integer factors: the mean over each
    /// `window.rows x window.cols` window, `[B, rows, cols, C]` to `[B, rows /
    /// window.rows, cols / window.cols, C]`.
    fn area_pool_fwd(&self, src: &Self::Buf, src_shape: GridShape, window: TileGrid, dst: &mut Self::Buf);
    fn area_pool_bwd(&self, ddst: &Self::Buf, src_shape: GridShape, window: TileGrid, dsrc: &mut Self::Buf);
    /// Writes `src` (`[rows, width]`) into columns `col_offset..col_offset+width`
    /// of `dst` (`[rows, dst_width]`): channel concatenation.
    #[allow(clippy::too_many_arguments)]
    fn concat_cols_fwd(
        &self,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        rows: usize,
        width: usize,
        dst_width: usize,
        col_offset: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn concat_cols_bwd(
        &self,
        ddst: &Self::Buf,
        dsrc: &mut Self::Buf,
        rows: usize,
        width: usize,
        dst_width: usize,
        col_offset: usize,
    );
    /// VILA 1.5 DownSampleBlock: zero-pad an odd side, then merge each 2x2 block
    /// into one token of 4x the channels, column pairs outer (see docs/DESIGN.md 1).
    /// `src` is a square `[batch, side*side, C]`, `dst` is `[batch, (ceil(side/2))^2, 4C]`.
    fn downsample2x2_fwd(&self, src: &Self::Buf, src_shape: GridShape, dst: &mut Self::Buf);
    fn downsample2x2_bwd(&self, ddst: &Self::Buf, src_shape: GridShape, dsrc: &mut Self::Buf);

    // ---- optimizer ----
    fn adamw(&self, param: &mut Self::Buf, grad: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, h: AdamW);
}
