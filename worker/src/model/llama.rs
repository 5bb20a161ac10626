//! LLaMA decoder (Hugging Face `LlamaForCausalLM`) on input embeddings, with
//! the shifted next-token cross-entropy and its backward.
//!
//! With `recompute` set, only each layer's input is kept during forward and
//! the layer runs again just before its backward, so one layer's activations
//! are alive at a time instead of all of them.
//!
//! The LM head and the loss run over chunks of rows: each chunk's logits,
//! loss, logits gradient and head backward are done before the next chunk
//! starts, so the `[tokens, vocab]` logits are never held whole.

use super::linear::{self, Dims};
use super::memory::{ModuleValues, Values};
use super::store::{GradReady, ParamStore};
use crate::engine::{AttnShape, Backend, Gemm, RopeShape};
use tessera_job::model::LlmConfig;

/// Logits values per head chunk: 16M (64 MiB in f32), 524 rows of LLaMA's
/// 32000-token vocabulary, a GEMM still large enough to fill a GPU.
const LOGITS_CHUNK_VALUES: usize = 1 << 24;

struct LayerParams {
    ln1: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    ln2: usize,
    gate: usize,
    up: usize,
    down: usize,
}

impl LayerParams {
    fn ids(&self) -> [usize; 9] {
        [self.ln1, self.q, self.k, self.v, self.o, self.ln2, self.gate, self.up, self.down]
    }
}

/// Everything one layer's backward reads.
struct LayerActs<B: Backend> {
    rstd1: B::Buf,
    h1: B::Buf,
    /// q and k after RoPE, as attention saw them.
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// Log-sum-exp of each attention row: all backward needs of the softmax.
    lse: B::Buf,
    attn: B::Buf,
    x1: B::Buf,
    rstd2: B::Buf,
    h2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    fn new(be: &B, c: &LlmConfig, rows: usize, a: &AttnShape) -> Self {
        let (h, im) = (c.hidden_size, c.intermediate_size);
        LayerActs {
            rstd1: be.alloc_state(rows),
            h1: be.alloc(rows * h),
            q: be.alloc(rows * h),
            k: be.alloc(rows * h),
            v: be.alloc(rows * h),
            lse: be.alloc_state(a.lse_len()),
            attn: be.alloc(rows * h),
            x1: be.alloc(rows * h),
            rstd2: be.alloc_state(rows),
            h2: be.alloc(rows * h),
            gate: be.alloc(rows * im),
            up: be.alloc(rows * im),
            act: be.alloc(rows * im),
        }
    }
}

/// Backward scratch: gradients of one layer's activations. `dx` carries
/// the gradient of the residual stream from layer to layer.
struct Scratch<B: Backend> {
    dx: B::Buf,
    dx1: B::Buf,
    dh: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dattn: B::Buf,
    dact: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
}

/// The LM head's buffers for one chunk of `rows` rows.
struct HeadChunk<B: Backend> {
    rows: usize,
    h: B::Buf,
    logits: B::Buf,
    dlogits: B::Buf,
    dh: B::Buf,
}

struct Workspace<B: Backend> {
    batch: usize,
    seq: usize,
    /// Input of each layer, then the output of the last one.
    xs: Vec<B::Buf>,
    /// One per layer, or one reused by every layer with `recompute`.
    layers: Vec<LayerActs<B>>,
    final_rstd: B::Buf,
    final_h: B::Buf,
    /// Gradient of `final_h`, left by `loss` for `backward`.
    dfinal_h: B::Buf,
    head: HeadChunk<B>,
    sc: Scratch<B>,
}

/// Attention and RoPE shapes of the decoder for `batch` sequences of `seq`.
pub(crate) fn shapes(c: &LlmConfig, batch: usize, seq: usize) -> (AttnShape, RopeShape) {
    let (heads, head_dim) = (c.num_attention_heads, c.head_dim());
    let a = AttnShape { batch, seq, heads, head_dim, causal: true, scale: 1.0 / (head_dim as f32).sqrt() };
    (a, RopeShape { batch, seq, heads, head_dim, theta: c.rope_theta })
}

/// What `input` allocates for `batch` sequences of `seq`, for the memory
/// planner: what forward keeps for backward, and backward's scratch with
/// the LM head's chunk buffers.
pub fn workspace_values(c: &LlmConfig, batch: usize, seq: usize, recompute: bool) -> ModuleValues {
    let rows = batch * seq;
    let (h, im, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (a, _) = shapes(c, batch, seq);
    let kept = if recompute { 1 } else { c.num_hidden_layers };
    let layer = Values { act: rows * (7 * h + 3 * im), state: 2 * rows + a.lse_len() };
    let saved = Values { act: (c.num_hidden_layers + 1) * rows * h + rows * h, state: rows } + layer * kept;
    let chunk = head_chunk_rows(rows, v);
    let head = Values::act(2 * chunk * h + 2 * chunk * v);
    ModuleValues { saved, scratch: Values::act(rows * h + rows * (7 * h + 3 * im)) + head }
}

/// Rows per LM-head chunk for `rows` rows of a `vocab`-wide head.
pub fn head_chunk_rows(rows: usize, vocab: usize) -> usize {
    (LOGITS_CHUNK_VALUES / vocab.max(1)).clamp(1, rows.max(1))
}

pub struct Llama<B: Backend> {
    pub cfg: LlmConfig,
    pub embed: usize,
    /// Keep only layer inputs and recompute each layer before its backward.
    pub recompute: bool,
    layers: Vec<LayerParams>,
    norm: usize,
    head: usize,
    /// Rows per LM-head chunk, when a test wants other than `head_chunk_rows`.
    head_rows: Option<usize>,
    ws: Option<Workspace<B>>,
}

impl<B: Backend> Llama<B> {
    pub fn new(cfg: &LlmConfig, p: &ParamStore<B>, recompute: bool) -> Self {
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let i = |n: &str| p.idx(&format!("llm.model.layers.{l}.{n}"));
                LayerParams {
                    ln1: i("input_layernorm.weight"),
                    q: i("self_attn.q_proj.weight"),
                    k: i("self_attn.k_proj.weight"),
                    v: i("self_attn.v_proj.weight"),
                    o: i("self_attn.o_proj.weight"),
                    ln2: i("post_attention_layernorm.weight"),
                    gate: i("mlp.gate_proj.weight"),
                    up: i("mlp.up_proj.weight"),
                    down: i("mlp.down_proj.weight"),
                }
            })
            .collect();
        Llama {
            cfg: cfg.clone(),
            embed: p.idx("llm.model.embed_tokens.weight"),
            recompute,
            layers,
            norm: p.idx("llm.model.norm.weight"),
            head: p.idx("llm.lm_head.weight"),
            head_rows: None,
            ws: None,
        }
    }

    /// Runs the LM head over chunks of `rows` rows instead of the default.
    #[cfg(test)]
    pub(crate) fn set_head_chunk_rows(&mut self, rows: usize) {
        self.head_rows = Some(rows.max(1));
        self.ws = None;
    }

    /// The buffer the caller fills with input embeddings `[batch * seq, hidden]`
    /// before `forward` (allocated for this shape on first use).
    pub fn input(&mut self, be: &B, batch: usize, seq: usize) -> &mut B::Buf {
        if self.ws.as_ref().is_none_or(|w| w.batch != batch || w.seq != seq) {
            // The old workspace goes before the new one is allocated: a shape
            // change must not hold both (on a GPU, twice the activations).
            self.ws = None;
            let c = &self.cfg;
            let rows = batch * seq;
            let (h, im, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
            let (a, _) = shapes(c, batch, seq);
            let kept = if self.recompute { 1 } else { c.num_hidden_layers };
            let chunk = self.head_rows.unwrap_or_else(|| head_chunk_rows(rows, v)).min(rows.max(1));
            self.ws = Some(Workspace {
                batch,
                seq,
                xs: (0..=c.num_hidden_layers).map(|_| be.alloc(rows * h)).collect(),
                layers: (0..kept).map(|_| LayerActs::new(be, c, rows, &a)).collect(),
                final_rstd: be.alloc_state(rows),
                final_h: be.alloc(rows * h),
                dfinal_h: be.alloc(rows * h),
                head: HeadChunk {
                    rows: chunk,
                    h: be.alloc(chunk * h),
                    logits: be.alloc(chunk * v),
                    dlogits: be.alloc(chunk * v),
                    dh: be.alloc(chunk * h),
                },
                sc: Scratch {
                    dx: be.alloc(rows * h),
                    dx1: be.alloc(rows * h),
                    dh: be.alloc(rows * h),
                    dq: be.alloc(rows * h),
                    dk: be.alloc(rows * h),
                    dv: be.alloc(rows * h),
                    dattn: be.alloc(rows * h),
                    dact: be.alloc(rows * im),
                    dgate: be.alloc(rows * im),
                    dup: be.alloc(rows * im),
                },
            });
        }
        &mut self.ws.as_mut().expect("workspace exists").xs[0]
    }

    /// Runs the decoder on the embeddings placed by `input`, up to the final
    /// norm; `loss` or `logits_row` run the LM head.
    pub fn forward(&mut self, be: &B, p: &ParamStore<B>) {
        let ws = self.ws.as_mut().expect("call Llama::input before forward");
        let c = &self.cfg;
        let (a, r) = shapes(c, ws.batch, ws.seq);
        let rows = ws.batch * ws.seq;
        for (l, lp) in self.layers.iter().enumerate() {
            let slot = if self.recompute { 0 } else { l };
            let (xs_in, xs_out) = ws.xs.split_at_mut(l + 1);
            layer_forward(be, &p.values, c, lp, a, r, &xs_in[l], &mut ws.layers[slot], &mut xs_out[0]);
        }
        let last = &ws.xs[self.layers.len()];
        be.rmsnorm_fwd(
            last,
            &p.values[self.norm],
            &mut ws.final_h,
            &mut ws.final_rstd,
            rows,
            c.hidden_size,
            c.rms_norm_eps,
        );
    }

    /// The logits `[vocab]` of row `row` of the last `forward`.
    pub fn logits_row(&mut self, be: &B, p: &ParamStore<B>, row: usize) -> Vec<f32> {
        let ws = self.ws.as_mut().expect("call forward before logits_row");
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        be.copy(&ws.final_h, row * h, &mut ws.head.h, 0, h);
        linear::forward(
            be,
            &ws.head.h,
            &p.values[self.head],
            None,
            &mut ws.head.logits,
            Dims { rows: 1, din: h, dout: v },
        );
        let mut out = be.alloc(v);
        be.copy(&ws.head.logits, 0, &mut out, 0, v);
        be.download(&out)
    }

    /// Loss sum over `targets` (already shifted, one per row; negative =
    /// ignored), chunk by chunk through the LM head. With `grad_scale` it
    /// also runs the head's backward: the gradient of the final hidden
    /// state is left for `backward`, and with `param_grads` the head's
    /// weight gradient is added.
    pub fn loss(
        &mut self,
        be: &B,
        p: &mut ParamStore<B>,
        targets: &[i32],
        grad_scale: Option<f32>,
        param_grads: bool,
    ) -> f64 {
        let ws = self.ws.as_mut().expect("call forward before loss");
        let rows = ws.batch * ws.seq;
        assert_eq!(targets.len(), rows, "one target per row");
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let hc = &mut ws.head;
        let mut sum = 0.0;
        for r0 in (0..rows).step_by(hc.rows) {
            let n = hc.rows.min(rows - r0);
            let d = Dims { rows: n, din: h, dout: v };
            be.copy(&ws.final_h, r0 * h, &mut hc.h, 0, n * h);
            linear::forward(be, &hc.h, &p.values[self.head], None, &mut hc.logits, d);
            let t = be.upload_idx(&targets[r0..r0 + n]);
            let Some(scale) = grad_scale else {
                sum += be.cross_entropy(&hc.logits, &t, None, n, v, 0.0);
                continue;
            };
            sum += be.cross_entropy(&hc.logits, &t, Some(&mut hc.dlogits), n, v, scale);
            // dh = dlogits W, overwritten: each row's gradient comes from its chunk alone.
            be.matmul(&hc.dlogits, &p.values[self.head], &mut hc.dh, Gemm::new(n, h, v));
            be.copy(&hc.dh, 0, &mut ws.dfinal_h, r0 * h, n * h);
            let dw = param_grads.then_some(&mut p.grads[self.head]);
            linear::backward(be, &hc.h, &p.values[self.head], &hc.dlogits, None, dw, None, d);
        }
        sum
    }

    /// Backward from the gradient `loss` left; returns the gradient of the input
    /// embeddings. `param_grads` false (a frozen LLM) skips weight gradients.
    /// `ready` hears which parameters' gradients are final, layer by layer.
    pub fn backward(&mut self, be: &B, p: &mut ParamStore<B>, param_grads: bool, ready: GradReady<B>) -> &B::Buf {
        let ws = self.ws.as_mut().expect("call loss with a grad_scale before backward");
        let c = &self.cfg;
        let (a, r) = shapes(c, ws.batch, ws.seq);
        let rows = ws.batch * ws.seq;
        let h = c.hidden_size;
        be.fill(&mut ws.sc.dx, 0.0);
        let last = &ws.xs[self.layers.len()];
        let (w, g) = (&p.values, &mut p.grads);
        be.rmsnorm_bwd(last, &w[self.norm], &ws.final_rstd, &ws.dfinal_h, &mut ws.sc.dx, &mut g[self.norm], rows, h);
        ready(&g[..], &[self.head, self.norm]);
        for (l, lp) in self.layers.iter().enumerate().rev() {
            let slot = if self.recompute {
                // This layer's activations again from its saved input; the
                // output goes to the next input slot, which backward no longer
                // needs (same ops, same bits as the first forward).
                let (xs_in, xs_out) = ws.xs.split_at_mut(l + 1);
                layer_forward(be, &p.values, c, lp, a, r, &xs_in[l], &mut ws.layers[0], &mut xs_out[0]);
                0
            } else {
                l
            };
            let (w, g) = (&p.values, &mut p.grads);
            layer_backward(be, w, g, param_grads, c, lp, a, r, &ws.xs[l], &ws.layers[slot], &mut ws.sc);
            ready(&p.grads[..], &lp.ids());
        }
        &ws.sc.dx
    }

    /// Adds the input embeddings' gradient into the token embedding table.
    pub fn embed_backward(&self, be: &B, p: &mut ParamStore<B>, dembeds: &B::Buf, ids: &B::Idx, rows: usize) {
        be.embedding_bwd(dembeds, ids, &mut p.grads[self.embed], rows, self.cfg.hidden_size);
    }
}

/// One decoder layer: `x1 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1)))`
/// with `h1 = norm1(x)`, then `out = x1 + down(silu(gate(h2)) * up(h2))`
/// with `h2 = norm2(x1)`; what backward reads goes to `s`.
#[allow(clippy::too_many_arguments)]
fn layer_forward<B: Backend>(
    be: &B,
    w: &[B::Buf],
    c: &LlmConfig,
    lp: &LayerParams,
    a: AttnShape,
    r: RopeShape,
    x: &B::Buf,
    s: &mut LayerActs<B>,
    out: &mut B::Buf,
) {
    let rows = a.batch * a.seq;
    let (h, im) = (c.hidden_size, c.intermediate_size);
    be.rmsnorm_fwd(x, &w[lp.ln1], &mut s.h1, &mut s.rstd1, rows, h, c.rms_norm_eps);
    let dd = Dims { rows, din: h, dout: h };
    linear::forward(be, &s.h1, &w[lp.q], None, &mut s.q, dd);
    linear::forward(be, &s.h1, &w[lp.k], None, &mut s.k, dd);
    linear::forward(be, &s.h1, &w[lp.v], None, &mut s.v, dd);
    be.rope_fwd(&mut s.q, r);
    be.rope_fwd(&mut s.k, r);
    be.attention_fwd(&s.q, &s.k, &s.v, &mut s.attn, &mut s.lse, a);
    linear::forward(be, &s.attn, &w[lp.o], None, &mut s.x1, dd);
    be.axpy(1.0, x, &mut s.x1);
    be.rmsnorm_fwd(&s.x1, &w[lp.ln2], &mut s.h2, &mut s.rstd2, rows, h, c.rms_norm_eps);
    let up = Dims { rows, din: h, dout: im };
    linear::forward(be, &s.h2, &w[lp.gate], None, &mut s.gate, up);
    linear::forward(be, &s.h2, &w[lp.up], None, &mut s.up, up);
    be.swiglu_fwd(&s.gate, &s.up, &mut s.act);
    linear::forward(be, &s.act, &w[lp.down], None, out, Dims { rows, din: im, dout: h });
    be.axpy(1.0, &s.x1, out);
}

/// Backward of `layer_forward`: `sc.dx` holds the gradient of the layer's
/// output on entry and that of its input `x` on return. Weight gradients
/// are added into `g` with `param_grads` (false: a frozen LLM); the norms'
/// always are, as they always were (the optimizer skips frozen modules).
#[allow(clippy::too_many_arguments)]
fn layer_backward<B: Backend>(
    be: &B,
    w: &[B::Buf],
    g: &mut [B::Buf],
    param_grads: bool,
    c: &LlmConfig,
    lp: &LayerParams,
    a: AttnShape,
    r: RopeShape,
    x: &B::Buf,
    s: &LayerActs<B>,
    sc: &mut Scratch<B>,
) {
    let rows = a.batch * a.seq;
    let (h, im) = (c.hidden_size, c.intermediate_size);
    // MLP: out = x1 + down(silu(gate(h2)) * up(h2))
    be.fill(&mut sc.dact, 0.0);
    let down = Dims { rows, din: im, dout: h };
    let dw = param_grads.then_some(&mut g[lp.down]);
    linear::backward(be, &s.act, &w[lp.down], &sc.dx, Some(&mut sc.dact), dw, None, down);
    be.fill(&mut sc.dgate, 0.0);
    be.fill(&mut sc.dup, 0.0);
    be.swiglu_bwd(&s.gate, &s.up, &sc.dact, &mut sc.dgate, &mut sc.dup);
    be.fill(&mut sc.dh, 0.0);
    let up = Dims { rows, din: h, dout: im };
    for (dy, wi) in [(&sc.dgate, lp.gate), (&sc.dup, lp.up)] {
        let dw = param_grads.then_some(&mut g[wi]);
        linear::backward(be, &s.h2, &w[wi], dy, Some(&mut sc.dh), dw, None, up);
    }
    be.copy(&sc.dx, 0, &mut sc.dx1, 0, rows * h);
    be.rmsnorm_bwd(&s.x1, &w[lp.ln2], &s.rstd2, &sc.dh, &mut sc.dx1, &mut g[lp.ln2], rows, h);
    // Attention: x1 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1)))
    let dd = Dims { rows, din: h, dout: h };
    be.fill(&mut sc.dattn, 0.0);
    let dw = param_grads.then_some(&mut g[lp.o]);
    linear::backward(be, &s.attn, &w[lp.o], &sc.dx1, Some(&mut sc.dattn), dw, None, dd);
    be.fill(&mut sc.dq, 0.0);
    be.fill(&mut sc.dk, 0.0);
    be.fill(&mut sc.dv, 0.0);
    be.attention_bwd(&s.q, &s.k, &s.v, &s.attn, &s.lse, &sc.dattn, &mut sc.dq, &mut sc.dk, &mut sc.dv, a);
    be.rope_bwd(&mut sc.dq, r);
    be.rope_bwd(&mut sc.dk, r);
    be.fill(&mut sc.dh, 0.0);
    for (dproj, wi) in [(&sc.dq, lp.q), (&sc.dk, lp.k), (&sc.dv, lp.v)] {
        let dw = param_grads.then_some(&mut g[wi]);
        linear::backward(be, &s.h1, &w[wi], dproj, Some(&mut sc.dh), dw, None, dd);
    }
    be.copy(&sc.dx1, 0, &mut sc.dx, 0, rows * h);
    be.rmsnorm_bwd(x, &w[lp.ln1], &s.rstd1, &sc.dh, &mut sc.dx, &mut g[lp.ln1], rows, h);
}
