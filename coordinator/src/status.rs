//! `coordinator status`: the job at a glance. `job_status` builds the
//! GetStatus reply from the job state and `render` prints it for people;
//! both are pure. `query` asks a running coordinator for it.

use crate::membership::Member;
use crate::state::{JobState, Outcome};
use anyhow::{anyhow, Result};
use std::fmt::Write;
use std::time::Duration;
use tessera_proto::auth::JobToken;
use tessera_proto::client::source_chain;
use tessera_proto::tls::ClientTls;
use tessera_proto::v1::{JobStatus, RankStatus, StatusRequest, StepLoss};
use tessera_proto::CoordinatorClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tonic::Code;

/// Steps the loss list and the ETA's mean step time look back over.
const RECENT: usize = 10;

/// The job as `coordinator status` shows it, at `now` (seconds since the
/// coordinator started, as in `JobState`).
pub fn job_status(st: &JobState, now: f64) -> JobStatus {
    let recent = &st.summaries[st.summaries.len().saturating_sub(RECENT)..];
    let steps_done = st.steps_done();
    let total = st.spec.total_steps;
    let seconds: f64 = recent.iter().map(|s| s.seconds).sum();
    let eta_s = (st.outcome == Outcome::Running && !recent.is_empty())
        .then(|| seconds / recent.len() as f64 * total.saturating_sub(steps_done) as f64);
    let tokens: u64 = recent.iter().map(|s| s.llm_tokens).sum();
    let m = &st.members;
    // A member silent this long may be replaced (membership's quiet_after_s).
    let quiet_after = 2.0 * st.spec.heartbeat_interval_s;
    let ranks = (0..m.world_size)
        .map(|rank| {
            let member = m.members.get(rank).and_then(Option::as_ref);
            RankStatus {
                rank: rank as u32,
                state: rank_state(member, m.generation, st.training, quiet_after, now).into(),
                host: member.map(|x| x.info.host.clone()).unwrap_or_default(),
                pid: member.map_or(0, |x| x.info.pid),
                device: member.map(|x| x.info.device.clone()).unwrap_or_default(),
                last_seen_s_ago: member.map(|x| (now - x.last_seen).max(0.0)),
                generation: member.map_or(0, |x| x.generation),
            }
        })
        .collect();
    JobStatus {
        generation: m.generation,
        world_size: m.world_size as u32,
        outcome: match &st.outcome {
            Outcome::Running => "running".into(),
            Outcome::Finished => "finished".into(),
            Outcome::Failed(why) => format!("failed: {why}"),
        },
        training: st.training,
        joined: m.joined() as u32,
        steps_done,
        total_steps: total,
        eta_s,
        recent_losses: recent.iter().map(|s| StepLoss { step: s.step + 1, loss: s.loss }).collect(),
        tokens_per_s: if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 },
        last_checkpoint_step: st.committed.last().copied(),
        restarts: st.restarts,
        max_restarts: st.policy.max_restarts,
        ranks,
    }
}

/// A rank's state; a long silence is named before anything else it is.
fn rank_state(m: Option<&Member>, generation: u64, training: bool, quiet_after: f64, now: f64) -> &'static str {
    match m {
        None => "missing",
        Some(m) if m.left => "left",
        Some(m) if now - m.last_seen > quiet_after => "quiet",
        Some(m) if m.generation != generation => "rejoining",
        Some(_) if training => "training",
        Some(_) => "joined",
    }
}

/// The status for people: a header line, then one line per rank.
pub fn render(s: &JobStatus) -> String {
    let mut out = String::new();
    let phase = match s.outcome.as_str() {
        "running" if s.training => "running (training)".to_string(),
        "running" => format!("running (waiting for workers: {}/{} joined)", s.joined, s.world_size),
        other => other.to_string(),
    };
    let pct = if s.total_steps > 0 { 100.0 * s.steps_done as f64 / s.total_steps as f64 } else { 0.0 };
    let _ = write!(out, "generation {}, {phase}; step {}/{} ({pct:.0}%)", s.generation, s.steps_done, s.total_steps);
    if let Some(eta) = s.eta_s {
        let _ = write!(out, ", ETA {}", duration(eta));
    }
    match (s.recent_losses.first(), s.recent_losses.last()) {
        (Some(first), Some(last)) if first.step != last.step => {
            let _ = write!(out, "; loss {:.4} ({:.4} at step {})", last.loss, first.loss, first.step);
        }
        (_, Some(last)) => {
            let _ = write!(out, "; loss {:.4}", last.loss);
        }
        _ => out.push_str("; no step yet"),
    }
    if s.tokens_per_s > 0.0 {
        let _ = write!(out, "; {:.0} tokens/s", s.tokens_per_s);
    }
    match s.last_checkpoint_step {
        Some(step) => {
            let _ = write!(out, "; checkpoint at step {step}");
        }
        None => out.push_str("; no checkpoint"),
    }
    let _ = writeln!(out, "; restarts {}/{}", s.restarts, s.max_restarts);
    for r in &s.ranks {
        let mut line = format!("  rank {:<3} {:<10}", r.rank, r.state);
        if !r.host.is_empty() {
            let _ = write!(line, " {} pid {} {}", r.host, r.pid, r.device);
        }
        if let Some(ago) = r.last_seen_s_ago {
            let _ = write!(line, ", last heartbeat {ago:.1} s ago");
        }
        if r.state == "rejoining" {
            let _ = write!(line, " (generation {})", r.generation);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "42 s", "3 min 05 s", "2 h 07 min".
fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

/// Asks the coordinator at `url` for the job's status. Errors are one line
/// that says whether it could not be reached or refused.
pub fn query(url: &str, token: Option<&JobToken>, tls: Option<&ClientTls>) -> Result<JobStatus> {
    let not_a_url = |why: &dyn std::fmt::Display| {
        anyhow!("{url:?} is not a coordinator URL: {why} (expected e.g. http://head-node:29500)")
    };
    if !url.contains("://") {
        return Err(not_a_url(&"no scheme"));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| not_a_url(&e))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let endpoint = match tls {
        Some(tls) => endpoint.tls_config(tls.config(url)?).map_err(|e| anyhow!("TLS settings for {url}: {e}"))?,
        None => endpoint,
    };
    let mut req = tonic::Request::new(StatusRequest {});
    if let Some(t) = token {
        let v = MetadataValue::try_from(t.bearer()).map_err(|_| anyhow!("the job token cannot travel in a header"))?;
        req.metadata_mut().insert("authorization", v);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow!("cannot reach the coordinator at {url}: {}", source_chain(&e)))?;
        let reply = CoordinatorClient::new(channel).get_status(req).await.map_err(|s| match s.code() {
            Code::Unauthenticated => anyhow!(
                "the coordinator at {url} refused: missing or wrong job token (give it with --token-file or TESSERA_JOB_TOKEN)"
            ),
            Code::Unimplemented => anyhow!("the coordinator at {url} does not answer GetStatus (an older version?)"),
            Code::Unavailable | Code::DeadlineExceeded => {
                anyhow!("cannot reach the coordinator at {url}: {}", s.message())
            }
            code => anyhow!("the coordinator at {url} refused: {} ({code:?})", s.message()),
        })?;
        Ok(reply.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::JoinInfo;
    use crate::progress::StepSummary;
    use crate::state::RecoveryPolicy;
    use tessera_proto::v1::JobSpec;

    fn info(rank: u32, pid: u32) -> JoinInfo {
        JoinInfo {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank: Some(rank),
            host: "node7".into(),
            device: "cpu".into(),
            collective_addr: format!("node7:{pid}"),
            pid,
        }
    }

    fn summary(step: u64, loss: f64) -> StepSummary {
        StepSummary {
            step,
            loss,
            grad_norm: 1.0,
            lr_scale: 1.0,
            samples: 4,
            target_tokens: 10,
            llm_tokens: 300,
            tiles: 10,
            bad_samples: 0,
            truncated: 0,
            seconds: 1.5,
            tokens_per_s: 200.0,
            tiles_per_s: 6.0,
            plan_imbalance: 0.0,
            compute_imbalance: 0.0,
            comm_wait_s: 0.0,
            compute_s: vec![1.0, 1.0, 1.0],
            step_s: vec![1.5, 1.5, 1.5],
            rank_samples: vec![1, 1, 2],
            stragglers: vec![],
        }
    }

    /// A job of 3 ranks on 40 steps, heartbeat 1 s, 12 steps done.
    fn training_job() -> JobState {
        let spec = JobSpec { total_steps: 40, heartbeat_interval_s: 1.0, ..Default::default() };
        let policy = RecoveryPolicy { max_restarts: 3, ..Default::default() };
        let mut st = JobState::resume(spec, 3, 10.0, policy, None, vec![]);
        for r in 0..3 {
            st.join(info(r, 100 + r), 0.0).unwrap();
        }
        assert!(st.start_training());
        st.summaries = (0..12).map(|s| summary(s, 3.0 - 0.1 * s as f64)).collect();
        st.committed(10, 2);
        st
    }

    #[test]
    fn a_training_job_reports_progress_and_every_rank() {
        let mut st = training_job();
        st.members.members[0].as_mut().unwrap().last_seen = 9.6;
        st.members.members[1].as_mut().unwrap().last_seen = 7.5;
        st.members.members[2].as_mut().unwrap().last_seen = 9.9;
        let s = job_status(&st, 10.0);
        assert_eq!((s.generation, s.world_size, s.outcome.as_str()), (1, 3, "running"));
        assert_eq!((s.steps_done, s.total_steps, s.joined, s.training), (12, 40, 3, true));
        assert_eq!(s.eta_s, Some(1.5 * 28.0), "28 steps left at 1.5 s");
        assert_eq!(s.recent_losses.len(), 10);
        assert_eq!((s.recent_losses[0].step, s.recent_losses[9].step), (3, 12));
        assert!((s.recent_losses[9].loss - 1.9).abs() < 1e-12);
        assert_eq!(s.tokens_per_s, 200.0);
        assert_eq!((s.last_checkpoint_step, s.restarts, s.max_restarts), (Some(10), 0, 3));
        let states: Vec<&str> = s.ranks.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["training", "quiet", "training"], "rank 1: silent 2.5 s, over two intervals");
        let r0 = &s.ranks[0];
        assert_eq!((r0.host.as_str(), r0.pid, r0.device.as_str(), r0.generation), ("node7", 100, "cpu", 1));
        assert!((r0.last_seen_s_ago.unwrap() - 0.4).abs() < 1e-9);
    }

    /// After a failure the survivors are members of the old generation, the
    /// dead rank is free, and nothing trains.
    #[test]
    fn a_recovering_job_names_rejoining_left_and_missing_ranks() {
        let mut st = training_job();
        assert!(st.check(0, 1, 5.0).is_ok() && st.check(2, 1, 5.0).is_ok());
        assert_eq!(st.leave(1, false, "ring broke", true, 5.0), Some(2));
        st.join(info(0, 100), 5.5).unwrap();
        let s = job_status(&st, 6.0);
        assert_eq!((s.generation, s.training, s.joined, s.restarts), (2, false, 1, 1));
        assert_eq!(s.steps_done, 10, "back to the checkpoint");
        let states: Vec<&str> = s.ranks.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["joined", "left", "rejoining"]);
        let text = render(&s);
        assert!(
            text.starts_with("generation 2, running (waiting for workers: 1/3 joined); step 10/40 (25%)"),
            "{text}"
        );
        assert!(
            text.contains("rank 2   rejoining  node7 pid 102 cpu, last heartbeat 1.0 s ago (generation 1)"),
            "{text}"
        );

        let spec = JobSpec { total_steps: 5, heartbeat_interval_s: 1.0, ..Default::default() };
        let fresh = JobState::resume(spec, 2, 10.0, RecoveryPolicy::default(), None, vec![]);
        let s = job_status(&fresh, 1.0);
        assert_eq!(s.ranks.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(), ["missing", "missing"]);
        assert_eq!((s.eta_s, s.ranks[0].last_seen_s_ago), (None, None));
        let text = render(&s);
        assert!(text.contains("no step yet; no checkpoint; restarts 0/0\n  rank 0   missing\n"), "{text}");
    }

    #[test]
    fn render_prints_a_header_and_a_line_per_rank() {
        let mut st = training_job();
        for m in st.members.members.iter_mut().flatten() {
            m.last_seen = 9.6;
        }
        let text = render(&job_status(&st, 10.0));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "generation 1, running (training); step 12/40 (30%), ETA 42 s; loss 1.9000 (2.8000 at step 3); \
                 200 tokens/s; checkpoint at step 10; restarts 0/3",
                "  rank 0   training   node7 pid 100 cpu, last heartbeat 0.4 s ago",
                "  rank 1   training   node7 pid 101 cpu, last heartbeat 0.4 s ago",
                "  rank 2   training   node7 pid 102 cpu, last heartbeat 0.4 s ago",
            ]
        );
        st.outcome = Outcome::Failed("rank 1 left: out of memory".into());
        let s = job_status(&st, 10.0);
        assert_eq!(s.eta_s, None, "a job that is over has no ETA");
        assert!(render(&s).starts_with("generation 1, failed: rank 1 left: out of memory; step 12/40"));
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(42.4), "42 s");
        assert_eq!(duration(185.0), "3 min 05 s");
        assert_eq!(duration(7620.0), "2 h 07 min");
        assert_eq!(duration(-3.0), "0 s");
    }

    /// A coordinator that is not there is a one-line error, not a hang.
    #[test]
    fn an_unreachable_coordinator_is_one_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = query(&format!("http://127.0.0.1:{port}"), None, None).unwrap_err().to_string();
        assert!(e.starts_with(&format!("cannot reach the coordinator at http://127.0.0.1:{port}")), "{e}");
        assert!(!e.contains('\n'), "{e}");
        for bad in ["not a url", "head-node:29500"] {
            let e = query(bad, None, None).unwrap_err().to_string();
            assert!(e.contains("is not a coordinator URL"), "{e}");
        }
    }
}
