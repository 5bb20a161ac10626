//! The simulated clients: each heartbeats the coordinator on one stream, as
//! a worker does, either as a member of a job (after a Join) or claiming a
//! rank it does not hold, and counts every answer and its latency.

use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_proto::auth::SESSION_KEY;
use tessera_proto::v1::{Action, HeartbeatReply, HeartbeatRequest, JoinRequest};
use tessera_proto::CoordinatorClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

/// Counts kept by each simulated client.
#[derive(Default)]
pub(crate) struct ClientStats {
    /// Per beat: sent (ms after the run's origin), latency (us).
    pub(crate) calls: Vec<(u32, u32)>,
    /// Beats by answer ("Continue", "Abort", ...) or, for a stream that
    /// failed, by status code.
    pub(crate) outcomes: BTreeMap<String, u64>,
}

/// What every simulated client shares.
#[derive(Clone)]
pub(crate) struct Beat {
    /// `authorization` metadata with the job token.
    pub(crate) auth: AsciiMetadataValue,
    /// Call times are kept relative to this.
    pub(crate) origin: Instant,
    pub(crate) period: Duration,
    pub(crate) stop: Arc<AtomicBool>,
    /// Beats answered so far, all clients.
    pub(crate) done: Arc<AtomicU64>,
}

/// Whom a simulated client's beats speak for.
pub(crate) struct Member {
    pub(crate) rank: u32,
    pub(crate) generation: u64,
    /// The session a Join gave (None: a claim without one, refused).
    pub(crate) session: Option<AsciiMetadataValue>,
}

impl Member {
    /// Claims `rank` without joining: every beat is answered ABORT.
    pub(crate) fn claim(rank: u32) -> Self {
        Member { rank, generation: 0, session: None }
    }

    /// Joins as `rank`, as a worker does: its beats are a member's.
    pub(crate) async fn join(
        client: &mut CoordinatorClient<Channel>,
        rank: u32,
        auth: &AsciiMetadataValue,
    ) -> Result<Self> {
        let mut req = tonic::Request::new(JoinRequest {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank: Some(rank),
            host: "simulated".into(),
            device: "cpu".into(),
            collective_addr: "127.0.0.1:1".into(),
            pid: rank + 1,
        });
        req.metadata_mut().insert("authorization", auth.clone());
        let r = client.join(req).await.map_err(|s| anyhow!("simulated member {rank} cannot join: {s}"))?.into_inner();
        let session = r.session_secret.parse().map_err(|_| anyhow!("a session secret that is not a header value"))?;
        Ok(Member { rank, generation: r.generation, session: Some(session) })
    }
}

/// Heartbeats from one simulated client until `stop`, as a worker sends
/// them: one stream, a beat every `period` from `first`, each answered
/// before the next. A stream that fails is counted by its status and
/// opened again at the next beat.
pub(crate) async fn heartbeat_loop(
    mut client: CoordinatorClient<Channel>,
    member: Member,
    first: tokio::time::Instant,
    b: Beat,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut tick = tokio::time::interval_at(first, b.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open: Option<(tokio::sync::mpsc::Sender<HeartbeatRequest>, tonic::Streaming<HeartbeatReply>)> = None;
    loop {
        tick.tick().await;
        if b.stop.load(Ordering::Relaxed) {
            return stats;
        }
        let t = Instant::now();
        let answer = async {
            let (beats, mut replies) = match open.take() {
                Some(o) => o,
                None => {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    req.metadata_mut().insert("authorization", b.auth.clone());
                    if let Some(s) = &member.session {
                        req.metadata_mut().insert(SESSION_KEY, s.clone());
                    }
                    (tx, client.heartbeats(req).await?.into_inner())
                }
            };
            let beat = HeartbeatRequest { rank: member.rank, generation: member.generation, step: 0 };
            beats.send(beat).await.map_err(|_| tonic::Status::unavailable("the stream is closed"))?;
            let reply = replies.message().await?.ok_or_else(|| tonic::Status::unavailable("the stream ended"))?;
            open = Some((beats, replies));
            Ok::<_, tonic::Status>(reply)
        }
        .await;
        let sent_ms = (t - b.origin).as_millis().min(u32::MAX as u128) as u32;
        stats.calls.push((sent_ms, t.elapsed().as_micros().min(u32::MAX as u128) as u32));
        let outcome = match answer {
            Ok(r) => format!("{:?}", Action::try_from(r.action).unwrap_or(Action::Continue)),
            Err(s) => format!("{:?}", s.code()),
        };
        *stats.outcomes.entry(outcome).or_default() += 1;
        b.done.fetch_add(1, Ordering::Relaxed);
    }
}
