//! A worker of a multi-worker job: join the coordinator, build the model the
//! job describes (identical on every rank), meet the other ranks on the
//! ring, then train the samples the coordinator assigns each step, with
//! gradients all-reduced in buckets while backward runs.

use super::checkpoint;
use super::grad_sync::{BucketSizes, CommThread};
use super::job::TrainJob;
use super::run::{build_model, model_config, restore, save_checkpoint, stop_on_signal};
use super::trainer::{synced_params, train_step_dp};
use crate::client::Client;
use crate::collective::ring::RingCollective;
use crate::collective::Collective;
use crate::data::loader::{Dataset, LoadedBatch, Prefetcher};
use crate::engine::device::Device;
use crate::engine::Backend;
use crate::eval::evaluate;
use crate::launch::Launch;
use crate::model::weights::{save_model_dir, SaveDtype};
use anyhow::{anyhow, bail, Context, Result};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_proto::v1::{
    Action, AssignmentRequest, EvalResult, HeartbeatRequest, JoinRequest, LeaveRequest, RendezvousReply,
    RendezvousRequest, StepReport, Timings,
};

pub struct WorkerOptions {
    pub launch: Launch,
    /// How long to keep retrying an unreachable coordinator.
    pub connect_patience: Duration,
    /// Host name or address the other ranks reach this one at (ring).
    pub advertise_host: Option<String>,
}

/// One step's share for this rank, cut into micro-batches.
struct Share {
    micro: Vec<LoadedBatch>,
}

/// Runs the worker until the job ends; errors are also reported to the
/// coordinator (Leave) so the job fails with the reason, not a timeout.
pub fn run_worker(opts: &WorkerOptions) -> Result<()> {
    let device = opts.launch.device.resolve(opts.launch.local_rank)?;
    let client = Client::connect(&opts.launch.coordinator, opts.connect_patience)?;
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
    let joined = client.join(JoinRequest {
        protocol_version: tessera_proto::PROTOCOL_VERSION,
        rank: opts.launch.rank,
        host: host.clone(),
        device: device.to_string(),
        collective_addr,
        pid: std::process::id(),
    })?;
    let (rank, generation) = (joined.rank, joined.generation);
    let world = joined.world_size as usize;
    if let Some(n) = opts.launch.world_size.filter(|&n| n != world) {
        let msg = format!("the launcher says WORLD_SIZE={n} but the job has cluster.world_size = {world}");
        let _ = client.leave(LeaveRequest { rank, generation, error: msg.clone(), ..Default::default() });
        bail!(msg);
    }
    tracing::info!(rank, world_size = world, generation, "joined the job");
    let spec = joined.job.context("the coordinator sent no job")?;
    let result = train(&Session { client: &client, rank, generation, world, spec }, device, listener);
    match &result {
        Ok((eval, saved)) => {
            let leave = LeaveRequest {
                rank,
                generation,
                finished: true,
                eval: *eval,
                saved_model: saved.clone().unwrap_or_default(),
                ..Default::default()
            };
            client.leave(leave)?;
        }
        Err(e) => {
            let _ = client.leave(LeaveRequest { rank, generation, error: format!("{e:#}"), ..Default::default() });
        }
    }
    result.map(|_| ())
}

type Finished = (Option<EvalResult>, Option<String>);

/// What a joined worker knows about its job.
struct Session<'a> {
    client: &'a Client,
    rank: u32,
    generation: u64,
    world: usize,
    spec: tessera_proto::v1::JobSpec,
}

/// Releases a blocked collective from another thread (on a shutdown).
type Aborter = Box<dyn Fn() + Send>;

/// Trains on the device's backend with its collective: the TCP ring on the
/// CPU, NCCL on a GPU (rank 0 creates the NCCL id and the coordinator hands
/// it to everyone at the rendezvous).
fn train(s: &Session, device: Device, listener: Option<TcpListener>) -> Result<Finished> {
    let job = TrainJob::parse(&s.spec.config_toml).context("the job config the coordinator sent")?;
    let (rank, world) = (s.rank as usize, s.world);
    match device {
        Device::Cpu => {
            let listener = listener.context("a CPU worker needs its ring listener")?;
            let connect = move |rdv: &RendezvousReply| -> Result<(RingCollective<f32>, Aborter)> {
                if !rdv.nccl_unique_id.is_empty() {
                    bail!(
                        "rank {rank} runs on the CPU but rank 0 runs on a GPU (NCCL): every rank of a job must use \
                         the same kind of device"
                    );
                }
                let timeout = Duration::from_secs(120);
                let ring =
                    RingCollective::<f32>::connect(rank, world, listener, &rdv.ring_peers, rdv.generation, timeout)?;
                let h = ring.abort_handle();
                Ok((ring, Box::new(move || h.abort())))
            };
            train_on(s, &job, &crate::engine::cpu::Cpu::<f32>::new(), Vec::new(), connect)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(k) => {
            use crate::collective::nccl::{new_unique_id, NcclCollective};
            let cu = crate::engine::cuda::Cuda::new(k, job.train.precision.math_mode()?)?;
            let id = if rank == 0 { new_unique_id()? } else { Vec::new() };
            let connect = |rdv: &RendezvousReply| -> Result<(NcclCollective, Aborter)> {
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
            train_on(s, &job, &cu, id, connect)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(k) => bail!("cuda:{k}: this worker was built without CUDA support"),
    }
}

fn train_on<B: Backend, C: Collective<Buf = B::Buf> + 'static>(
    s: &Session,
    job: &TrainJob,
    be: &B,
    nccl_unique_id: Vec<u8>,
    connect: impl FnOnce(&RendezvousReply) -> Result<(C, Aborter)>,
) -> Result<Finished>
where
    B::Buf: Send + 'static,
{
    let (client, rank, generation, world, spec) = (s.client, s.rank, s.generation, s.world, &s.spec);
    let cfg = model_config(job)?;
    let t = &job.train;
    let (mut vlm, mut opt) = build_model(be, job, &cfg)?;
    let data_cfg = job.data.clone().context("the job has no [data] section")?;
    let dataset = Arc::new(Dataset::open(&data_cfg, &cfg)?);
    // With checkpoints on, SIGTERM/SIGINT stop the job at a step boundary
    // that every rank agrees on (train_step_dp), with a checkpoint.
    let stop_signal = stop_on_signal(job)?;

    // Heartbeats from their own thread, so a long step never looks like death.
    let step_now = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let shutdown: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    // Set once the ring is up: a shutdown then also releases a blocked all-reduce.
    let abort: Arc<Mutex<Option<Aborter>>> = Arc::new(Mutex::new(None));
    let heartbeat = {
        let (client, step_now, stop, shutdown) = (client.clone(), step_now.clone(), stop.clone(), shutdown.clone());
        let abort = abort.clone();
        let interval = Duration::from_secs_f64(spec.heartbeat_interval_s.max(0.05));
        std::thread::spawn(move || {
            heartbeat_loop(&client, rank, generation, interval, &step_now, &stop, &shutdown);
            if !stop.load(Ordering::Relaxed) {
                if let Some(a) = abort.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    a();
                }
            }
        })
    };
    let _stop_heartbeat = StopOnDrop(stop.clone(), Some(heartbeat));

    let rdv = loop {
        if let Some(why) = shutdown.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            bail!("stopped while waiting for the other workers: {why}");
        }
        let r = client.rendezvous(RendezvousRequest { rank, generation, nccl_unique_id: nccl_unique_id.clone() })?;
        if r.ready {
            break r;
        }
        tracing::info!(joined = r.joined, world_size = world, "waiting for the other workers");
    };
    if rdv.start_step > 0 {
        // The coordinator found this checkpoint intact; every rank loads it.
        let root = job
            .checkpoint
            .dir
            .as_ref()
            .context("the coordinator resumes at a step, but the job has no checkpoint.dir")?;
        let dir = root.join(checkpoint::step_dir_name(rdv.start_step));
        let done = restore(be, job, &cfg, &mut vlm, &mut opt, &dir)?;
        tracing::info!(rank, step = done, checkpoint = %dir.display(), "resumed from the checkpoint");
    }
    let (collective, aborter) = connect(&rdv)?;
    *abort.lock().unwrap_or_else(|e| e.into_inner()) = Some(aborter);
    let comm = CommThread::new(collective);
    let sizes = BucketSizes::from_mb(job.cluster.first_bucket_mb, job.cluster.bucket_mb);
    let synced = synced_params(&vlm, &opt);
    tracing::info!(rank, peers = ?rdv.ring_peers, "collective connected; training");

    let accum = t.grad_accum;
    let (loader_client, ds) = (client.clone(), dataset.clone());
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
    let mut loader = Prefetcher::with(load, rdv.start_step, data_cfg.prefetch.clamp(1, 2), data_cfg.prefetch);
    let mut last_step_at = Instant::now();
    for step in rdv.start_step..spec.total_steps {
        if let Some(why) = shutdown.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            bail!("stopping at step {step}: {why}");
        }
        step_now.store(step, Ordering::Relaxed);
        let tick = Instant::now();
        let share = loader.next_batch()?;
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
        let stop_wanted = stop_signal.as_deref().is_some_and(|f| f.load(Ordering::Relaxed));
        let r = train_step_dp(be, &mut vlm, &mut opt, &micro, &comm, sizes, &synced, stop_wanted).map_err(|e| {
            // An all-reduce released by a shutdown fails; the shutdown is the news.
            match shutdown.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                Some(why) => anyhow!("stopping at step {step}: {why}"),
                None => e,
            }
        })?;
        let Some(r) = r else {
            // A rank was asked to stop: all learned it at this step's first
            // all-reduce, none trained it, and rank 0 checkpoints what is done.
            let total = spec.total_steps;
            if rank == 0 {
                let log = &mut |line: &str| tracing::info!("{line}");
                if let Some(dir) = save_checkpoint(be, job, &cfg, &vlm, &opt, step, true, log)? {
                    bail!("stopped by a signal after step {step} of {total}; the checkpoint {} holds it: start the job again to resume", dir.display());
                }
            }
            if stop_wanted {
                bail!("stopped by a signal after step {step} of {total}");
            }
            bail!("stopping after step {step} of {total}: another rank was stopped by a signal");
        };
        if rank == 0 {
            // Every rank holds the same weights and optimizer state after
            // the all-reduced update: rank 0 writes the checkpoint for all,
            // before it reports the step.
            save_checkpoint(be, job, &cfg, &vlm, &opt, step + 1, false, &mut |line| tracing::info!("{line}"))?;
        }
        let step_s = last_step_at.elapsed().max(tick.elapsed());
        last_step_at = Instant::now();
        client.report(StepReport {
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
        })?;
    }
    drop(loader);
    if rank != 0 {
        return Ok((None, None));
    }
    // Rank 0 speaks for the job: every rank holds the same weights.
    let mut saved = None;
    if !spec.output_dir.is_empty() {
        let dir = PathBuf::from(&spec.output_dir);
        save_model_dir(&dir, &cfg, &vlm.params.to_host(be), SaveDtype::F32, None)?;
        data_cfg.record_image_preprocessing(&dir)?;
        tracing::info!(model = %dir.display(), "saved the model");
        saved = Some(spec.output_dir.clone());
    }
    let eval = if data_cfg.eval_datasets.is_empty() {
        None
    } else {
        let ds = Dataset::open_eval(&data_cfg, &cfg)?;
        let e = evaluate(be, &mut vlm, &ds, 8)?;
        tracing::info!(accuracy = e.accuracy(), samples = e.samples, "evaluated");
        Some(EvalResult { correct: e.correct as u32, total: e.samples as u32, mean_loss: e.mean_loss })
    };
    Ok((eval, saved))
}

fn heartbeat_loop(
    client: &Client,
    rank: u32,
    generation: u64,
    interval: Duration,
    step: &AtomicU64,
    stop: &AtomicBool,
    shutdown: &Mutex<Option<String>>,
) {
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(interval);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let req = HeartbeatRequest { rank, generation, step: step.load(Ordering::Relaxed) };
        let verdict = match client.heartbeat(req) {
            Ok(r) if r.action == Action::Continue as i32 => {
                failures = 0;
                None
            }
            Ok(r) => Some(if r.reason.is_empty() { "the coordinator ended the job".to_string() } else { r.reason }),
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "heartbeat failed");
                (failures >= 5).then(|| format!("lost the coordinator: {e:#}"))
            }
        };
        if let Some(why) = verdict {
            *shutdown.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
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
