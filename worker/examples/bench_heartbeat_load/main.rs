//! Coordinator under heartbeat load: a real 4-worker training job
//! on 127.0.0.1 while N simulated clients (default 1024) heartbeat the
//! coordinator at 10 Hz each. Does the load slow training, and what do the
//! heartbeats cost the coordinator?
//!
//! Each run writes a job config (configs/demo.toml with `cluster.world_size
//! = --workers` and `train.steps = --steps`; the heartbeat interval is the
//! config's), makes a job token, and starts the release `coordinator
//! --listen 127.0.0.1:PORT --out DIR --rate-limit R` and `--workers` real
//! `worker --rank i` processes (`RAYON_NUM_THREADS=1`), all with the token in
//! `TESSERA_JOB_TOKEN`. Runs, in the order `--runs` gives (default
//! A,B,C,A,C,B,A, which spreads a drift of the machine's speed over B and C
//! alike):
//!
//! - **A**, no load: the job alone.
//! - **B**, load on the job's coordinator: before the workers start, this
//!   process opens N tonic channels to the coordinator (one TCP connection
//!   each), and every client opens a heartbeat stream, as a worker does,
//!   and sends a beat on it every 1/`--rate-hz` s, each answered before the
//!   next, with the job token, starting at staggered offsets spread evenly
//!   over the first period. The clients are not members of the job: client
//!   i claims rank i % world_size without that rank's session, so each beat
//!   goes through the whole path (the stream's token check, the per-beat
//!   rate limit, the job's state lock, the rank's session lookup) and is
//!   answered ABORT ("join again"), touching no rank. Every answer is
//!   counted, and every stream that fails by its status code.
//! - **C**, load on a decoy: the same clients heartbeat a second coordinator
//!   process on another port (the same config and token, no workers join
//!   it), so the machine serves the same RPCs at the same rate but the job's
//!   coordinator serves none of them. C minus A is what sharing the CPU
//!   costs; B minus C is what serving the load inside the job's coordinator
//!   costs on top (its state lock, its async threads).
//! - **D**, members of a decoy (not in the default order): the decoy's job
//!   has a rank for every client, each client joins it as its rank, as a
//!   worker does, and beats with its session, so every beat is a member's
//!   accepted beat (CONTINUE). The decoy's CPU per beat in C and in D says
//!   what a refusal costs against a member's beat.
//!
//! The training speed comes from the coordinator's `metrics.jsonl` (each
//! line a step, with `seconds`, the slowest rank's step time): the mean over
//! the steps after `--warmup`. The same window (from the line of step
//! `--warmup` to the last line, timed here) gives the wall time per step and
//! the CPU time (user + system, /proc/PID/stat) of the coordinator, the
//! decoy, the workers and this process (the simulated clients), each as a
//! % of one core, what the rest of the machine used (/proc/stat less
//! ours: other users of a shared machine), and the heartbeats completed
//! per second. Latency is measured client-side, from send to reply, for
//! every simulated call of the run. In every run, A included, one more
//! client (the probe) heartbeats the job's coordinator at the same rate:
//! the latency the job's coordinator answers with, loaded or not. The
//! table ends with the mean step of each kind of run and B vs A, C vs A
//! and B vs C.
//!
//! Bounded: every child process is killed when its run ends or fails (a
//! guard), each run has `--run-limit-s` and the whole benchmark
//! `--time-limit-s`, after which the run is dropped (its processes killed
//! and its clients aborted) and the benchmark fails.
//!
//! ```text
//! cargo build --release -p tessera-worker -p tessera-coordinator --bin worker --bin coordinator --example bench_heartbeat_load
//! target/release/examples/bench_heartbeat_load [--clients 1024] [--steps 1000] [--runs A,B,C,A,C,B,A]
//! ```
//! or `tools/bench_heartbeat_load.sh`, which builds and prints the machine.

#[path = "../bench_util/mod.rs"]
mod bench_util;
mod clients;
mod measure;

use anyhow::{anyhow, bail, Context, Result};
use bench_util::{cpu_s, delta, log_tail, quantile, LocalCoordinator, Reaper};
use clap::Parser;
use clients::{heartbeat_loop, Beat, ClientStats, Member};
use measure::{machine_cpu_s, step_seconds, LineCounter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_proto::auth::TOKEN_ENV;
use tessera_proto::CoordinatorClient;
use tonic::metadata::AsciiMetadataValue;

#[derive(Parser)]
#[command(about = "A real training job while N simulated clients heartbeat the coordinator")]
struct Args {
    /// Simulated heartbeat clients in runs B and C, one connection each.
    #[arg(long, default_value_t = 1024)]
    clients: usize,
    /// Heartbeats a second each simulated client sends.
    #[arg(long, default_value_t = 10.0)]
    rate_hz: f64,
    /// Real worker processes (the job's world size).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Training steps of each run.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Steps left out of the speed figures at the start of each run.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// The runs, in order: A (no load), B (load on the job's coordinator),
    /// C (load on a decoy coordinator), D (the clients are members of a
    /// decoy job of as many ranks). The default alternates them so that a
    /// slow drift of the machine's speed falls on B and C alike.
    #[arg(long, value_delimiter = ',', default_value = "A,B,C,A,C,B,A")]
    runs: Vec<String>,
    /// The coordinator's --rate-limit (requests a second per connection; a
    /// simulated client makes --rate-hz, a worker a few).
    #[arg(long, default_value_t = 200.0)]
    rate_limit: f64,
    #[command(flatten)]
    common: bench_util::CommonArgs,
    /// Async runtime threads of the simulated clients.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Longest one simulated call may take.
    #[arg(long, default_value_t = 10.0)]
    call_timeout_s: f64,
    /// Longest one run may take, start to the processes' exit.
    #[arg(long, default_value_t = 600)]
    run_limit_s: u64,
    /// Longest the whole benchmark may take.
    #[arg(long, default_value_t = 2400)]
    time_limit_s: u64,
    /// CPUs the worker processes run on (a taskset list, e.g. 0-7); unset:
    /// this process's CPUs. With --coordinator-cpus, and this process
    /// started on others (`taskset -c 10-15 ...`), the simulated clients
    /// stop sharing cores with the job, as on a cluster where they are
    /// other machines.
    #[arg(long)]
    worker_cpus: Option<String>,
    /// CPUs the job's coordinator (and the decoy) run on.
    #[arg(long)]
    coordinator_cpus: Option<String>,
    /// Keep each run's folder (config, logs, metrics).
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// A: no simulated clients.
    None,
    /// B: the clients heartbeat the job's coordinator.
    Job,
    /// C: the clients heartbeat a decoy coordinator with no workers.
    Decoy,
    /// D: the clients join a decoy job of as many ranks and heartbeat it as
    /// its members (accepted beats, not refusals).
    DecoyMembers,
}

impl Load {
    fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "A" | "a" => Ok(Load::None),
            "B" | "b" => Ok(Load::Job),
            "C" | "c" => Ok(Load::Decoy),
            "D" | "d" => Ok(Load::DecoyMembers),
            other => bail!("--runs: {other:?} is not A, B, C or D"),
        }
    }

    fn letter(self) -> &'static str {
        match self {
            Load::None => "A",
            Load::Job => "B",
            Load::Decoy => "C",
            Load::DecoyMembers => "D",
        }
    }

    fn describe(self, n: usize) -> String {
        match self {
            Load::None => "no load".into(),
            Load::Job => format!("{n} clients -> job's coordinator"),
            Load::Decoy => format!("{n} clients -> decoy coordinator"),
            Load::DecoyMembers => format!("{n} members -> decoy job of {n} ranks"),
        }
    }
}

/// One run's measurements.
struct RunResult {
    label: String,
    load: Load,
    /// Steps after the warm-up, their mean and median `seconds`.
    measured_steps: usize,
    mean_step_s: f64,
    median_step_s: f64,
    /// Wall time from step `warmup`'s metrics line to the last one, per step.
    wall_step_s: f64,
    window_s: f64,
    coordinator_cpu_s: Option<f64>,
    decoy_cpu_s: Option<f64>,
    workers_cpu_s: Option<f64>,
    clients_cpu_s: Option<f64>,
    /// Every process on the machine (/proc/stat), and what is left after
    /// ours: other users of the machine.
    machine_cpu_s: Option<f64>,
    others_cpu_s: Option<f64>,
    /// The probe's heartbeats to the job's coordinator inside the window.
    probe: Latency,
    heartbeats: Option<LoadStats>,
    /// Heartbeats completed inside the window.
    window_calls: u64,
    coordinator_exit: String,
}

/// What the simulated clients saw.
struct LoadStats {
    /// Every call of the run, by status code ("Ok", "PermissionDenied", ...).
    outcomes: BTreeMap<String, u64>,
    /// Latency of every call of the run.
    all: Latency,
    /// Latency of the calls sent inside the measured window.
    window: Latency,
    /// The slowest calls: seconds after the workers started, latency (ms).
    slowest: Vec<(f64, f64)>,
}

/// Client-side latency quantiles (ms) of a set of calls.
struct Latency {
    calls: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Latency {
            calls: ms.len() as u64,
            p50_ms: quantile(&ms, 0.5).unwrap_or(f64::NAN),
            p99_ms: quantile(&ms, 0.99).unwrap_or(f64::NAN),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn cell(&self) -> String {
        format!("{:.2} / {:.2} / {:.1}", self.p50_ms, self.p99_ms, self.max_ms)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.time_limit_s);
    let runs: Vec<Load> = args.runs.iter().map(|s| Load::parse(s)).collect::<Result<_>>()?;
    if runs.is_empty() {
        bail!("--runs: no runs");
    }
    if args.workers == 0 || args.steps <= args.warmup + 1 {
        bail!("need at least one worker and more steps ({}) than warm-up steps ({}) + 1", args.steps, args.warmup);
    }
    if !(args.rate_hz > 0.0 && args.rate_hz.is_finite()) {
        bail!("--rate-hz: {} is not a positive rate", args.rate_hz);
    }
    if runs.iter().any(|&r| r != Load::None) {
        bench_util::check_open_files(args.clients + 64)?;
    }
    let bench_util::Inputs { bin_dir, data, base } = args.common.inputs()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let mut results: Vec<Result<RunResult>> = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for &load in &runs {
        let k = seen.entry(load.letter()).or_default();
        *k += 1;
        let label = format!("{}{}", load.letter(), k);
        let dir = tempfile::Builder::new().prefix(&format!("bench-hb-{label}-")).tempdir().context("temp dir")?;
        eprintln!("== run {label}: {} ({})", load.describe(args.clients), dir.path().display());
        let now = Instant::now();
        if now >= deadline {
            results.push(Err(anyhow!("not run: the benchmark's {} s time limit is spent", args.time_limit_s)));
            continue;
        }
        let limit = (deadline - now).min(Duration::from_secs(args.run_limit_s));
        let run = run_one(&args, &label, load, &bin_dir, &base, &data, dir.path());
        // Past the limit the run's future is dropped: its guards kill its
        // processes and its JoinSet aborts its clients.
        let r = match rt.block_on(async { tokio::time::timeout(limit, run).await }) {
            Ok(r) => r,
            Err(_) => Err(anyhow!("run {label} did not finish within {} s", limit.as_secs())),
        };
        match &r {
            Ok(r) => eprintln!(
                "   mean step {:.2} ms over {} steps, coordinator CPU {}",
                r.mean_step_s * 1e3,
                r.measured_steps,
                pct(r.coordinator_cpu_s, r.window_s)
            ),
            Err(e) => eprintln!("   FAILED: {e:#}"),
        }
        if args.keep || r.is_err() {
            eprintln!("   kept {}", dir.keep().display());
        }
        results.push(r);
    }
    print_table(&results, &args, start.elapsed());
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} runs failed", results.len());
    }
    Ok(())
}

/// CPU seconds over a window as a % of one core.
fn pct(cpu: Option<f64>, window_s: f64) -> String {
    cpu.map_or("?".into(), |c| format!("{:.0}%", 100.0 * c / window_s))
}

/// A command for `bin`, run on `cpus` through taskset (which execs it:
/// the process id is the binary's) when given.
fn on_cpus(bin: PathBuf, cpus: Option<&str>) -> Command {
    match cpus {
        Some(list) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(list).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

async fn start_coordinator(
    args: &Args,
    bin_dir: &Path,
    config: &Path,
    out: &Path,
    log: PathBuf,
    token: &str,
) -> Result<LocalCoordinator> {
    let mut cmd = on_cpus(bin_dir.join("coordinator"), args.coordinator_cpus.as_deref());
    cmd.arg("--config").arg(config).args(["--rate-limit", &args.rate_limit.to_string(), "--out"]).arg(out);
    cmd.env(TOKEN_ENV, token);
    bench_util::start_coordinator(cmd, log, args.call_timeout_s).await
}

/// Clocks read at the start and the end of the measured window.
struct Snap {
    at: Instant,
    coordinator: Option<f64>,
    decoy: Option<f64>,
    workers: Option<f64>,
    /// This process: the simulated clients (and the probe).
    me: Option<f64>,
    machine: Option<f64>,
    /// Heartbeats the simulated clients have completed.
    calls: u64,
}

async fn run_one(
    args: &Args,
    label: &str,
    load: Load,
    bin_dir: &Path,
    base: &str,
    data: &Path,
    dir: &Path,
) -> Result<RunResult> {
    let config = dir.join("job.toml");
    let int = |v: u64| toml::Value::Integer(v as i64);
    std::fs::write(
        &config,
        bench_util::job_config(
            base,
            data,
            &[("train", "steps", int(args.steps)), ("cluster", "world_size", int(args.workers as u64))],
        )?,
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    // A fresh job token per run, as scripts/slurm/train.sbatch makes one per job.
    let token = tessera_proto::auth::new_session_secret();
    let auth: AsciiMetadataValue =
        format!("Bearer {token}").parse().map_err(|_| anyhow!("the job token cannot travel in a header"))?;

    let out = dir.join("out");
    let mut coord = start_coordinator(args, bin_dir, &config, &out, dir.join("coordinator.log"), &token).await?;
    let mut decoy = None;
    if matches!(load, Load::Decoy | Load::DecoyMembers) {
        // The same job, but no worker joins it: it only serves the load (and
        // would give up after cluster.join_timeout_s, far beyond a run). For
        // D it has a rank for every client, which joins it.
        let ranks = if load == Load::DecoyMembers { args.clients } else { args.workers };
        let decoy_config = dir.join("decoy.toml");
        let c = bench_util::job_config(
            base,
            data,
            &[
                ("train", "steps", int(args.steps)),
                ("cluster", "world_size", int(ranks as u64)),
                ("cluster", "join_timeout_s", toml::Value::Float(3600.0)),
            ],
        )?;
        std::fs::write(&decoy_config, c).with_context(|| format!("cannot write {}", decoy_config.display()))?;
        decoy = Some(
            start_coordinator(args, bin_dir, &decoy_config, &dir.join("decoy-out"), dir.join("decoy.log"), &token)
                .await?,
        );
    }

    // The load: N connections, then a heartbeat loop on each.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    let origin = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.rate_hz);
    // The probe: one more client, in every run, heartbeating the job's
    // coordinator at the same rate: the latency the job's coordinator
    // answers with, loaded or not.
    let mut probe = tokio::task::JoinSet::new();
    {
        let c = CoordinatorClient::new(coord.endpoint.connect().await.context("cannot connect the probe")?);
        let beat = Beat { auth: auth.clone(), origin, period, stop: stop.clone(), done: Arc::new(AtomicU64::new(0)) };
        probe.spawn(heartbeat_loop(c, Member::claim(0), tokio::time::Instant::now(), beat));
    }
    if load != Load::None {
        let target = match &decoy {
            Some(d) => &d.endpoint,
            None => &coord.endpoint,
        };
        let t = Instant::now();
        let mut conns = bench_util::connect_all(target, args.clients, args.common.connect_batch).await?;
        eprintln!("   {} connections in {:.2} s", conns.len(), t.elapsed().as_secs_f64());
        let mut members = Vec::with_capacity(conns.len());
        for (i, c) in conns.iter_mut().enumerate() {
            members.push(match load {
                Load::DecoyMembers => Member::join(c, i as u32, &auth).await?,
                _ => Member::claim((i % args.workers) as u32),
            });
        }
        let beat = Beat { auth: auth.clone(), origin, period, stop: stop.clone(), done: done.clone() };
        let t0 = tokio::time::Instant::now();
        let n = conns.len();
        for (i, (c, m)) in conns.into_iter().zip(members).enumerate() {
            let first = t0 + beat.period.mul_f64(i as f64 / n as f64);
            clients.spawn(heartbeat_loop(c, m, first, beat.clone()));
        }
        // Let the load settle before the job starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The workers.
    let workers_at = Instant::now();
    let url = coord.endpoint.uri().to_string();
    let mut workers = Vec::with_capacity(args.workers);
    for rank in 0..args.workers {
        let log = dir.join(format!("worker-{rank}.log"));
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let out_file = log_file.try_clone().context("cannot share the log file")?;
        let child = on_cpus(bin_dir.join("worker"), args.worker_cpus.as_deref())
            .args(["--rank", &rank.to_string(), "--coordinator", url.trim_end_matches('/')])
            .args(["--device", "cpu", "--connect-timeout", "60"])
            .env(TOKEN_ENV, &token)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::from(out_file))
            .stderr(Stdio::from(log_file))
            .spawn()
            .context("cannot start a worker")?;
        workers.push(Reaper(Some(child)));
    }
    let worker_pids: Vec<u32> = workers.iter().filter_map(Reaper::pid).collect();
    let snapshot = |coord_pid: u32, decoy_pid: Option<u32>| Snap {
        at: Instant::now(),
        coordinator: cpu_s(coord_pid),
        decoy: decoy_pid.and_then(cpu_s),
        workers: worker_pids.iter().map(|&p| cpu_s(p)).sum(),
        me: cpu_s(std::process::id()),
        machine: machine_cpu_s(),
        calls: done.load(Ordering::Relaxed),
    };

    // Watch metrics.jsonl: the window runs from step `warmup`'s line to the last.
    let decoy_pid = decoy.as_ref().map(|d| d.pid);
    let mut lines = LineCounter { path: out.join("metrics.jsonl"), offset: 0, lines: 0 };
    let mut begin = None;
    let end = loop {
        // The lines first: a finished job's workers exit right after its last
        // line, and an exited (not yet reaped) process still has its CPU clock.
        let n = lines.poll()?;
        if begin.is_none() && n > args.warmup {
            begin = Some(snapshot(coord.pid, decoy_pid));
        }
        if n >= args.steps {
            break snapshot(coord.pid, decoy_pid);
        }
        if let Some(status) = coord.reaper.try_exit()? {
            bail!("the coordinator exited during training ({status}):\n{}", log_tail(&coord.log));
        }
        for (rank, w) in workers.iter_mut().enumerate() {
            if let Some(status) = w.try_exit()? {
                bail!(
                    "worker {rank} exited during training ({status}):\n{}",
                    log_tail(&dir.join(format!("worker-{rank}.log")))
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let begin = begin.context("the window never began")?;
    stop.store(true, Ordering::Relaxed);

    // Gather the clients (each ends after its call in flight).
    let mut all = ClientStats::default();
    while let Some(r) = clients.join_next().await {
        let s = r.context("a heartbeat client task failed")?;
        all.calls.extend(s.calls);
        for (k, v) in s.outcomes {
            *all.outcomes.entry(k).or_default() += v;
        }
    }
    let ms_since = |t: Instant| (t - origin).as_secs_f64() * 1e3;
    let (w0, w1) = (ms_since(begin.at), ms_since(end.at));
    let lat = |c: &(u32, u32)| c.1 as f64 / 1e3;
    let in_window = |c: &&(u32, u32)| (w0..=w1).contains(&(c.0 as f64));
    let mut probe_calls = Vec::new();
    while let Some(r) = probe.join_next().await {
        probe_calls.extend(r.context("the probe task failed")?.calls);
    }
    let probe = Latency::of(probe_calls.iter().filter(in_window).map(lat).collect());
    let heartbeats = (load != Load::None).then(|| {
        let window = all.calls.iter().filter(in_window).map(lat).collect();
        let mut slowest = all.calls.clone();
        slowest.sort_by_key(|c| std::cmp::Reverse(c.1));
        let workers_ms = ms_since(workers_at);
        LoadStats {
            all: Latency::of(all.calls.iter().map(lat).collect()),
            window: Latency::of(window),
            slowest: slowest.iter().take(5).map(|c| ((c.0 as f64 - workers_ms) / 1e3, lat(c))).collect(),
            outcomes: all.outcomes,
        }
    });
    if let Some(h) = &heartbeats {
        eprintln!(
            "   slowest heartbeats (s after the workers started: ms): {}; the window: {:.1} to {:.1} s",
            h.slowest.iter().map(|(t, l)| format!("{t:.2}: {l:.1}")).collect::<Vec<_>>().join(", "),
            (begin.at - workers_at).as_secs_f64(),
            (end.at - workers_at).as_secs_f64()
        );
    }
    // The decoy is killed: it would wait for workers for an hour.
    drop(decoy.take());

    // Rank 0 evaluates and saves the model, then everyone leaves.
    let status = loop {
        if let Some(s) = coord.reaper.try_exit()? {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if !status.success() {
        bail!("the coordinator exited with {status}:\n{}", log_tail(&coord.log));
    }
    for (rank, w) in workers.iter_mut().enumerate() {
        let s = loop {
            if let Some(s) = w.try_exit()? {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if !s.success() {
            bail!("worker {rank} exited with {s}:\n{}", log_tail(&dir.join(format!("worker-{rank}.log"))));
        }
    }

    let steps = step_seconds(&out.join("metrics.jsonl"))?;
    let mut measured: Vec<f64> = steps.iter().filter(|(s, _)| *s >= args.warmup).map(|&(_, s)| s).collect();
    if measured.is_empty() {
        bail!("no steps after the warm-up in metrics.jsonl");
    }
    let mean_step_s = measured.iter().sum::<f64>() / measured.len() as f64;
    measured.sort_by(f64::total_cmp);
    let window_s = (end.at - begin.at).as_secs_f64();
    let cpu = |f: fn(&Snap) -> Option<f64>| delta(f(&begin), f(&end));
    let ours: Option<f64> =
        [cpu(|s| s.coordinator), cpu(|s| s.decoy).or(Some(0.0)), cpu(|s| s.workers), cpu(|s| s.me)].into_iter().sum();
    let window_steps = args.steps - (args.warmup + 1);
    Ok(RunResult {
        label: label.to_string(),
        load,
        measured_steps: measured.len(),
        mean_step_s,
        median_step_s: quantile(&measured, 0.5).unwrap_or(f64::NAN),
        wall_step_s: window_s / window_steps.max(1) as f64,
        window_s,
        coordinator_cpu_s: cpu(|s| s.coordinator),
        decoy_cpu_s: cpu(|s| s.decoy),
        workers_cpu_s: cpu(|s| s.workers),
        clients_cpu_s: if load == Load::None { None } else { cpu(|s| s.me) },
        machine_cpu_s: cpu(|s| s.machine),
        others_cpu_s: delta(ours, cpu(|s| s.machine)),
        probe,
        heartbeats,
        window_calls: end.calls - begin.calls,
        coordinator_exit: format!("exit {}", status.code().map_or("signal".into(), |c| c.to_string())),
    })
}

fn print_table(results: &[Result<RunResult>], args: &Args, took: Duration) {
    // Mean step of each kind of run, over its runs.
    let mean_of = |load: Load| -> Option<(f64, usize)> {
        let v: Vec<f64> =
            results.iter().filter_map(|r| r.as_ref().ok()).filter(|r| r.load == load).map(|r| r.mean_step_s).collect();
        (!v.is_empty()).then(|| (v.iter().sum::<f64>() / v.len() as f64, v.len()))
    };
    let baseline = mean_of(Load::None).map(|m| m.0);
    println!();
    println!(
        "| run | load | mean step (ms) | vs mean A | median step (ms) | wall per step (ms) | job's coordinator, probe latency p50 / p99 / max (ms) | coordinator CPU | decoy CPU | workers CPU | clients CPU | other processes CPU | heartbeats/s | latency in window p50 / p99 / max (ms) | latency, all calls | outcomes, all calls | coordinator |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for (i, r) in results.iter().enumerate() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                println!("| {} | failed: {} |", i + 1, format!("{e:#}").replace('|', "/").replace('\n', " "));
                continue;
            }
        };
        let ratio = baseline.map_or("?".into(), |b| format!("{:+.1}%", 100.0 * (r.mean_step_s / b - 1.0)));
        let (rate, window_lat, all_lat, outcomes) = match &r.heartbeats {
            Some(h) => (
                format!("{:.0}", r.window_calls as f64 / r.window_s),
                h.window.cell(),
                h.all.cell(),
                format!(
                    "{} calls: {}",
                    h.all.calls,
                    h.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
                ),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let dash = |v: Option<f64>| if v.is_none() { "-".to_string() } else { pct(v, r.window_s) };
        println!(
            "| {} | {} | **{:.2}** | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.load.describe(args.clients),
            r.mean_step_s * 1e3,
            ratio,
            r.median_step_s * 1e3,
            r.wall_step_s * 1e3,
            r.probe.cell(),
            pct(r.coordinator_cpu_s, r.window_s),
            dash(r.decoy_cpu_s),
            pct(r.workers_cpu_s, r.window_s),
            dash(r.clients_cpu_s),
            pct(r.others_cpu_s, r.window_s),
            rate,
            window_lat,
            all_lat,
            outcomes,
            r.coordinator_exit,
        );
    }
    let measured = results.iter().find_map(|r| r.as_ref().ok().map(|r| r.measured_steps)).unwrap_or(0);
    let machine = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| format!("{} {}", r.label, pct(r.machine_cpu_s, r.window_s)))
        .collect::<Vec<_>>()
        .join(", ");
    // All the machine's cores (/proc/stat counts them all), not this process's share.
    let cores = std::fs::read_to_string("/proc/stat")
        .map(|s| s.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count())
        .unwrap_or(0);
    let own_cpus = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:").map(|v| v.trim().to_string())))
        .unwrap_or_else(|| "?".into());
    let placed = |cpus: &Option<String>| cpus.clone().unwrap_or_else(|| format!("{own_cpus} (shared)"));
    let (workers, steps, warmup, clients, hz) = (args.workers, args.steps, args.warmup, args.clients, args.rate_hz);
    println!();
    println!(
        "{workers} workers, {steps} steps. Step figures: the steps from {warmup} on ({measured} a run); mean step = \
         mean of metrics.jsonl `seconds` (the slowest rank's step); wall per step = the window (step {warmup}'s \
         metrics line to the last) / its steps. CPU: user + system in the window as a % of one core; clients = this \
         process; other processes = the machine's busy time (/proc/stat) less ours (machine, {cores} cores: \
         {machine}). Probe: one more client heartbeating the job's coordinator at {hz} Hz in every run (calls sent \
         in the window). Heartbeats: {clients} clients x {hz} Hz offered = {:.0}/s, on one stream each, a beat answered \
         before the next, rank i % {workers} without its session (D: rank i of the decoy's job, with its session); heartbeats/s completed in the window; latency client-side, send to \
         reply, of the calls sent in the window and of every call of the run (from before the workers start to the \
         last step). CPUs: workers {}, coordinator and decoy {}, clients {own_cpus}. Took {:.0} s.",
        clients as f64 * hz,
        placed(&args.worker_cpus),
        placed(&args.coordinator_cpus),
        took.as_secs_f64()
    );
    println!();
    let show = |load: Load| {
        mean_of(load)
            .map_or("no run".into(), |(m, k)| format!("{:.2} ms ({k} run{})", m * 1e3, if k == 1 { "" } else { "s" }))
    };
    println!("Mean step, mean of the runs of each kind: A (no load) {}, B (load on the job's coordinator) {}, C (load on a decoy) {}.", show(Load::None), show(Load::Job), show(Load::Decoy));
    let vs = |a: Load, b: Load| match (mean_of(a), mean_of(b)) {
        (Some((x, _)), Some((y, _))) => format!("{:+.1}%", 100.0 * (x / y - 1.0)),
        _ => "?".into(),
    };
    println!(
        "B vs A {} (the whole slowdown under load); C vs A {} (the same load served by another process: sharing the \
         machine); B vs C {} (serving it inside the job's coordinator).",
        vs(Load::Job, Load::None),
        vs(Load::Decoy, Load::None),
        vs(Load::Job, Load::Decoy)
    );
    // What one beat costs the decoy: refusals (C) against members' beats (D).
    let per_beat = |load: Load| {
        let (cpu, beats) = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|r| r.load == load)
            .filter_map(|r| Some((r.decoy_cpu_s?, r.window_calls)))
            .fold((0.0, 0), |(c, b), (dc, db)| (c + dc, b + db));
        if beats == 0 {
            "no run".to_string()
        } else {
            format!("{:.1} us", 1e6 * cpu / beats as f64)
        }
    };
    println!(
        "Decoy CPU per answered beat (its whole CPU in the window over the beats): C (refusals) {}, D (members' \
         beats) {}.",
        per_beat(Load::Decoy),
        per_beat(Load::DecoyMembers)
    );
}
