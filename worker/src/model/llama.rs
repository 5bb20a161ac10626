//! LLaMA decoder (Hugging Face `LlamaForCausalLM`) on input embeddings, with
//! the shifted next-token cross-entropy and its backward.

use super::linear::{self, Dims};
use super::store::{GradReady, ParamStore};
use crate::engine::{AttnShape, Backend, RopeShape};
use tessera_job::model::LlmConfig;

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

struct Workspace<B: Backend> {
    batch: usize,
    seq: usize,
    xs: Vec<B::Buf>,
    layers: Vec<LayerActs<B>>,
    final_rstd: B::Buf,
    final_h: B::Buf,
    logits: B::Buf,
    dlogits: B::Buf,
    // backward scratch
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

/// Attention and RoPE shapes of the decoder for `batch` sequences of `seq`.
fn shapes(c: &LlmConfig, batch: usize, seq: usize) -> (AttnShape, RopeShape) {
    let (heads, head_dim) = (c.num_attention_heads, c.head_dim());
    let a = AttnShape { batch, seq, heads, head_dim, causal: true, scale: 1.0 / (head_dim as f32).sqrt() };
    (a, RopeShape { batch, seq, heads, head_dim, theta: c.rope_theta })
}

pub struct Llama<B: Backend> {
    pub cfg: LlmConfig,
    pub embed: usize,
    layers: Vec<LayerParams>,
    norm: usize,
    head: usize,
    ws: Option<Workspace<B>>,
}

impl<B: Backend> Llama<B> {
    pub fn new(cfg: &LlmConfig, p: &ParamStore<B>) -> Self {
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
            layers,
            norm: p.idx("llm.model.norm.weight"),
            head: p.idx("llm.lm_head.weight"),
            ws: None,
        }
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
            let acts = |be: &B| LayerActs {
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
            };
            self.ws = Some(Workspace {
                batch,
                seq,
                xs: (0..=c.num_hidden_layers).map(|_| be.alloc(rows * h)).collect(),
                layers: (0..c.num_hidden_layers).map(|_| acts(be)).collect(),
                final_rstd: be.alloc_state(rows),
                final_h: be.alloc(rows * h),
                logits: be.alloc(rows * v),
                dlogits: be.alloc(0),
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
            });
        }
        &mut self.ws.as_mut().expect("workspace exists").xs[0]
    }

    /// Runs the decoder on the embeddings placed by `input` and returns the
    /// logits `[batch * seq, vocab]`.
    pub fn forward(&mut self, be: &B, p: &ParamStore<B>) -> &B::Buf {
        let ws = self.ws.as_mut().expect("call Llama::input before forward");
        let (batch, seq) = (ws.batch, ws.seq);
        let c = &self.cfg;
        let (a, r) = shapes(c, batch, seq);
        let rows = batch * seq;
        let (h, im) = (c.hidden_size, c.intermediate_size);
        let w = &p.values;
        for (l, lp) in self.layers.iter().enumerate() {
            let (xs_in, xs_out) = ws.xs.split_at_mut(l + 1);
            let (x, out, s) = (&xs_in[l], &mut xs_out[0], &mut ws.layers[l]);
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
        let last = &ws.xs[self.layers.len()];
        be.rmsnorm_fwd(last, &w[self.norm], &mut ws.final_h, &mut ws.final_rstd, rows, h, c.rms_norm_eps);
        linear::forward(
            be,
            &ws.final_h,
            &w[self.head],
            None,
            &mut ws.logits,
            Dims { rows, din: h, dout: c.vocab_size },
        );
        &ws.logits
    }

    /// The logits of the last `forward`.
    pub fn logits(&self) -> &B::Buf {
        &self.ws.as_ref().expect("call forward before logits").logits
    }

    /// Loss sum over `targets` (already shifted; negative = ignored). With
    /// `grad_scale` it also leaves the logits' gradient for `backward`.
    pub fn loss(&mut self, be: &B, targets: &B::Idx, grad_scale: Option<f32>) -> f64 {
        let ws = self.ws.as_mut().expect("call forward before loss");
        let rows = ws.batch * ws.seq;
        let v = self.cfg.vocab_size;
        match grad_scale {
            Some(s) => {
                if be.buf_len(&ws.dlogits) != rows * v {
                    ws.dlogits = be.alloc(rows * v);
                }
                be.cross_entropy(&ws.logits, targets, Some(&mut ws.dlogits), rows, v, s)
            }
            None => be.cross_entropy(&ws.logits, targets, None, rows, v, 0.0),
        }
    }

    /// Backward from the gradient `loss` left; returns the gradient of the input
    /// embeddings. `param_grads` false (a frozen LLM) skips weight gradients.
    /// `ready` hears which parameters' gradients are final, layer by layer.
    pub fn backward(&mut self, be: &B, p: &mut ParamStore<B>, param_grads: bool, ready: GradReady<B>) -> &B::Buf {
        let ws = self.ws.as_mut().expect("call loss with a grad_scale before backward");
        let (batch, seq) = (ws.batch, ws.seq);
        let c = &self.cfg;
        let (a, r) = shapes(c, batch, seq);
        let rows = batch * seq;
        let (h, im) = (c.hidden_size, c.intermediate_size);
        let (w, g) = (&p.values, &mut p.grads);
        // lm_head and final norm
        be.fill(&mut ws.dh, 0.0);
        linear::backward(
            be,
            &ws.final_h,
            &w[self.head],
            &ws.dlogits,
            Some(&mut ws.dh),
            param_grads.then_some(&mut g[self.head]),
            None,
            Dims { rows, din: h, dout: c.vocab_size },
        );
        be.fill(&mut ws.dx, 0.0);
        let last = &ws.xs[self.layers.len()];
        be.rmsnorm_bwd(last, &w[self.norm], &ws.final_rstd, &ws.dh, &mut ws.dx, &mut g[self.norm], rows, h);
        ready(&g[..], &[self.head, self.norm]);
        for (l, lp) in self.layers.iter().enumerate().rev() {
            let (x, s) = (&ws.xs[l], &ws.layers[l]);
            // MLP: out = x1 + down(silu(gate(h2)) * up(h2))
            be.fill(&mut ws.dact, 0.0);
            linear::backward(
                be,
                &s.act,
                &w[lp.down],
                &ws.dx,
                Some(&mut ws.dact),
                param_grads.then_some(&mut g[lp.down]),
                None,
                Dims { rows, din: im, dout: h },
            );
            be.fill(&mut ws.dgate, 0.0);
            be.fill(&mut ws.dup, 0.0);
            be.swiglu_bwd(&s.gate, &s.up, &ws.dact, &mut ws.dgate, &mut ws.dup);
            be.fill(&mut ws.dh, 0.0);
            let up = Dims { rows, din: h, dout: im };
            linear::backward(
                be,
                &s.h2,
                &w[lp.gate],
                &ws.dgate,
                Some(&mut ws.dh),
                param_grads.then_some(&mut g[lp.gate]),
                None,
                up,
            );
            linear::backward(
                be,
                &s.h2,
                &w[lp.up],
                &ws.dup,
                Some(&mut ws.dh),
                param_grads.then_some(&mut g[lp.up]),
                None,
                up,
            );
            be.copy(&ws.dx, 0, &mut ws.dx1, 0, rows * h);
            be.rmsnorm_bwd(&s.x1, &w[lp.ln2], &s.rstd2, &ws.dh, &mut ws.dx1, &mut g[lp.ln2], rows, h);
            // Attention: x1 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1)))
            let dd = Dims { rows, din: h, dout: h };
            be.fill(&mut ws.dattn, 0.0);
            linear::backward(
                be,
                &s.attn,
                &w[lp.o],
                &ws.dx1,
                Some(&mut ws.dattn),
                param_grads.then_some(&mut g[lp.o]),
                None,
                dd,
            );
            be.fill(&mut ws.dq, 0.0);
            be.fill(&mut ws.dk, 0.0);
            be.fill(&mut ws.dv, 0.0);
            be.attention_bwd(&s.q, &s.k, &s.v, &s.attn, &s.lse, &ws.dattn, &mut ws.dq, &mut ws.dk, &mut ws.dv, a);
            be.rope_bwd(&mut ws.dq, r);
            be.rope_bwd(&mut ws.dk, r);
            be.fill(&mut ws.dh, 0.0);
            for (dproj, wi) in [(&ws.dq, lp.q), (&ws.dk, lp.k), (&ws.dv, lp.v)] {
                linear::backward(
                    be,
                    &s.h1,
                    &w[wi],
                    dproj,
                    Some(&mut ws.dh),
                    param_grads.then_some(&mut g[wi]),
                    None,
                    dd,
                );
            }
            be.copy(&ws.dx1, 0, &mut ws.dx, 0, rows * h);
            be.rmsnorm_bwd(x, &w[lp.ln1], &s.rstd1, &ws.dh, &mut ws.dx, &mut g[lp.ln1], rows, h);
            ready(&g[..], &[lp.ln1, lp.q, lp.k, lp.v, lp.o, lp.ln2, lp.gate, lp.up, lp.down]);
        }
        &ws.dx
    }

    /// Adds the input embeddings' gradient into the token embedding table.
    pub fn embed_backward(&self, be: &B, p: &mut ParamStore<B>, dembeds: &B::Buf, ids: &B::Idx, rows: usize) {
        be.embedding_bwd(dembeds, ids, &mut p.grads[self.embed], rows, self.cfg.hidden_size);
    }
}
