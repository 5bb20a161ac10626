//! Runs a single-process training job from its config: model, data (real or
//! synthetic), the step loop with logging, evaluation and saving.

use super::signal::stop_on_signal;
use crate::codec::SaveDtype;
use crate::data::loader::{Dataset, Prefetcher};
use crate::engine::device::Device;
use crate::engine::Backend;
use crate::eval::{evaluate, EvalReport};
use crate::model::weights::save_model_dir;
use crate::model::Batch;
use crate::train::job_checkpoint::{restore, save_checkpoint};
use crate::train::setup::build_model;
use crate::train::train_step;
use anyhow::{bail, Context, Result};
use std::path::Path;
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

/// `run_job` on the backend of its device.
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
    let (mut vlm, mut opt) = build_model(be, job, &cfg, 1)?;
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
