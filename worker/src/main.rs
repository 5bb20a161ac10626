//! The `worker` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_job::config::TrainJob;
use tessera_job::data::DatasetIndex;
use tessera_job::hf_config;
use tessera_worker::codec::SaveDtype;
use tessera_worker::data::demo::{make_demo_data, DemoSpec};
use tessera_worker::data::loader::Dataset;
use tessera_worker::engine::cpu::Cpu;
use tessera_worker::engine::device::{Device, DeviceSpec, Precision};
use tessera_worker::engine::parity::{check_ops, OpResult, Tolerance};
use tessera_worker::engine::Backend;
use tessera_worker::eval::evaluate;
use tessera_worker::launch::{resolve, LaunchFlags};
use tessera_worker::model::flops::train_step_flops;
use tessera_worker::model::memory::MemoryJob;
use tessera_worker::model::weights::save_model_dir;
use tessera_worker::model::{store, Batch, ModelConfig, ParamStore, Recompute, Vlm};
use tessera_worker::node::single::run_job;
use tessera_worker::node::{run_worker, WorkerOptions};
use tessera_worker::train::{train_step, OptimConfig, Optimizer};

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Tessera worker: trains S2 vision-language models",
    long_about = "Tessera worker: trains S2 vision-language models.\n\nWithout a subcommand it joins a multi-worker job: `worker --rank N --coordinator URL [--device cpu|cuda:K|auto]` (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and SLURM_PROCID/SLURM_LOCALID are read when flags are absent).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// Joining a multi-worker job.
#[derive(clap::Args, Clone, Debug, Default)]
struct RunArgs {
    /// This worker's rank (else RANK or SLURM_PROCID; else the coordinator assigns one).
    #[arg(long)]
    rank: Option<u32>,
    /// The coordinator's URL, e.g. http://head-node:29500 (else MASTER_ADDR and MASTER_PORT).
    #[arg(long)]
    coordinator: Option<String>,
    /// cpu, cuda:K or auto (cuda-emu, the emulated GPU, runs only the single-process commands).
    #[arg(long)]
    device: Option<String>,
    /// Seconds to keep retrying a coordinator that is not up yet.
    #[arg(long, default_value_t = 300.0)]
    connect_timeout: f64,
    /// Address the other workers reach this one at (default: this host's
    /// address on the route to the coordinator).
    #[arg(long)]
    advertise_host: Option<String>,
    #[command(flatten)]
    client: tessera_proto::client::ClientArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Joins a multi-worker job (the same as giving the flags without a subcommand).
    Run(RunArgs),
    /// One forward + backward pass with every module trainable; writes the
    /// loss and all gradients (docs/DESIGN.md section 4).
    DebugStep {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        batch: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// A reference gradients file (tests/fixtures/tiny/expected_grads.safetensors):
        /// compare, print the worst errors, and fail beyond 1e-5 relative on
        /// the loss or 1e-4 on a gradient's norm.
        #[arg(long)]
        expect: Option<PathBuf>,
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
    /// Trains on one process from a job config (configs/tiny.toml: synthetic
    /// batches; configs/demo.toml: the demo data), and optionally saves the
    /// model. Multi-worker jobs run under the coordinator.
    Train {
        /// cpu, cuda:K, auto (the GPU of LOCAL_RANK when CUDA is there), or
        /// cuda-emu (the emulated GPU, built with --features cuda-emu).
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "configs/tiny.toml")]
        config: PathBuf,
        /// Override train.steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Save the trained model directory here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write one JSON line of metrics per step here.
        #[arg(long)]
        metrics: Option<PathBuf>,
    },
    /// Writes the synthetic demo dataset (train/eval splits, images, tokenizer.json).
    MakeDemoData {
        #[arg(long)]
        out: PathBuf,
        /// Image side; the `tiny` preset's largest S2 scale is 40.
        #[arg(long, default_value_t = 40)]
        size: usize,
        #[arg(long, default_value_t = 2000)]
        train: usize,
        #[arg(long, default_value_t = 200)]
        eval: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Answer accuracy (greedy, exact match) and mean loss on an eval split:
    /// DIR/eval.jsonl of a demo-layout folder, or a job config's
    /// `data.eval_datasets`.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// A demo-layout data folder: eval.jsonl, images/, tokenizer.json.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        data: Option<PathBuf>,
        /// A job config whose [data] section names eval_datasets and the tokenizer.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Times full training steps (forward, backward, AdamW) on synthetic
    /// data and prints one JSON line; tools/bench_cpu_step.sh (CPU) and
    /// scripts/device-check.sh (GPU) compare it with the same step in PyTorch.
    BenchStep {
        #[arg(long, default_value = "small")]
        preset: String,
        /// cpu, cuda:K, auto, or cuda-emu (the emulated GPU: a test device).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// GPU GEMM precision: f32, tf32 or bf16.
        #[arg(long, default_value = "tf32")]
        precision: String,
        /// Override the ViT's layer count (same widths, fewer layers).
        #[arg(long)]
        vit_layers: Option<usize>,
        /// Override the LLM's layer count.
        #[arg(long)]
        llm_layers: Option<usize>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Text tokens per sample (the image adds its tokens).
        #[arg(long, default_value_t = 32)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// none, vit, llm or all (as the job config's model.recompute).
        #[arg(long, default_value = "none")]
        recompute: String,
    },
    /// Prints what one GPU of a job holds, part by part (weights, compute
    /// copies, gradients, optimizer state, activations per module,
    /// workspaces), the largest micro-batch that fits, and one JSON line
    /// `{"fits", "max_micro_batch", "peak_gib"}`. Exits non-zero when the
    /// job's micro-batch does not fit.
    PlanMemory {
        #[arg(long)]
        config: PathBuf,
        /// Ranks of the job (default: cluster.world_size); each gets its share of train.batch_size.
        #[arg(long)]
        world_size: Option<usize>,
        /// Memory of one GPU in GiB.
        #[arg(long, default_value_t = 80.0)]
        gpu_gib: f64,
        /// Samples per micro-batch on one rank (default: its share of train.batch_size).
        #[arg(long)]
        micro_batch: Option<usize>,
        /// Override the text tokens per sample (data.max_length or train.text_tokens).
        #[arg(long)]
        text_tokens: Option<usize>,
        /// Memory the GPU process needs besides its buffers (context, cuBLAS, NCCL, pool slack).
        #[arg(long, default_value_t = 2.0)]
        reserve_gib: f64,
    },
    /// Runs every op of the backend on DEVICE and on the CPU in f64 with the
    /// same random inputs, and compares (relative error 1e-5 in f32; 3e-4 for
    /// TF32 GEMMs and 1e-3 for two TF32 GEMMs in a row, as in attention; 1e-2
    /// for bf16 mixed precision). Exits non-zero when an op fails.
    CheckOps {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// f32, tf32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn run(cli: Cli) -> Result<()> {
    let command = match cli.command {
        Some(c) => c,
        None => {
            let r = &cli.run;
            if r.rank.is_none() && r.coordinator.is_none() && std::env::var_os("MASTER_ADDR").is_none() {
                use clap::CommandFactory;
                Cli::command().print_help()?;
                bail!("nothing to do: give a subcommand, or --coordinator URL to join a job");
            }
            Command::Run(cli.run)
        }
    };
    match command {
        Command::Run(args) => {
            let flags = LaunchFlags { rank: args.rank, coordinator: args.coordinator, device: args.device };
            let launch = resolve(&flags, &|k| std::env::var(k).ok())?;
            if !(args.connect_timeout.is_finite() && args.connect_timeout >= 0.0) {
                bail!("--connect-timeout {}: expected seconds", args.connect_timeout);
            }
            let (token, tls) = args.client.resolve()?;
            run_worker(&WorkerOptions {
                launch,
                connect_patience: std::time::Duration::from_secs_f64(args.connect_timeout),
                advertise_host: args.advertise_host,
                token,
                tls,
            })?;
        }
        Command::DebugStep { model, batch, out, device, expect } => {
            let loss = tessera_worker::debug_step::command(&model, &batch, &out, &device)?;
            println!("loss {loss:.6}; gradients written to {}", out.display());
            if let Some(reference) = expect {
                let c = tessera_worker::debug_step::compare(&out, &reference)?;
                let (worst, e) = c.worst_grad().map(|(n, e)| (n.as_str(), *e)).unwrap_or(("none", 0.0));
                println!(
                    "against {}: loss error {:.2e}, {} gradients, worst {worst} {e:.2e}",
                    reference.display(),
                    c.loss_error,
                    c.grads.len()
                );
                if !c.nonzero_where_zero.is_empty() {
                    println!("nonzero where the reference is zero: {}", c.nonzero_where_zero.join(", "));
                }
                if !c.passes(1e-5, 1e-4) {
                    bail!("debug-step does not match {} (limits: loss 1e-5, gradients 1e-4)", reference.display());
                }
            }
        }
        Command::InitModel { preset: name, out, seed } => {
            let cfg = ModelConfig::named_preset(&name)?;
            save_model_dir(&out, &cfg, &store::init_host(&cfg, seed), SaveDtype::F32, None)?;
            println!("wrote {name} model to {}", out.display());
        }
        Command::Train { device, config, steps, out, metrics } => {
            let mut job = TrainJob::from_file(&config)?;
            if let Some(n) = steps {
                job.train.steps = n;
                job.validate()?;
            }
            let device = DeviceSpec::parse(&device)?.resolve(None)?;
            train(&job, device, out.as_deref(), metrics.as_deref())?;
        }
        Command::MakeDemoData { out, size, train, eval, seed } => {
            let t = std::time::Instant::now();
            make_demo_data(&out, &DemoSpec { size, train, eval, seed })?;
            println!(
                "wrote demo data ({train} train, {eval} eval) to {} in {:.1} s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
        }
        Command::Eval { model, data, config } => {
            let be = Cpu::<f32>::new();
            let cfg = hf_config::read_model_config(&model)?;
            let params = ParamStore::from_dir(&be, &cfg, &model)?;
            let mut vlm = Vlm::new(&cfg, params, Recompute::None);
            let data_cfg = match (data, config) {
                // The model's config.json says how its images were prepared.
                (Some(dir), _) => DatasetIndex::demo_config(&dir).with_model_image_preprocessing(&model)?,
                (None, Some(job)) => {
                    let job = TrainJob::from_file(&job)?;
                    let d = job.data.context("the job config has no [data] section")?;
                    if d.eval_datasets.is_empty() {
                        bail!("data.eval_datasets: the job config names no eval dataset");
                    }
                    d
                }
                (None, None) => bail!("give --data DIR or --config FILE"),
            };
            let ds = Dataset::open_eval(&data_cfg, &cfg)?;
            let r = evaluate(&be, &mut vlm, &ds, 8)?;
            println!(
                "eval: accuracy {:.3} ({}/{}), mean loss {:.4}, bad samples {}",
                r.accuracy(),
                r.correct,
                r.samples,
                r.mean_loss,
                r.bad.len()
            );
        }
        Command::BenchStep {
            preset: name,
            device,
            precision,
            vit_layers,
            llm_layers,
            batch,
            seq,
            warmup,
            steps,
            recompute,
        } => {
            let recompute = Recompute::parse(&recompute)?;
            let mut cfg = ModelConfig::named_preset(&name)?;
            if let Some(n) = vit_layers {
                cfg.vision.num_hidden_layers = n;
            }
            if let Some(n) = llm_layers {
                cfg.llm.num_hidden_layers = n;
            }
            cfg.validate().map_err(|e| anyhow::anyhow!("--vit-layers/--llm-layers: {e}"))?;
            let device = DeviceSpec::parse(&device)?.resolve(None)?;
            let precision = Precision::parse(&precision)?;
            let (times, peak_bytes) = tessera_worker::on_device!(device, precision, |be| bench_step(
                be, &cfg, batch, seq, warmup, steps, recompute
            ))?;
            let median = times[times.len() / 2];
            let flops = train_step_flops(&cfg, batch, seq);
            let llm_tokens = batch * cfg.spliced_len(seq);
            println!(
                "{}",
                serde_json::json!({
                    "impl": "tessera",
                    "preset": name,
                    "device": device.to_string(),
                    "precision": if device == Device::Cpu { "f32".to_string() } else { format!("{precision:?}").to_lowercase() },
                    "vit_layers": cfg.vision.num_hidden_layers,
                    "llm_layers": cfg.llm.num_hidden_layers,
                    "batch": batch,
                    "text_tokens": seq,
                    "llm_tokens_per_step": llm_tokens,
                    "images_per_step": batch,
                    "tiles_per_step": batch * cfg.s2.tiles_per_image(),
                    "model_flops_per_step": flops,
                    "threads": rayon::current_num_threads(),
                    "step_s_median": median,
                    "step_s_all": times,
                    "recompute": format!("{recompute:?}").to_lowercase(),
                    // Same key as tools/bench_step_torch.py (GiB); null on the CPU.
                    "peak_mem_gib": peak_bytes.map(|b| b as f64 / GIB),
                    // The process's peak resident memory (Linux), the CPU backend's peak.
                    "peak_rss_gib": peak_rss_bytes().map(|b| b as f64 / GIB),
                })
            );
        }
        Command::PlanMemory { config, world_size, gpu_gib, micro_batch, text_tokens, reserve_gib } => {
            let job = TrainJob::from_file(&config)?;
            let world = world_size.unwrap_or(job.cluster.world_size);
            let mut plan = MemoryJob::from_job(&job, world)?;
            plan.micro_batch = micro_batch.unwrap_or(plan.micro_batch);
            plan.text_tokens = text_tokens.unwrap_or(plan.text_tokens);
            plan.reserve_bytes = (reserve_gib.max(0.0) * GIB) as u64;
            let budget = (gpu_gib.max(0.0) * GIB) as u64;
            println!("{}", plan.report(budget));
            if plan.plan().peak_bytes() > budget {
                bail!("micro-batch {} does not fit {gpu_gib} GiB", plan.micro_batch);
            }
        }
        Command::CheckOps { device, precision, seed } => {
            let device = DeviceSpec::parse(&device)?.resolve(None)?;
            let precision = Precision::parse(&precision)?;
            let tol = Tolerance::of(precision);
            let reference = Cpu::<f64>::new();
            let results = tessera_worker::on_device!(device, precision, |be| Ok::<_, anyhow::Error>(check_ops(
                &reference, be, tol, seed
            )))?;
            let failed: Vec<&OpResult> = results.iter().filter(|r| !r.passed()).collect();
            for r in &results {
                println!(
                    "{:<58} {:>10.2e}  (limit {:.0e})  {}",
                    r.op,
                    r.rel_error,
                    r.tolerance,
                    if r.passed() { "ok" } else { "FAIL" }
                );
            }
            let gemms = if device == Device::Cpu { "f32".to_string() } else { format!("{precision:?} GEMMs") };
            println!(
                "{} of {} checks passed on {device} ({gemms}) against the CPU in f64",
                results.len() - failed.len(),
                results.len()
            );
            if !failed.is_empty() {
                bail!(
                    "{} op check(s) failed: {}",
                    failed.len(),
                    failed.iter().map(|r| r.op.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Times `warmup + steps` training steps on one synthetic batch; returns
/// the timed ones, sorted.
const GIB: f64 = (1u64 << 30) as f64;

/// The process's peak resident set (`VmHWM` in /proc/self/status); None
/// where the kernel does not say.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn bench_step<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    recompute: Recompute,
) -> Result<(Vec<f64>, Option<u64>)> {
    let mut vlm = Vlm::new(cfg, ParamStore::init(be, cfg, 0), recompute);
    let mut opt = Optimizer::new(be, OptimConfig { total_steps: 1000, ..OptimConfig::default() }, &vlm.params);
    let b = Batch::synthetic(cfg, batch, seq, 1);
    let mut times = Vec::new();
    for i in 0..warmup + steps.max(1) {
        let t = std::time::Instant::now();
        // train_step ends with the backend's check, which waits for a GPU.
        train_step(be, &mut vlm, &mut opt, std::slice::from_ref(&b))?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times, be.peak_memory_bytes()))
}

fn train(
    job: &TrainJob,
    device: Device,
    out: Option<&std::path::Path>,
    metrics: Option<&std::path::Path>,
) -> Result<()> {
    let report = run_job(job, device, out, metrics, &mut |line| println!("{line}"))?;
    println!("trained {} steps in {:.1} s", report.losses.len(), report.seconds);
    if report.bad_samples > 0 {
        println!("bad samples skipped: {}", report.bad_samples);
    }
    if let Some(e) = report.eval {
        println!(
            "eval: accuracy {:.3} ({}/{}), mean loss {:.4}{}",
            e.accuracy(),
            e.correct,
            e.samples,
            e.mean_loss,
            if e.bad.is_empty() { String::new() } else { format!(", {} bad samples", e.bad.len()) }
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tessera_job::logging::init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the problem, with its causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
