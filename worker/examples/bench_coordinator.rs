//! Coordinator scale benchmark: N simulated workers in this one process talk
//! real gRPC to a real `coordinator` process on 127.0.0.1.
//!
//! For each N it writes a job config (configs/demo.toml with
//! `train.steps = --steps`, `train.batch_size = N`, so each rank gets about
//! one sample a step, `cluster.world_size = N` and a 30 s heartbeat
//! interval), starts `coordinator --config ... --listen 127.0.0.1:PORT --out
//! TMP`, and opens N tonic channels, one TCP connection each. Then, timed
//! phase by phase, every simulated worker
//!
//! 1. calls Join (its own fake host, pid and ring address, device "cpu") and
//!    then Rendezvous until the reply says ready. The rendezvous time runs
//!    from the first Join sent to the last ready reply received. Every call
//!    after Join carries the session secret Join returned
//!    (`x-tessera-session`), as a real worker's does;
//! 2. fetches GetAssignment for steps 0..steps, one after another (all
//!    workers at once, as ranks in lock step do); the per-step sample counts
//!    over all ranks are checked against the global batch. Then it fetches
//!    them all again: the coordinator caches plans, so this second pass
//!    measures the RPC and a cache lookup without planning;
//! 3. sends a ReportStep for each step and Leave(finished = true), so the
//!    coordinator ends the job as finished, exits 0 and is reaped.
//!
//! The connections are opened before the clock starts (the table shows how
//! long that took). Both processes share the machine's cores; the table
//! shows the coordinator's CPU time (user + system) in each phase.
//!
//! `--device cuda` simulates a GPU job instead: worker i claims cuda:(i % 8)
//! on fake host i / 8, and rank 0 sends a 128-byte NCCL id with its
//! Rendezvous, which it starts `--rank0-delay-ms` after its Join (creating
//! the id and initializing CUDA take a moment), so the other ranks are
//! already waiting in Rendezvous when the id arrives.
//!
//! ```text
//! cargo build --release -p tessera-worker -p tessera-coordinator --example bench_coordinator
//! target/release/examples/bench_coordinator [--workers 64,256,1024] [--steps 100]
//! ```
//! or `tools/bench_coordinator.sh`, which builds and prints the machine.

mod bench_util;

use anyhow::{anyhow, bail, Context, Result};
use bench_util::{check_open_files, connect_all, cpu_s, delta, log_tail, peak_rss_mib, LocalCoordinator, Reaper};
use clap::Parser;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_proto::auth::SESSION_KEY;
use tessera_proto::v1::{AssignmentRequest, JoinRequest, LeaveRequest, RendezvousRequest, StepReport, Timings};
use tessera_proto::CoordinatorClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "N simulated workers against a real coordinator over gRPC")]
struct Args {
    /// Simulated worker counts, one coordinator run each.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    workers: Vec<usize>,
    /// Step assignments each worker fetches (and steps the job has).
    #[arg(long, default_value_t = 100)]
    steps: u64,
    #[command(flatten)]
    common: bench_util::CommonArgs,
    /// Async runtime threads of the simulated workers.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Keep each run's folder (config, coordinator log, metrics).
    #[arg(long)]
    keep: bool,
    /// cpu: every worker on "cpu"; cuda: 8 fake GPUs per fake host, and
    /// rank 0 sends an NCCL id with its Rendezvous.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// With --device cuda: rank 0 starts its Rendezvous this long after its Join.
    #[arg(long, default_value_t = 200)]
    rank0_delay_ms: u64,
    /// Longest one call may take (the worker's client allows 60 s).
    #[arg(long, default_value_t = 60.0)]
    call_timeout_s: f64,
}

/// One row of the table.
struct Row {
    workers: usize,
    device: String,
    connect_s: f64,
    all_joined_s: f64,
    rendezvous_s: f64,
    polls: u64,
    rendezvous_cpu_s: Option<f64>,
    /// The phases after the rendezvous, or why they failed.
    rest: Result<Rest, String>,
}

/// Assignments, reports and the coordinator's exit.
struct Rest {
    assignments: u64,
    assign_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    assign_cpu_s: Option<f64>,
    cached_assign_s: f64,
    reports_s: f64,
    leave_exit_s: f64,
    coordinator_peak_rss_mib: Option<f64>,
    exit: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let max_n = args.workers.iter().copied().max().unwrap_or(0);
    check_open_files(max_n)?;
    let bench_util::Inputs { bin_dir, data, base } = args.common.inputs()?;
    let coordinator = bin_dir.join("coordinator");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut rows = Vec::new();
    for &n in &args.workers {
        if n == 0 {
            bail!("--workers: 0 is not a worker count");
        }
        let dir = tempfile::Builder::new().prefix(&format!("bench-coord-{n}-")).tempdir().context("temp dir")?;
        eprintln!("== {n} workers ({})", dir.path().display());
        let row = rt.block_on(run_one(&args, n, &coordinator, &base, &data, dir.path()));
        if args.keep {
            eprintln!("   kept {}", dir.keep().display());
        }
        match &row {
            Ok(Row { rendezvous_s, rest: Ok(r), .. }) => eprintln!(
                "   rendezvous {rendezvous_s:.3} s, {:.0} assignments/s, coordinator: {} {:.2} s after the last Leave",
                r.assignments as f64 / r.assign_s,
                r.exit,
                r.leave_exit_s
            ),
            Ok(Row { rendezvous_s, rest: Err(e), .. }) => {
                eprintln!("   rendezvous {rendezvous_s:.3} s, then FAILED: {e}")
            }
            Err(e) => eprintln!("   FAILED: {e:#}"),
        }
        rows.push((n, row));
    }
    print_table(&rows, &args);
    let failed = rows.iter().filter(|(_, r)| !matches!(r, Ok(Row { rest: Ok(_), .. }))).count();
    if failed > 0 {
        bail!("{failed} of {} runs failed", rows.len());
    }
    Ok(())
}

/// The base config with this run's size and steps and a 30 s heartbeat
/// interval.
fn job_config(base: &str, n: usize, steps: u64, data: &Path) -> Result<String> {
    let int = |v: i64| toml::Value::Integer(v);
    bench_util::job_config(
        base,
        data,
        &[
            ("train", "steps", int(steps as i64)),
            ("train", "batch_size", int(n as i64)),
            ("cluster", "world_size", int(n as i64)),
            ("cluster", "heartbeat_interval_s", toml::Value::Float(30.0)),
        ],
    )
}

async fn run_one(args: &Args, n: usize, coordinator: &Path, base: &str, data: &Path, dir: &Path) -> Result<Row> {
    let steps = args.steps;
    let config = dir.join("job.toml");
    std::fs::write(&config, job_config(base, n, steps, data)?)
        .with_context(|| format!("cannot write {}", config.display()))?;
    let mut cmd = Command::new(coordinator);
    cmd.arg("--config").arg(&config).arg("--out").arg(dir.join("out"));
    let LocalCoordinator { mut reaper, pid, endpoint, log } =
        bench_util::start_coordinator(cmd, dir.join("coordinator.log"), args.call_timeout_s).await?;

    // One connection per simulated worker, opened before the clock starts.
    let t = Instant::now();
    let clients = connect_all(&endpoint, n, args.common.connect_batch).await?;
    let connect_s = t.elapsed().as_secs_f64();

    // Phase 1: Join, then Rendezvous until ready.
    let cuda = args.device == "cuda";
    let rank0_delay = Duration::from_millis(args.rank0_delay_ms);
    let cpu0 = cpu_s(pid);
    let joined = on_every_worker(&clients, "rendezvous", |i, mut c| async move {
        let t_join = Instant::now();
        let j = c
            .join(JoinRequest {
                protocol_version: tessera_proto::PROTOCOL_VERSION,
                rank: Some(i as u32),
                host: if cuda { format!("sim-node-{}", i / 8) } else { format!("sim-{i}") },
                device: if cuda { format!("cuda:{}", i % 8) } else { "cpu".into() },
                collective_addr: format!("10.{}.{}.{}:29600", i >> 16 & 255, i >> 8 & 255, i & 255),
                pid: 100_000 + i as u32,
            })
            .await
            .map_err(|s| anyhow!("rank {i}: join: {}", s.message()))?
            .into_inner();
        let t_joined = Instant::now();
        let session: AsciiMetadataValue =
            j.session_secret.parse().map_err(|_| anyhow!("rank {i}: the session secret is not a header value"))?;
        if j.rank != i as u32 || j.world_size as usize != n {
            bail!("rank {i}: join answered rank {} of {}", j.rank, j.world_size);
        }
        let nccl_unique_id = if cuda && i == 0 {
            tokio::time::sleep(rank0_delay).await;
            vec![7u8; 128]
        } else {
            vec![]
        };
        let mut polls = 0u64;
        loop {
            let r = c
                .rendezvous(as_member(
                    RendezvousRequest {
                        rank: j.rank,
                        generation: j.generation,
                        nccl_unique_id: nccl_unique_id.clone(),
                        member_id: j.member_id,
                    },
                    &session,
                ))
                .await
                .map_err(|s| anyhow!("rank {i}: rendezvous: {}", s.message()))?
                .into_inner();
            polls += 1;
            if r.ready {
                if r.ring_peers.len() != n {
                    bail!("rank {i}: {} ring peers, expected {n}", r.ring_peers.len());
                }
                if cuda && r.nccl_unique_id.len() != 128 {
                    bail!("rank {i}: ready without the NCCL id");
                }
                return Ok((t_join, t_joined, Instant::now(), polls, j.generation, session));
            }
        }
    })
    .await?;
    let mut first_join: Option<Instant> = None;
    let (mut last_joined, mut last_ready) = (None::<Instant>, None::<Instant>);
    let (mut polls, mut generation) = (0u64, 0u64);
    let mut sessions = Vec::with_capacity(n);
    for (tj, tjd, tr, p, g, session) in joined {
        sessions.push(session);
        first_join = Some(first_join.map_or(tj, |f| f.min(tj)));
        last_joined = Some(last_joined.map_or(tjd, |l| l.max(tjd)));
        last_ready = Some(last_ready.map_or(tr, |l| l.max(tr)));
        polls += p;
        generation = g;
    }
    let first_join = first_join.context("no workers")?;
    let all_joined_s = last_joined.map_or(0.0, |l| (l - first_join).as_secs_f64());
    let rendezvous_s = last_ready.map_or(0.0, |l| (l - first_join).as_secs_f64());
    let cpu1 = cpu_s(pid);
    let rest = later_phases(&clients, &sessions, n, steps, generation, pid, &mut reaper, &log, cpu1).await;
    Ok(Row {
        workers: n,
        device: args.device.clone(),
        connect_s,
        all_joined_s,
        rendezvous_s,
        polls,
        rendezvous_cpu_s: delta(cpu0, cpu1),
        rest: rest.map_err(|e| format!("{e:#}")),
    })
}

/// `msg` carrying the session secret the simulated worker's Join returned
/// (the coordinator refuses a call for a rank without it).
fn as_member<T>(msg: T, session: &AsciiMetadataValue) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(SESSION_KEY, session.clone());
    r
}

/// Runs `work(rank, client)` for every simulated worker at once, each on its
/// own task, and returns the results in rank order (the first error wins).
async fn on_every_worker<T, F, Fut>(clients: &[CoordinatorClient<Channel>], what: &str, work: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize, CoordinatorClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let handles: Vec<_> = clients.iter().enumerate().map(|(i, c)| tokio::spawn(work(i, c.clone()))).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.with_context(|| format!("{what} task"))??);
    }
    Ok(out)
}

/// Phases 2 and 3: assignments (planned, then cached), reports, Leave, and
/// the coordinator's exit.
#[allow(clippy::too_many_arguments)]
async fn later_phases(
    clients: &[CoordinatorClient<Channel>],
    sessions: &[AsciiMetadataValue],
    n: usize,
    steps: u64,
    generation: u64,
    pid: u32,
    reaper: &mut Reaper,
    log: &Path,
    cpu1: Option<f64>,
) -> Result<Rest> {
    // Phase 2: every worker fetches its assignment for each step.
    let per_step: Arc<Vec<AtomicU64>> = Arc::new((0..steps).map(|_| AtomicU64::new(0)).collect());
    let t = Instant::now();
    let fetched = on_every_worker(clients, "assignment", |i, mut c| {
        let per_step = per_step.clone();
        let session = sessions[i].clone();
        async move {
            let mut lat = Vec::with_capacity(steps as usize);
            let mut mine = Vec::with_capacity(steps as usize);
            for step in 0..steps {
                let t = Instant::now();
                let a = c
                    .get_assignment(as_member(AssignmentRequest { rank: i as u32, generation, step }, &session))
                    .await
                    .map_err(|s| anyhow!("rank {i}: assignment {step}: {}", s.message()))?
                    .into_inner();
                lat.push(t.elapsed().as_secs_f64());
                if a.done || a.step != step || a.global_samples as usize != n {
                    bail!(
                        "rank {i}: step {step}: unexpected assignment (done {}, {} global samples)",
                        a.done,
                        a.global_samples
                    );
                }
                per_step[step as usize].fetch_add(a.samples.len() as u64, Ordering::Relaxed);
                mine.push(a.samples.len() as u32);
            }
            Ok((lat, mine))
        }
    })
    .await?;
    let mut latencies = Vec::with_capacity(n * steps as usize);
    let mut samples: Vec<Vec<u32>> = Vec::with_capacity(n);
    for (lat, mine) in fetched {
        latencies.extend(lat);
        samples.push(mine);
    }
    let assign_s = t.elapsed().as_secs_f64();
    for (step, total) in per_step.iter().enumerate() {
        let total = total.load(Ordering::Relaxed);
        if total != n as u64 {
            bail!("step {step}: the ranks' assignments hold {total} samples, the global batch is {n}");
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| bench_util::quantile(&latencies, q).unwrap_or(f64::NAN) * 1e3;
    let cpu2 = cpu_s(pid);

    // Phase 2b: the same assignments again, now from the plan cache.
    let t = Instant::now();
    on_every_worker(clients, "assignment", |i, mut c| {
        let session = sessions[i].clone();
        async move {
            for step in 0..steps {
                c.get_assignment(as_member(AssignmentRequest { rank: i as u32, generation, step }, &session))
                    .await
                    .map_err(|s| anyhow!("rank {i}: assignment {step} (again): {}", s.message()))?;
            }
            Ok(())
        }
    })
    .await?;
    let cached_assign_s = t.elapsed().as_secs_f64();
    let coordinator_peak_rss_mib = peak_rss_mib(pid);

    // Phase 3: report every step, then leave as finished.
    let t = Instant::now();
    on_every_worker(clients, "report", |i, mut c| {
        let mine = samples[i].clone();
        let session = sessions[i].clone();
        async move {
            for (step, &k) in mine.iter().enumerate() {
                let report = StepReport {
                    rank: i as u32,
                    generation,
                    step: step as u64,
                    loss_sum: k as f64,
                    target_tokens: k as u64,
                    samples: k,
                    tiles: 2 * k,
                    llm_tokens: 32 * k as u64,
                    grad_norm: 1.0,
                    lr_scale: 1.0,
                    timings: Some(Timings { data_wait_s: 0.0, compute_s: 0.01, comm_wait_s: 0.0, step_s: 0.01 }),
                    ..Default::default()
                };
                c.report_step(as_member(report, &session))
                    .await
                    .map_err(|s| anyhow!("rank {i}: report {step}: {}", s.message()))?;
            }
            Ok(())
        }
    })
    .await?;
    let reports_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    on_every_worker(clients, "leave", |i, mut c| {
        let leave =
            as_member(LeaveRequest { rank: i as u32, generation, finished: true, ..Default::default() }, &sessions[i]);
        async move {
            c.leave(leave).await.map_err(|s| anyhow!("rank {i}: leave: {}", s.message()))?;
            Ok(())
        }
    })
    .await?;
    let mut child = reaper.0.take().context("the coordinator is gone")?;
    let status = loop {
        if let Some(s) = child.try_wait().context("cannot poll the coordinator")? {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the coordinator did not exit within 60 s of the last Leave:\n{}", log_tail(log));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let leave_exit_s = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the coordinator exited with {status}:\n{}", log_tail(log));
    }
    Ok(Rest {
        assignments: n as u64 * steps,
        assign_s,
        latency_p50_ms: pct(0.5),
        latency_p99_ms: pct(0.99),
        assign_cpu_s: delta(cpu1, cpu2),
        cached_assign_s,
        reports_s,
        leave_exit_s,
        coordinator_peak_rss_mib,
        exit: format!("exit {}", status.code().map_or("signal".into(), |c| c.to_string())),
    })
}

fn print_table(rows: &[(usize, Result<Row>)], args: &Args) {
    let steps = args.steps;
    let opt = |v: Option<f64>, digits: usize| v.map_or("?".to_string(), |v| format!("{v:.digits$}"));
    println!();
    println!(
        "| workers | device | connect (s) | all joined (s) | rendezvous (s) | < 2 s | Rendezvous calls | coordinator CPU (s) | assignments | time (s) | assignments/s | latency p50 / p99 (ms) | coordinator CPU (s) | assignments/s, plans cached | reports/s | coordinator peak RSS (MiB) | coordinator |"
    );
    println!("|---:|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let failed = |e: &str| format!("failed: {}", e.replace('|', "/").replace('\n', " "));
    for (n, r) in rows {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                println!("| {n} | {} | {} |", args.device, failed(&format!("{e:#}")));
                continue;
            }
        };
        let total = (r.workers as u64 * steps) as f64;
        let head = format!(
            "| {} | {} | {:.3} | {:.3} | **{:.3}** | {} | {} | {} |",
            r.workers,
            r.device,
            r.connect_s,
            r.all_joined_s,
            r.rendezvous_s,
            if r.rendezvous_s < 2.0 { "yes" } else { "no" },
            r.polls,
            opt(r.rendezvous_cpu_s, 2),
        );
        match &r.rest {
            Ok(x) => println!(
                "{head} {} | {:.2} | **{:.0}** | {:.1} / {:.1} | {} | {:.0} | {:.0} | {} | {} |",
                x.assignments,
                x.assign_s,
                x.assignments as f64 / x.assign_s,
                x.latency_p50_ms,
                x.latency_p99_ms,
                opt(x.assign_cpu_s, 1),
                total / x.cached_assign_s,
                total / x.reports_s,
                opt(x.coordinator_peak_rss_mib, 0),
                x.exit,
            ),
            Err(e) => println!("{head} {} |", failed(e)),
        }
    }
    println!();
    println!(
        "rendezvous: first Join sent to last ready Rendezvous reply; the first coordinator CPU column covers it, the \
         second the first assignment pass (planning). Connections are opened before the clock starts. \
         Call timeout {} s.",
        args.call_timeout_s
    );
}
