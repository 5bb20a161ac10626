//! The single-process training job config (TOML), e.g. `configs/tiny.toml`.

use super::optimizer::OptimConfig;
use crate::data::loader::DataConfig;
use crate::model::ModelConfig;
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
    /// Recompute ViT activations during backward.
    #[serde(default)]
    pub recompute_vit: bool,
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
        Ok(())
    }
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
