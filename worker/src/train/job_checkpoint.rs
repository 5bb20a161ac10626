//! A job's checkpoints, on top of the format in `checkpoint`: when one is
//! due, writing it (from a single process, or one rank's part of a
//! multi-worker one) and restoring a run from it.

use super::checkpoint;
use super::Optimizer;
use crate::codec::SaveDtype;
use crate::engine::Backend;
use crate::model::weights::{load_weights, save_model_dir};
use crate::model::{ModelConfig, ParamStore, Vlm};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tessera_job::checkpoint as manifest;
use tessera_job::config::TrainJob;

/// Loads the checkpoint in `dir`, which `manifest::latest_intact` has
/// verified (here or on the coordinator), into the model and optimizer;
/// returns the steps it had done. The checkpoint must come from this job:
/// the same seed, accumulation and model.
pub(crate) fn restore<B: Backend>(
    be: &B,
    job: &TrainJob,
    cfg: &ModelConfig,
    vlm: &mut Vlm<B>,
    opt: &mut Optimizer<B>,
    dir: &Path,
) -> Result<u64> {
    let t = &job.train;
    let c = checkpoint::load(dir, |model| load_weights(model, cfg))?;
    if c.state.seed != t.seed {
        bail!("{}: written with train.seed = {}, the job has {}", dir.display(), c.state.seed, t.seed);
    }
    if c.state.micro_batches != c.state.step * t.grad_accum as u64 {
        bail!("{}: written with another train.grad_accum; resume with the job it was written by", dir.display());
    }
    vlm.params = ParamStore::from_host(be, cfg, &c.weights)
        .with_context(|| format!("{}: the model does not match the job's", dir.display()))?;
    opt.restore(be, &vlm.params, c.state.optimizer_step, &c.m, &c.v)?;
    Ok(c.state.step)
}

/// The checkpoint root when a checkpoint is due after `done` steps:
/// every `checkpoint.every` steps, after the last one, and when `force`d.
fn checkpoint_due(job: &TrainJob, done: u64, force: bool) -> Option<&Path> {
    let ck = &job.checkpoint;
    let root = ck.dir.as_deref()?;
    (force || done.is_multiple_of(ck.every) || done == job.train.steps).then_some(root)
}

fn run_state<B: Backend>(job: &TrainJob, opt: &Optimizer<B>, done: u64) -> manifest::RunState {
    manifest::RunState {
        step: done,
        optimizer_step: opt.step,
        micro_batches: done * job.train.grad_accum as u64,
        seed: job.train.seed,
    }
}

/// Writes a checkpoint's model directory: the VILA layout in f32, with the
/// job's image preprocessing.
fn model_writer<'a>(
    job: &'a TrainJob,
    cfg: &'a ModelConfig,
    weights: &'a BTreeMap<String, Vec<f32>>,
) -> impl FnOnce(&Path) -> Result<()> + 'a {
    move |model| {
        save_model_dir(model, cfg, weights, SaveDtype::F32, None)?;
        match &job.data {
            Some(d) => d.record_image_preprocessing(model),
            None => Ok(()),
        }
    }
}

/// Checkpoints after `done` steps when due (see `checkpoint_due`), from
/// this one process; then prunes to `keep`. Returns the committed directory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint<B: Backend>(
    be: &B,
    job: &TrainJob,
    cfg: &ModelConfig,
    vlm: &Vlm<B>,
    opt: &Optimizer<B>,
    done: u64,
    force: bool,
    log: &mut dyn FnMut(&str),
) -> Result<Option<PathBuf>> {
    let Some(root) = checkpoint_due(job, done, force) else { return Ok(None) };
    let (m, v) = opt.moments_to_host(be, &vlm.params);
    let state = run_state(job, opt, done);
    let weights = vlm.params.to_host(be);
    let dir =
        checkpoint::save(root, &checkpoint::Parts { state: &state, m: &m, v: &v }, model_writer(job, cfg, &weights))?;
    manifest::prune(root, job.checkpoint.keep, None)?;
    log(&format!("checkpoint {} committed", dir.display()));
    Ok(Some(dir))
}

/// Phase one of a multi-worker checkpoint after `done` steps, when due (see
/// `checkpoint_due`): rank `rank` of `world` writes its part into the
/// staging directory of `generation` (rank 0 also the model and the run
/// state). Returns that directory and the files written, for the
/// coordinator's `manifest::commit`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_checkpoint_part<B: Backend>(
    be: &B,
    job: &TrainJob,
    cfg: &ModelConfig,
    vlm: &Vlm<B>,
    opt: &Optimizer<B>,
    done: u64,
    force: bool,
    rank: usize,
    world: usize,
    generation: u64,
) -> Result<Option<(PathBuf, Vec<manifest::FileEntry>)>> {
    let Some(root) = checkpoint_due(job, done, force) else { return Ok(None) };
    // Every rank holds every moment after the all-reduced update; the
    // optimizer downloads them all, and `write_part` writes this rank's share.
    let (m, v) = opt.moments_to_host(be, &vlm.params);
    let state = run_state(job, opt, done);
    let staging = manifest::staging_dir(root, done, generation);
    let weights = (rank == 0).then(|| vlm.params.to_host(be));
    let part = checkpoint::RankPart { rank, world, state: &state, m: &m, v: &v };
    let files = checkpoint::write_part(&staging, &part, weights.as_ref().map(|w| model_writer(job, cfg, w)))?;
    Ok(Some((staging, files)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;
    use crate::train::setup::build_model;
    use tessera_job::config::model_config;

    /// Three ranks write their parts of a tiny model's checkpoint, in any
    /// order; the commit joins them and a restore gets the step, weights
    /// and every moment back.
    #[test]
    fn checkpoint_parts_of_three_ranks_restore_the_run() {
        let root = tempfile::tempdir().unwrap();
        let toml = format!(
            "[model]\npreset = \"tiny\"\n[train]\nsteps = 10\nbatch_size = 2\ntext_tokens = 8\n[checkpoint]\ndir = {:?}\nevery = 4\n",
            root.path()
        );
        let job = TrainJob::parse(&toml).unwrap();
        let be = Cpu::<f32>::new();
        let cfg = model_config(&job).unwrap();
        let (vlm, mut opt) = build_model(&be, &job, &cfg, 1).unwrap();
        // Distinct moments, so a part lost or swapped would show.
        let fill = |x: BTreeMap<String, Vec<f32>>, k: f32| -> BTreeMap<String, Vec<f32>> {
            x.into_iter()
                .enumerate()
                .map(|(i, (n, x))| (n, (0..x.len()).map(|j| k * (i + j) as f32).collect()))
                .collect()
        };
        let (m, v) = opt.moments_to_host(&be, &vlm.params);
        let (m, v) = (fill(m, 1e-3), fill(v, 2e-6));
        opt.restore(&be, &vlm.params, 4, &m, &v).unwrap();
        let part = |done, rank| write_checkpoint_part(&be, &job, &cfg, &vlm, &opt, done, false, rank, 3, 1).unwrap();
        assert!(part(3, 0).is_none(), "not due");
        let mut files = Vec::new();
        let mut staging = PathBuf::new();
        for rank in [2, 0, 1] {
            let (dir, f) = part(4, rank).unwrap();
            (staging, files) = (dir, [files, f].concat());
        }
        assert_eq!(staging, manifest::staging_dir(root.path(), 4, 1));
        let dir = manifest::commit(root.path(), &staging, 4, files).unwrap();
        manifest::verify(&dir).unwrap();

        let (mut vlm2, mut opt2) = build_model(&be, &job, &cfg, 1).unwrap();
        assert_eq!(restore(&be, &job, &cfg, &mut vlm2, &mut opt2, &dir).unwrap(), 4);
        assert_eq!(opt2.step, 4);
        assert!(opt2.moments_to_host(&be, &vlm2.params) == (m, v));
        assert!(vlm2.params.to_host(&be) == vlm.params.to_host(&be));
    }
}
