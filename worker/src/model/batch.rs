//! A training batch as `debug-step` and the trainer receive it, and its
//! validation into the flat layout the model runs on.

use crate::engine::TileGrid;
use anyhow::{bail, Result};
use tessera_job::model::{ModelConfig, IGNORE_INDEX, IMAGE_TOKEN_INDEX};

/// Host-side batch (docs/DESIGN.md section 4): `input_ids` and `labels` `[B, T]`,
/// and normalized pixels `[N, C, S_max, S_max]` for the N samples that have
/// an image, in sample order. A sample with an image has exactly one -200
/// token; a text-only sample has none. Samples may be right-padded (labels
/// -100): the LLM is causal, so padding after a sample changes nothing in it.
///
/// Dynamic S2 (NVILA's aspect-ratio-aware grid, see `model/s2.rs`) sets
/// `tile_grids`; `pixel_values` then holds tiles rather than whole images.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    /// Static S2 (`tile_grids` empty): `[N, C, S_max, S_max]`. Dynamic S2:
    /// every image's tiles in turn, each `[C, base, base]` (base = the first
    /// scale): the `n x n` tiles of each smaller scale, then the `rows x cols`
    /// tiles of the largest, each scale's tiles row by row.
    pub pixel_values: Vec<f32>,
    /// Dynamic S2 only: per image, the largest scale's tile grid.
    pub tile_grids: Vec<TileGrid>,
    /// Per sample: whether it has an image.
    pub has_image: Vec<bool>,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// The batch after splicing: a sample with an image is T - 1 + image_tokens
/// long; every sample is padded to the longest (`seq`).
#[derive(Clone, Debug)]
pub struct Prepared {
    pub batch: usize,
    pub seq: usize,
    /// Samples that have an image (the S2 batch size).
    pub images: usize,
    /// ViT passes (S2 tiles) over all images.
    pub tiles: usize,
    /// Token id per position, -1 where an image token goes.
    pub token_ids: Vec<i32>,
    /// Flat row (`b * seq + t`) of each image token, image-major.
    pub image_rows: Vec<i32>,
    /// Next-token target per position (already shifted), -1 = ignored.
    pub targets: Vec<i32>,
    pub n_targets: usize,
}

impl Batch {
    /// Checks the batch against the model and splices the image placeholders.
    pub fn prepare(&self, cfg: &ModelConfig) -> Result<Prepared> {
        self.prepare_with(cfg, true)
    }

    /// As `prepare`; `need_targets` false allows a batch without any target
    /// (inference: generation reads logits, not a loss).
    pub fn prepare_with(&self, cfg: &ModelConfig, need_targets: bool) -> Result<Prepared> {
        let (b, t) = (self.batch, self.seq);
        if b == 0 || t == 0 {
            bail!("batch is empty ({b} samples of {t} tokens)");
        }
        if self.has_image.len() != b {
            bail!("has_image has {} entries for {b} samples", self.has_image.len());
        }
        let images = self.has_image.iter().filter(|&&x| x).count();
        let tiles = self.check_pixels(cfg, images)?;
        if self.input_ids.len() != b * t || self.labels.len() != b * t {
            bail!("input_ids and labels must both be [{b}, {t}]");
        }
        if let Some(i) = self.pixel_values.iter().position(|v| !v.is_finite()) {
            bail!("pixel_values[{i}] is not finite ({})", self.pixel_values[i]);
        }
        let m = cfg.image_tokens();
        let seq = if images > 0 { cfg.spliced_len(t) } else { t };
        if seq > cfg.llm.max_position_embeddings {
            bail!(
                "sequence of {seq} tokens ({t} text + {m} image - 1) exceeds max_position_embeddings {}",
                cfg.llm.max_position_embeddings
            );
        }
        let vocab = cfg.llm.vocab_size as i64;
        let mut token_ids = Vec::with_capacity(b * seq);
        let mut labels = Vec::with_capacity(b * seq);
        let mut image_rows = Vec::with_capacity(images * m);
        for i in 0..b {
            let ids = &self.input_ids[i * t..(i + 1) * t];
            let lab = &self.labels[i * t..(i + 1) * t];
            let places = ids.iter().filter(|&&x| x == IMAGE_TOKEN_INDEX).count();
            match (self.has_image[i], places) {
                (true, 1) | (false, 0) => {}
                (true, 0) => {
                    bail!("sample {i} has no image token ({IMAGE_TOKEN_INDEX}) in input_ids but comes with an image")
                }
                (false, n) => bail!("sample {i} has {n} image tokens ({IMAGE_TOKEN_INDEX}) but no image"),
                (true, n) => bail!("sample {i} has {n} image tokens ({IMAGE_TOKEN_INDEX}); exactly one is supported"),
            }
            for (j, (&id, &l)) in ids.iter().zip(lab).enumerate() {
                if id != IMAGE_TOKEN_INDEX && !(0..vocab).contains(&id) {
                    bail!("input_ids[{i}, {j}] = {id} is outside the vocabulary 0..{vocab}");
                }
                if l != IGNORE_INDEX && !(0..vocab).contains(&l) {
                    bail!("labels[{i}, {j}] = {l} is neither {IGNORE_INDEX} nor inside the vocabulary 0..{vocab}");
                }
                if id == IMAGE_TOKEN_INDEX {
                    for k in 0..m {
                        image_rows.push((i * seq + j + k) as i32);
                        token_ids.push(-1);
                        labels.push(IGNORE_INDEX);
                    }
                } else {
                    token_ids.push(id as i32);
                    labels.push(l);
                }
            }
            // Right padding of text-only samples: token 0, no target.
            while token_ids.len() < (i + 1) * seq {
                token_ids.push(0);
                labels.push(IGNORE_INDEX);
            }
        }
        // Shift by one as LlamaForCausalLM does: position t predicts label t + 1.
        let mut targets = vec![-1i32; b * seq];
        for i in 0..b {
            for j in 0..seq - 1 {
                let l = labels[i * seq + j + 1];
                if l != IGNORE_INDEX {
                    targets[i * seq + j] = l as i32;
                }
            }
        }
        let n_targets = targets.iter().filter(|&&x| x >= 0).count();
        if n_targets == 0 && need_targets {
            bail!("batch has no target token: every label is {IGNORE_INDEX} after the shift, so the loss is undefined");
        }
        Ok(Prepared { batch: b, seq, images, tiles, token_ids, image_rows, targets, n_targets })
    }
}

impl Batch {
    /// Checks `pixel_values` (and `tile_grids`) against the model and the
    /// number of images; returns the number of ViT tiles.
    fn check_pixels(&self, cfg: &ModelConfig, images: usize) -> Result<usize> {
        let ch = cfg.vision.num_channels;
        let tiles = if self.tile_grids.is_empty() {
            let s = cfg.s2.max_scale();
            if self.pixel_values.len() != images * ch * s * s {
                bail!(
                    "pixel_values has {} values; expected [{images}, {ch}, {s}, {s}] = {} ({images} samples with an image, largest S2 scale {s})",
                    self.pixel_values.len(),
                    images * ch * s * s
                );
            }
            images * cfg.s2.tiles_per_image()
        } else {
            if self.tile_grids.len() != images {
                bail!("tile_grids has {} entries for {images} samples with an image", self.tile_grids.len());
            }
            if let Some((i, g)) = self.tile_grids.iter().enumerate().find(|(_, g)| g.rows == 0 || g.cols == 0) {
                bail!("tile_grids[{i}] is {} x {}; a tile grid needs at least one row and one column", g.rows, g.cols);
            }
            let base = cfg.vision.image_size;
            let tiles: usize = self.tile_grids.iter().map(|&g| cfg.s2.dynamic_tiles(g)).sum();
            if self.pixel_values.len() != tiles * ch * base * base {
                bail!(
                    "pixel_values has {} values; the tile grids need {tiles} dynamic S2 tiles of [{ch}, {base}, {base}] = {}",
                    self.pixel_values.len(),
                    tiles * ch * base * base
                );
            }
            tiles
        };
        if let Some(i) = self.pixel_values.iter().position(|v| !v.is_finite()) {
            bail!("pixel_values[{i}] is not finite ({})", self.pixel_values[i]);
        }
        Ok(tiles)
    }

    /// A random but valid batch: pixels in [-1, 1], the image placeholder after
    /// a short prompt, and the second half of each sample as the answer.
    /// Deterministic in `seed`; used by tests and benchmarks.
    pub fn synthetic(cfg: &ModelConfig, batch: usize, seq: usize, seed: u64) -> Batch {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let s = cfg.s2.max_scale();
        let pixel_values = (0..batch * cfg.vision.num_channels * s * s).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let vocab = cfg.llm.vocab_size as i64;
        let mut input_ids = Vec::with_capacity(batch * seq);
        let mut labels = Vec::with_capacity(batch * seq);
        for b in 0..batch {
            let image_at = (b % 3).min(seq.saturating_sub(2));
            for t in 0..seq {
                if t == image_at {
                    input_ids.push(IMAGE_TOKEN_INDEX);
                    labels.push(IGNORE_INDEX);
                } else {
                    let id = rng.gen_range(1..vocab);
                    input_ids.push(id);
                    labels.push(if t >= seq / 2 { id } else { IGNORE_INDEX });
                }
            }
        }
        Batch { batch, seq, pixel_values, tile_grids: Vec::new(), has_image: vec![true; batch], input_ids, labels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(cfg: &ModelConfig, ids: Vec<i64>, labels: Vec<i64>) -> Batch {
        let s = cfg.s2.max_scale();
        Batch {
            batch: 1,
            seq: ids.len(),
            pixel_values: vec![0.0; 3 * s * s],
            tile_grids: Vec::new(),
            has_image: vec![true],
            input_ids: ids,
            labels,
        }
    }

    #[test]
    fn splices_image_tokens_and_shifts_labels() {
        let cfg = ModelConfig::tiny(); // 9 image tokens
        let p = batch(&cfg, vec![5, -200, 7, 8], vec![-100, -100, 7, 8]).prepare(&cfg).unwrap();
        assert_eq!(p.seq, 12);
        assert_eq!(p.token_ids[0], 5);
        assert!(p.token_ids[1..10].iter().all(|&x| x == -1));
        assert_eq!(&p.token_ids[10..], &[7, 8]);
        assert_eq!(p.image_rows, (1..10).collect::<Vec<i32>>());
        // position 9 (last image token) predicts 7, position 10 predicts 8
        let mut want = vec![-1; 12];
        want[9] = 7;
        want[10] = 8;
        assert_eq!(p.targets, want);
        assert_eq!(p.n_targets, 2);
    }

    #[test]
    fn text_only_samples_are_padded_after_image_samples() {
        let cfg = ModelConfig::tiny(); // 9 image tokens
        let s = cfg.s2.max_scale();
        let b = Batch {
            batch: 2,
            seq: 3,
            pixel_values: vec![0.0; 3 * s * s],
            tile_grids: Vec::new(),
            has_image: vec![false, true],
            input_ids: vec![4, 5, 6, 7, -200, 8],
            labels: vec![-100, 5, 6, -100, -100, 8],
        };
        let p = b.prepare(&cfg).unwrap();
        assert_eq!((p.seq, p.images), (11, 1));
        assert_eq!(&p.token_ids[..3], &[4, 5, 6]);
        assert!(p.token_ids[3..11].iter().all(|&x| x == 0), "padding");
        assert!(p.targets[2..11].iter().all(|&x| x == -1), "no target in padding");
        assert_eq!(&p.targets[..2], &[5, 6]);
        assert_eq!(p.image_rows, (12..21).collect::<Vec<i32>>());
        assert_eq!(p.targets[20], 8);
        let mut bad = b.clone();
        bad.has_image = vec![true, true];
        assert!(bad.prepare(&cfg).unwrap_err().to_string().contains("pixel_values"));
        bad.pixel_values = vec![0.0; 6 * s * s];
        assert!(bad.prepare(&cfg).unwrap_err().to_string().contains("sample 0 has no image token"));
    }

    #[test]
    fn bad_batches_are_refused_with_clear_messages() {
        let cfg = ModelConfig::tiny();
        let e = batch(&cfg, vec![5, 6, 7], vec![-100, 6, 7]).prepare(&cfg).unwrap_err().to_string();
        assert!(e.contains("no image token"), "{e}");
        let e = batch(&cfg, vec![5, -200, 7], vec![-100; 3]).prepare(&cfg).unwrap_err().to_string();
        assert!(e.contains("every label is -100"), "{e}");
        let e = batch(&cfg, vec![-200, 999], vec![-100, 999]).prepare(&cfg).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        let mut b = batch(&cfg, vec![-200, 3], vec![-100, 3]);
        b.pixel_values.pop();
        assert!(b.prepare(&cfg).unwrap_err().to_string().contains("pixel_values"));
    }
}
