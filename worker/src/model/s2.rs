//! The S2 multiscale wrapper (s2wrapper's `multiscale_forward`): resize the
//! image to every scale, cut each into base-size tiles, run the ViT on all
//! tiles at once, stitch each scale's tiles back, area-pool to the base grid
//! and concatenate the scales along channels. Backward flows through the
//! pooling and stitching into every tile and so into the ViT.
//!
//! Dynamic S2 (NVILA's `dynamic_s2`, with `s2_resize_output_to_scale_idx =
//! 0`): the data pipeline has already cut every image into tiles (each
//! smaller scale `n x n`, the largest `rows x cols` with the aspect ratio
//! closest to the image's; `data/image.rs`). The ViT runs on all tiles; per
//! image, each scale's tiles are stitched into a `(rows g) x (cols g)` map
//! (NVILA's `merge_chessboard`) and area-pooled by `rows x cols` windows to
//! the base `g x g` grid, so the projector and the LLM see the same number of
//! image tokens as with static S2, while the ViT's cost follows the image.

use super::memory::{ModuleValues, Values};
use super::store::{GradReady, ParamStore};
use super::vit::Vit;
use crate::engine::{Backend, GridShape, ImageShape, TileGrid};
use std::collections::BTreeMap;
use tessera_job::model::{ModelConfig, S2Config};

/// One scale of one image in a dynamic S2 batch: its tile grid and where
/// its tiles start in the tile stack.
#[derive(Clone, Copy, Debug)]
struct DynamicBlock {
    image: usize,
    scale: usize,
    grid: TileGrid,
    first: usize,
}

/// The blocks of a dynamic S2 batch, in tile-stack order
/// (`Batch::pixel_values`: image after image, each scale's tiles in turn).
fn dynamic_blocks(s2: &S2Config, grids: &[TileGrid]) -> Vec<DynamicBlock> {
    let mut first = 0;
    let mut blocks = Vec::new();
    for (image, &last) in grids.iter().enumerate() {
        for (scale, grid) in s2.dynamic_grids(last).into_iter().enumerate() {
            blocks.push(DynamicBlock { image, scale, grid, first });
            first += grid.count();
        }
    }
    blocks
}

/// Buffers sized for one batch layout: `batch` images and, for dynamic S2,
/// their largest-scale grids.
struct Workspace<B: Backend> {
    batch: usize,
    grids: Vec<TileGrid>,
    /// Dynamic S2: the blocks of `grids`.
    blocks: Vec<DynamicBlock>,
    /// Static S2: the image resized to each non-final scale.
    resized: Vec<B::Buf>,
    /// Static S2: all tiles of all scales, scale-major, each scale in chessboard order.
    tiles: B::Buf,
    /// Static S2: per scale, the stitched `[batch, (n g)^2, D]` map.
    merged: Vec<B::Buf>,
    /// Dynamic S2: one image's stitched map for each distinct tile grid,
    /// reused image after image, and one image's pooled `[g^2, D]` map.
    merged_one: BTreeMap<TileGrid, B::Buf>,
    pooled_one: B::Buf,
    /// Per scale, the pooled `[batch, g^2, D]` map.
    pooled: Vec<B::Buf>,
    /// `[batch, g^2, D * scales]`
    features: B::Buf,
    dtiles: B::Buf,
}

/// What static S2's workspace allocates for `batch` images (the ViT's
/// aside), for the memory planner.
pub fn workspace_values(c: &ModelConfig, batch: usize) -> ModuleValues {
    let (g, d, ch, base) = (c.vision.grid(), c.vision.hidden_size, c.vision.num_channels, c.vision.image_size);
    let nt = batch * c.s2.tiles_per_image();
    let resized: usize = c.s2.scales.iter().filter(|&&s| s != c.s2.max_scale()).map(|&s| batch * ch * s * s).sum();
    let merged: usize = c.s2.splits().iter().map(|n| batch * n * n * g * g * d).sum();
    let pooled = c.s2.scales.len() * batch * g * g * d;
    let saved = resized + nt * ch * base * base + merged + pooled + batch * g * g * c.mm_hidden();
    ModuleValues { saved: Values::act(saved), scratch: Values::act(nt * g * g * d) }
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

    /// Tile index where each scale's tiles start, for `batch` images (static S2).
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

    fn workspace(&mut self, be: &B, batch: usize, grids: &[TileGrid]) {
        if self.ws.as_ref().is_some_and(|w| w.batch == batch && w.grids == grids) {
            return;
        }
        // The old workspace goes before the new one is allocated: a shape
        // change must not hold both (on a GPU, twice the activations).
        self.ws = None;
        let c = &self.cfg;
        let (g, d, ch, base) = (c.vision.grid(), c.vision.hidden_size, c.vision.num_channels, c.vision.image_size);
        let splits = c.s2.splits();
        let blocks = dynamic_blocks(&c.s2, grids);
        let dynamic = !grids.is_empty();
        let nt = match blocks.last() {
            Some(b) => b.first + b.grid.count(),
            None => batch * c.s2.tiles_per_image(),
        };
        let static_len = |len: usize| if dynamic { 0 } else { len };
        let mut merged_one = BTreeMap::new();
        for b in &blocks {
            merged_one.entry(b.grid).or_insert_with(|| be.alloc(b.grid.count() * g * g * d));
        }
        self.ws = Some(Workspace {
            batch,
            grids: grids.to_vec(),
            blocks,
            resized: c
                .s2
                .scales
                .iter()
                .map(|&s| be.alloc(if s == c.s2.max_scale() { 0 } else { static_len(batch * ch * s * s) }))
                .collect(),
            tiles: be.alloc(static_len(nt * ch * base * base)),
            merged: splits.iter().map(|n| be.alloc(static_len(batch * n * n * g * g * d))).collect(),
            merged_one,
            pooled_one: be.alloc(if dynamic { g * g * d } else { 0 }),
            pooled: splits.iter().map(|_| be.alloc(batch * g * g * d)).collect(),
            features: be.alloc(batch * g * g * c.mm_hidden()),
            dtiles: be.alloc(nt * g * g * d),
        });
    }

    /// Static S2. `pixels`: `[batch, C, S_max, S_max]`, normalized. Returns
    /// the S2 features `[batch, g^2, D * scales]`.
    pub fn forward(&mut self, be: &B, p: &ParamStore<B>, pixels: &B::Buf, batch: usize) -> &B::Buf {
        self.workspace(be, batch, &[]);
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
            let merged_shape = GridShape::square(batch, n * g, d);
            be.tile_merge_fwd(out, offsets[i], TileGrid::square(n), &mut ws.merged[i], merged_shape);
            be.area_pool_fwd(&ws.merged[i], merged_shape, TileGrid::square(n), &mut ws.pooled[i]);
        }
        Self::concat_scales(be, &c, ws);
        &ws.features
    }

    /// Dynamic S2. `tiles`: every image's tiles as `Batch::pixel_values`
    /// holds them, `grids` the largest scale's grid per image. Returns the
    /// S2 features `[images, g^2, D * scales]`.
    pub fn forward_dynamic(&mut self, be: &B, p: &ParamStore<B>, tiles: &B::Buf, grids: &[TileGrid]) -> &B::Buf {
        assert!(!grids.is_empty(), "dynamic S2 needs at least one image");
        self.workspace(be, grids.len(), grids);
        let c = self.cfg.clone();
        let ws = self.ws.as_mut().expect("workspace exists");
        let (g, d) = (c.vision.grid(), c.vision.hidden_size);
        let nt = ws.blocks.last().map_or(0, |b| b.first + b.grid.count());
        let out = self.vit.forward(be, p, tiles, nt);
        for &DynamicBlock { image, scale, grid, first } in &ws.blocks {
            let shape = GridShape { batch: 1, rows: grid.rows * g, cols: grid.cols * g, channels: d };
            let merged = ws.merged_one.get_mut(&grid).expect("a merge buffer for every grid");
            be.tile_merge_fwd(out, first, grid, merged, shape);
            be.area_pool_fwd(merged, shape, grid, &mut ws.pooled_one);
            be.copy(&ws.pooled_one, 0, &mut ws.pooled[scale], image * g * g * d, g * g * d);
        }
        Self::concat_scales(be, &c, ws);
        &ws.features
    }

    /// Concatenates the pooled maps of every scale along channels.
    fn concat_scales(be: &B, c: &ModelConfig, ws: &mut Workspace<B>) {
        let (g, d) = (c.vision.grid(), c.vision.hidden_size);
        for (i, pooled) in ws.pooled.iter().enumerate() {
            be.concat_cols_fwd(pooled, &mut ws.features, ws.batch * g * g, d, c.mm_hidden(), i * d);
        }
    }

    /// Backward from the gradient of the features into the ViT's parameters
    /// (for the last forward, static or dynamic).
    pub fn backward(&mut self, be: &B, p: &mut ParamStore<B>, dfeatures: &B::Buf, ready: GradReady<B>) {
        let c = self.cfg.clone();
        let batch = self.ws.as_ref().expect("S2 backward needs a forward first").batch;
        let offsets = self.tile_offsets(batch);
        let ws = self.ws.as_mut().expect("workspace exists");
        let (g, d) = (c.vision.grid(), c.vision.hidden_size);
        be.fill(&mut ws.dtiles, 0.0);
        // pooled/merged buffers are reused as their own gradients.
        for (i, pooled) in ws.pooled.iter_mut().enumerate() {
            be.fill(pooled, 0.0);
            be.concat_cols_bwd(dfeatures, pooled, batch * g * g, d, c.mm_hidden(), i * d);
        }
        if ws.grids.is_empty() {
            for (i, &n) in c.s2.splits().iter().enumerate() {
                let merged_shape = GridShape::square(batch, n * g, d);
                be.fill(&mut ws.merged[i], 0.0);
                be.area_pool_bwd(&ws.pooled[i], merged_shape, TileGrid::square(n), &mut ws.merged[i]);
                be.tile_merge_bwd(&ws.merged[i], merged_shape, TileGrid::square(n), &mut ws.dtiles, offsets[i]);
            }
        } else {
            for &DynamicBlock { image, scale, grid, first } in &ws.blocks {
                let shape = GridShape { batch: 1, rows: grid.rows * g, cols: grid.cols * g, channels: d };
                be.copy(&ws.pooled[scale], image * g * g * d, &mut ws.pooled_one, 0, g * g * d);
                let merged = ws.merged_one.get_mut(&grid).expect("a merge buffer for every grid");
                be.fill(merged, 0.0);
                be.area_pool_bwd(&ws.pooled_one, shape, grid, merged);
                be.tile_merge_bwd(merged, shape, grid, &mut ws.dtiles, first);
            }
        }
        self.vit.backward(be, p, &ws.dtiles, ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;
    use crate::engine::testing::rand_vec;

    /// Dynamic S2 with the static `n x n` grid, fed the very tiles static S2
    /// cuts (the smaller scale resized by the same op), computes static S2:
    /// the same features and the same ViT gradients. What differs between
    /// the modes is only where the tiles come from and the grid shape.
    #[test]
    fn dynamic_with_the_static_grid_equals_static_s2() {
        let be = Cpu::<f64>::new();
        let cfg = ModelConfig::tiny(); // scales [20, 40], tiles of 20
        let (batch, ch, base, big) = (2, cfg.vision.num_channels, cfg.vision.image_size, cfg.s2.max_scale());
        let pixels = be.upload_f64(&rand_vec(5, batch * ch * big * big));
        let full = ImageShape { batch, channels: ch, size: big };

        // Static S2's tiles, scale-major and image-inner...
        let per_image = cfg.s2.tiles_per_image();
        let mut small = be.alloc(batch * ch * base * base);
        be.resize_bicubic(&pixels, full, &mut small, base);
        let mut static_tiles = be.alloc(batch * per_image * ch * base * base);
        be.tile_split(&small, ImageShape { size: base, ..full }, 1, &mut static_tiles, 0);
        be.tile_split(&pixels, full, 2, &mut static_tiles, batch);
        // ... reordered image-major, as dynamic S2 takes them.
        let host = be.download_f64(&static_tiles);
        let tile_len = ch * base * base;
        let mut order = Vec::new();
        for b in 0..batch {
            order.push(b);
            order.extend((0..4).map(|t| batch + t * batch + b));
        }
        let dyn_tiles: Vec<f64> = order.iter().flat_map(|&t| host[t * tile_len..(t + 1) * tile_len].to_vec()).collect();
        let dyn_tiles = be.upload_f64(&dyn_tiles);

        let run = |dynamic: bool| {
            let mut p = ParamStore::init(&be, &cfg, 9);
            p.zero_grads(&be);
            let mut s2 = S2::new(&cfg, &p, false);
            let grids = vec![TileGrid::square(2); batch];
            let features = if dynamic {
                be.download_f64(s2.forward_dynamic(&be, &p, &dyn_tiles, &grids))
            } else {
                be.download_f64(s2.forward(&be, &p, &pixels, batch))
            };
            let dfeatures = be.upload_f64(&rand_vec(6, features.len()));
            s2.backward(&be, &mut p, &dfeatures, &mut |_, _| {});
            let grads: Vec<Vec<f64>> = p.grads.iter().map(|g| be.download_f64(g)).collect();
            (features, grads)
        };
        let (fs, gs) = run(false);
        let (fd, gd) = run(true);
        assert_eq!(fs, fd, "features");
        assert!(gs.iter().any(|g| g.iter().any(|&v| v != 0.0)), "the ViT gets gradients");
        // The ViT sees the tiles in another order, so its parameter gradients
        // (sums over tiles) round differently: equal to f64 rounding, measured
        // against the largest gradient (the key bias's gradient is zero in
        // exact arithmetic, so its own scale is rounding noise).
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let largest = gs.iter().map(|g| norm(g)).fold(0.0, f64::max);
        for (i, (a, b)) in gs.iter().zip(&gd).enumerate() {
            let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            assert!(norm(&diff) <= 1e-12 * largest, "gradient {i}: {:e} off", norm(&diff) / largest);
        }
    }
}
