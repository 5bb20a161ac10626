//! The process-wide part of a worker's training: the backend and collective
//! of its device, the dataset and the stop signal, then one generation after
//! another until one finishes the job.

use super::generation::{Finished, Generation};
use super::heartbeat::Aborter;
use super::rejoin::{Failure, Rejoin};
use super::signal::stop_on_signal;
use crate::collective::ring::RingCollective;
use crate::collective::Collective;
use crate::data::loader::Dataset;
use crate::engine::device::Device;
use crate::engine::Backend;
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tessera_job::config::model_config;
use tessera_job::config::TrainJob;
use tessera_job::data::DataConfig;
use tessera_proto::auth::JobToken;
use tessera_proto::client::Client;
use tessera_proto::v1::{JobSpec, RendezvousReply};

/// Trains on the device's backend with its collective: the TCP ring on the
/// CPU, NCCL on a GPU (rank 0 creates the NCCL id and the coordinator hands
/// it to everyone at the rendezvous).
pub(super) fn train(
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
            let new_id = |_world: usize| Ok(Vec::new());
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
        // run_worker refuses it before joining: NCCL is not emulated.
        Device::CudaEmu => bail!("--device cuda-emu cannot join a multi-worker job"),
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
    new_nccl_id: impl Fn(usize) -> Result<Vec<u8>>,
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
pub(super) struct Process<'a> {
    pub(super) client: &'a Client,
    pub(super) spec: &'a JobSpec,
    pub(super) job: &'a TrainJob,
    pub(super) cfg: &'a ModelConfig,
    pub(super) data_cfg: &'a DataConfig,
    pub(super) dataset: Arc<Dataset>,
    pub(super) stop_signal: Option<Arc<AtomicBool>>,
}
