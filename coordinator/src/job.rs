//! Reading the job config for a multi-worker run and turning it into the
//! job spec every worker receives on Join.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tessera_job::config::model_config;
use tessera_job::config::TrainJob;
use tessera_proto::v1::JobSpec;

/// Reads and validates the job config. Relative paths in it are taken from
/// the coordinator's working directory and sent to workers as absolute
/// paths, so a worker started elsewhere on a shared file system finds them.
pub fn load(path: &Path) -> Result<TrainJob> {
    let mut job = TrainJob::from_file(path)?;
    let data = job.data.as_mut().with_context(|| {
        format!("job config {}: [data] is missing; a multi-worker job trains on a dataset", path.display())
    })?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let abs = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = cwd.join(&*p);
        }
    };
    abs(&mut data.tokenizer);
    for d in data.datasets.iter_mut().chain(data.eval_datasets.iter_mut()) {
        abs(&mut d.path);
        abs(&mut d.image_folder);
    }
    if let Some(dir) = job.model.dir.as_mut() {
        abs(dir);
    }
    if let Some(dir) = job.checkpoint.dir.as_mut() {
        abs(dir);
    }
    Ok(job)
}

/// Samples per optimizer step over all ranks, whatever the world size:
/// `batch_size x grad_accum`, the same stream positions a single process
/// (`worker train`) trains on in one step. Each rank cuts its share into
/// `grad_accum` micro-batches.
pub fn global_batch(job: &TrainJob) -> usize {
    job.train.batch_size * job.train.grad_accum
}

pub fn spec(job: &TrainJob, output_dir: Option<&Path>) -> Result<JobSpec> {
    let cfg = model_config(job)?;
    Ok(JobSpec {
        config_toml: toml::to_string(job).context("cannot serialize the job config")?,
        total_steps: job.train.steps,
        global_batch: global_batch(job) as u32,
        seed: job.train.seed,
        s2_scales: cfg.s2.scales.iter().map(|&s| s as u32).collect(),
        output_dir: output_dir.map(|p| p.display().to_string()).unwrap_or_default(),
        heartbeat_interval_s: job.cluster.heartbeat_interval_s,
    })
}
