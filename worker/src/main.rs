//! The `worker` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_worker::engine::cpu::Cpu;
use tessera_worker::model::weights::{save_model_dir, SaveDtype};
use tessera_worker::model::{hf_config, store, weights, Batch, ModelConfig, ParamStore, Vlm};
use tessera_worker::train::job::TrainJob;
use tessera_worker::train::schedule::warmup_steps;
use tessera_worker::train::{train_step, OptimConfig, Optimizer};

#[derive(Parser)]
#[command(name = "worker", version, about = "Tessera worker: trains S2 vision-language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One forward + backward pass with every module trainable; writes the
    /// loss and all gradients (DESIGN.md section 4).
    DebugStep {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        batch: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Writes a freshly initialized model directory in the VILA layout.
    InitModel {
        /// tiny, small or vila-3b-s2
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Trains on one process (CPU) on synthetic batches, from a job config
    /// (configs/tiny.toml), and optionally saves the model. The multi-worker
    /// job arrives with the coordinator.
    Train {
        #[arg(long, default_value = "configs/tiny.toml")]
        config: PathBuf,
        /// Override train.steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Save the trained model directory here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Times full training steps (forward, backward, AdamW) on synthetic
    /// data and prints one JSON line; tools/bench_cpu_step.sh compares it
    /// with the same step in PyTorch.
    BenchStep {
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Text tokens per sample (the image adds its tokens).
        #[arg(long, default_value_t = 32)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
}

fn preset(name: &str) -> Result<ModelConfig> {
    ModelConfig::preset(name).with_context(|| format!("unknown preset `{name}`; expected tiny, small or vila-3b-s2"))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::DebugStep { model, batch, out, device } => {
            let loss = tessera_worker::debug_step::command(&model, &batch, &out, &device)?;
            println!("loss {loss:.6}; gradients written to {}", out.display());
        }
        Command::InitModel { preset: name, out, seed } => {
            let cfg = preset(&name)?;
            save_model_dir(&out, &cfg, &store::init_host(&cfg, seed), SaveDtype::F32, None)?;
            println!("wrote {name} model to {}", out.display());
        }
        Command::Train { config, steps, out } => {
            let mut job = TrainJob::from_file(&config)?;
            if let Some(n) = steps {
                job.train.steps = n;
                job.validate()?;
            }
            train(&job, out.as_deref())?;
        }
        Command::BenchStep { preset: name, batch, seq, warmup, steps } => {
            let cfg = preset(&name)?;
            let be = Cpu::<f32>::new();
            let mut vlm = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 0), false);
            let mut opt = Optimizer::new(&be, OptimConfig { total_steps: 1000, ..OptimConfig::default() }, &vlm.params);
            let b = Batch::synthetic(&cfg, batch, seq, 1);
            let mut times = Vec::new();
            for i in 0..warmup + steps.max(1) {
                let t = std::time::Instant::now();
                train_step(&be, &mut vlm, &mut opt, std::slice::from_ref(&b))?;
                if i >= warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!(
                "{}",
                serde_json::json!({
                    "impl": "tessera",
                    "preset": name,
                    "batch": batch,
                    "text_tokens": seq,
                    "threads": rayon::current_num_threads(),
                    "step_s_median": median,
                    "step_s_all": times,
                })
            );
        }
    }
    Ok(())
}

fn train(job: &TrainJob, out: Option<&std::path::Path>) -> Result<()> {
    let be = Cpu::<f32>::new();
    let t = &job.train;
    let (cfg, params) = match (&job.model.dir, &job.model.preset) {
        (Some(dir), _) => {
            let cfg = hf_config::read_model_config(dir)?;
            let host = weights::load_weights(dir, &cfg)?;
            let p = ParamStore::from_host(&be, &cfg, &host)?;
            (cfg, p)
        }
        (None, Some(name)) => {
            let cfg = preset(name)?;
            let p = ParamStore::init(&be, &cfg, t.seed);
            (cfg, p)
        }
        (None, None) => bail!("model: set `preset` or `dir`"),
    };
    let mut vlm = Vlm::new(&cfg, params, job.model.recompute_vit);
    let oc =
        OptimConfig { warmup_steps: warmup_steps(t.warmup_ratio, t.steps), total_steps: t.steps, ..job.optim.clone() };
    let mut opt = Optimizer::new(&be, oc, &vlm.params);
    // A fixed pool of synthetic batches: the model can only learn to memorize
    // them, which is what this smoke job shows. Real data comes with the data
    // pipeline.
    let pool: Vec<Batch> = (0..4 * t.grad_accum as u64)
        .map(|i| Batch::synthetic(&cfg, t.batch_size, t.text_tokens, t.seed * 100 + i))
        .collect();
    let t0 = std::time::Instant::now();
    for step in 0..t.steps {
        let k = (step as usize * t.grad_accum) % pool.len();
        let tick = std::time::Instant::now();
        let r = train_step(&be, &mut vlm, &mut opt, &pool[k..k + t.grad_accum])?;
        println!(
            "step {:>4}/{}  loss {:.4}  grad_norm {:.3}  lr_scale {:.3}  {:.0} ms",
            step + 1,
            t.steps,
            r.loss.mean(),
            r.info.grad_norm,
            r.info.lr_scale,
            tick.elapsed().as_secs_f64() * 1e3
        );
    }
    println!("trained {} steps in {:.1} s", t.steps, t0.elapsed().as_secs_f64());
    if let Some(dir) = out {
        save_model_dir(dir, &cfg, &vlm.params.to_host(&be), SaveDtype::F32, None)?;
        println!("saved model to {}", dir.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the problem, with its causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
