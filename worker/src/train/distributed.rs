//! A worker of a multi-worker job: join the coordinator, build the model the
//! job describes (identical on every rank), meet the other ranks on the
//! ring, then train the samples the coordinator assigns each step, with
//! gradients all-reduced in buckets while backward runs.

use super::grad_sync::{BucketSizes, CommThread};
use super::optimizer::Optimizer;
use super::run::{build_model, restore, stop_on_signal, write_checkpoint_part};
use super::trainer::{synced_params, train_step_dp};
use crate::codec::SaveDtype;
use crate::collective::ring::RingCollective;
use crate::collective::Collective;
use crate::data::loader::{Dataset, LoadedBatch, Prefetcher};
use crate::engine::device::Device;
use crate::engine::Backend;
use crate::eval::evaluate;
use crate::launch::Launch;
use crate::model::weights::save_model_dir;
use crate::model::{ModelConfig, Vlm};
use anyhow::{anyhow, bail, Context, Result};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_job::checkpoint as manifest;
use tessera_job::config::model_config;
use tessera_job::config::TrainJob;
use tessera_job::data::DataConfig;
use tessera_proto::auth::JobToken;
use tessera_proto::client::Client;
use tessera_proto::tls::ClientTls;
use tessera_proto::v1::{
    Action, AssignmentRequest, CheckpointFile, CheckpointPart, EvalResult, HeartbeatRequest, JobSpec, JoinReply,
    JoinRequest, LeaveRequest, RendezvousReply, RendezvousRequest, StepReport, Timings,
};

pub struct WorkerOptions {
    pub launch: Launch,
    /// How long to keep retrying an unreachable coordinator.
    pub connect_patience: Duration,
    /// Host name or address the other ranks reach this one at (ring).
    pub advertise_host: Option<String>,
    /// The job token: every call to the coordinator carries it.
    pub token: Option<JobToken>,
    /// TLS towards the coordinator (an https:// URL).
    pub tls: Option<ClientTls>,
}

/// One step's share for this rank, cut into micro-batches.
struct Share {
    micro: Vec<LoadedBatch>,
}

/// Runs the worker until the job ends; errors are also reported to the
/// coordinator (Leave) so the job fails with the reason, not a timeout.
/// When a generation ends early (a peer died, the coordinator restarted or
/// lost a rank), the worker joins the next one and resumes from the last
/// committed checkpoint; the coordinator decides whether there is one.
pub fn run_worker(opts: &WorkerOptions) -> Result<()> {
    let device = opts.launch.device.resolve(opts.launch.local_rank)?;
    let client =
        Client::connect(&opts.launch.coordinator, opts.connect_patience, opts.token.as_ref(), opts.tls.as_ref())?;
    let host = match &opts.advertise_host {
        Some(h) => h.clone(),
        None => advertise_host(&opts.launch.coordinator),
    };
    // CPU ranks listen for their ring peers; GPU ranks meet through NCCL.
    let listener = match device {
        Device::Cpu => Some(TcpListener::bind("0.0.0.0:0").context("cannot open the ring listener")?),
        Device::Cuda(_) => None,
    };
    let collective_addr = match &listener {
        Some(l) => format!("{host}:{}", l.local_addr().context("ring listener address")?.port()),
        None => String::new(),
    };
    let request = JoinRequest {
        protocol_version: tessera_proto::PROTOCOL_VERSION,
        rank: opts.launch.rank,
        host: host.clone(),
        device: device.to_string(),
        collective_addr,
        pid: std::process::id(),
    };
    let joined = client.join_patiently(request.clone(), opts.connect_patience)?;
    let world = joined.world_size as usize;
    if let Some(n) = opts.launch.world_size.filter(|&n| n != world) {
        let msg = format!("the launcher says WORLD_SIZE={n} but the job has cluster.world_size = {world}");
        let leave =
            LeaveRequest { rank: joined.rank, generation: joined.generation, error: msg.clone(), ..Default::default() };
        let _ = client.leave(leave);
        bail!(msg);
    }
    let spec = joined.job.clone().context("the coordinator sent no job")?;
    let rejoin = Rejoin { client: &client, request, patience: opts.connect_patience, config: spec.config_toml.clone() };
    let mut gen = Generation::from(&joined);
    let result = train(&client, &spec, &mut gen, &rejoin, device, listener, opts.token.clone());
    match &result {
        Ok((eval, saved)) => {
            let leave = LeaveRequest {
                rank: gen.rank,
                generation: gen.generation,
                finished: true,
                eval: *eval,
                saved_model: saved.clone().unwrap_or_default(),
                ..Default::default()
            };
            client.leave(leave)?;
        }
        Err(e) => {
            let leave = LeaveRequest {
                rank: gen.rank,
                generation: gen.generation,
                error: format!("{e:#}"),
                ..Default::default()
            };
            let _ = client.leave(leave);
        }
    }
    result.map(|_| ())
}

type Finished = (Option<EvalResult>, Option<String>);

/// This worker's place in the current generation.
#[derive(Clone, Copy, Debug)]
struct Generation {
    rank: u32,
    generation: u64,
    member_id: u64,
    world: usize,
}

impl From<&JoinReply> for Generation {
    fn from(j: &JoinReply) -> Self {
        Generation { rank: j.rank, generation: j.generation, member_id: j.member_id, world: j.world_size as usize }
    }
}

/// How a generation ended, when it did not finish the job.
enum Failure {
    /// Join the next generation: a peer or the coordinator went away, or
    /// the coordinator moved the job on.
    Rejoin(anyhow::Error),
    /// The job is over for this worker (a bad config, a stop signal, the
    /// coordinator ended the job).
    Fatal(anyhow::Error),
}

/// Sorts errors: everything before the generation meets is about the job
/// or this machine (fatal); from the rendezvous on, about who is there.
trait Classify<T> {
    fn fatal(self) -> Result<T, Failure>;
    fn rejoin(self) -> Result<T, Failure>;
}

impl<T> Classify<T> for Result<T> {
    fn fatal(self) -> Result<T, Failure> {
        self.map_err(Failure::Fatal)
    }
    fn rejoin(self) -> Result<T, Failure> {
        self.map_err(Failure::Rejoin)
    }
}

/// What a worker needs to join the next generation.
struct Rejoin<'a> {
    client: &'a Client,
    request: JoinRequest,
    patience: Duration,
    /// The job config of the first join: a coordinator restarted with
    /// another config is a different job.
    config: String,
}

impl Rejoin<'_> {
    /// Tells the coordinator this generation is over for us, then joins the
    /// next one with the same rank (a coordinator that restarted may take a
    /// while to come back: retried with backoff within the patience).
    fn next(&self, gen: &Generation, why: &anyhow::Error) -> Result<Generation> {
        let leave = LeaveRequest {
            rank: gen.rank,
            generation: gen.generation,
            error: format!("{why:#}"),
            will_rejoin: true,
            ..Default::default()
        };
        // The coordinator may be gone or already in the next generation.
        let _ = self.client.leave(leave);
        let request = JoinRequest { rank: Some(gen.rank), ..self.request.clone() };
        let joined = self.client.join_patiently(request, self.patience)?;
        let spec = joined.job.as_ref().context("the coordinator sent no job")?;
        if spec.config_toml != self.config {
            bail!("the coordinator now runs another job config than the one this worker started with: start the workers again");
        }
        Ok(Generation::from(&joined))
    }
}

/// Releases a blocked collective from another thread (on a shutdown).
type Aborter = Box<dyn Fn() + Send>;

/// Trains on the device's backend with its collective: the TCP ring on the
/// CPU, NCCL on a GPU (rank 0 creates the NCCL id and the coordinator hands
/// it to everyone at the rendezvous).
fn train(
    client: &Client,
    spec: &JobSpec,
    gen: &mut Generation,
    rejoin: &Rejoin,
    device: Device,
    listener: Option<TcpListener>,
    token: Option<JobToken>,
) -> Result<Finished> {
    let job = TrainJob::parse(&spec.config_toml).context("the job config the coordinator sent")?;
    match device {
        Device::Cpu => {
            let listener = listener.context("a CPU worker needs its ring listener")?;
            let connect = move |rdv: &RendezvousReply| -> Result<(RingCollective<f32>, Aborter)> {
                let (rank, world) = (rdv.rank as usize, rdv.world_size as usize);
                if !rdv.nccl_unique_id.is_empty() {
                    bail!(
                        "rank {rank} runs on the CPU but rank 0 runs on a GPU (NCCL): every rank of a job must use \
                         the same kind of device"
                    );
                }
                let timeout = Duration::from_secs(120);
                let listener = listener.try_clone().context("cannot reuse the ring listener")?;
                // Ring peers prove the job token to each other before any gradient moves.
                let ring = RingCollective::<f32>::connect_with_token(
                    rank,
                    world,
                    listener,
                    &rdv.ring_peers,
                    rdv.generation,
                    timeout,
                    token.as_ref().map_or(&[][..], |t| t.bytes()),
                )?;
                let h = ring.abort_handle();
                Ok((ring, Box::new(move || h.abort())))
            };
            let new_id = || Ok(Vec::new());
            train_on(client, spec, &job, gen, rejoin, &crate::engine::cpu::Cpu::<f32>::new(), new_id, connect)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(k) => {
            use crate::collective::nccl::{new_unique_id, NcclCollective};
            let cu = crate::engine::cuda::Cuda::new(k, crate::engine::device::math_mode(job.train.precision)?)?;
            let connect = |rdv: &RendezvousReply| -> Result<(NcclCollective, Aborter)> {
                let (rank, world) = (rdv.rank as usize, rdv.world_size as usize);
                if rdv.nccl_unique_id.is_empty() {
                    bail!(
                        "rank {rank} runs on cuda:{k} but rank 0 sent no NCCL id (is it on the CPU?): every rank of \
                         a job must use the same kind of device"
                    );
                }
                let nccl = NcclCollective::connect(&cu, rank, world, &rdv.nccl_unique_id, Duration::from_secs(120))?;
                let h = nccl.abort_handle();
                Ok((nccl, Box::new(move || h.abort())))
            };
            train_on(client, spec, &job, gen, rejoin, &cu, new_unique_id, connect)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(k) => bail!("cuda:{k}: this worker was built without CUDA support"),
    }
}

/// The process-wide part of training: the dataset and the stop signal,
/// then one generation after another until one finishes the job.
#[allow(clippy::too_many_arguments)]
fn train_on<B: Backend, C: Collective<Buf = B::Buf> + 'static>(
    client: &Client,
    spec: &JobSpec,
    job: &TrainJob,
    gen: &mut Generation,
    rejoin: &Rejoin,
    be: &B,
    new_nccl_id: impl Fn() -> Result<Vec<u8>>,
    connect: impl Fn(&RendezvousReply) -> Result<(C, Aborter)>,
) -> Result<Finished>
where
    B::Buf: Send + 'static,
{
    let cfg = model_config(job)?;
    let data_cfg = job.data.clone().context("the job has no [data] section")?;
    let dataset = Arc::new(Dataset::open(&data_cfg, &cfg)?);
    // With checkpoints on, SIGTERM/SIGINT stop the job at a step boundary
    // that every rank agrees on (train_step_dp), with a checkpoint.
    let stop_signal = stop_on_signal(job)?;
    let process = Process { client, spec, job, cfg: &cfg, data_cfg: &data_cfg, dataset, stop_signal };
    loop {
        match process.generation(gen, be, &new_nccl_id, &connect) {
            Ok(done) => return Ok(done),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Rejoin(why)) => {
                tracing::warn!(rank = gen.rank, generation = gen.generation, error = %format!("{why:#}"), "this generation ended: joining the next");
                *gen = rejoin.next(gen, &why)?;
                tracing::info!(rank = gen.rank, generation = gen.generation, "joined the next generation");
            }
        }
    }
}

/// What stays the same from one generation to the next.
struct Process<'a> {
    client: &'a Client,
    spec: &'a JobSpec,
    job: &'a TrainJob,
    cfg: &'a ModelConfig,
    data_cfg: &'a DataConfig,
    dataset: Arc<Dataset>,
    stop_signal: Option<Arc<AtomicBool>>,
}

/// Why the heartbeat thread stopped the generation.
#[derive(Clone, Debug)]
enum Verdict {
    /// The coordinator moved the job to another generation, or is gone.
    Abort(String),
    /// The job is over.
    Shutdown(String),
}

impl Verdict {
    fn into_failure(self, context: String) -> Failure {
        match self {
            Verdict::Abort(why) => Failure::Rejoin(anyhow!("{context}: {why}")),
            Verdict::Shutdown(why) => Failure::Fatal(anyhow!("{context}: {why}")),
        }
    }
}

impl Process<'_> {
    /// One generation: meet the others, build the model (from the last
    /// committed checkpoint, if any), connect the collective and train the
    /// assigned steps.
    fn generation<B: Backend, C: Collective<Buf = B::Buf> + 'static>(
        &self,
        gen: &mut Generation,
        be: &B,
        new_nccl_id: &impl Fn() -> Result<Vec<u8>>,
        connect: &impl Fn(&RendezvousReply) -> Result<(C, Aborter)>,
    ) -> Result<Finished, Failure>
    where
        B::Buf: Send + 'static,
    {
        let (client, spec, job, cfg) = (self.client, self.spec, self.job, self.cfg);
        let generation = gen.generation;
        // Heartbeats from their own thread, so a long step never looks like death.
        let step_now = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let verdict: Arc<Mutex<Option<Verdict>>> = Arc::new(Mutex::new(None));
        // Set once the collective is up: a verdict then also releases a blocked all-reduce.
        let abort: Arc<Mutex<Option<Aborter>>> = Arc::new(Mutex::new(None));
        // The rank may change at the rendezvous (an elastic job shrinking).
        let rank_now = Arc::new(AtomicU64::new(gen.rank as u64));
        let heartbeat = {
            let (client, step_now, stop, verdict) = (client.clone(), step_now.clone(), stop.clone(), verdict.clone());
            let (abort, rank_now) = (abort.clone(), rank_now.clone());
            let interval = Duration::from_secs_f64(spec.heartbeat_interval_s.max(0.05));
            std::thread::spawn(move || {
                heartbeat_loop(&client, &rank_now, generation, interval, &step_now, &stop, &verdict);
                if !stop.load(Ordering::Relaxed) {
                    if let Some(a) = abort.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        a();
                    }
                }
            })
        };
        let _stop_heartbeat = StopOnDrop(stop.clone(), Some(heartbeat));
        let verdict_now = || verdict.lock().unwrap_or_else(|e| e.into_inner()).clone();

        let mut nccl_id = if gen.rank == 0 { new_nccl_id().fatal()? } else { Vec::new() };
        let rdv = loop {
            if let Some(v) = verdict_now() {
                return Err(v.into_failure("stopped while waiting for the other workers".into()));
            }
            let req = RendezvousRequest {
                rank: gen.rank,
                generation,
                nccl_unique_id: nccl_id.clone(),
                member_id: gen.member_id,
            };
            let r = client.rendezvous(req).rejoin()?;
            if r.rank == 0 && nccl_id.is_empty() {
                // Renumbered to rank 0 (an elastic shrink): the NCCL id is ours to make.
                nccl_id = new_nccl_id().fatal()?;
            }
            if r.ready {
                break r;
            }
            tracing::info!(joined = r.joined, world_size = r.world_size, generation, "waiting for the other workers");
        };
        if rdv.rank != gen.rank {
            tracing::warn!(
                from = gen.rank,
                to = rdv.rank,
                world_size = rdv.world_size,
                "the job shrank: this worker has a new rank"
            );
        }
        gen.rank = rdv.rank;
        gen.world = rdv.world_size as usize;
        rank_now.store(rdv.rank as u64, Ordering::Relaxed);
        let (rank, world) = (gen.rank, gen.world);

        // Every generation starts from the same bits: a fresh model from the
        // seed, then the checkpoint the coordinator resumes from.
        let (mut vlm, mut opt) = build_model(be, job, cfg).fatal()?;
        if rdv.start_step > 0 {
            let root = job
                .checkpoint
                .dir
                .as_ref()
                .context("the coordinator resumes at a step, but the job has no checkpoint.dir")
                .fatal()?;
            let dir = root.join(manifest::step_dir_name(rdv.start_step));
            let done = restore(be, job, cfg, &mut vlm, &mut opt, &dir).fatal()?;
            tracing::info!(rank, step = done, checkpoint = %dir.display(), "resumed from the checkpoint");
        }
        let (collective, aborter) = connect(&rdv).rejoin()?;
        *abort.lock().unwrap_or_else(|e| e.into_inner()) = Some(aborter);
        let comm = CommThread::new(collective);
        let sizes = BucketSizes::from_mb(job.cluster.first_bucket_mb, job.cluster.bucket_mb);
        let synced = synced_params(&vlm, &opt);
        tracing::info!(rank, generation, peers = ?rdv.ring_peers, "collective connected; training");

        let accum = job.train.grad_accum;
        let (loader_client, ds) = (client.clone(), self.dataset.clone());
        let load = move |step: u64| -> Result<Share> {
            let a = loader_client.assignment(AssignmentRequest { rank, generation, step })?;
            if a.done {
                return Ok(Share { micro: vec![] });
            }
            let refs: Vec<(usize, usize)> = a.samples.iter().map(|s| (s.part as usize, s.index as usize)).collect();
            // Contiguous micro-batches; an empty share still takes part in the all-reduce.
            let per = refs.len().div_ceil(accum).max(1);
            refs.chunks(per).map(|c| ds.load_samples(c, step)).collect::<Result<Vec<_>>>().map(|micro| Share { micro })
        };
        let prefetch = self.data_cfg.prefetch;
        let mut loader = Prefetcher::with(load, rdv.start_step, prefetch.clamp(1, 2), prefetch);
        // A failure in a step: the heartbeat's verdict, when it has one, is the news.
        let failed = |step: u64, e: anyhow::Error| match verdict_now() {
            Some(v) => v.into_failure(format!("stopping at step {step}")),
            None => Failure::Rejoin(e.context(format!("step {step}"))),
        };
        let commit = |vlm: &Vlm<B>, opt: &Optimizer<B>, step: u64, force: bool| -> Result<Option<PathBuf>> {
            let part = write_checkpoint_part(be, job, cfg, vlm, opt, step, force, rank as usize, world, generation)?;
            let Some((_, files)) = part else { return Ok(None) };
            let files =
                files.into_iter().map(|f| CheckpointFile { path: f.path, bytes: f.bytes, sha256: f.sha256 }).collect();
            let ack = client.commit_checkpoint(CheckpointPart { rank, generation, step, files })?;
            Ok(ack.committed.then(|| PathBuf::from(ack.dir)))
        };
        let mut last_step_at = Instant::now();
        for step in rdv.start_step..spec.total_steps {
            if let Some(v) = verdict_now() {
                return Err(v.into_failure(format!("stopping at step {step}")));
            }
            step_now.store(step, Ordering::Relaxed);
            let tick = Instant::now();
            let share = loader.next_batch().map_err(|e| failed(step, e))?;
            let data_wait = tick.elapsed();
            let (mut bad, mut truncated) = (0, 0);
            let mut micro = Vec::new();
            for lb in share.micro {
                bad += lb.bad.len();
                truncated += lb.truncated;
                if lb.batch.batch > 0 {
                    micro.push(lb.batch);
                }
            }
            let samples: usize = micro.iter().map(|b| b.batch).sum();
            let stop_wanted = self.stop_signal.as_deref().is_some_and(|f| f.load(Ordering::Relaxed));
            let r = train_step_dp(be, &mut vlm, &mut opt, &micro, &comm, sizes, &synced, stop_wanted)
                .map_err(|e| failed(step, e))?;
            let Some(r) = r else {
                // A rank was asked to stop: all learned it at this step's
                // first all-reduce, none trained it, and every rank writes
                // its part of the checkpoint of what is done.
                let total = spec.total_steps;
                let dir = commit(&vlm, &opt, step, true).fatal()?;
                let msg = if stop_wanted {
                    format!("stopped by a signal after step {step} of {total}")
                } else {
                    format!("stopping after step {step} of {total}: another rank was stopped by a signal")
                };
                // The last rank's part completes the checkpoint; the others
                // know it is committed once every part is in.
                let held = match dir {
                    Some(dir) => format!("the checkpoint of step {step} is committed as {}", dir.display()),
                    None => format!("this rank's part of the checkpoint of step {step} is written"),
                };
                return Err(Failure::Fatal(anyhow!("{msg}; {held}: start the job again to resume")));
            };
            let step_s = last_step_at.elapsed().max(tick.elapsed());
            last_step_at = Instant::now();
            let report = StepReport {
                rank,
                generation,
                step,
                loss_sum: r.loss.sum,
                target_tokens: r.loss.tokens as u64,
                samples: samples as u32,
                tiles: r.tiles as u32,
                llm_tokens: r.llm_tokens as u64,
                bad_samples: bad as u32,
                truncated: truncated as u32,
                grad_norm: r.info.grad_norm,
                lr_scale: r.info.lr_scale,
                timings: Some(Timings {
                    data_wait_s: data_wait.as_secs_f64(),
                    compute_s: (tick.elapsed() - data_wait - r.comm_wait).as_secs_f64(),
                    comm_wait_s: r.comm_wait.as_secs_f64(),
                    step_s: step_s.as_secs_f64(),
                }),
            };
            client.report(report).map_err(|e| failed(step, e))?;
            // Every rank holds the same weights after the all-reduced update
            // and writes its part of the checkpoint. After the report: the
            // step is in the metrics before any checkpoint that includes it.
            commit(&vlm, &opt, step + 1, false).map_err(|e| failed(step, e))?;
        }
        drop(loader);
        if rank != 0 {
            return Ok((None, None));
        }
        self.finish(be, &mut vlm).fatal()
    }

    /// Rank 0 speaks for the job (every rank holds the same weights): it
    /// saves the model and evaluates it.
    fn finish<B: Backend>(&self, be: &B, vlm: &mut Vlm<B>) -> Result<Finished> {
        let (spec, cfg, data_cfg) = (self.spec, self.cfg, self.data_cfg);
        let mut saved = None;
        if !spec.output_dir.is_empty() {
            let dir = PathBuf::from(&spec.output_dir);
            save_model_dir(&dir, cfg, &vlm.params.to_host(be), SaveDtype::F32, None)?;
            data_cfg.record_image_preprocessing(&dir)?;
            tracing::info!(model = %dir.display(), "saved the model");
            saved = Some(spec.output_dir.clone());
        }
        let eval = if data_cfg.eval_datasets.is_empty() {
            None
        } else {
            let ds = Dataset::open_eval(data_cfg, cfg)?;
            let e = evaluate(be, vlm, &ds, 8)?;
            tracing::info!(accuracy = e.accuracy(), samples = e.samples, "evaluated");
            Some(EvalResult { correct: e.correct as u32, total: e.samples as u32, mean_loss: e.mean_loss })
        };
        Ok((eval, saved))
    }
}

fn heartbeat_loop(
    client: &Client,
    rank: &AtomicU64,
    generation: u64,
    interval: Duration,
    step: &AtomicU64,
    stop: &AtomicBool,
    verdict: &Mutex<Option<Verdict>>,
) {
    let mut failures = 0;
    // Opened at the first beat, opened again after any error.
    let mut stream = None;
    let patience = (2 * interval).max(Duration::from_secs(10));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(interval);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let rank = rank.load(Ordering::Relaxed) as u32;
        let req = HeartbeatRequest { rank, generation, step: step.load(Ordering::Relaxed) };
        let answer = match stream.take() {
            Some(open) => Ok(open),
            None => client.heartbeats(),
        }
        .and_then(|open| open.beat(req, patience));
        let v = match answer {
            Ok((r, open)) if r.action == Action::Continue as i32 => {
                stream = Some(open);
                failures = 0;
                None
            }
            Ok((r, _)) if r.action == Action::Abort as i32 => Some(Verdict::Abort(r.reason)),
            Ok((r, _)) => Some(Verdict::Shutdown(if r.reason.is_empty() {
                "the coordinator ended the job".into()
            } else {
                r.reason
            })),
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "heartbeat failed");
                // Training cannot go on without the coordinator: rejoin, which
                // waits for it to come back (within the connect patience).
                (failures >= 5).then(|| Verdict::Abort(format!("lost the coordinator: {e:#}")))
            }
        };
        if let Some(v) = v {
            *verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
            break;
        }
    }
}

/// Stops and joins the heartbeat thread when training ends, however it ends.
struct StopOnDrop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

/// The address other ranks can reach this one at: the local address of a
/// route to the coordinator (no packet is sent), or loopback for a local job.
fn advertise_host(coordinator: &str) -> String {
    let hostport = coordinator.split("://").nth(1).unwrap_or(coordinator).trim_end_matches('/');
    let route = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            use std::net::ToSocketAddrs;
            let addr = hostport
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
            s.connect(addr)?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string());
    route.unwrap_or_else(|e| {
        tracing::warn!(error = %anyhow!(e), "cannot find this host's address towards the coordinator; advertising 127.0.0.1");
        "127.0.0.1".to_string()
    })
}
