//! SigLIP vision encoder (Hugging Face `SiglipVisionModel`), run up to the
//! selected hidden state, with backward into every parameter it uses.
//!
//! With `recompute` set, only each layer's input is kept during forward and
//! the layer is run again just before its backward: S2 multiplies ViT
//! activations by the tile count, and this trades one extra forward for them.

use super::linear::{self, Dims};
use super::memory::{ModuleValues, Values};
use super::store::{GradReady, ParamStore};
use crate::engine::{AttnShape, Backend, GeluKind, ImageShape};
use tessera_job::model::VisionConfig;

struct LayerParams {
    ln1_w: usize,
    ln1_b: usize,
    q_w: usize,
    q_b: usize,
    k_w: usize,
    k_b: usize,
    v_w: usize,
    v_b: usize,
    o_w: usize,
    o_b: usize,
    ln2_w: usize,
    ln2_b: usize,
    fc1_w: usize,
    fc1_b: usize,
    fc2_w: usize,
    fc2_b: usize,
}

impl LayerParams {
    fn ids(&self) -> [usize; 16] {
        [
            self.ln1_w, self.ln1_b, self.q_w, self.q_b, self.k_w, self.k_b, self.v_w, self.v_b, self.o_w, self.o_b,
            self.ln2_w, self.ln2_b, self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b,
        ]
    }
}

/// Everything one layer's backward reads, for a fixed number of tokens.
struct LayerActs<B: Backend> {
    mean1: B::Buf,
    rstd1: B::Buf,
    h1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// Log-sum-exp of each attention row: all backward needs of the softmax.
    lse: B::Buf,
    attn: B::Buf,
    x1: B::Buf,
    mean2: B::Buf,
    rstd2: B::Buf,
    h2: B::Buf,
    f: B::Buf,
    g: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    fn new(be: &B, rows: usize, c: &VisionConfig, attn: &AttnShape) -> Self {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        LayerActs {
            mean1: be.alloc_state(rows),
            rstd1: be.alloc_state(rows),
            h1: be.alloc(rows * d),
            q: be.alloc(rows * d),
            k: be.alloc(rows * d),
            v: be.alloc(rows * d),
            lse: be.alloc_state(attn.lse_len()),
            attn: be.alloc(rows * d),
            x1: be.alloc(rows * d),
            mean2: be.alloc_state(rows),
            rstd2: be.alloc_state(rows),
            h2: be.alloc(rows * d),
            f: be.alloc(rows * i),
            g: be.alloc(rows * i),
        }
    }
}

/// What `LayerActs::new` and the workspace allocate, for the memory planner.
pub fn workspace_values(c: &VisionConfig, tiles: usize, recompute: bool) -> ModuleValues {
    let rows = tiles * c.num_patches();
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let layers = c.layers_used();
    let kept = if recompute { 1 } else { layers };
    let a = attn_shape(c, tiles);
    let layer = Values { act: rows * (7 * d + 2 * i), state: 4 * rows + a.lse_len() };
    let inputs = Values::act(rows * c.num_channels * c.patch_size * c.patch_size + (layers + 1) * rows * d);
    ModuleValues { saved: inputs + layer * kept, scratch: Values::act(rows * (7 * d + 2 * i)) }
}

/// Activations for one tile count; reused while the tile count stays the same.
struct Workspace<B: Backend> {
    tiles: usize,
    patches: B::Buf,
    /// Input of each layer, then the output of the last one.
    xs: Vec<B::Buf>,
    layers: Vec<LayerActs<B>>,
    sc: Scratch<B>,
}

/// Bidirectional attention over each tile's patches.
pub(crate) fn attn_shape(c: &VisionConfig, tiles: usize) -> AttnShape {
    let head_dim = c.head_dim();
    let scale = 1.0 / (head_dim as f32).sqrt();
    AttnShape { batch: tiles, seq: c.num_patches(), heads: c.num_attention_heads, head_dim, causal: false, scale }
}

pub struct Vit<B: Backend> {
    pub cfg: VisionConfig,
    pub recompute: bool,
    patch_w: usize,
    patch_b: usize,
    pos: usize,
    layers: Vec<LayerParams>,
    ws: Option<Workspace<B>>,
}

impl<B: Backend> Vit<B> {
    pub fn new(cfg: &VisionConfig, params: &ParamStore<B>, recompute: bool) -> Self {
        let p = |n: &str| params.idx(&format!("vision_tower.vision_model.{n}"));
        let layers = (0..cfg.layers_used())
            .map(|l| {
                let q = |n: &str| p(&format!("encoder.layers.{l}.{n}"));
                LayerParams {
                    ln1_w: q("layer_norm1.weight"),
                    ln1_b: q("layer_norm1.bias"),
                    q_w: q("self_attn.q_proj.weight"),
                    q_b: q("self_attn.q_proj.bias"),
                    k_w: q("self_attn.k_proj.weight"),
                    k_b: q("self_attn.k_proj.bias"),
                    v_w: q("self_attn.v_proj.weight"),
                    v_b: q("self_attn.v_proj.bias"),
                    o_w: q("self_attn.out_proj.weight"),
                    o_b: q("self_attn.out_proj.bias"),
                    ln2_w: q("layer_norm2.weight"),
                    ln2_b: q("layer_norm2.bias"),
                    fc1_w: q("mlp.fc1.weight"),
                    fc1_b: q("mlp.fc1.bias"),
                    fc2_w: q("mlp.fc2.weight"),
                    fc2_b: q("mlp.fc2.bias"),
                }
            })
            .collect();
        Vit {
            cfg: cfg.clone(),
            recompute,
            patch_w: p("embeddings.patch_embedding.weight"),
            patch_b: p("embeddings.patch_embedding.bias"),
            pos: p("embeddings.position_embedding.weight"),
            layers,
            ws: None,
        }
    }

    fn workspace(&mut self, be: &B, tiles: usize) -> &mut Workspace<B> {
        if self.ws.as_ref().is_none_or(|w| w.tiles != tiles) {
            // The old workspace goes before the new one is allocated: a shape
            // change must not hold both (on a GPU, twice the activations).
            self.ws = None;
            let c = &self.cfg;
            let rows = tiles * c.num_patches();
            let (d, i) = (c.hidden_size, c.intermediate_size);
            let a = attn_shape(&self.cfg, tiles);
            let kept = if self.recompute { 1 } else { self.layers.len() };
            self.ws = Some(Workspace {
                tiles,
                patches: be.alloc(rows * c.num_channels * c.patch_size * c.patch_size),
                xs: (0..=self.layers.len()).map(|_| be.alloc(rows * d)).collect(),
                layers: (0..kept).map(|_| LayerActs::new(be, rows, c, &a)).collect(),
                sc: Scratch {
                    dx: be.alloc(rows * d),
                    dx1: be.alloc(rows * d),
                    dh: be.alloc(rows * d),
                    dq: be.alloc(rows * d),
                    dk: be.alloc(rows * d),
                    dv: be.alloc(rows * d),
                    dattn: be.alloc(rows * d),
                    dg: be.alloc(rows * i),
                    df: be.alloc(rows * i),
                },
            });
        }
        self.ws.as_mut().expect("workspace was just created")
    }

    /// Runs the encoder on `tiles` images `[tiles, C, S, S]` and returns the
    /// selected hidden state `[tiles * patches, hidden]`.
    pub fn forward(&mut self, be: &B, p: &ParamStore<B>, pixels: &B::Buf, tiles: usize) -> &B::Buf {
        let c = self.cfg.clone();
        let a = attn_shape(&self.cfg, tiles);
        let recompute = self.recompute;
        let n_layers = self.layers.len();
        let (patch_w, patch_b, pos) = (self.patch_w, self.patch_b, self.pos);
        self.workspace(be, tiles);
        let ws = self.ws.as_mut().expect("workspace exists");
        let rows = tiles * c.num_patches();
        let shape = ImageShape { batch: tiles, channels: c.num_channels, size: c.image_size };
        be.patchify(pixels, shape, c.patch_size, &mut ws.patches);
        let kdim = c.num_channels * c.patch_size * c.patch_size;
        let d = Dims { rows, din: kdim, dout: c.hidden_size };
        linear::forward(be, &ws.patches, &p.values[patch_w], Some(&p.values[patch_b]), &mut ws.xs[0], d);
        be.add_broadcast(&mut ws.xs[0], &p.values[pos], tiles, c.num_patches(), c.hidden_size);
        for l in 0..n_layers {
            let slot = if recompute { 0 } else { l };
            let (xs_in, xs_out) = ws.xs.split_at_mut(l + 1);
            layer_forward(be, p, &c, &self.layers[l], &a, &xs_in[l], &mut ws.layers[slot], &mut xs_out[0]);
        }
        &self.ws.as_ref().expect("workspace exists").xs[n_layers]
    }

    /// Backward from `dout` (gradient of the selected hidden state). Parameter
    /// gradients are added into `p.grads`.
    /// `ready` hears which parameters' gradients are final, layer by layer.
    pub fn backward(&mut self, be: &B, p: &mut ParamStore<B>, dout: &B::Buf, ready: GradReady<B>) {
        let c = self.cfg.clone();
        let ws = self.ws.as_mut().expect("ViT backward needs a forward first");
        let tiles = ws.tiles;
        let a = attn_shape(&c, tiles);
        let rows = tiles * c.num_patches();
        be.copy(dout, 0, &mut ws.sc.dx, 0, rows * c.hidden_size);
        for l in (0..self.layers.len()).rev() {
            let lp = &self.layers[l];
            let slot = if self.recompute {
                let (xs_in, xs_out) = ws.xs.split_at_mut(l + 1);
                // Recompute this layer's activations from its saved input; the
                // output is written to the next input slot, which backward no
                // longer needs.
                layer_forward(be, p, &c, lp, &a, &xs_in[l], &mut ws.layers[0], &mut xs_out[0]);
                0
            } else {
                l
            };
            layer_backward(be, p, &c, lp, &a, &ws.xs[l], &ws.layers[slot], &mut ws.sc);
            ready(&p.grads, &lp.ids());
        }
        let kdim = c.num_channels * c.patch_size * c.patch_size;
        be.add_broadcast_bwd(&ws.sc.dx, &mut p.grads[self.pos], tiles, c.num_patches(), c.hidden_size);
        let d = Dims { rows, din: kdim, dout: c.hidden_size };
        let (gw, gb) = two_mut(&mut p.grads, self.patch_w, self.patch_b);
        linear::backward(be, &ws.patches, &p.values[self.patch_w], &ws.sc.dx, None, Some(gw), Some(gb), d);
        ready(&p.grads, &[self.pos, self.patch_w, self.patch_b]);
    }
}

/// Backward scratch: gradients of one layer's activations.
struct Scratch<B: Backend> {
    dx: B::Buf,
    dx1: B::Buf,
    dh: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dattn: B::Buf,
    dg: B::Buf,
    df: B::Buf,
}

/// Two distinct mutable elements of a slice.
pub(crate) fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "two_mut needs distinct indices");
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_forward<B: Backend>(
    be: &B,
    p: &ParamStore<B>,
    c: &VisionConfig,
    lp: &LayerParams,
    a: &AttnShape,
    x: &B::Buf,
    s: &mut LayerActs<B>,
    out: &mut B::Buf,
) {
    let rows = a.batch * a.seq;
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let w = &p.values;
    be.layernorm_fwd(x, &w[lp.ln1_w], &w[lp.ln1_b], &mut s.h1, &mut s.mean1, &mut s.rstd1, rows, d, c.layer_norm_eps);
    let dd = Dims { rows, din: d, dout: d };
    linear::forward(be, &s.h1, &w[lp.q_w], Some(&w[lp.q_b]), &mut s.q, dd);
    linear::forward(be, &s.h1, &w[lp.k_w], Some(&w[lp.k_b]), &mut s.k, dd);
    linear::forward(be, &s.h1, &w[lp.v_w], Some(&w[lp.v_b]), &mut s.v, dd);
    be.attention_fwd(&s.q, &s.k, &s.v, &mut s.attn, &mut s.lse, *a);
    linear::forward(be, &s.attn, &w[lp.o_w], Some(&w[lp.o_b]), &mut s.x1, dd);
    // x1 += x, then layer_norm2 of x1, fused.
    be.add_layernorm_fwd(
        &mut s.x1,
        x,
        &w[lp.ln2_w],
        &w[lp.ln2_b],
        &mut s.h2,
        &mut s.mean2,
        &mut s.rstd2,
        rows,
        d,
        c.layer_norm_eps,
    );
    // fc1's bias and the GELU fused: f keeps the pre-activation for gelu_bwd.
    linear::forward(be, &s.h2, &w[lp.fc1_w], None, &mut s.f, Dims { rows, din: d, dout: i });
    be.bias_gelu_fwd(&mut s.f, &w[lp.fc1_b], &mut s.g, rows, i, GeluKind::Tanh);
    linear::forward(be, &s.g, &w[lp.fc2_w], Some(&w[lp.fc2_b]), out, Dims { rows, din: i, dout: d });
    be.axpy(1.0, &s.x1, out);
}

/// On entry `sc.dx` holds the gradient of the layer output; on exit, of its input.
#[allow(clippy::too_many_arguments)]
fn layer_backward<B: Backend>(
    be: &B,
    p: &mut ParamStore<B>,
    c: &VisionConfig,
    lp: &LayerParams,
    a: &AttnShape,
    x: &B::Buf,
    s: &LayerActs<B>,
    sc: &mut Scratch<B>,
) {
    let rows = a.batch * a.seq;
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let (w, g) = (&p.values, &mut p.grads);
    // MLP: out = x1 + fc2(gelu(fc1(ln2(x1))))
    be.fill(&mut sc.dg, 0.0);
    let (gw, gb) = two_mut(g, lp.fc2_w, lp.fc2_b);
    linear::backward(
        be,
        &s.g,
        &w[lp.fc2_w],
        &sc.dx,
        Some(&mut sc.dg),
        Some(gw),
        Some(gb),
        Dims { rows, din: i, dout: d },
    );
    be.fill(&mut sc.df, 0.0);
    be.gelu_bwd(&s.f, &sc.dg, &mut sc.df, GeluKind::Tanh);
    be.fill(&mut sc.dh, 0.0);
    let (gw, gb) = two_mut(g, lp.fc1_w, lp.fc1_b);
    linear::backward(
        be,
        &s.h2,
        &w[lp.fc1_w],
        &sc.df,
        Some(&mut sc.dh),
        Some(gw),
        Some(gb),
        Dims { rows, din: d, dout: i },
    );
    be.copy(&sc.dx, 0, &mut sc.dx1, 0, rows * d);
    let (gw, gb) = two_mut(g, lp.ln2_w, lp.ln2_b);
    be.layernorm_bwd(&s.x1, &w[lp.ln2_w], &s.mean2, &s.rstd2, &sc.dh, &mut sc.dx1, gw, gb, rows, d);
    // Attention: x1 = x + out_proj(attn(q, k, v))
    let dd = Dims { rows, din: d, dout: d };
    be.fill(&mut sc.dattn, 0.0);
    let (gw, gb) = two_mut(g, lp.o_w, lp.o_b);
    linear::backward(be, &s.attn, &w[lp.o_w], &sc.dx1, Some(&mut sc.dattn), Some(gw), Some(gb), dd);
    be.fill(&mut sc.dq, 0.0);
    be.fill(&mut sc.dk, 0.0);
    be.fill(&mut sc.dv, 0.0);
    be.attention_bwd(&s.q, &s.k, &s.v, &s.attn, &s.lse, &sc.dattn, &mut sc.dq, &mut sc.dk, &mut sc.dv, *a);
    be.fill(&mut sc.dh, 0.0);
    for (dproj, wi, bi) in [(&sc.dq, lp.q_w, lp.q_b), (&sc.dk, lp.k_w, lp.k_b), (&sc.dv, lp.v_w, lp.v_b)] {
        let (gw, gb) = two_mut(g, wi, bi);
        linear::backward(be, &s.h1, &w[wi], dproj, Some(&mut sc.dh), Some(gw), Some(gb), dd);
    }
    be.copy(&sc.dx1, 0, &mut sc.dx, 0, rows * d);
    let (gw, gb) = two_mut(g, lp.ln1_w, lp.ln1_b);
    be.layernorm_bwd(x, &w[lp.ln1_w], &s.mean1, &s.rstd1, &sc.dh, &mut sc.dx, gw, gb, rows, d);
}
