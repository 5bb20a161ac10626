//! Runs a single-process training job from its config: model, data (real or
//! synthetic), the step loop with logging, evaluation and saving.

use super::checkpoint;
use super::schedule::warmup_steps;
use super::{train_step, OptimConfig, Optimizer};
use crate::codec::SaveDtype;
use crate::data::loader::{Dataset, Prefetcher};
use crate::engine::device::Device;
use crate::engine::Backend;
use crate::eval::{evaluate, EvalReport};
use crate::model::weights::{load_weights, save_model_dir};
use crate::model::{Batch, ModelConfig, ParamStore, Vlm};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_job::checkpoint as manifest;
use tessera_job::config::model_config;
use tessera_job::config::TrainJob;

/// One line of the step metrics (JSONL).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr_scale: f64,
    pub samples: usize,
    pub target_tokens: usize,
    /// Samples skipped as bad in this step.
    pub bad_samples: usize,
    /// Samples cut to the maximum length in this step.
    pub truncated: usize,
    pub seconds: f64,
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// Mean loss of each step.
    pub losses: Vec<f64>,
    pub steps: Vec<StepMetrics>,
    pub bad_samples: usize,
    pub eval: Option<EvalReport>,
    pub seconds: f64,
}

/// The job's model (loaded from its directory, or initialized from the job
/// seed, so every rank of a multi-worker job starts from the same weights)
/// and its optimizer with the job's schedule.
pub fn build_model<B: Backend>(be: &B, job: &TrainJob, cfg: &ModelConfig) -> Result<(Vlm<B>, Optimizer<B>)> {
    let t = &job.train;
    let params = match &job.model.dir {
        Some(dir) => ParamStore::from_dir(be, cfg, dir)?,
        None => ParamStore::init(be, cfg, t.seed),
    };
    let vlm = Vlm::new(cfg, params, job.model.recompute_vit);
    let oc =
        OptimConfig { warmup_steps: warmup_steps(t.warmup_ratio, t.steps), total_steps: t.steps, ..job.optim.clone() };
    let opt = Optimizer::new(be, oc, &vlm.params);
    Ok((vlm, opt))
}

/// Trains `job` on `device`; `out` receives the model directory at the
/// end, `metrics` one JSON line per step.
pub fn run_job(
    job: &TrainJob,
    device: Device,
    out: Option<&Path>,
    metrics: Option<&Path>,
    log: &mut dyn FnMut(&str),
) -> Result<JobReport> {
    crate::on_device!(device, job.train.precision, |be| run_job_on(be, job, out, metrics, log))
}

fn run_job_on<B: Backend>(
    be: &B,
    job: &TrainJob,
    out: Option<&Path>,
    metrics: Option<&Path>,
    log: &mut dyn FnMut(&str),
) -> Result<JobReport> {
    let ck = &job.checkpoint;
    let resume_from = match &ck.dir {
        Some(root) => manifest::latest_intact(root, &mut |w| log(&w))?,
        None => None,
    };
    let mut metrics_file = match metrics {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // A resumed run adds to the metrics of the steps before it.
            let f = std::fs::File::options()
                .create(true)
                .write(true)
                .append(resume_from.is_some())
                .truncate(resume_from.is_none())
                .open(p)
                .with_context(|| format!("cannot create metrics file {}", p.display()))?;
            Some((p, std::io::BufWriter::new(f)))
        }
        None => None,
    };
    let t = &job.train;
    let cfg = model_config(job)?;
    let (mut vlm, mut opt) = build_model(be, job, &cfg)?;
    let mut start = 0;
    if let Some(dir) = &resume_from {
        start = restore(be, job, &cfg, &mut vlm, &mut opt, dir)?;
        log(&format!("resumed from {} (step {start} of {})", dir.display(), t.steps));
    }
    let data = match &job.data {
        Some(d) => Some(Arc::new(Dataset::open(d, &cfg)?)),
        None => None,
    };
    // The data order is a pure function of (seed, micro-batch index), so the
    // cursor is all a resumed run needs to see the samples it would have seen.
    let first = start * t.grad_accum as u64;
    let mut loader = data.as_ref().map(|d| Prefetcher::new(d.clone(), t.seed, t.batch_size, first, d.cfg.prefetch));
    // Without data: a fixed pool of synthetic batches the model can only memorize.
    let pool: Vec<Batch> = match loader {
        Some(_) => vec![],
        None => (0..4 * t.grad_accum as u64)
            .map(|i| Batch::synthetic(&cfg, t.batch_size, t.text_tokens, t.seed * 100 + i))
            .collect(),
    };
    let mut report = JobReport { losses: vec![], steps: vec![], bad_samples: 0, eval: None, seconds: 0.0 };
    let stop = stop_on_signal(job)?;
    let t0 = std::time::Instant::now();
    for step in start..t.steps {
        let tick = std::time::Instant::now();
        let mut micro = Vec::with_capacity(t.grad_accum);
        let (mut bad, mut truncated) = (0, 0);
        for k in 0..t.grad_accum {
            match loader.as_mut() {
                Some(l) => {
                    let b = l.next_batch()?;
                    bad += b.bad.len();
                    truncated += b.truncated;
                    if b.batch.batch > 0 {
                        micro.push(b.batch);
                    }
                }
                None => micro.push(pool[(step as usize * t.grad_accum + k) % pool.len()].clone()),
            }
        }
        report.bad_samples += bad;
        if micro.is_empty() {
            log(&format!("step {:>5}/{}  skipped: every sample was bad", step + 1, t.steps));
        } else {
            let r = train_step(be, &mut vlm, &mut opt, &micro)?;
            let samples: usize = micro.iter().map(|b| b.batch).sum();
            report.losses.push(r.loss.mean());
            let m = StepMetrics {
                step: step + 1,
                loss: r.loss.mean(),
                grad_norm: r.info.grad_norm,
                lr_scale: r.info.lr_scale,
                samples,
                target_tokens: r.loss.tokens,
                bad_samples: bad,
                truncated,
                seconds: tick.elapsed().as_secs_f64(),
            };
            if let Some((p, f)) = metrics_file.as_mut() {
                use std::io::Write;
                writeln!(f, "{}", serde_json::to_string(&m)?)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
            report.steps.push(m);
            log(&format!(
                "step {:>5}/{}  loss {:.4}  grad_norm {:.3}  lr_scale {:.3}  {:.1} samples/s  {:.0} tokens/s{}",
                step + 1,
                t.steps,
                r.loss.mean(),
                r.info.grad_norm,
                r.info.lr_scale,
                samples as f64 / tick.elapsed().as_secs_f64(),
                r.loss.tokens as f64 / tick.elapsed().as_secs_f64(),
                if bad > 0 { format!("  bad samples skipped: {bad}") } else { String::new() }
            ));
        }
        // After the step: a checkpoint when due, or at once when a stop
        // signal came, and then the run stops with how to resume.
        let stopping = stop.as_deref().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        let saved = save_checkpoint(be, job, &cfg, &vlm, &opt, step + 1, stopping, log)?;
        if stopping {
            let dir = saved.map(|d| d.display().to_string()).unwrap_or_default();
            bail!(
                "stopped by a signal after step {} of {}; the checkpoint {dir} holds it: run the same command to resume",
                step + 1,
                t.steps
            );
        }
    }
    drop(loader);
    if let Some((p, mut f)) = metrics_file {
        use std::io::Write;
        f.flush().with_context(|| format!("cannot write {}", p.display()))?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    if let Some(d) = job.data.as_ref().filter(|d| !d.eval_datasets.is_empty()) {
        let eval = Dataset::open_eval(d, &cfg)?;
        report.eval = Some(evaluate(be, &mut vlm, &eval, 8)?);
    }
    if let Some(dir) = out {
        save_model_dir(dir, &cfg, &vlm.params.to_host(be), SaveDtype::F32, None)?;
        if let Some(d) = &job.data {
            d.record_image_preprocessing(dir)?;
        }
        log(&format!("saved model to {}", dir.display()));
    }
    Ok(report)
}

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

/// With checkpoints on, SIGTERM (a scheduler's preemption or time limit)
/// and SIGINT no longer kill the run at once: they set a flag, and the run
/// stops after the step in progress with a checkpoint of it. A second
/// signal ends the process at once (exit status 1).
pub(crate) fn stop_on_signal(job: &TrainJob) -> Result<Option<Arc<std::sync::atomic::AtomicBool>>> {
    if job.checkpoint.dir.is_none() {
        return Ok(None);
    }
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, flag.clone())
            .context("cannot install the stop-signal handler")?;
        signal_hook::flag::register(signal, flag.clone()).context("cannot install the stop-signal handler")?;
    }
    Ok(Some(flag))
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
        let (vlm, mut opt) = build_model(&be, &job, &cfg).unwrap();
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

        let (mut vlm2, mut opt2) = build_model(&be, &job, &cfg).unwrap();
        assert_eq!(restore(&be, &job, &cfg, &mut vlm2, &mut opt2, &dir).unwrap(), 4);
        assert_eq!(opt2.step, 4);
        assert!(opt2.moments_to_host(&be, &vlm2.params) == (m, v));
        assert!(vlm2.params.to_host(&be) == vlm.params.to_host(&be));
    }
}
