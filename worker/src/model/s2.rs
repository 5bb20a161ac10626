//! The S2 multiscale wrapper (s2wrapper's `multiscale_forward`): resize the
//! image to every scale, cut each into base-size tiles, run the ViT on all
//! tiles at once, stitch each scale's tiles back, area-pool to the base grid
//! and concatenate the scales along channels. Backward flows through the
//! pooling and stitching into every tile and so into the ViT.

use super::config::ModelConfig;
use super::store::{GradReady, ParamStore};
use super::vit::Vit;
use crate::engine::{Backend, GridShape, ImageShape};

struct Workspace<B: Backend> {
    batch: usize,
    /// The image resized to each non-final scale.
    resized: Vec<B::Buf>,
    /// All tiles of all scales, scale-major, each scale in chessboard order.
    tiles: B::Buf,
    /// Per scale: the stitched `[batch, (n g)^2, D]` map and the pooled `[batch, g^2, D]` one.
    merged: Vec<B::Buf>,
    pooled: Vec<B::Buf>,
    /// `[batch, g^2, D * scales]`
    features: B::Buf,
    dtiles: B::Buf,
}

pub struct S2<B: Backend> {
    cfg: ModelConfig,
    pub vit: Vit<B>,
    ws: Option<Workspace<B>>,
}

impl<B: Backend> S2<B> {
    pub fn new(cfg: &ModelConfig, params: &ParamStore<B>, recompute: bool) -> Self {
        S2 { cfg: cfg.clone(), vit: Vit::new(&cfg.vision, params, recompute), ws: None }
    }

    /// Tile index where each scale's tiles start, for `batch` images.
    fn tile_offsets(&self, batch: usize) -> Vec<usize> {
        let mut off = 0;
        self.cfg
            .s2
            .splits()
            .iter()
            .map(|n| {
                let o = off;
                off += n * n * batch;
                o
            })
            .collect()
    }

    fn workspace(&mut self, be: &B, batch: usize) {
        if self.ws.as_ref().is_some_and(|w| w.batch == batch) {
            return;
        }
        let c = &self.cfg;
        let (g, d, ch, base) = (c.vision.grid(), c.vision.hidden_size, c.vision.num_channels, c.vision.image_size);
        let splits = c.s2.splits();
        let nt = batch * c.s2.tiles_per_image();
        self.ws = Some(Workspace {
            batch,
            resized: c
                .s2
                .scales
                .iter()
                .map(|&s| be.alloc(if s == c.s2.max_scale() { 0 } else { batch * ch * s * s }))
                .collect(),
            tiles: be.alloc(nt * ch * base * base),
            merged: splits.iter().map(|n| be.alloc(batch * n * n * g * g * d)).collect(),
            pooled: splits.iter().map(|_| be.alloc(batch * g * g * d)).collect(),
            features: be.alloc(batch * g * g * c.mm_hidden()),
            dtiles: be.alloc(nt * g * g * d),
        });
    }

    /// `pixels`: `[batch, C, S_max, S_max]`, normalized. Returns the S2
    /// features `[batch, g^2, D * scales]`.
    pub fn forward(&mut self, be: &B, p: &ParamStore<B>, pixels: &B::Buf, batch: usize) -> &B::Buf {
        self.workspace(be, batch);
        let offsets = self.tile_offsets(batch);
        let c = self.cfg.clone();
        let ws = self.ws.as_mut().expect("workspace exists");
        let (g, d, ch) = (c.vision.grid(), c.vision.hidden_size, c.vision.num_channels);
        let full = ImageShape { batch, channels: ch, size: c.s2.max_scale() };
        for (i, (&s, &n)) in c.s2.scales.iter().zip(&c.s2.splits()).enumerate() {
            // Pixels need no gradient: resizing and cutting happen once, forward only.
            let src = if s == full.size {
                pixels
            } else {
                be.resize_bicubic(pixels, full, &mut ws.resized[i], s);
                &ws.resized[i]
            };
            be.tile_split(src, ImageShape { size: s, ..full }, n, &mut ws.tiles, offsets[i]);
        }
        let nt = batch * c.s2.tiles_per_image();
        let out = self.vit.forward(be, p, &ws.tiles, nt);
        for (i, &n) in c.s2.splits().iter().enumerate() {
            let merged_shape = GridShape { batch, side: n * g, channels: d };
            be.tile_merge_fwd(out, offsets[i], n, &mut ws.merged[i], merged_shape);
            be.area_pool_fwd(&ws.merged[i], merged_shape, n, &mut ws.pooled[i]);
            be.concat_cols_fwd(&ws.pooled[i], &mut ws.features, batch * g * g, d, c.mm_hidden(), i * d);
        }
        &ws.features
    }

    /// Backward from the gradient of the features into the ViT's parameters.
    pub fn backward(&mut self, be: &B, p: &mut ParamStore<B>, dfeatures: &B::Buf, ready: GradReady<B>) {
        let c = self.cfg.clone();
        let batch = self.ws.as_ref().expect("S2 backward needs a forward first").batch;
        let offsets = self.tile_offsets(batch);
        let ws = self.ws.as_mut().expect("workspace exists");
        let (g, d) = (c.vision.grid(), c.vision.hidden_size);
        be.fill(&mut ws.dtiles, 0.0);
        for (i, &n) in c.s2.splits().iter().enumerate() {
            let merged_shape = GridShape { batch, side: n * g, channels: d };
            // pooled/merged buffers are reused as their own gradients.
            be.fill(&mut ws.pooled[i], 0.0);
            be.concat_cols_bwd(dfeatures, &mut ws.pooled[i], batch * g * g, d, c.mm_hidden(), i * d);
            be.fill(&mut ws.merged[i], 0.0);
            be.area_pool_bwd(&ws.pooled[i], merged_shape, n, &mut ws.merged[i]);
            be.tile_merge_bwd(&ws.merged[i], merged_shape, n, &mut ws.dtiles, offsets[i]);
        }
        self.vit.backward(be, p, &ws.dtiles, ready);
    }
}
