//! The training job config (TOML), e.g. `configs/tiny.toml`: one schema for
//! `worker train` (one process) and the coordinator (many workers), with its
//! validation and the model shape it names.

use crate::data::DataConfig;
use crate::hf_config;
use crate::model::{ModelConfig, Module, Trainable};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// A preset name: tiny, small or vila-3b-s2.
    pub preset: Option<String>,
    /// Or a model directory in the VILA layout.
    pub dir: Option<PathBuf>,
    /// Which modules recompute their activations during backward instead
    /// of keeping them from forward: "none", "vit", "llm" or "all".
    #[serde(default)]
    pub recompute: Recompute,
    /// The old spelling of `recompute = "vit"`, refused with the new one.
    #[serde(default, skip_serializing)]
    pub recompute_vit: Option<bool>,
    /// Override the preset's S2 scales (e.g. `[20]` for a one-scale baseline).
    #[serde(default)]
    pub s2_scales: Option<Vec<usize>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Text tokens per synthetic sample (without a `[data]` section).
    #[serde(default = "sixteen")]
    pub text_tokens: usize,
    #[serde(default)]
    pub seed: u64,
    /// Fraction of the steps spent warming up (VILA: 0.03).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// How a GPU computes: "tf32" (default: f32 storage, TF32 GEMMs),
    /// "bf16" (mixed precision: bf16 activations and weight copies, f32
    /// masters, gradients and optimizer state) or "f32"; the CPU ignores it.
    #[serde(default)]
    pub precision: Precision,
}

fn one() -> usize {
    1
}

fn sixteen() -> usize {
    16
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainJob {
    pub model: ModelSource,
    pub train: TrainSection,
    #[serde(default)]
    pub optim: OptimConfig,
    /// Real data; without it the job trains on synthetic batches.
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// How many workers train together (read by the coordinator).
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Where and how often to checkpoint; a run resumes from the newest
    /// intact checkpoint there.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
}

/// The `[checkpoint]` section (train/checkpoint.rs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Checkpoints go here, one `step-NNNNNNNN` directory each; none: no checkpoints.
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
    /// Steps between checkpoints (the last step is always checkpointed).
    #[serde(default = "hundred")]
    pub every: u64,
    /// Committed checkpoints kept; older ones are deleted after a newer commit.
    #[serde(default = "three")]
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection { dir: None, every: hundred(), keep: three() }
    }
}

fn hundred() -> u64 {
    100
}

fn three() -> usize {
    3
}

/// The `[cluster]` section: the multi-worker job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Workers that train together; the global batch is split among them.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Seconds between a worker's heartbeats.
    #[serde(default = "two")]
    pub heartbeat_interval_s: f64,
    /// Seconds the coordinator waits for all `world_size` workers to join
    /// before it gives up on the job.
    #[serde(default = "ten_minutes")]
    pub join_timeout_s: f64,
    /// Gradient buckets all-reduced while backward continues: a small first
    /// one so communication starts early, then buckets of `bucket_mb` (DDP's
    /// defaults).
    #[serde(default = "first_bucket_mb")]
    pub first_bucket_mb: f64,
    #[serde(default = "bucket_mb")]
    pub bucket_mb: f64,
    /// A rank whose compute time exceeds the median over ranks by this
    /// factor is flagged as a straggler (log and metrics.jsonl).
    #[serde(default = "straggler_factor")]
    pub straggler_factor: f64,
    /// Recoveries allowed: a rank that dies or fails starts a new
    /// generation that resumes from the last committed checkpoint, up to
    /// this many times over the job's life (0: a failure fails the job).
    #[serde(default = "three_u32")]
    pub max_restarts: u32,
    /// After a failure, go on with the ranks that are left when no
    /// replacement joins within `elastic_timeout_s` (the global batch is kept).
    #[serde(default)]
    pub elastic: bool,
    #[serde(default = "thirty")]
    pub elastic_timeout_s: f64,
}

fn three_u32() -> u32 {
    3
}

fn thirty() -> f64 {
    30.0
}

fn straggler_factor() -> f64 {
    1.5
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            world_size: 1,
            heartbeat_interval_s: two(),
            join_timeout_s: ten_minutes(),
            first_bucket_mb: first_bucket_mb(),
            straggler_factor: straggler_factor(),
            bucket_mb: bucket_mb(),
            max_restarts: three_u32(),
            elastic: false,
            elastic_timeout_s: thirty(),
        }
    }
}

fn two() -> f64 {
    2.0
}
fn ten_minutes() -> f64 {
    600.0
}
fn first_bucket_mb() -> f64 {
    1.0
}
fn bucket_mb() -> f64 {
    25.0
}

impl TrainJob {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read job config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("job config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        // toml's messages name the key and line of a bad or unknown field.
        let job: TrainJob =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().replace('\n', " ")))?;
        job.validate()?;
        Ok(job)
    }

    pub fn validate(&self) -> Result<()> {
        match (&self.model.preset, &self.model.dir) {
            (Some(_), Some(_)) => bail!("model: set either `preset` or `dir`, not both"),
            (None, None) => bail!("model: set `preset` (tiny, small, vila-3b-s2) or `dir`"),
            (Some(p), None) => {
                ModelConfig::named_preset(p).context("model.preset")?;
            }
            _ => {}
        }
        if let Some(old) = self.model.recompute_vit {
            let new = if old { "\"vit\"" } else { "\"none\"" };
            bail!(
                "model.recompute_vit: renamed; write `recompute = {new}` (one of \"none\", \"vit\", \"llm\", \"all\")"
            );
        }
        let t = &self.train;
        if t.steps == 0 {
            bail!("train.steps: must be positive");
        }
        if t.batch_size == 0 {
            bail!("train.batch_size: must be positive");
        }
        if t.grad_accum == 0 {
            bail!("train.grad_accum: must be positive");
        }
        if t.text_tokens < 2 {
            bail!("train.text_tokens: must be at least 2 (a prompt and an answer)");
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            bail!("train.warmup_ratio: {} is not in [0, 1)", t.warmup_ratio);
        }
        if self.cluster.straggler_factor.is_nan() || self.cluster.straggler_factor <= 1.0 {
            bail!("cluster.straggler_factor: {} must be above 1 (a rank this many times slower than the median is flagged)", self.cluster.straggler_factor);
        }
        if self.checkpoint.every == 0 {
            bail!("checkpoint.every: must be positive");
        }
        if self.checkpoint.keep == 0 {
            bail!("checkpoint.keep: must be positive (the newest checkpoint is always kept)");
        }
        let o = &self.optim;
        for (key, v) in [
            ("optim.lr.vision_tower", o.lr.vision_tower),
            ("optim.lr.projector", o.lr.projector),
            ("optim.lr.llm", o.lr.llm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{key}: {v} is not a non-negative learning rate");
            }
        }
        if o.freeze.vision_tower && o.freeze.projector && o.freeze.llm {
            bail!("optim.freeze: every module is frozen, nothing would train");
        }
        let c = &self.cluster;
        if c.world_size == 0 {
            bail!("cluster.world_size: must be positive");
        }
        if !(c.heartbeat_interval_s.is_finite() && c.heartbeat_interval_s > 0.0) {
            bail!("cluster.heartbeat_interval_s: {} is not a positive number of seconds", c.heartbeat_interval_s);
        }
        if !(c.elastic_timeout_s.is_finite() && c.elastic_timeout_s > 0.0) {
            bail!("cluster.elastic_timeout_s: {} is not a positive number of seconds", c.elastic_timeout_s);
        }
        if !(c.join_timeout_s.is_finite() && c.join_timeout_s > 0.0) {
            bail!("cluster.join_timeout_s: {} is not a positive number of seconds", c.join_timeout_s);
        }
        for (key, v) in [("cluster.first_bucket_mb", c.first_bucket_mb), ("cluster.bucket_mb", c.bucket_mb)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{key}: {v} is not a positive size in MB");
            }
        }
        Ok(())
    }
}

/// Activation recomputation (`[model] recompute`): a module that
/// recomputes keeps only each layer's input during forward and runs the
/// layer again just before its backward. Gradients are the same bits
/// either way; it costs about one more forward of that module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    #[default]
    None,
    /// The ViT (its activations scale with the S2 tile count).
    Vit,
    /// The LLM decoder.
    Llm,
    /// Both.
    All,
}

impl Recompute {
    pub fn parse(s: &str) -> Result<Recompute> {
        match s {
            "none" => Ok(Recompute::None),
            "vit" => Ok(Recompute::Vit),
            "llm" => Ok(Recompute::Llm),
            "all" => Ok(Recompute::All),
            _ => bail!("recompute {s:?}: expected none, vit, llm or all"),
        }
    }
    pub fn vit(self) -> bool {
        matches!(self, Recompute::Vit | Recompute::All)
    }
    pub fn llm(self) -> bool {
        matches!(self, Recompute::Llm | Recompute::All)
    }
}

/// How a GPU computes (`[train] precision`); the CPU always computes f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere, GEMMs included.
    F32,
    /// f32 storage, GEMMs on the tensor cores in TF32 (PyTorch's
    /// `allow_tf32`): about 1e-3 relative per product, much faster.
    #[default]
    Tf32,
    /// bf16 mixed precision: activations and the weights' compute copies
    /// in bf16 (half the memory and traffic), GEMMs on the tensor cores in
    /// bf16 with f32 accumulation (twice TF32's rate), the other ops in f32
    /// arithmetic; f32 master weights, gradients and AdamW state.
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => bail!("precision {s:?}: expected f32, tf32 or bf16"),
        }
    }
}

/// Per-module values (learning rates): vision tower, projector, LLM.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerModule<T> {
    pub vision_tower: T,
    pub projector: T,
    pub llm: T,
}

impl<T: Copy> PerModule<T> {
    pub fn all(v: T) -> Self {
        PerModule { vision_tower: v, projector: v, llm: v }
    }
    pub fn get(&self, m: Module) -> T {
        match m {
            Module::VisionTower => self.vision_tower,
            Module::Projector => self.projector,
            Module::Llm => self.llm,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: PerModule<f32>,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f32,
    pub freeze: PerModule<bool>,
}

impl Default for OptimConfig {
    /// VILA 1.5 stage 3 (everything trainable, lr 1e-4, no weight decay).
    fn default() -> Self {
        OptimConfig {
            lr: PerModule::all(1e-4),
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            total_steps: 1,
            max_grad_norm: 1.0,
            freeze: PerModule::all(false),
        }
    }
}

impl OptimConfig {
    pub fn trainable(&self) -> Trainable {
        Trainable { vision_tower: !self.freeze.vision_tower, projector: !self.freeze.projector, llm: !self.freeze.llm }
    }
}

pub fn model_config(job: &TrainJob) -> Result<ModelConfig> {
    let mut cfg = match (&job.model.dir, &job.model.preset) {
        (Some(dir), _) => hf_config::read_model_config(dir)?,
        (None, Some(name)) => ModelConfig::named_preset(name).context("model.preset")?,
        (None, None) => bail!("model: set `preset` or `dir`"),
    };
    if let Some(scales) = &job.model.s2_scales {
        if job.model.dir.is_some() {
            bail!("model.s2_scales: only a preset's scales can be overridden; a model directory fixes its own");
        }
        cfg.s2.scales = scales.clone();
        cfg.validate().context("model.s2_scales")?;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
preset = "tiny"
[train]
steps = 10
batch_size = 2
text_tokens = 8
[optim.lr]
vision_tower = 1e-4
projector = 1e-3
llm = 5e-5
[optim.freeze]
vision_tower = false
projector = false
llm = true
"#;

    #[test]
    fn parses_per_module_lr_and_freeze() {
        let j = TrainJob::parse(GOOD).unwrap();
        assert_eq!(j.optim.lr.projector, 1e-3);
        assert!(j.optim.freeze.llm && !j.optim.freeze.vision_tower);
        assert_eq!(j.train.grad_accum, 1);
    }

    #[test]
    fn errors_name_the_key() {
        let e = TrainJob::parse(&GOOD.replace("steps = 10", "steps = 0")).unwrap_err().to_string();
        assert!(e.contains("train.steps"), "{e}");
        let e = TrainJob::parse(&GOOD.replace("batch_size = 2", "batch_size = 2\nbatch = 3")).unwrap_err().to_string();
        assert!(e.contains("batch"), "{e}");
        let e = TrainJob::parse(&GOOD.replace("\"tiny\"", "\"huge\"")).unwrap_err().to_string();
        assert!(e.contains("model.preset"), "{e}");
        let e = TrainJob::parse(&GOOD.replace("steps = 10", "steps = \"ten\"")).unwrap_err().to_string();
        assert!(e.contains("steps"), "{e}");
        let e = TrainJob::parse(&format!("{GOOD}\n[cluster]\nworld_size = 0\n")).unwrap_err().to_string();
        assert!(e.contains("cluster.world_size"), "{e}");
        let e = TrainJob::parse(&format!("{GOOD}\n[cluster]\nbucket_mb = -1\n")).unwrap_err().to_string();
        assert!(e.contains("cluster.bucket_mb"), "{e}");
        let e = TrainJob::parse(&format!("{GOOD}\n[cluster]\nstraggler_factor = 1.0\n")).unwrap_err().to_string();
        assert!(e.contains("cluster.straggler_factor"), "{e}");
        let e = TrainJob::parse(&format!("{GOOD}\n[checkpoint]\nevery = 0\n")).unwrap_err().to_string();
        assert!(e.contains("checkpoint.every"), "{e}");
        let e = TrainJob::parse(&format!("{GOOD}\n[checkpoint]\nkeep = 0\n")).unwrap_err().to_string();
        assert!(e.contains("checkpoint.keep"), "{e}");
        let e = TrainJob::parse(&format!("{GOOD}\n[checkpoint]\nevry = 5\n")).unwrap_err().to_string();
        assert!(e.contains("evry"), "{e}");
    }

    /// `[train] precision`: TF32 by default, f32 or bf16 on request,
    /// anything else refused by name.
    #[test]
    fn precision_is_tf32_unless_asked() {
        assert_eq!(TrainJob::parse(GOOD).unwrap().train.precision, Precision::Tf32);
        let f32_job = GOOD.replace("steps = 10", "steps = 10\nprecision = \"f32\"");
        assert_eq!(TrainJob::parse(&f32_job).unwrap().train.precision, Precision::F32);
        let bf16_job = GOOD.replace("steps = 10", "steps = 10\nprecision = \"bf16\"");
        assert_eq!(TrainJob::parse(&bf16_job).unwrap().train.precision, Precision::Bf16);
        let e = TrainJob::parse(&GOOD.replace("steps = 10", "steps = 10\nprecision = \"fp8\"")).unwrap_err();
        assert!(format!("{e:#}").contains("precision"), "{e:#}");
    }

    #[test]
    fn recompute_names_the_modules_and_the_old_key_is_refused_with_the_new_one() {
        assert_eq!(TrainJob::parse(GOOD).unwrap().model.recompute, Recompute::None);
        for (word, want, vit, llm) in [
            ("none", Recompute::None, false, false),
            ("vit", Recompute::Vit, true, false),
            ("llm", Recompute::Llm, false, true),
            ("all", Recompute::All, true, true),
        ] {
            let job = GOOD.replace("preset = \"tiny\"", &format!("preset = \"tiny\"\nrecompute = \"{word}\""));
            let r = TrainJob::parse(&job).unwrap().model.recompute;
            assert_eq!((r, r.vit(), r.llm()), (want, vit, llm), "{word}");
        }
        let bad = GOOD.replace("preset = \"tiny\"", "preset = \"tiny\"\nrecompute = \"some\"");
        let e = format!("{:#}", TrainJob::parse(&bad).unwrap_err());
        assert!(e.contains("recompute") || e.contains("some"), "{e}");
        let old = GOOD.replace("preset = \"tiny\"", "preset = \"tiny\"\nrecompute_vit = true");
        let e = format!("{:#}", TrainJob::parse(&old).unwrap_err());
        assert!(e.contains("recompute = \"vit\""), "{e}");
    }

    #[test]
    fn committed_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                TrainJob::from_file(&p).unwrap();
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
