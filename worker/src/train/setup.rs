//! The job's model and optimizer, built from its config (the model shape
//! itself is `tessera_job::config::model_config`): the weights every rank
//! starts from and the optimizer with the job's schedule.

use super::schedule::warmup_steps;
use super::{OptimConfig, Optimizer};
use crate::engine::Backend;
use crate::model::memory::MemoryJob;
use crate::model::{ModelConfig, ParamStore, Vlm};
use anyhow::Result;
use tessera_job::config::TrainJob;

/// The job's model (loaded from its directory, or initialized from the job
/// seed, so every rank of a multi-worker job starts from the same weights)
/// and its optimizer with the job's schedule. On a GPU, a job whose plan
/// for one of `world_size` ranks does not fit the device is refused first,
/// with the numbers, before anything is allocated.
pub fn build_model<B: Backend>(
    be: &B,
    job: &TrainJob,
    cfg: &ModelConfig,
    world_size: usize,
) -> Result<(Vlm<B>, Optimizer<B>)> {
    if let Some(capacity) = be.memory_capacity_bytes() {
        // The capacity is what buffers may use: no device reserve on top.
        MemoryJob { reserve_bytes: 0, ..MemoryJob::from_job(job, world_size)? }.check_fits(capacity)?;
    }
    let t = &job.train;
    let params = match &job.model.dir {
        Some(dir) => ParamStore::from_dir(be, cfg, dir)?,
        None => ParamStore::init(be, cfg, t.seed),
    };
    let vlm = Vlm::new(cfg, params, job.model.recompute);
    let oc =
        OptimConfig { warmup_steps: warmup_steps(t.warmup_ratio, t.steps), total_steps: t.steps, ..job.optim.clone() };
    let opt = Optimizer::new(be, oc, &vlm.params);
    Ok((vlm, opt))
}
