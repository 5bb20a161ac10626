//! The datasets of a job as an index: records read and checked, their
//! weighted mix into one stream, the tokenizer, and each sample's cost from
//! its text and its image header. The coordinator plans from it; the worker
//! loads batches through it (`tessera_worker::data::loader`).
//!
//! The content of step `s` is a pure function of (seed, s, batch size) and
//! the datasets: position `p = s * batch + k` of the sample stream is sample
//! `order(epoch = p / len)[p % len]`, where `order` is `dataset::mix` for
//! that epoch. A resumed run asks for the same steps and sees the same samples.

use super::dataset::{contribution, mix, read_dataset, DatasetSpec};
use super::template::{tokenize, TemplateKind, Tokenized};
use super::{BadSample, OnBadSample, Sample};
use crate::cost::SampleCost;
use crate::hf_config;
use crate::image::{header_tiles, AspectMode, ImageConfig};
use crate::model::{ModelConfig, S2Config};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The `[data]` section of a job config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub datasets: Vec<DatasetSpec>,
    /// Held-out data scored after training (`worker eval` does the same).
    #[serde(default)]
    pub eval_datasets: Vec<DatasetSpec>,
    /// A Hugging Face `tokenizer.json`.
    pub tokenizer: PathBuf,
    #[serde(default = "default_template")]
    pub template: TemplateKind,
    /// `resize` (VILA 1.5 S2 models), `pad`, or `dynamic_s2` (NVILA: the
    /// largest S2 scale is cut into the tile grid closest to the image's
    /// aspect ratio, at most `max_tiles` tiles).
    #[serde(default)]
    pub image_aspect_ratio: AspectMode,
    /// `dynamic_s2` only: the most tiles of the largest scale (NVILA: 12).
    #[serde(default = "default_max_tiles")]
    pub max_tiles: usize,
    /// Images whose header declares more pixels are refused before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Token limit per sample; defaults to the LLM's max_position_embeddings
    /// less the image tokens.
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub on_bad_sample: OnBadSample,
    /// Batches prepared ahead by background threads.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

fn default_template() -> TemplateKind {
    TemplateKind::VicunaV1
}
fn default_max_pixels() -> u64 {
    ImageConfig::new(1).max_pixels
}
fn default_max_tiles() -> usize {
    ImageConfig::new(1).max_tiles
}
fn default_prefetch() -> usize {
    2
}

impl DataConfig {
    /// Records in a model directory's `config.json` how its images were
    /// prepared, as VILA and NVILA read it: `image_aspect_ratio` ("resize",
    /// "pad" or "dynamic_s2"), and for dynamic S2 `dynamic_s2: true` and
    /// `max_tiles`.
    pub fn record_image_preprocessing(&self, model_dir: &Path) -> Result<()> {
        let mode = serde_json::to_value(self.image_aspect_ratio)?;
        let dynamic = self.image_aspect_ratio == AspectMode::DynamicS2;
        let max_tiles = self.max_tiles;
        hf_config::update_top_config(model_dir, |top| {
            top.insert("image_aspect_ratio".into(), mode);
            if dynamic {
                top.insert("dynamic_s2".into(), true.into());
                top.insert("max_tiles".into(), max_tiles.into());
            } else {
                top.remove("dynamic_s2");
                top.remove("max_tiles");
            }
        })
    }

    /// Takes `image_aspect_ratio` and `max_tiles` from a model directory's
    /// `config.json`, so a saved model is evaluated on images prepared the
    /// way it was trained. Keys that are absent leave the setting as it is.
    pub fn with_model_image_preprocessing(mut self, model_dir: &Path) -> Result<Self> {
        let (path, top) = hf_config::read_top_config(model_dir)?;
        if let Some(v) = top.get("image_aspect_ratio") {
            self.image_aspect_ratio = serde_json::from_value(v.clone()).map_err(|_| {
                anyhow::anyhow!(
                    "{path}: image_aspect_ratio is {v}; Tessera prepares \"resize\", \"pad\" or \"dynamic_s2\""
                )
            })?;
        }
        if let Some(v) = top.get("max_tiles") {
            self.max_tiles = v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| anyhow::anyhow!("{path}: max_tiles is {v}; expected a positive integer"))?;
        }
        Ok(self)
    }
}

/// The datasets of a job, read and indexed, with the tokenizer: what a
/// sample is, where it sits in the stream, and what it costs.
pub struct DatasetIndex {
    pub cfg: DataConfig,
    pub image: ImageConfig,
    /// The model's S2 scales the images are cut for.
    pub s2: S2Config,
    pub max_len: usize,
    parts: Vec<(DatasetSpec, Vec<Sample>)>,
    tokenizer: tokenizers::Tokenizer,
    /// Records refused while reading the files.
    pub bad_records: Vec<BadSample>,
    epoch_order: Mutex<Option<CachedOrder>>,
}

/// (seed, epoch, order): the last epoch order computed.
type CachedOrder = (u64, u64, Arc<Vec<(usize, usize)>>);

impl DatasetIndex {
    /// The evaluation split of `cfg` (its `eval_datasets`) as a dataset.
    pub fn open_eval(cfg: &DataConfig, model: &ModelConfig) -> Result<Self> {
        Self::open(&DataConfig { datasets: cfg.eval_datasets.clone(), eval_datasets: vec![], ..cfg.clone() }, model)
    }

    /// The demo layout `DIR/{train,eval}.jsonl`, `DIR/images`, `DIR/tokenizer.json`.
    pub fn demo_config(dir: &std::path::Path) -> DataConfig {
        let spec = |f: &str| DatasetSpec { path: dir.join(f), image_folder: dir.join("images"), weight: 1.0 };
        DataConfig {
            datasets: vec![spec("train.jsonl")],
            eval_datasets: vec![spec("eval.jsonl")],
            tokenizer: dir.join("tokenizer.json"),
            template: default_template(),
            image_aspect_ratio: AspectMode::Resize,
            max_tiles: default_max_tiles(),
            max_pixels: default_max_pixels(),
            max_length: None,
            on_bad_sample: OnBadSample::Skip,
            prefetch: default_prefetch(),
        }
    }

    pub fn open(cfg: &DataConfig, model: &ModelConfig) -> Result<Self> {
        if cfg.datasets.is_empty() {
            bail!("data.datasets: at least one dataset is needed");
        }
        if cfg.prefetch == 0 {
            bail!("data.prefetch: must be at least 1");
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&cfg.tokenizer)
            .map_err(|e| anyhow::anyhow!("data.tokenizer: cannot load {}: {e}", cfg.tokenizer.display()))?;
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > model.llm.vocab_size {
            bail!(
                "data.tokenizer: {} has {vocab} tokens but the model's vocabulary is {}",
                cfg.tokenizer.display(),
                model.llm.vocab_size
            );
        }
        let mut parts = Vec::new();
        let mut bad_records = Vec::new();
        for spec in &cfg.datasets {
            let read = read_dataset(spec, cfg.on_bad_sample)?;
            bad_records.extend(read.bad);
            parts.push((spec.clone(), read.samples));
        }
        if parts.iter().all(|(_, s)| s.is_empty()) {
            bail!("data.datasets: no usable sample in {} dataset(s)", parts.len());
        }
        let room = model.max_text_tokens();
        let max_len = cfg.max_length.unwrap_or(room).min(room);
        let image = ImageConfig {
            size: model.s2.max_scale(),
            mode: cfg.image_aspect_ratio,
            max_pixels: cfg.max_pixels,
            max_tiles: cfg.max_tiles,
            tile_size: model.s2.max_split_size,
            ..ImageConfig::new(model.s2.max_scale())
        };
        if cfg.image_aspect_ratio == AspectMode::DynamicS2 {
            let n = model.s2.splits().last().copied().unwrap_or(1);
            if cfg.max_tiles < n * n {
                bail!(
                    "data.max_tiles: {} is fewer than the {} tiles of the largest S2 scale ({n} x {n} tiles of {} px); dynamic_s2 needs at least that many",
                    cfg.max_tiles,
                    n * n,
                    model.s2.max_split_size
                );
            }
        }
        Ok(DatasetIndex {
            cfg: cfg.clone(),
            image,
            s2: model.s2.clone(),
            max_len,
            parts,
            tokenizer,
            bad_records,
            epoch_order: Mutex::new(None),
        })
    }

    /// Every usable sample once, in file order (evaluation).
    pub fn indices(&self) -> Vec<(usize, usize)> {
        self.parts.iter().enumerate().flat_map(|(p, (_, s))| (0..s.len()).map(move |i| (p, i))).collect()
    }

    /// Samples in one epoch (after weighting); the same for every epoch and seed.
    pub fn epoch_len(&self) -> usize {
        self.parts.iter().map(|(spec, samples)| contribution(spec.weight, samples.len())).sum()
    }

    /// The order of epoch `epoch`: `dataset::mix` of the parts, cached.
    pub fn order(&self, seed: u64, epoch: u64) -> Arc<Vec<(usize, usize)>> {
        let mut cache = self.epoch_order.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, e, o)) = cache.as_ref() {
            if (*s, *e) == (seed, epoch) {
                return o.clone();
            }
        }
        let o = Arc::new(mix(&self.parts, seed, epoch));
        *cache = Some((seed, epoch, o.clone()));
        o
    }

    /// The cost of a sample from its text and its image *header* only.
    pub fn cost(&self, model: &ModelConfig, part: usize, index: usize) -> Result<SampleCost, BadSample> {
        let s = &self.parts[part].1[index];
        let n = self.tokenize(part, index)?.input_ids.len();
        match &s.image {
            Some(p) => {
                let tiles =
                    header_tiles(p, &self.image, &model.s2).map_err(|e| BadSample::new(&s.id, e.to_string()))?;
                Ok(SampleCost { tiles, tokens: n - 1 + model.image_tokens() })
            }
            None => Ok(SampleCost { tiles: 0, tokens: n }),
        }
    }

    /// The record of a sample.
    pub fn record(&self, part: usize, index: usize) -> Option<&Sample> {
        self.parts.get(part).and_then(|(_, s)| s.get(index))
    }

    /// A sample's tokens, as the step gets them.
    pub fn tokenize(&self, part: usize, index: usize) -> Result<Tokenized, BadSample> {
        let s = &self.parts[part].1[index];
        tokenize(s, self.cfg.template, &self.tokenizer, self.max_len)
    }

    /// The sample at position `pos` of the stream: `order(pos / len)[pos % len]`.
    pub fn sample_at(&self, seed: u64, pos: u64) -> Result<(usize, usize)> {
        let len = self.epoch_len() as u64;
        if len == 0 {
            bail!("data.datasets: every dataset has weight 0, so an epoch holds no sample");
        }
        Ok(self.order(seed, pos / len)[(pos % len) as usize])
    }

    /// The samples at stream positions `first..first + count`.
    pub fn samples_at(&self, seed: u64, first: u64, count: usize) -> Result<Vec<(usize, usize)>> {
        (first..first + count as u64).map(|pos| self.sample_at(seed, pos)).collect()
    }
}
