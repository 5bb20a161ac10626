//! VILA's `mlp_downsample` projector: DownSampleBlock (2x2 token merge with
//! zero padding), LayerNorm, Linear, exact GELU, Linear.

use super::linear::{self, Dims};
use super::memory::{ModuleValues, Values};
use super::store::ParamStore;
use super::vit::two_mut;
use crate::engine::{Backend, GeluKind, GridShape};
use tessera_job::model::ModelConfig;

struct Workspace<B: Backend> {
    batch: usize,
    merged: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    normed: B::Buf,
    h: B::Buf,
    act: B::Buf,
    out: B::Buf,
    // backward scratch
    dact: B::Buf,
    dh: B::Buf,
    dnormed: B::Buf,
    dmerged: B::Buf,
    dfeatures: B::Buf,
}

/// What the workspace allocates for `images` images, for the memory planner.
pub fn workspace_values(c: &ModelConfig, images: usize) -> ModuleValues {
    let (rows, pin, h) = (images * c.image_tokens(), c.projector_in(), c.llm.hidden_size);
    let g = c.vision.grid();
    ModuleValues {
        saved: Values { act: rows * (2 * pin + 3 * h), state: 2 * rows },
        scratch: Values::act(rows * (2 * pin + 2 * h) + images * g * g * c.mm_hidden()),
    }
}

pub struct Projector<B: Backend> {
    cfg: ModelConfig,
    ln_w: usize,
    ln_b: usize,
    l1_w: usize,
    l1_b: usize,
    l2_w: usize,
    l2_b: usize,
    ws: Option<Workspace<B>>,
}

impl<B: Backend> Projector<B> {
    pub fn new(cfg: &ModelConfig, p: &ParamStore<B>) -> Self {
        let i = |n: &str| p.idx(&format!("mm_projector.layers.{n}"));
        Projector {
            cfg: cfg.clone(),
            ln_w: i("1.weight"),
            ln_b: i("1.bias"),
            l1_w: i("2.weight"),
            l1_b: i("2.bias"),
            l2_w: i("4.weight"),
            l2_b: i("4.bias"),
            ws: None,
        }
    }

    fn grid(&self, batch: usize) -> GridShape {
        GridShape::square(batch, self.cfg.vision.grid(), self.cfg.mm_hidden())
    }

    /// `features` `[batch, g^2, mm_hidden]` -> image tokens `[batch * m^2, llm_hidden]`.
    pub fn forward(&mut self, be: &B, p: &ParamStore<B>, features: &B::Buf, batch: usize) -> &B::Buf {
        let c = &self.cfg;
        let (rows, pin, h) = (batch * c.image_tokens(), c.projector_in(), c.llm.hidden_size);
        if self.ws.as_ref().is_none_or(|w| w.batch != batch) {
            // The old workspace goes before the new one is allocated: a shape
            // change must not hold both (on a GPU, twice the activations).
            self.ws = None;
            self.ws = Some(Workspace {
                batch,
                merged: be.alloc(rows * pin),
                mean: be.alloc_state(rows),
                rstd: be.alloc_state(rows),
                normed: be.alloc(rows * pin),
                h: be.alloc(rows * h),
                act: be.alloc(rows * h),
                out: be.alloc(rows * h),
                dact: be.alloc(rows * h),
                dh: be.alloc(rows * h),
                dnormed: be.alloc(rows * pin),
                dmerged: be.alloc(rows * pin),
                dfeatures: be.alloc(self.grid(batch).numel()),
            });
        }
        let grid = self.grid(batch);
        let ws = self.ws.as_mut().expect("workspace exists");
        let w = &p.values;
        be.downsample2x2_fwd(features, grid, &mut ws.merged);
        be.layernorm_fwd(
            &ws.merged,
            &w[self.ln_w],
            &w[self.ln_b],
            &mut ws.normed,
            &mut ws.mean,
            &mut ws.rstd,
            rows,
            pin,
            c.projector.layer_norm_eps,
        );
        // The first linear's bias and the GELU fused: h keeps the pre-activation for gelu_bwd.
        linear::forward(be, &ws.normed, &w[self.l1_w], None, &mut ws.h, Dims { rows, din: pin, dout: h });
        be.bias_gelu_fwd(&mut ws.h, &w[self.l1_b], &mut ws.act, rows, h, GeluKind::Erf);
        linear::forward(be, &ws.act, &w[self.l2_w], Some(&w[self.l2_b]), &mut ws.out, Dims { rows, din: h, dout: h });
        &ws.out
    }

    /// The image tokens of the last `forward`.
    pub fn output(&self) -> &B::Buf {
        &self.ws.as_ref().expect("projector output needs a forward first").out
    }

    /// Backward from the image tokens' gradient; returns the features' gradient.
    /// `param_grads` false (a frozen projector) still propagates to the features.
    pub fn backward(&mut self, be: &B, p: &mut ParamStore<B>, dout: &B::Buf, param_grads: bool) -> &B::Buf {
        let batch = self.ws.as_ref().expect("projector backward needs a forward first").batch;
        let grid = self.grid(batch);
        let c = &self.cfg;
        let ws = self.ws.as_mut().expect("workspace exists");
        let (rows, pin, h) = (batch * c.image_tokens(), c.projector_in(), c.llm.hidden_size);
        let (w, g) = (&p.values, &mut p.grads);
        be.fill(&mut ws.dact, 0.0);
        let (gw, gb) = two_mut(g, self.l2_w, self.l2_b);
        let (gw, gb) = if param_grads { (Some(gw), Some(gb)) } else { (None, None) };
        linear::backward(be, &ws.act, &w[self.l2_w], dout, Some(&mut ws.dact), gw, gb, Dims { rows, din: h, dout: h });
        be.fill(&mut ws.dh, 0.0);
        be.gelu_bwd(&ws.h, &ws.dact, &mut ws.dh, GeluKind::Erf);
        be.fill(&mut ws.dnormed, 0.0);
        let (gw, gb) = two_mut(g, self.l1_w, self.l1_b);
        let (gw, gb) = if param_grads { (Some(gw), Some(gb)) } else { (None, None) };
        linear::backward(
            be,
            &ws.normed,
            &w[self.l1_w],
            &ws.dh,
            Some(&mut ws.dnormed),
            gw,
            gb,
            Dims { rows, din: pin, dout: h },
        );
        be.fill(&mut ws.dmerged, 0.0);
        // LayerNorm backward always adds into dw/db; a frozen projector's grads are simply unused.
        let (gw, gb) = two_mut(g, self.ln_w, self.ln_b);
        be.layernorm_bwd(
            &ws.merged,
            &w[self.ln_w],
            &ws.mean,
            &ws.rstd,
            &ws.dnormed,
            &mut ws.dmerged,
            gw,
            gb,
            rows,
            pin,
        );
        be.fill(&mut ws.dfeatures, 0.0);
        be.downsample2x2_bwd(&ws.dmerged, grid, &mut ws.dfeatures);
        &ws.dfeatures
    }
}
