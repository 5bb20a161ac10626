//! From indexed samples to model batches: tokenize, load images, collate,
//! and prefetch on background threads while the model computes. Which
//! sample a step holds is the index's (`tessera_job::data::index`), so a
//! resumed run asks for the same steps and sees the same samples.

use super::image::{load_image, load_image_dynamic_s2};
use crate::engine::TileGrid;
use crate::model::{Batch, ModelConfig};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tessera_job::data::template::Tokenized;
use tessera_job::data::{BadSample, DataConfig, DatasetIndex, OnBadSample};
use tessera_job::image::AspectMode;

/// One sample ready for the collator.
#[derive(Clone, Debug)]
pub struct Example {
    pub id: String,
    pub tokens: Tokenized,
    /// `[3, S, S]` normalized, for samples with an image; with dynamic S2,
    /// the image's tiles (see `Batch::pixel_values`).
    pub pixels: Option<Vec<f32>>,
    /// Dynamic S2: the largest scale's tile grid.
    pub grid: Option<TileGrid>,
}

/// The datasets of a job: the shared index (records, stream order, tokens,
/// costs) and what the worker adds, loading images and collating batches.
pub struct Dataset {
    index: DatasetIndex,
    /// Sample ids already logged as bad (each is logged once).
    logged: Mutex<HashSet<String>>,
}

impl std::ops::Deref for Dataset {
    type Target = DatasetIndex;
    fn deref(&self) -> &DatasetIndex {
        &self.index
    }
}

impl From<DatasetIndex> for Dataset {
    fn from(index: DatasetIndex) -> Self {
        Dataset { index, logged: Mutex::new(HashSet::new()) }
    }
}

impl Dataset {
    pub fn open(cfg: &DataConfig, model: &ModelConfig) -> Result<Self> {
        DatasetIndex::open(cfg, model).map(Dataset::from)
    }

    /// The evaluation split of `cfg` (its `eval_datasets`) as a dataset.
    pub fn open_eval(cfg: &DataConfig, model: &ModelConfig) -> Result<Self> {
        DatasetIndex::open_eval(cfg, model).map(Dataset::from)
    }

    /// Tokenizes a sample and loads its image.
    pub fn example(&self, part: usize, index: usize) -> Result<Example, BadSample> {
        let s = self
            .record(part, index)
            .ok_or_else(|| BadSample::new(format!("({part}, {index})"), "no such sample in the job's datasets"))?;
        let tokens = self.tokenize(part, index)?;
        let bad = |e: tessera_job::image::ImageError| BadSample::new(&s.id, e.to_string());
        let (pixels, grid) = match (&s.image, self.image.mode) {
            (None, _) => (None, None),
            (Some(p), AspectMode::DynamicS2) => {
                let (tiles, grid) = load_image_dynamic_s2(p, &self.image, &self.s2).map_err(bad)?;
                (Some(tiles), Some(grid))
            }
            (Some(p), AspectMode::Resize | AspectMode::Pad) => (Some(load_image(p, &self.image).map_err(bad)?), None),
        };
        Ok(Example { id: s.id.clone(), tokens, pixels, grid })
    }

    /// The samples of step `step` (positions `step * batch_size ..`), loaded
    /// and collated.
    pub fn load_step(&self, seed: u64, batch_size: usize, step: u64) -> Result<LoadedBatch> {
        let refs = self.samples_at(seed, step * batch_size as u64, batch_size)?;
        self.load_samples(&refs, step)
    }

    /// Loads and collates the given samples (a worker's share of a step).
    /// Bad samples are skipped (and returned) or fail the step, as
    /// `on_bad_sample` says.
    pub fn load_samples(&self, refs: &[(usize, usize)], step: u64) -> Result<LoadedBatch> {
        let mut examples = Vec::with_capacity(refs.len());
        let mut bad = Vec::new();
        for &(part, index) in refs {
            if self.record(part, index).is_none() {
                bail!("sample ({part}, {index}) does not exist: the job's datasets differ from the planner's");
            }
            match self.example(part, index) {
                Ok(e) => examples.push(e),
                Err(b) => match self.cfg.on_bad_sample {
                    OnBadSample::Fail => bail!("{b} (on_bad_sample = \"fail\")"),
                    OnBadSample::Skip => {
                        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
                        if logged.insert(b.id.clone()) {
                            tracing::warn!(id = %b.id, reason = %b.reason, "skipping bad sample");
                        }
                        bad.push(b);
                    }
                },
            }
        }
        let truncated = examples.iter().filter(|e| e.tokens.truncated).count();
        Ok(LoadedBatch {
            step,
            batch: collate(&examples),
            ids: examples.into_iter().map(|e| e.id).collect(),
            bad,
            truncated,
        })
    }
}

/// A step's batch and what happened on the way.
#[derive(Clone, Debug)]
pub struct LoadedBatch {
    pub step: u64,
    pub batch: Batch,
    pub ids: Vec<String>,
    /// Samples skipped in this step, with the reason.
    pub bad: Vec<BadSample>,
    /// Samples cut to the maximum length.
    pub truncated: usize,
}

/// Right-pads the samples to the longest (token 0, label -100; the LLM is
/// causal, so padding after a sample does not change it).
pub fn collate(examples: &[Example]) -> Batch {
    let t = examples.iter().map(|e| e.tokens.input_ids.len()).max().unwrap_or(0);
    let mut b = Batch { batch: examples.len(), seq: t, ..Batch::default() };
    for e in examples {
        let n = e.tokens.input_ids.len();
        b.input_ids.extend(&e.tokens.input_ids);
        b.input_ids.extend(std::iter::repeat_n(0, t - n));
        b.labels.extend(&e.tokens.labels);
        b.labels.extend(std::iter::repeat_n(tessera_job::model::IGNORE_INDEX, t - n));
        b.has_image.push(e.pixels.is_some());
        if let Some(p) = &e.pixels {
            b.pixel_values.extend(p);
        }
        b.tile_grids.extend(e.grid);
    }
    b
}

/// Prepares the batches of steps `first, first + 1, ...` on `threads`
/// background threads, a bounded number of steps ahead, and hands them out in
/// step order. Thread `w` makes steps `first + w, first + w + threads, ...`
/// into its own bounded channel, so the order is fixed and memory bounded.
pub struct Prefetcher<T: Send + 'static = LoadedBatch> {
    next: u64,
    first: u64,
    channels: Vec<crossbeam_channel::Receiver<Result<T>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prefetcher<LoadedBatch> {
    /// The single-process stream: step `s` is `dataset.load_step(seed, batch_size, s)`.
    pub fn new(dataset: Arc<Dataset>, seed: u64, batch_size: usize, first: u64, threads: usize) -> Self {
        let ahead = dataset.cfg.prefetch;
        Self::with(move |step| dataset.load_step(seed, batch_size, step), first, threads, ahead)
    }
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Prefetches `load(step)` for steps `first, first + 1, ...`, at most
    /// `ahead` steps in advance.
    pub fn with<F>(load: F, first: u64, threads: usize, ahead: usize) -> Self
    where
        F: Fn(u64) -> Result<T> + Send + Sync + 'static,
    {
        let load = Arc::new(load);
        let threads = threads.max(1);
        let depth = ahead.div_ceil(threads).max(1);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut channels = Vec::new();
        let mut handles = Vec::new();
        for w in 0..threads as u64 {
            let (tx, rx) = crossbeam_channel::bounded(depth);
            let (load, stop) = (load.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                let mut step = first + w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if tx.send(load(step)).is_err() {
                        break;
                    }
                    step += threads as u64;
                }
            }));
            channels.push(rx);
        }
        Prefetcher { next: first, first, channels, stop, threads: handles }
    }

    /// The next step's batch, in order.
    pub fn next_batch(&mut self) -> Result<T> {
        let w = ((self.next - self.first) % self.channels.len() as u64) as usize;
        self.next += 1;
        self.channels[w].recv().context("data loader thread stopped")?
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Unblock senders waiting on full channels, then join.
        self.channels.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::demo::{make_demo_data, DemoSpec};
    use std::path::Path;
    use tessera_job::cost::SampleCost;
    use tessera_job::data::dataset::DatasetSpec;
    use tessera_job::data::template::TemplateKind;
    use tessera_job::hf_config;

    fn demo(dir: &std::path::Path, train: usize) -> (DataConfig, ModelConfig) {
        make_demo_data(dir, &DemoSpec { size: 40, train, eval: 4, seed: 1 }).unwrap();
        let cfg = DataConfig {
            datasets: vec![DatasetSpec {
                path: dir.join("train.jsonl"),
                image_folder: dir.join("images"),
                weight: 1.0,
            }],
            eval_datasets: vec![],
            tokenizer: dir.join("tokenizer.json"),
            template: TemplateKind::VicunaV1,
            image_aspect_ratio: AspectMode::Resize,
            max_tiles: 12,
            max_pixels: 1 << 30,
            max_length: None,
            on_bad_sample: OnBadSample::Skip,
            prefetch: 3,
        };
        (cfg, ModelConfig::tiny())
    }

    #[test]
    fn steps_are_a_pure_function_of_seed_and_step_and_prefetch_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, model) = demo(dir.path(), 10);
        let ds = Arc::new(Dataset::open(&cfg, &model).unwrap());
        assert_eq!(ds.epoch_len(), ds.order(5, 3).len());
        let direct: Vec<Vec<String>> = (0..7).map(|s| ds.load_step(5, 3, s).unwrap().ids).collect();
        // 3 per step over 10 samples: each epoch holds every sample once.
        let first_epoch: HashSet<&String> = direct.iter().flatten().take(10).collect();
        assert_eq!(first_epoch.len(), 10);
        let mut p = Prefetcher::new(ds.clone(), 5, 3, 2, 2);
        for (s, want) in direct.iter().enumerate().skip(2) {
            let got = p.next_batch().unwrap();
            assert_eq!((got.step, &got.ids), (s as u64, want));
        }
        let b = ds.load_step(5, 3, 0).unwrap();
        b.batch.prepare(&model).unwrap();
        assert_eq!(b.batch.pixel_values.len(), 3 * 3 * 40 * 40);
    }

    /// Dynamic S2 end to end through the loader: wide and tall images get
    /// their own grids, the header cost counts exactly the tiles the batch
    /// carries, and the tiny model trains on the batch.
    #[test]
    fn dynamic_s2_batches_carry_per_image_grids_and_match_the_header_cost() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, model) = demo(dir.path(), 6);
        cfg.image_aspect_ratio = AspectMode::DynamicS2;
        cfg.max_tiles = 6;
        // Replace two demo images by a wide and a tall one.
        for (i, (w, h)) in [(0, (90u32, 30u32)), (1, (20, 70))] {
            let img =
                image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
            img.save(dir.path().join(format!("images/train_{i:05}.png"))).unwrap();
        }
        let ds = Dataset::open(&cfg, &model).unwrap();
        let refs: Vec<(usize, usize)> = (0..6).map(|i| (0, i)).collect();
        let b = ds.load_samples(&refs, 0).unwrap();
        assert!(b.bad.is_empty(), "{:?}", b.bad);
        let grids = &b.batch.tile_grids;
        assert_eq!(grids.len(), 6);
        assert_eq!(grids[0], TileGrid { rows: 1, cols: 4 }, "90 x 30 is wide");
        assert_eq!(grids[1], TileGrid { rows: 4, cols: 1 }, "20 x 70 is tall");
        assert!(grids[2..].iter().all(|&g| g == TileGrid::square(2)), "square demo images keep 2 x 2");
        let prep = b.batch.prepare(&model).unwrap();
        let header: usize = refs.iter().map(|&(p, i)| ds.cost(&model, p, i).unwrap().tiles).sum();
        assert_eq!(prep.tiles, header, "the cost counts the tiles the model runs");
        assert_eq!(prep.tiles, 6 * 5);
        // The tiny model trains on it: the loss drops on repeated steps.
        use crate::engine::Backend;
        let be = crate::engine::cpu::Cpu::<f32>::new();
        let mut vlm = crate::model::Vlm::new(
            &model,
            crate::model::ParamStore::init(&be, &model, 1),
            crate::model::Recompute::None,
        );
        let mut losses = Vec::new();
        for _ in 0..3 {
            vlm.params.zero_grads(&be);
            losses.push(vlm.forward_backward(&be, &b.batch, None).unwrap().mean());
            for i in 0..vlm.params.values.len() {
                let g = vlm.params.grads[i].clone();
                be.axpy(-0.05, &g, &mut vlm.params.values[i]);
            }
        }
        assert!(losses.iter().all(|l| l.is_finite()) && losses[2] < losses[0], "{losses:?}");

        cfg.max_tiles = 3;
        let err = Dataset::open(&cfg, &model).err().expect("too few tiles");
        assert!(err.to_string().contains("data.max_tiles"), "{err}");
    }

    /// A saved model says how its images were prepared (VILA/NVILA keys), and
    /// evaluating it from the model directory prepares them the same way.
    #[test]
    fn model_dir_records_and_restores_image_preprocessing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, model) = demo(dir.path(), 2);
        let m = dir.path().join("model");
        hf_config::write_model_config(&m, &model).unwrap();
        let top = |m: &Path| hf_config::read_top_config(m).unwrap().1;
        assert_eq!(top(&m)["image_aspect_ratio"], "resize");
        cfg.image_aspect_ratio = AspectMode::DynamicS2;
        cfg.max_tiles = 6;
        cfg.record_image_preprocessing(&m).unwrap();
        let t = top(&m);
        assert_eq!(
            (&t["image_aspect_ratio"], &t["dynamic_s2"], &t["max_tiles"]),
            (&"dynamic_s2".into(), &true.into(), &6.into())
        );
        assert_eq!(hf_config::read_model_config(&m).unwrap(), model, "the model config still reads");
        let restored = DatasetIndex::demo_config(dir.path()).with_model_image_preprocessing(&m).unwrap();
        assert_eq!((restored.image_aspect_ratio, restored.max_tiles), (AspectMode::DynamicS2, 6));
        // Back to static: the dynamic keys go.
        cfg.image_aspect_ratio = AspectMode::Pad;
        cfg.record_image_preprocessing(&m).unwrap();
        let t = top(&m);
        assert_eq!(t["image_aspect_ratio"], "pad");
        assert!(!t.contains_key("dynamic_s2") && !t.contains_key("max_tiles"));
        // A preprocessing Tessera does not do is named, not ignored.
        hf_config::update_top_config(&m, |t| {
            t.insert("image_aspect_ratio".into(), "anyres".into());
        })
        .unwrap();
        let err = DatasetIndex::demo_config(dir.path()).with_model_image_preprocessing(&m).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("anyres"), "{err}");
    }

    #[test]
    fn bad_samples_are_skipped_and_reported_or_fail_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, model) = demo(dir.path(), 4);
        std::fs::write(dir.path().join("images/train_00001.png"), b"").unwrap();
        let ds = Dataset::open(&cfg, &model).unwrap();
        let mut bad = Vec::new();
        let mut good = 0;
        for s in 0..2 {
            let b = ds.load_step(0, 2, s).unwrap();
            good += b.ids.len();
            bad.extend(b.bad);
        }
        assert_eq!((good, bad.len()), (3, 1));
        assert_eq!(bad[0].id, "train-1");
        assert!(bad[0].reason.contains("train_00001.png"), "{}", bad[0].reason);
        cfg.on_bad_sample = OnBadSample::Fail;
        let ds = Dataset::open(&cfg, &model).unwrap();
        let err = (0..2).find_map(|s| ds.load_step(0, 2, s).err()).expect("a step must fail");
        assert!(err.to_string().contains("train-1"), "{err}");
    }

    #[test]
    fn cost_comes_from_the_header_and_max_length_defaults_to_the_llm_room() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, model) = demo(dir.path(), 3);
        let ds = Dataset::open(&cfg, &model).unwrap();
        // 512 positions, of which the image takes 9 for its one placeholder.
        assert_eq!(ds.max_len, model.llm.max_position_embeddings - (model.image_tokens() - 1));
        let c = ds.cost(&model, 0, 0).unwrap();
        let e = ds.example(0, 0).unwrap();
        assert_eq!(c, SampleCost { tiles: 5, tokens: e.tokens.input_ids.len() - 1 + 9 });
        // Without its image file a sample has no cost: it is a bad sample.
        let png = dir.path().join("images/train_00001.png");
        std::fs::remove_file(&png).unwrap();
        let err = ds.cost(&model, 0, 1).unwrap_err();
        assert_eq!(err.id, "train-1");
    }
}
