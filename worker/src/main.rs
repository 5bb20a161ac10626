//! The `worker` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_worker::engine::cpu::Cpu;
use tessera_worker::model::weights::{save_model_dir, SaveDtype};
use tessera_worker::model::{hf_config, store, weights, Batch, ModelConfig, ParamStore, Vlm};
use tessera_worker::train::{train_step, OptimConfig, Optimizer, PerModule};

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
    /// Trains on one process (CPU) on synthetic batches and optionally saves
    /// the model. The multi-worker job arrives with the coordinator.
    Train {
        /// Model preset (ignored with --model).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Start from this model directory instead of fresh weights.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 60)]
        steps: u64,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Text tokens per sample (the image adds its tokens).
        #[arg(long, default_value_t = 16)]
        seq: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f32,
        #[arg(long)]
        freeze_vision_tower: bool,
        /// Recompute ViT activations in backward (saves memory under S2).
        #[arg(long)]
        recompute_vit: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Save the trained model directory here.
        #[arg(long)]
        out: Option<PathBuf>,
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
        Command::Train {
            preset: name,
            model,
            steps,
            batch,
            seq,
            lr,
            freeze_vision_tower,
            recompute_vit,
            seed,
            out,
        } => {
            if steps == 0 || batch == 0 || seq < 2 {
                bail!("--steps and --batch must be positive and --seq at least 2");
            }
            let be = Cpu::<f32>::new();
            let (cfg, params) = match &model {
                Some(dir) => {
                    let cfg = hf_config::read_model_config(dir)?;
                    let host = weights::load_weights(dir, &cfg)?;
                    let p = ParamStore::from_host(&be, &cfg, &host)?;
                    (cfg, p)
                }
                None => {
                    let cfg = preset(&name)?;
                    let p = ParamStore::init(&be, &cfg, seed);
                    (cfg, p)
                }
            };
            let mut vlm = Vlm::new(&cfg, params, recompute_vit);
            let oc = OptimConfig {
                lr: PerModule::all(lr),
                warmup_steps: (steps / 10).max(1),
                total_steps: steps,
                freeze: PerModule { vision_tower: freeze_vision_tower, projector: false, llm: false },
                ..OptimConfig::default()
            };
            let mut opt = Optimizer::new(&be, oc, &vlm.params);
            // A fixed pool of synthetic batches: the model can only learn to
            // memorize them, which is what this smoke job shows.
            let pool: Vec<Batch> = (0..4).map(|i| Batch::synthetic(&cfg, batch, seq, seed * 100 + i)).collect();
            let t0 = std::time::Instant::now();
            for step in 0..steps {
                let b = &pool[(step % pool.len() as u64) as usize];
                let t = std::time::Instant::now();
                let r = train_step(&be, &mut vlm, &mut opt, std::slice::from_ref(b))?;
                println!(
                    "step {:>4}/{steps}  loss {:.4}  grad_norm {:.3}  lr {:.2e}  {:.0} ms",
                    step + 1,
                    r.loss.mean(),
                    r.info.grad_norm,
                    lr as f64 * r.info.lr_scale,
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            println!("trained {steps} steps in {:.1} s", t0.elapsed().as_secs_f64());
            if let Some(dir) = out {
                save_model_dir(&dir, &cfg, &vlm.params.to_host(&be), SaveDtype::F32, None)?;
                println!("saved model to {}", dir.display());
            }
        }
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
