//! The gRPC handlers: translate requests into `JobState` and `Planner`
//! calls and their answers back into replies. No job logic lives here.

use crate::limits::RateLimiter;
use crate::membership::{JoinError, JoinInfo};
use crate::planner::Planner;
use crate::progress::StepSummary;
use crate::state::{JobState, Outcome};
use crate::store::JobStore;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tessera_job::checkpoint::{self, FileEntry};
use tessera_proto::auth::SESSION_KEY;
use tessera_proto::v1::{
    Action, Assignment, AssignmentRequest, CheckpointAck, CheckpointPart, HeartbeatReply, HeartbeatRequest, JobStatus,
    JoinReply, JoinRequest, LeaveReply, LeaveRequest, RendezvousReply, RendezvousRequest, SampleRef, StatusRequest,
    StepAck, StepReport,
};
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// How long a Rendezvous call waits for the last ranks before answering
/// "not ready" (the worker asks again), so no call outlives a proxy timeout.
const RENDEZVOUS_WAIT: Duration = Duration::from_secs(10);

/// Told the steps kept when a recovery goes back to a checkpoint.
pub type Rewind = dyn Fn(&[StepSummary]) + Send + Sync;

/// Shared between the handlers and the coordinator's main loop.
pub struct Shared {
    pub state: Mutex<JobState>,
    pub planner: Arc<Planner>,
    /// Signalled on every membership or outcome change.
    pub changed: Notify,
    pub started: Instant,
    /// Called with each finished step (progress bar, metrics file).
    pub on_step: Box<dyn Fn(&StepSummary) + Send + Sync>,
    /// Called with the steps kept when a recovery goes back to a checkpoint.
    pub on_rewind: Box<Rewind>,
    /// The durable job record (generation, restarts, commits).
    pub store: JobStore,
    /// checkpoint.dir and checkpoint.keep, when the job checkpoints.
    pub checkpoints: Option<(PathBuf, usize)>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Admits a worker (see `JobState::join`) and says what it joined.
    fn try_join(&self, info: JoinInfo) -> Result<JoinReply, JoinError> {
        let mut st = self.lock();
        let rank = st.join(info, self.now())?;
        Ok(JoinReply {
            rank,
            world_size: st.members.world_size as u32,
            generation: st.members.generation,
            job: Some(st.spec.clone()),
            member_id: st.members.members[rank as usize].as_ref().map_or(0, |m| m.id),
            session_secret: st.members.members[rank as usize].as_ref().map(|m| m.secret.clone()).unwrap_or_default(),
        })
    }

    /// Writes the job record to the durable store. A failure is logged, not
    /// fatal: the checkpoints on disk still hold the job.
    pub fn persist(&self, st: &JobState) {
        if let Err(e) = self.store.save(&st.stored()) {
            tracing::error!(error = %format!("{e:#}"), "cannot record the job state");
        }
    }

    /// A failure started generation `generation`: everyone goes back to the
    /// last committed checkpoint.
    pub fn recovered(&self, st: &JobState, generation: u64) {
        tracing::warn!(
            generation,
            resume_step = st.start_step,
            restarts = st.restarts,
            max_restarts = st.policy.max_restarts,
            "recovering: every rank rejoins and resumes from the last committed checkpoint"
        );
        (self.on_rewind)(&st.summaries);
        self.persist(st);
    }
}

/// The handlers, with the per-peer rate limit that heartbeat streams keep
/// beat by beat (the interceptor sees only a stream's opening).
#[derive(Clone)]
pub struct Service(pub Arc<Shared>, pub Arc<RateLimiter>);

/// The answers on a heartbeat stream, one per beat.
pub type HeartbeatReplies = Pin<Box<dyn Stream<Item = Result<HeartbeatReply, Status>> + Send>>;

fn refused(msg: String) -> Status {
    Status::failed_precondition(msg)
}

/// The session secret a worker's call carries (empty: none).
fn session<T>(req: &Request<T>) -> String {
    req.metadata().get(SESSION_KEY).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Whether a call for `rank` carries that rank's session; why not, if not.
fn session_of(st: &JobState, rank: u32, secret: &str) -> Result<(), String> {
    if st.members.authorize(rank, secret) {
        return Ok(());
    }
    Err(format!(
        "this call speaks for rank {rank} without that rank's session: only the worker that joined as rank {rank} may"
    ))
}

/// Refuses a call for `rank` that does not carry that rank's session.
fn authorize(st: &JobState, rank: u32, secret: &str) -> Result<(), Status> {
    session_of(st, rank, secret).map_err(Status::permission_denied)
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
        // A rank held by a worker that has just died looks taken until its
        // holder has been quiet for a while: wait that long before saying
        // so, and a replacement started right after the death gets in.
        let patience = Duration::from_secs_f64(s.lock().members.quiet_after_s.min(30.0) + 0.2);
        let waited = Instant::now();
        let joined = loop {
            // A refused join changes nothing, so it can be tried again.
            let joined = s.try_join(info.clone());
            if !matches!(joined, Err(JoinError::RankTaken { .. })) || waited.elapsed() >= patience {
                break joined;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let reply = joined.map_err(|e| {
            tracing::warn!(%host, %device, error = %e, "join refused");
            match e {
                JoinError::Protocol { .. } => Status::failed_precondition(e.to_string()),
                // The holder is about to be declared dead: the worker retries.
                JoinError::RankBusy { .. } => Status::unavailable(e.to_string()),
                _ => Status::already_exists(e.to_string()),
            }
        })?;
        tracing::info!(rank = reply.rank, %host, %device, generation = reply.generation, "worker joined");
        s.changed.notify_waiters();
        Ok(Response::new(reply))
    }

    async fn rendezvous(&self, req: Request<RendezvousRequest>) -> Result<Response<RendezvousReply>, Status> {
        let secret = session(&req);
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
                // By member id: an elastic shrink may have given it another rank.
                let rank = st.members.by_id(r.member_id).map(|(rank, _)| rank).ok_or_else(|| {
                    refused(format!(
                        "rank {} is not a member of generation {}: join again",
                        r.rank, st.members.generation
                    ))
                })?;
                authorize(&st, rank, &secret)?;
                st.check(rank, r.generation, s.now()).map_err(refused)?;
                if rank == 0 && !r.nccl_unique_id.is_empty() && st.members.nccl_id != r.nccl_unique_id {
                    st.members.nccl_id = r.nccl_unique_id.clone();
                    id_arrived = true;
                }
                if st.start_training() {
                    tracing::info!(
                        generation = st.members.generation,
                        world_size = st.members.world_size,
                        start_step = st.start_step,
                        "every rank has joined: training"
                    );
                    s.persist(&st);
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
                    rank,
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
        let secret = session(&req);
        let r = req.into_inner();
        let s = self.0.clone();
        let (world, total) = {
            let mut st = s.lock();
            authorize(&st, r.rank, &secret)?;
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
        let secret = session(&req);
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
        authorize(&st, r.rank, &secret)?;
        st.check(r.rank, r.generation, s.now()).map_err(refused)?;
        let total = st.spec.total_steps;
        if let Some(summary) = st.report(r, imbalance) {
            // Not persisted per step: a redb commit (an fsync) under the
            // job's lock would stall every call each step, and a restart
            // resumes from the checkpoints on disk, which commits record.
            (s.on_step)(&summary);
        }
        Ok(Response::new(StepAck { done: step + 1 >= total }))
    }

    type HeartbeatsStream = HeartbeatReplies;

    /// Each beat is answered in turn. A beat that is not the current
    /// member's (no session for its rank, another generation) is answered
    /// ABORT ("join again") and the stream stays open, so the worker hears
    /// why; only a peer over its rate, or a message that does not decode,
    /// ends the stream (and the coordinator stopping: see `STOP_GRACE`).
    async fn heartbeats(
        &self,
        req: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<HeartbeatReplies>, Status> {
        let secret = session(&req);
        let peer = req.remote_addr();
        let (s, limiter) = (self.0.clone(), self.1.clone());
        let replies = req.into_inner().map(move |beat| {
            let r = beat?;
            if let Some(peer) = peer {
                limiter.check(peer)?;
            }
            let mut st = s.lock();
            let answer = session_of(&st, r.rank, &secret).and_then(|()| st.heartbeat(r.rank, r.generation, s.now()));
            let (action, reason) = answer.unwrap_or_else(|why| (Action::Abort, format!("{why}: join again")));
            Ok(HeartbeatReply { generation: st.members.generation, action: action as i32, reason })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let secret = session(&req);
        let r = req.into_inner();
        let s = &self.0;
        let mut st = s.lock();
        authorize(&st, r.rank, &secret)?;
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
            tracing::error!(rank = r.rank, error = %r.error, will_rejoin = r.will_rejoin, "worker failed");
        }
        if let Some(generation) = st.leave(r.rank, r.finished, &r.error, r.will_rejoin, s.now()) {
            s.recovered(&st, generation);
        }
        drop(st);
        s.changed.notify_waiters();
        Ok(Response::new(LeaveReply {}))
    }

    /// Read-only: the job token (checked by the interceptor) is enough.
    async fn get_status(&self, _req: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        let s = &self.0;
        let st = s.lock();
        Ok(Response::new(crate::status::job_status(&st, s.now())))
    }

    async fn commit_checkpoint(&self, req: Request<CheckpointPart>) -> Result<Response<CheckpointAck>, Status> {
        let secret = session(&req);
        let r = req.into_inner();
        let s = &self.0;
        let (root, keep) = s
            .checkpoints
            .clone()
            .ok_or_else(|| Status::failed_precondition("the job has no checkpoint.dir: nothing to commit"))?;
        let files: Vec<FileEntry> =
            r.files.into_iter().map(|f| FileEntry { path: f.path, bytes: f.bytes, sha256: f.sha256 }).collect();
        let all = {
            let mut st = s.lock();
            authorize(&st, r.rank, &secret)?;
            st.check(r.rank, r.generation, s.now()).map_err(refused)?;
            st.add_part(r.rank, r.step, files)
        };
        let Some(all) = all else { return Ok(Response::new(CheckpointAck::default())) };
        // Phase two: every rank's part is on disk; the manifest and the
        // rename make it one committed checkpoint.
        let (step, generation) = (r.step, r.generation);
        let staging = checkpoint::staging_dir(&root, step, generation);
        let into = root.clone();
        let committed = tokio::task::spawn_blocking(move || checkpoint::commit(&into, &staging, step, all))
            .await
            .map_err(|e| Status::internal(format!("commit task: {e}")))?;
        match committed {
            Ok(dir) => {
                let loading = {
                    let mut st = s.lock();
                    st.committed(step, keep);
                    s.persist(&st);
                    st.loading_checkpoint()
                };
                tracing::info!(step, dir = %dir.display(), "checkpoint committed");
                // Pruned after the record: a generation that starts later
                // resumes from this checkpoint (the newest, kept), and one
                // that started while this commit ran keeps the one it loads.
                let pruned = tokio::task::spawn_blocking(move || checkpoint::prune(&root, keep, loading)).await;
                if let Err(e) = pruned.map_err(anyhow::Error::from).and_then(|r| r) {
                    tracing::error!(error = %format!("{e:#}"), "cannot delete old checkpoints");
                }
                Ok(Response::new(CheckpointAck { committed: true, dir: dir.display().to_string() }))
            }
            Err(e) => {
                tracing::error!(step, error = %format!("{e:#}"), "cannot commit the checkpoint");
                Err(Status::internal(format!("cannot commit the checkpoint of step {step}: {e:#}")))
            }
        }
    }
}
