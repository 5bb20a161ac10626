//! Runs a job: serve the workers, show progress, and when every worker has
//! left, write the metrics, the loss curve and the outcome.

use crate::job;
use crate::limits::{gate, RateLimiter};
use crate::loss_curve::loss_curve_svg;
use crate::metrics_log::MetricsLog;
use crate::planner::Planner;
use crate::progress::StepSummary;
use crate::prometheus::{JobSnapshot, Metrics};
use crate::service::{Service, Shared};
use crate::state::{Gathering, JobState, Liveness, Outcome, RecoveryPolicy};
use crate::store::{self, JobStore};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_job::checkpoint;
use tessera_job::config::model_config;
use tessera_job::data::DatasetIndex;
use tessera_proto::auth::JobToken;
use tessera_proto::tls::ServerTls;

/// How long the gRPC server may take to finish its calls once the job has
/// ended (a Rendezvous answers within 10 s) before connections are closed.
const STOP_GRACE: Duration = Duration::from_secs(12);

pub struct RunOptions {
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// metrics.jsonl, loss_curve.svg and the model directory go here.
    pub out: PathBuf,
    /// Heartbeats a rank may miss before it is declared dead.
    pub missed_heartbeats: f64,
    /// Every call must carry it (none: anyone who reaches the port may join).
    /// It guards the metrics endpoint too.
    pub token: Option<JobToken>,
    /// Requests a second each client connection may make (bursts of twice that).
    pub rate_limit: f64,
    /// Larger requests are refused (OUT_OF_RANGE) without being decoded.
    pub max_message_bytes: usize,
    pub tls: Option<ServerTls>,
    /// Where `GET /metrics` is served (none: nowhere).
    pub metrics_listen: Option<SocketAddr>,
}

/// What the job produced.
pub struct RunReport {
    pub outcome: Outcome,
    pub steps: Vec<StepSummary>,
    pub eval: Option<tessera_proto::v1::EvalResult>,
}

pub fn run(opts: &RunOptions) -> Result<RunReport> {
    let job = job::load(&opts.config)?;
    let cfg = model_config(&job)?;
    let data_cfg = job.data.clone().context("job config: [data] is missing")?;
    let t0 = Instant::now();
    let dataset = Arc::new(DatasetIndex::open(&data_cfg, &cfg)?);
    tracing::info!(
        samples_per_epoch = dataset.epoch_len(),
        bad_records = dataset.bad_records.len(),
        seconds = t0.elapsed().as_secs_f64(),
        "dataset indexed"
    );
    let world = job.cluster.world_size;
    let global_batch = job::global_batch(&job);
    let planner = Arc::new(Planner::new(dataset, cfg, job.train.seed, global_batch));
    let costs = planner.cost_model();
    tracing::info!(
        global_batch,
        vit_gflop_per_tile = costs.per_tile / 1e9,
        llm_gflop_per_token = costs.per_token / 1e9,
        "cost model for sharding"
    );
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let out = opts.out.canonicalize().with_context(|| format!("cannot resolve {}", opts.out.display()))?;
    let spec = job::spec(&job, Some(&out.join("model")))?;
    let total = spec.total_steps;
    // A job whose checkpoint directory holds an intact checkpoint resumes
    // from the newest one: the plan of every later step is the same pure
    // function of the step, whatever the world size.
    let start_step = match &job.checkpoint.dir {
        Some(root) => match checkpoint::latest_intact(root, &mut |w| tracing::warn!("{w}"))? {
            Some(dir) => {
                let step = checkpoint::committed_step(&dir)?;
                tracing::info!(checkpoint = %dir.display(), step, total, "resuming from the checkpoint");
                step
            }
            None => 0,
        },
        None => 0,
    };
    let deadline = job.cluster.heartbeat_interval_s * opts.missed_heartbeats;
    // The state directory: a coordinator started again on it picks the job
    // up where the last one left it.
    let (store, stored) = JobStore::open(&out)?;
    let stored = match stored {
        Some(stored) if start_step > 0 => {
            store::check_identity(&stored, spec.seed, spec.global_batch, &out)?;
            tracing::warn!(
                previous_generation = stored.generation,
                restarts = stored.restarts,
                steps_done = stored.steps_done,
                resume_step = start_step,
                "the coordinator restarted on a job in progress: every worker rejoins"
            );
            Some(stored)
        }
        // Nothing to resume: a new job, though still past every generation
        // a worker of the old one may speak for.
        Some(stored) => Some(store::StoredJob { generation: stored.generation, ..Default::default() }),
        None => None,
    };
    let metrics_path = out.join("metrics.jsonl");
    // A resumed job keeps the metrics of the steps before its checkpoint.
    let (metrics, earlier) = MetricsLog::open(&metrics_path, (start_step > 0).then_some(start_step))?;
    let metrics = Arc::new(Mutex::new(metrics));
    let bar = progress_bar(total);
    bar.set_position(start_step);
    let straggler_factor = job.cluster.straggler_factor;
    let bar_for_steps = bar.clone();
    let log_every = (total / 20).max(1);
    let metrics_for_steps = metrics.clone();
    let prom = opts.metrics_listen.map(|_| Arc::new(Metrics::new()));
    let prom_for_steps = prom.clone();
    let on_step = move |s: &StepSummary| {
        if let Err(e) = metrics_for_steps.lock().unwrap_or_else(|e| e.into_inner()).append(s) {
            tracing::error!(error = %format!("{e:#}"), "cannot write metrics.jsonl");
        }
        if let Some(p) = &prom_for_steps {
            p.observe_step(s);
        }
        for &rank in &s.stragglers {
            let compute_s = s.compute_s[rank as usize];
            tracing::warn!(step = s.step + 1, rank, compute_s, all_ranks = ?s.compute_s, factor = straggler_factor, "straggler");
        }
        bar_for_steps.set_position(s.step + 1);
        bar_for_steps.set_message(format!(
            "loss {:.4}  {:.0} tok/s  {:.1} tiles/s  imbalance {:.0}%",
            s.loss,
            s.tokens_per_s,
            s.tiles_per_s,
            100.0 * s.plan_imbalance
        ));
        if bar_for_steps.is_hidden() && ((s.step + 1).is_multiple_of(log_every) || s.step + 1 == total) {
            tracing::info!(
                step = s.step + 1,
                loss = format!("{:.4}", s.loss),
                tokens_per_s = format!("{:.0}", s.tokens_per_s),
                tiles_per_s = format!("{:.1}", s.tiles_per_s),
                plan_imbalance = format!("{:.3}", s.plan_imbalance),
                compute_imbalance = format!("{:.3}", s.compute_imbalance),
                comm_wait_s = format!("{:.3}", s.comm_wait_s),
                "step"
            );
        } else {
            tracing::debug!(step = s.step + 1, loss = s.loss, plan_imbalance = s.plan_imbalance, "step");
        }
    };
    let bar_for_rewind = bar.clone();
    let prom_for_rewind = prom.clone();
    let on_rewind = move |kept: &[StepSummary]| {
        if let Err(e) = metrics.lock().unwrap_or_else(|e| e.into_inner()).rewrite(kept) {
            tracing::error!(error = %format!("{e:#}"), "cannot rewrite metrics.jsonl");
        }
        if let Some(p) = &prom_for_rewind {
            p.rewound(kept);
        }
        bar_for_rewind.set_position(kept.last().map_or(0, |s| s.step + 1));
    };
    let policy = RecoveryPolicy {
        max_restarts: job.cluster.max_restarts,
        elastic: job.cluster.elastic,
        elastic_timeout_s: job.cluster.elastic_timeout_s,
        join_timeout_s: job.cluster.join_timeout_s,
    };
    // What is on disk is what a resume can use (the record in the store
    // may name checkpoints deleted or damaged since).
    let committed = match &job.checkpoint.dir {
        Some(root) if start_step > 0 => {
            checkpoint::committed_steps(root)?.into_iter().filter(|&s| s <= start_step).collect()
        }
        _ => Vec::new(),
    };
    let mut state = JobState::resume(spec, world, deadline, policy, stored.as_ref(), committed);
    state.set_straggler_factor(job.cluster.straggler_factor);
    state.summaries = earlier;
    store.save(&state.stored())?;
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        planner,
        changed: tokio::sync::Notify::new(),
        started: Instant::now(),
        on_step: Box::new(on_step),
        on_rewind: Box::new(on_rewind),
        store,
        checkpoints: job.checkpoint.dir.clone().map(|d| (d, job.checkpoint.keep)),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if opts.token.is_none() && !opts.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %opts.listen,
            "no job token: any process that reaches this port can join the job; set TESSERA_JOB_TOKEN or --token-file"
        );
    }
    let prom = opts.metrics_listen.zip(prom);
    let outcome = rt.block_on(serve(shared.clone(), opts, prom))?;
    bar.finish_and_clear();
    let st = shared.lock();
    let points: Vec<(u64, f64)> = st.summaries.iter().map(|s| (s.step + 1, s.loss)).collect();
    let svg_path = out.join("loss_curve.svg");
    let title = format!("{} on {world} worker(s)", opts.config.display());
    std::fs::write(&svg_path, loss_curve_svg(&points, &title))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    tracing::info!(metrics = %metrics_path.display(), loss_curve = %svg_path.display(), "wrote metrics");
    if let Some(m) = &st.saved_model {
        tracing::info!(model = %m, "rank 0 saved the model");
    }
    Ok(RunReport { outcome, steps: st.summaries.clone(), eval: st.eval })
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps  {elapsed} (eta {eta})  {msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// Serves until the job has an outcome and every worker has left (or a
/// failed job's workers had a chance to hear it); with `metrics`, serves
/// `GET /metrics` on its address as long.
async fn serve(shared: Arc<Shared>, opts: &RunOptions, metrics: Option<(SocketAddr, Arc<Metrics>)>) -> Result<Outcome> {
    let (listen, token) = (opts.listen, opts.token.clone());
    let world = shared.lock().members.world_size;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (is another coordinator running there?)"))?;
    let addr = listener.local_addr().context("listener address")?;
    let (metrics_stop, metrics_server) = match metrics {
        Some((at, metrics)) => {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} for the metrics endpoint"))?;
            let bound = listener.local_addr().context("metrics listener address")?;
            tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
            let for_scrape = shared.clone();
            // Copied under the lock, encoded after it is released.
            let snapshot = Box::new(move || JobSnapshot::of(&for_scrape.lock()));
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = crate::prometheus::serve(listener, metrics, snapshot, token.clone(), async {
                let _ = stop_rx.await;
            });
            (Some(stop_tx), Some(tokio::spawn(server)))
        }
        None => (None, None),
    };
    tracing::info!(%addr, world_size = world, "coordinator listening; waiting for workers");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let limiter = Arc::new(RateLimiter::new(opts.rate_limit, 2.0 * opts.rate_limit));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.config()?).context("the TLS certificate or key")?;
        tracing::info!(mutual = tls.client_ca.is_some(), "serving TLS");
    }
    let server = builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            tessera_proto::CoordinatorServer::new(Service(shared.clone(), limiter.clone()))
                .max_decoding_message_size(opts.max_message_bytes),
            gate(opts.token.clone(), limiter),
        ))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);
    let mut last_wait_log = Instant::now();
    let outcome = loop {
        let notified = shared.changed.notified();
        // Decided under the lock, awaited after it is released.
        let ended = {
            let mut st = shared.lock();
            match st.check_liveness(shared.now()) {
                Some(Liveness::Dead { rank, recovery }) => {
                    tracing::error!(rank, deadline_s = st.heartbeat_deadline_s, "worker declared dead");
                    if let Some(generation) = recovery {
                        shared.recovered(&st, generation);
                    }
                    shared.changed.notify_waiters();
                }
                Some(Liveness::Dropped { rank }) => {
                    tracing::warn!(
                        rank,
                        deadline_s = st.heartbeat_deadline_s,
                        "a rank that had not rejoined went silent: its rank is free for a replacement"
                    );
                }
                None => {}
            }
            match st.check_gathering(shared.now()) {
                Gathering::Waiting => {}
                Gathering::Shrunk(n) => {
                    tracing::warn!(world_size = n, "no replacement came within cluster.elastic_timeout_s: going on with fewer ranks, same global batch");
                    shared.changed.notify_waiters();
                }
                Gathering::Failed => {
                    tracing::error!(
                        joined = st.members.joined(),
                        world_size = st.members.world_size,
                        "gave up waiting for workers"
                    );
                }
            }
            let (joined, world) = (st.members.joined(), st.members.world_size);
            let waiting = st.outcome == Outcome::Running && !st.training;
            if waiting && last_wait_log.elapsed() > Duration::from_secs(10) {
                tracing::info!(joined, world_size = world, generation = st.members.generation, "waiting for workers");
                last_wait_log = Instant::now();
            }
            match &st.outcome {
                Outcome::Running => None,
                Outcome::Finished => Some((st.outcome.clone(), 0.0)),
                // Let the survivors hear "shutdown" on their next heartbeat.
                Outcome::Failed(_) => Some((st.outcome.clone(), 2.0 * st.spec.heartbeat_interval_s + 1.0)),
            }
        };
        if let Some((outcome, grace)) = ended {
            tokio::time::sleep(Duration::from_secs_f64(grace)).await;
            break outcome;
        }
        // Liveness is checked at least twice per heartbeat interval, so a
        // death is declared within the deadline plus half an interval.
        let tick = (shared.lock().spec.heartbeat_interval_s / 2.0).clamp(0.01, 0.5);
        let _ = tokio::time::timeout(Duration::from_secs_f64(tick), notified).await;
    };
    let _ = stop_tx.send(());
    if let Some(stop) = metrics_stop {
        let _ = stop.send(());
    }
    // A client that keeps its connection open must not keep the coordinator
    // from ending. The graceful stop sends each connection HTTP/2's GOAWAY
    // and waits for it to close: a stream still open (a stray heartbeat
    // stream, a hung worker) holds it, and so does an idle connection whose
    // client no longer runs its connection task (a stopped process, a
    // runtime nobody drives), which never answers the GOAWAY. Both measured
    // in tests/wire.rs; an idle client that runs closes at once.
    let mut server = server;
    match tokio::time::timeout(STOP_GRACE, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("gRPC server: {e}"),
        Ok(Err(e)) => bail!("gRPC server task: {e}"),
        Err(_) => {
            tracing::warn!(
                grace_s = STOP_GRACE.as_secs(),
                "clients still connected at the end: closing their connections"
            );
            server.abort();
        }
    }
    if let Some(server) = metrics_server {
        // The job's outcome stands whatever happened to its metrics.
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "metrics server"),
            Err(e) => tracing::warn!(error = %e, "metrics server task"),
        }
    }
    Ok(outcome)
}

/// Prints the end of a run for people.
pub fn print_report(r: &RunReport, out: &Path) {
    if let Some(last) = r.steps.last() {
        let secs: f64 = r.steps.iter().map(|s| s.seconds).sum();
        println!(
            "trained {} steps; final loss {:.4}; {:.0} tokens/s, {:.1} tiles/s (mean)",
            last.step + 1,
            last.loss,
            r.steps.iter().map(|s| s.llm_tokens as f64).sum::<f64>() / secs.max(1e-9),
            r.steps.iter().map(|s| s.tiles as f64).sum::<f64>() / secs.max(1e-9),
        );
    }
    if let Some(e) = &r.eval {
        println!(
            "eval: accuracy {:.3} ({}/{}), mean loss {:.4}",
            e.correct as f64 / (e.total.max(1)) as f64,
            e.correct,
            e.total,
            e.mean_loss
        );
    }
    println!("metrics: {}  loss curve: {}", out.join("metrics.jsonl").display(), out.join("loss_curve.svg").display());
}
