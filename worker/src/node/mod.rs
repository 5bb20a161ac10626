//! The worker process: a worker of a multi-worker job joins the coordinator,
//! builds the model the job describes (identical on every rank), meets the
//! other ranks on the ring, then trains the samples the coordinator assigns
//! each step, with gradients all-reduced in buckets while backward runs.
//! The single-process runner (`single`) is here too.

mod generation;
mod heartbeat;
mod process;
mod rejoin;
mod signal;
pub mod single;

use crate::engine::device::Device;
use crate::launch::Launch;
use anyhow::{anyhow, bail, Context, Result};
use generation::Generation;
use rejoin::Rejoin;
use std::net::TcpListener;
use std::time::Duration;
use tessera_proto::auth::JobToken;
use tessera_proto::client::Client;
use tessera_proto::tls::ClientTls;
use tessera_proto::v1::{JoinRequest, LeaveRequest};

/// How the worker process reaches its job: the launch (rank, device,
/// coordinator) and how it connects to the coordinator.
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
        Device::CudaEmu => bail!(
            "--device cuda-emu is a test device for single-process commands (train, check-ops, debug-step, \
             bench-step): NCCL is not emulated, so it cannot join a multi-worker job; use --device cpu or cuda:K"
        ),
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
    let result = process::train(&client, &spec, &mut gen, &rejoin, device, listener, opts.token.clone());
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
                // A lost GPU is the rank's fault, not the job's: the job goes
                // on in a new generation, as when a worker dies, and waits
                // for a replacement of this rank.
                will_rejoin: crate::engine::device::device_lost(e),
                ..Default::default()
            };
            let _ = client.leave(leave);
        }
    }
    result.map(|_| ())
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
