//! The job as the coordinator sees it: members, progress, outcome. Methods
//! take the time as an argument (seconds since start) so tests drive it by
//! hand; the gRPC handlers in `service.rs` only translate to and from it.

use crate::membership::{JoinError, JoinInfo, Membership};
use crate::progress::{StepBook, StepSummary};
use tessera_proto::v1::{Action, EvalResult, JobSpec, StepReport};

/// How the job ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Running,
    Finished,
    Failed(String),
}

pub struct JobState {
    pub spec: JobSpec,
    pub members: Membership,
    book: StepBook,
    /// Steps every rank has reported, with their summaries.
    pub summaries: Vec<StepSummary>,
    pub outcome: Outcome,
    pub eval: Option<EvalResult>,
    pub saved_model: Option<String>,
    /// A rank silent for this long is declared dead.
    pub heartbeat_deadline_s: f64,
    /// The first step to train: the step of the checkpoint the job resumes
    /// from (0 for a fresh job).
    pub start_step: u64,
}

impl JobState {
    pub fn new(spec: JobSpec, world_size: usize, heartbeat_deadline_s: f64) -> Self {
        JobState {
            spec,
            members: Membership::new(world_size),
            book: StepBook::new(world_size),
            summaries: Vec::new(),
            outcome: Outcome::Running,
            eval: None,
            saved_model: None,
            heartbeat_deadline_s,
            start_step: 0,
        }
    }

    pub fn join(&mut self, info: JoinInfo, now: f64) -> Result<u32, JoinError> {
        if self.outcome != Outcome::Running {
            return Err(JoinError::Finished);
        }
        self.members.join(info, now)
    }

    /// Checks that a request comes from a current member of this generation.
    pub fn check(&mut self, rank: u32, generation: u64, now: f64) -> Result<(), String> {
        if generation != self.members.generation {
            return Err(format!(
                "rank {rank} speaks for generation {generation}, but the job is in generation {}",
                self.members.generation
            ));
        }
        if !self.members.touch(rank, now) {
            return Err(format!("rank {rank} has not joined this job (or has left it)"));
        }
        Ok(())
    }

    /// Flags ranks slower than `factor` times the median in every summary.
    pub fn set_straggler_factor(&mut self, factor: f64) {
        self.book.straggler_factor = factor;
    }

    /// Files a step report; returns the summary when the step is complete.
    pub fn report(&mut self, r: StepReport, plan_imbalance: f64) -> Option<StepSummary> {
        let s = self.book.record(r, plan_imbalance)?;
        self.summaries.push(s.clone());
        Some(s)
    }

    /// The step after the last one every rank has reported (or the step
    /// the job resumed at, before any report).
    pub fn steps_done(&self) -> u64 {
        self.summaries.last().map(|s| s.step + 1).unwrap_or(self.start_step)
    }

    pub fn action(&self) -> (Action, String) {
        match &self.outcome {
            Outcome::Running => (Action::Continue, String::new()),
            Outcome::Finished => (Action::Shutdown, "the job has finished".into()),
            Outcome::Failed(why) => (Action::Shutdown, format!("the job failed: {why}")),
        }
    }

    /// A worker leaves. The job finishes when every rank has left after the
    /// last step; a rank leaving early fails it.
    pub fn leave(&mut self, rank: u32, finished: bool, error: &str) {
        self.members.leave(rank);
        if !finished && self.outcome == Outcome::Running {
            let why = if error.is_empty() { "no reason given" } else { error };
            self.outcome = Outcome::Failed(format!("rank {rank} left: {why}"));
        }
        if self.members.all_left() && self.outcome == Outcome::Running {
            self.outcome = if self.steps_done() >= self.spec.total_steps {
                Outcome::Finished
            } else {
                Outcome::Failed(format!(
                    "every worker left after {} of {} steps",
                    self.steps_done(),
                    self.spec.total_steps
                ))
            };
        }
    }

    /// Gives up on a job whose workers did not all join within `timeout_s`.
    pub fn check_join_timeout(&mut self, now: f64, timeout_s: f64) -> bool {
        if self.outcome != Outcome::Running || self.members.joined() == self.members.world_size || now < timeout_s {
            return false;
        }
        // Once the job has trained, missing ranks are the liveness check's business.
        if !self.summaries.is_empty() {
            return false;
        }
        let missing: Vec<usize> =
            (0..self.members.world_size).filter(|&r| self.members.members[r].as_ref().is_none_or(|m| m.left)).collect();
        self.outcome = Outcome::Failed(format!(
            "only {} of {} workers joined within cluster.join_timeout_s = {timeout_s} s; missing ranks: {missing:?}",
            self.members.joined(),
            self.members.world_size
        ));
        true
    }

    /// Declares dead every member silent for longer than the deadline.
    /// Recovery (a new generation) belongs to the failure-recovery work; for
    /// now a dead rank fails the job with a message naming it.
    pub fn check_liveness(&mut self, now: f64) -> Option<u32> {
        if self.outcome != Outcome::Running {
            return None;
        }
        let dead = self.members.members.iter().enumerate().find_map(|(r, m)| {
            m.as_ref().filter(|m| !m.left && now - m.last_seen > self.heartbeat_deadline_s).map(|_| r as u32)
        })?;
        self.outcome = Outcome::Failed(format!("rank {dead} sent no heartbeat for {:.0} s", self.heartbeat_deadline_s));
        Some(dead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(world: usize) -> JobState {
        let spec = JobSpec { total_steps: 2, ..Default::default() };
        JobState::new(spec, world, 10.0)
    }

    fn join(s: &mut JobState, pid: u32, now: f64) -> u32 {
        let info = JoinInfo {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank: None,
            host: "h".into(),
            device: "cpu".into(),
            collective_addr: format!("h:{pid}"),
            pid,
        };
        s.join(info, now).unwrap()
    }

    fn report(rank: u32, step: u64) -> StepReport {
        StepReport { rank, step, loss_sum: 1.0, target_tokens: 1, ..Default::default() }
    }

    #[test]
    fn finishes_when_every_rank_leaves_after_the_last_step() {
        let mut s = state(2);
        let (a, b) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        for step in 0..2 {
            assert!(s.report(report(a, step), 0.0).is_none());
            assert!(s.report(report(b, step), 0.0).is_some());
        }
        assert_eq!(s.steps_done(), 2);
        s.leave(a, true, "");
        assert_eq!(s.outcome, Outcome::Running);
        s.leave(b, true, "");
        assert_eq!(s.outcome, Outcome::Finished);
        assert_eq!(s.action().0, Action::Shutdown);
    }

    #[test]
    fn a_rank_leaving_early_or_going_silent_fails_the_job() {
        let mut s = state(2);
        let (a, _) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        s.leave(a, false, "out of memory");
        assert_eq!(s.outcome, Outcome::Failed("rank 0 left: out of memory".into()));

        let mut s = state(2);
        let (a, b) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        assert!(s.check(a, 1, 9.0).is_ok());
        assert_eq!(s.check_liveness(10.5), Some(b), "rank 1 was last seen at 0 s");
        assert!(matches!(&s.outcome, Outcome::Failed(m) if m.contains("rank 1")));
        assert_eq!(s.action().0, Action::Shutdown);
    }

    #[test]
    fn gives_up_when_workers_do_not_join_in_time() {
        let mut s = state(3);
        join(&mut s, 1, 0.0);
        assert!(!s.check_join_timeout(5.0, 10.0));
        assert!(s.check_join_timeout(10.0, 10.0));
        assert_eq!(
            s.outcome,
            Outcome::Failed(
                "only 1 of 3 workers joined within cluster.join_timeout_s = 10 s; missing ranks: [1, 2]".into()
            )
        );
    }

    #[test]
    fn requests_from_strangers_or_old_generations_are_refused() {
        let mut s = state(2);
        let a = join(&mut s, 1, 0.0);
        assert!(s.check(a, 0, 1.0).unwrap_err().contains("generation 0"));
        assert!(s.check(1, 1, 1.0).unwrap_err().contains("rank 1 has not joined"));
    }
}
