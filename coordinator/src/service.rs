//! The gRPC handlers: translate requests into `JobState` and `Planner`
//! calls and their answers back into replies. No job logic lives here.

use crate::membership::JoinInfo;
use crate::planner::Planner;
use crate::progress::StepSummary;
use crate::state::{JobState, Outcome};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tessera_proto::v1::{
    Assignment, AssignmentRequest, HeartbeatReply, HeartbeatRequest, JoinReply, JoinRequest, LeaveReply, LeaveRequest,
    RendezvousReply, RendezvousRequest, SampleRef, StepAck, StepReport,
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// How long a Rendezvous call waits for the last ranks before answering
/// "not ready" (the worker asks again), so no call outlives a proxy timeout.
const RENDEZVOUS_WAIT: Duration = Duration::from_secs(10);

/// Shared between the handlers and the coordinator's main loop.
pub struct Shared {
    pub state: Mutex<JobState>,
    pub planner: Arc<Planner>,
    /// Signalled on every membership or outcome change.
    pub changed: Notify,
    pub started: Instant,
    /// Called with each finished step (progress bar, metrics file).
    pub on_step: Box<dyn Fn(&StepSummary) + Send + Sync>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

#[derive(Clone)]
pub struct Service(pub Arc<Shared>);

fn refused(msg: String) -> Status {
    Status::failed_precondition(msg)
}

#[tonic::async_trait]
impl tessera_proto::Coordinator for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let r = req.into_inner();
        let info = JoinInfo {
            protocol_version: r.protocol_version,
            rank: r.rank,
            host: r.host,
            device: r.device,
            collective_addr: r.collective_addr,
            pid: r.pid,
        };
        let (host, device) = (info.host.clone(), info.device.clone());
        let s = &self.0;
        let mut st = s.lock();
        let rank = st.join(info, s.now()).map_err(|e| {
            tracing::warn!(%host, %device, error = %e, "join refused");
            match e {
                crate::membership::JoinError::Protocol { .. } => Status::failed_precondition(e.to_string()),
                _ => Status::already_exists(e.to_string()),
            }
        })?;
        tracing::info!(rank, %host, %device, joined = st.members.joined(), world_size = st.members.world_size, "worker joined");
        let reply = JoinReply {
            rank,
            world_size: st.members.world_size as u32,
            generation: st.members.generation,
            job: Some(st.spec.clone()),
        };
        drop(st);
        s.changed.notify_waiters();
        Ok(Response::new(reply))
    }

    async fn rendezvous(&self, req: Request<RendezvousRequest>) -> Result<Response<RendezvousReply>, Status> {
        let r = req.into_inner();
        let s = &self.0;
        let deadline = tokio::time::Instant::now() + RENDEZVOUS_WAIT;
        loop {
            // Register interest before looking, so a change in between is not missed.
            let notified = s.changed.notified();
            // Rank 0 bringing the NCCL id can complete the rendezvous: the
            // ranks already waiting must hear it now, not at their deadline.
            let mut id_arrived = false;
            let reply = {
                let mut st = s.lock();
                st.check(r.rank, r.generation, s.now()).map_err(refused)?;
                if r.rank == 0 && !r.nccl_unique_id.is_empty() && st.members.nccl_id != r.nccl_unique_id {
                    st.members.nccl_id = r.nccl_unique_id.clone();
                    id_arrived = true;
                }
                let m = &st.members;
                (m.complete() || tokio::time::Instant::now() >= deadline).then(|| RendezvousReply {
                    ready: m.complete(),
                    generation: m.generation,
                    world_size: m.world_size as u32,
                    ring_peers: if m.complete() { m.ring_peers() } else { vec![] },
                    nccl_unique_id: m.nccl_id.clone(),
                    start_step: st.start_step,
                    joined: m.joined() as u32,
                })
            };
            if id_arrived {
                s.changed.notify_waiters();
            }
            if let Some(reply) = reply {
                return Ok(Response::new(reply));
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    async fn get_assignment(&self, req: Request<AssignmentRequest>) -> Result<Response<Assignment>, Status> {
        let r = req.into_inner();
        let s = self.0.clone();
        let (world, total) = {
            let mut st = s.lock();
            st.check(r.rank, r.generation, s.now()).map_err(refused)?;
            if let Outcome::Failed(why) = &st.outcome {
                return Err(Status::aborted(format!("the job failed: {why}")));
            }
            (st.members.world_size, st.spec.total_steps)
        };
        if r.step >= total {
            return Ok(Response::new(Assignment { step: r.step, done: true, ..Default::default() }));
        }
        let planner = s.planner.clone();
        let p = tokio::task::spawn_blocking(move || planner.step(r.step, world))
            .await
            .map_err(|e| Status::internal(format!("planner task: {e}")))?
            .map_err(|e| Status::internal(format!("cannot plan step {}: {e:#}", r.step)))?;
        let shard = &p.plan.shards[r.rank as usize];
        Ok(Response::new(Assignment {
            step: r.step,
            done: false,
            samples: shard
                .samples
                .iter()
                .map(|&i| SampleRef { part: p.samples[i].0 as u32, index: p.samples[i].1 as u64 })
                .collect(),
            global_samples: p.samples.len() as u32,
            cost: shard.cost,
            max_cost: p.plan.max_cost(),
        }))
    }

    async fn report_step(&self, req: Request<StepReport>) -> Result<Response<StepAck>, Status> {
        let r = req.into_inner();
        let s = &self.0;
        let world = s.lock().members.world_size;
        // The plan is cached: this is a lookup, not a re-plan.
        let planner = s.planner.clone();
        let step = r.step;
        let imbalance = tokio::task::spawn_blocking(move || planner.step(step, world).map(|p| p.plan.imbalance()))
            .await
            .map_err(|e| Status::internal(format!("planner task: {e}")))?
            .unwrap_or(0.0);
        let mut st = s.lock();
        st.check(r.rank, r.generation, s.now()).map_err(refused)?;
        let total = st.spec.total_steps;
        if let Some(summary) = st.report(r, imbalance) {
            (s.on_step)(&summary);
        }
        Ok(Response::new(StepAck { done: step + 1 >= total }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let s = &self.0;
        let mut st = s.lock();
        st.check(r.rank, r.generation, s.now()).map_err(refused)?;
        let (action, reason) = st.action();
        Ok(Response::new(HeartbeatReply { generation: st.members.generation, action: action as i32, reason }))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let r = req.into_inner();
        let s = &self.0;
        let mut st = s.lock();
        st.check(r.rank, r.generation, s.now()).map_err(refused)?;
        if let Some(e) = r.eval {
            st.eval = Some(e);
        }
        if !r.saved_model.is_empty() {
            st.saved_model = Some(r.saved_model.clone());
        }
        if r.finished {
            tracing::info!(rank = r.rank, "worker finished");
        } else {
            tracing::error!(rank = r.rank, error = %r.error, "worker failed");
        }
        st.leave(r.rank, r.finished, &r.error);
        drop(st);
        s.changed.notify_waiters();
        Ok(Response::new(LeaveReply {}))
    }
}
