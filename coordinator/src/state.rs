//! The job as the coordinator sees it: members, generations, progress,
//! checkpoints, outcome. Methods take the time as an argument (seconds since
//! start) so tests drive it by hand; the gRPC handlers in `service.rs` only
//! translate to and from it.
//!
//! Recovery (docs/DESIGN.md section 5): a rank that dies or fails while its
//! generation trains starts the next generation, up to
//! `cluster.max_restarts`. Survivors hear ABORT on their next heartbeat,
//! drop their collective and join again with their ranks; a replacement
//! takes the dead rank. Everyone resumes from the last committed checkpoint.
//! An elastic job whose replacement does not come goes on with the ranks it
//! has, keeping the global batch.

use crate::membership::{JoinError, JoinInfo, Membership};
use crate::progress::{StepBook, StepSummary};
use crate::store::StoredJob;
use std::collections::BTreeMap;
use tessera_job::checkpoint::FileEntry;
use tessera_proto::v1::{Action, EvalResult, JobSpec, StepReport};

/// How the job ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Running,
    Finished,
    Failed(String),
}

/// What the job does when a rank fails (the `[cluster]` settings).
#[derive(Clone, Debug, PartialEq)]
pub struct RecoveryPolicy {
    pub max_restarts: u32,
    pub elastic: bool,
    /// An elastic job waits this long for a replacement before it shrinks.
    pub elastic_timeout_s: f64,
    /// A generation whose ranks have not all joined after this long fails.
    pub join_timeout_s: f64,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy { max_restarts: 0, elastic: false, elastic_timeout_s: 30.0, join_timeout_s: 600.0 }
    }
}

/// What the liveness check found.
#[derive(Clone, Debug, PartialEq)]
pub enum Liveness {
    /// A rank of the training generation went silent; `recovery` is the new
    /// generation (None: the job failed).
    Dead { rank: u32, recovery: Option<u64> },
    /// A rank that had not started training (a survivor that never came
    /// back, or a member of a generation still gathering) went silent: its
    /// rank is free for a replacement.
    Dropped { rank: u32 },
}

/// What waiting for a generation's ranks led to.
#[derive(Clone, Debug, PartialEq)]
pub enum Gathering {
    Waiting,
    /// An elastic job went on with this many ranks.
    Shrunk(usize),
    Failed,
}

pub struct JobState {
    pub spec: JobSpec,
    pub members: Membership,
    book: StepBook,
    /// Steps every rank has reported, with their summaries (cut back to the
    /// checkpoint a recovery resumes from).
    pub summaries: Vec<StepSummary>,
    pub outcome: Outcome,
    pub eval: Option<EvalResult>,
    pub saved_model: Option<String>,
    /// A rank silent for this long is declared dead.
    pub heartbeat_deadline_s: f64,
    /// The first step the current generation trains: the step of the
    /// checkpoint it resumes from (0 without one).
    pub start_step: u64,
    pub policy: RecoveryPolicy,
    /// Recoveries so far (all coordinator lives).
    pub restarts: u32,
    pub coordinator_restarts: u32,
    /// Steps of the committed checkpoints, oldest first.
    pub committed: Vec<u64>,
    /// The current generation has met at the rendezvous and trains.
    pub training: bool,
    /// When the current generation began gathering its ranks.
    generation_began: f64,
    /// The generation this coordinator started with (an elastic job never
    /// starts smaller than configured).
    first_generation: u64,
    /// Checkpoint parts reported so far, by step and rank.
    parts: BTreeMap<u64, BTreeMap<u32, Vec<FileEntry>>>,
    /// Why the last recovery began (named if the job then fails).
    last_failure: Option<String>,
}

impl JobState {
    /// A job started on a state directory: `stored` is what a previous
    /// coordinator recorded (None for a new job), `committed` the steps of
    /// the checkpoints on disk up to the newest intact one, which the job
    /// resumes from (none: from step 0).
    pub fn resume(
        spec: JobSpec,
        world_size: usize,
        heartbeat_deadline_s: f64,
        policy: RecoveryPolicy,
        stored: Option<&StoredJob>,
        committed: Vec<u64>,
    ) -> Self {
        let start_step = committed.last().copied().unwrap_or(0);
        // Past every generation a worker may still speak for.
        let generation = stored.map_or(1, |s| s.generation + 1);
        let mut members = Membership::at_generation(world_size, generation);
        // A replacement may take the rank of a quiet survivor after two intervals.
        members.quiet_after_s = 2.0 * spec.heartbeat_interval_s;
        JobState {
            spec,
            members,
            book: StepBook::new(world_size),
            summaries: Vec::new(),
            outcome: Outcome::Running,
            eval: None,
            saved_model: None,
            heartbeat_deadline_s,
            start_step,
            policy,
            restarts: stored.map_or(0, |s| s.restarts),
            coordinator_restarts: stored.map_or(0, |s| s.coordinator_restarts + 1),
            committed,
            training: false,
            generation_began: 0.0,
            first_generation: generation,
            parts: BTreeMap::new(),
            last_failure: None,
        }
    }

    /// The record the durable store keeps.
    pub fn stored(&self) -> StoredJob {
        StoredJob {
            seed: self.spec.seed,
            global_batch: self.spec.global_batch,
            generation: self.members.generation,
            restarts: self.restarts,
            coordinator_restarts: self.coordinator_restarts,
            committed: self.committed.clone(),
            steps_done: self.steps_done(),
        }
    }

    pub fn join(&mut self, info: JoinInfo, now: f64) -> Result<u32, JoinError> {
        if self.outcome != Outcome::Running {
            return Err(JoinError::Ended(self.action().1));
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
        if !self.members.touch(rank, generation, now) {
            return Err(format!("rank {rank} has not joined this job (or has left it)"));
        }
        Ok(())
    }

    /// A heartbeat: what the rank should do. A rank of an earlier
    /// generation is alive but must rejoin.
    pub fn heartbeat(&mut self, rank: u32, generation: u64, now: f64) -> Result<(Action, String), String> {
        if generation < self.members.generation && self.outcome == Outcome::Running {
            self.members.touch(rank, generation, now);
            let why = self.last_failure.as_deref().unwrap_or("the coordinator restarted");
            return Ok((
                Action::Abort,
                format!("the job moved to generation {} ({why}): rejoin", self.members.generation),
            ));
        }
        self.check(rank, generation, now)?;
        Ok(self.action())
    }

    /// The rendezvous of the current generation is complete: it trains.
    /// Returns true the first time.
    pub fn start_training(&mut self) -> bool {
        let first = self.members.complete() && !self.training;
        self.training |= first;
        first
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
    /// last step. A rank leaving early fails the job, unless it will rejoin
    /// (its collective failed, or it lost the coordinator): then the job
    /// recovers, and the new generation is returned.
    pub fn leave(&mut self, rank: u32, finished: bool, error: &str, will_rejoin: bool, now: f64) -> Option<u64> {
        let why = if error.is_empty() { "no reason given" } else { error };
        if !finished && will_rejoin && self.outcome == Outcome::Running {
            return self.fail_rank(rank, format!("rank {rank} failed: {why}"), now);
        }
        self.members.leave(rank);
        if !finished && self.outcome == Outcome::Running {
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
        None
    }

    /// A rank is gone (dead or failed). Its rank is freed; if its
    /// generation was training, the job starts the next generation when a
    /// restart is left, and fails otherwise.
    fn fail_rank(&mut self, rank: u32, why: String, now: f64) -> Option<u64> {
        self.members.leave(rank);
        if !self.training || self.outcome != Outcome::Running {
            return None;
        }
        if self.restarts >= self.policy.max_restarts {
            let max = self.policy.max_restarts;
            self.outcome = Outcome::Failed(format!("{why}; no restarts left (cluster.max_restarts = {max})"));
            return None;
        }
        self.restarts += 1;
        self.last_failure = Some(why);
        self.next_generation(now);
        Some(self.members.generation)
    }

    /// Everyone joins again and resumes from the last committed checkpoint:
    /// the steps after it are trained again, so their summaries go.
    fn next_generation(&mut self, now: f64) {
        self.members.next_generation();
        self.training = false;
        self.generation_began = now;
        self.start_step = self.committed.last().copied().unwrap_or(0);
        self.summaries.retain(|s| s.step < self.start_step);
        let factor = self.book.straggler_factor;
        self.book = StepBook::new(self.members.world_size);
        self.book.straggler_factor = factor;
        self.parts.clear();
    }

    /// While a generation gathers its ranks: an elastic job that has waited
    /// `elastic_timeout_s` for a replacement goes on with the ranks it has;
    /// otherwise the job fails after `join_timeout_s`.
    pub fn check_gathering(&mut self, now: f64) -> Gathering {
        let (world, joined) = (self.members.world_size, self.members.joined());
        if self.outcome != Outcome::Running || self.training || joined == world {
            return Gathering::Waiting;
        }
        let waited = now - self.generation_began;
        let p = &self.policy;
        if p.elastic && self.members.generation != self.first_generation && joined > 0 && waited >= p.elastic_timeout_s
        {
            let n = self.members.shrink_to_joined();
            let factor = self.book.straggler_factor;
            self.book = StepBook::new(n);
            self.book.straggler_factor = factor;
            return Gathering::Shrunk(n);
        }
        if waited < p.join_timeout_s {
            return Gathering::Waiting;
        }
        let g = self.members.generation;
        let missing: Vec<usize> = (0..world)
            .filter(|&r| self.members.members[r].as_ref().is_none_or(|m| m.left || m.generation != g))
            .collect();
        let mut why = format!(
            "only {joined} of {world} workers joined within cluster.join_timeout_s = {} s; missing ranks: {missing:?}",
            p.join_timeout_s
        );
        if let Some(failure) = &self.last_failure {
            why.push_str(&format!(" (generation {g} began after: {failure})"));
        }
        self.outcome = Outcome::Failed(why);
        Gathering::Failed
    }

    /// Declares dead a member silent for longer than the deadline (one per
    /// call; the coordinator calls this several times a heartbeat).
    pub fn check_liveness(&mut self, now: f64) -> Option<Liveness> {
        if self.outcome != Outcome::Running {
            return None;
        }
        let g = self.members.generation;
        let (rank, current) = self.members.members.iter().enumerate().find_map(|(r, m)| {
            m.as_ref()
                .filter(|m| !m.left && now - m.last_seen > self.heartbeat_deadline_s)
                .map(|m| (r as u32, m.generation == g))
        })?;
        if current && self.training {
            // A training generation either recovers or fails the job.
            let why = format!("rank {rank} sent no heartbeat for {:.0} s", self.heartbeat_deadline_s);
            let recovery = self.fail_rank(rank, why, now);
            return Some(Liveness::Dead { rank, recovery });
        }
        self.members.leave(rank);
        Some(Liveness::Dropped { rank })
    }

    /// Phase one of a checkpoint: `rank` has written its part of the
    /// checkpoint after `step` steps. Returns every rank's files once the
    /// last part is in (phase two, the commit, is the caller's).
    pub fn add_part(&mut self, rank: u32, step: u64, files: Vec<FileEntry>) -> Option<Vec<FileEntry>> {
        let world = self.members.world_size;
        let parts = self.parts.entry(step).or_default();
        parts.insert(rank, files);
        if parts.len() < world {
            return None;
        }
        let all = self.parts.remove(&step)?;
        Some(all.into_values().flatten().collect())
    }

    /// Records a committed checkpoint (and forgets the pruned ones).
    /// The checkpoint this generation's ranks may still be loading: the one
    /// it resumed from, until every rank has finished a step after it.
    pub fn loading_checkpoint(&self) -> Option<u64> {
        (self.start_step > 0 && self.steps_done() <= self.start_step).then_some(self.start_step)
    }

    pub fn committed(&mut self, step: u64, keep: usize) {
        self.committed.retain(|&s| s != step);
        self.committed.push(step);
        self.committed.sort_unstable();
        let drop = self.committed.len().saturating_sub(keep.max(1));
        self.committed.drain(..drop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(world: usize) -> JobState {
        state_with(world, RecoveryPolicy { join_timeout_s: 10.0, ..Default::default() })
    }

    fn state_with(world: usize, policy: RecoveryPolicy) -> JobState {
        let spec = JobSpec { total_steps: 2, heartbeat_interval_s: 1.0, ..Default::default() };
        JobState::resume(spec, world, 10.0, policy, None, vec![])
    }

    fn info(rank: Option<u32>, pid: u32) -> JoinInfo {
        JoinInfo {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank,
            host: "h".into(),
            device: "cpu".into(),
            collective_addr: format!("h:{pid}"),
            pid,
        }
    }

    fn join(s: &mut JobState, pid: u32, now: f64) -> u32 {
        s.join(info(None, pid), now).unwrap()
    }

    fn report(rank: u32, step: u64) -> StepReport {
        StepReport { rank, step, loss_sum: 1.0, target_tokens: 1, ..Default::default() }
    }

    fn file(path: &str) -> FileEntry {
        FileEntry { path: path.into(), bytes: 1, sha256: "00".into() }
    }

    #[test]
    fn finishes_when_every_rank_leaves_after_the_last_step() {
        let mut s = state(2);
        let (a, b) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        assert!(s.start_training());
        for step in 0..2 {
            assert!(s.report(report(a, step), 0.0).is_none());
            assert!(s.report(report(b, step), 0.0).is_some());
        }
        assert_eq!(s.steps_done(), 2);
        s.leave(a, true, "", false, 1.0);
        assert_eq!(s.outcome, Outcome::Running);
        s.leave(b, true, "", false, 1.0);
        assert_eq!(s.outcome, Outcome::Finished);
        assert_eq!(s.action().0, Action::Shutdown);
    }

    #[test]
    fn without_restarts_a_rank_leaving_early_or_going_silent_fails_the_job() {
        let mut s = state(2);
        let (a, _) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        s.leave(a, false, "out of memory", false, 1.0);
        assert_eq!(s.outcome, Outcome::Failed("rank 0 left: out of memory".into()));

        let mut s = state(2);
        let (a, b) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        s.start_training();
        assert!(s.check(a, 1, 9.0).is_ok());
        assert_eq!(
            s.check_liveness(10.5),
            Some(Liveness::Dead { rank: b, recovery: None }),
            "rank 1: last seen at 0 s"
        );
        assert!(matches!(&s.outcome, Outcome::Failed(m) if m.contains("rank 1") && m.contains("max_restarts = 0")));
        assert_eq!(s.action().0, Action::Shutdown);
    }

    #[test]
    fn gives_up_when_workers_do_not_join_in_time() {
        let mut s = state(3);
        join(&mut s, 1, 0.0);
        assert_eq!(s.check_gathering(5.0), Gathering::Waiting);
        assert_eq!(s.check_gathering(10.0), Gathering::Failed);
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

    /// A dead rank of a training generation starts the next one: the
    /// survivor is told to abort, its old generation's requests are
    /// refused, progress goes back to the last committed checkpoint, a
    /// replacement takes the dead rank, and once both have joined the new
    /// generation trains. With the restarts spent, the next failure fails
    /// the job and says why.
    #[test]
    fn a_dead_rank_starts_a_new_generation_that_a_replacement_joins() {
        let mut s = state_with(2, RecoveryPolicy { max_restarts: 1, ..Default::default() });
        let (a, b) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        assert!(s.start_training() && !s.start_training());
        for step in 0..2 {
            s.report(report(a, step), 0.0);
            s.report(report(b, step), 0.0);
        }
        assert_eq!(s.add_part(a, 1, vec![file("optimizer-00000-of-00002.safetensors")]), None);
        let all = s.add_part(b, 1, vec![file("optimizer-00001-of-00002.safetensors")]).unwrap();
        assert_eq!(all.len(), 2);
        s.committed(1, 2);
        assert!(s.check(a, 1, 9.0).is_ok());
        assert_eq!(s.check_liveness(10.5), Some(Liveness::Dead { rank: b, recovery: Some(2) }));
        assert_eq!((s.outcome.clone(), s.restarts, s.start_step, s.training), (Outcome::Running, 1, 1, false));
        assert_eq!(s.summaries.iter().map(|x| x.step).collect::<Vec<_>>(), vec![0], "step 1 is trained again");
        assert_eq!(s.steps_done(), 1);
        let (action, why) = s.heartbeat(a, 1, 11.0).unwrap();
        assert_eq!(action, Action::Abort);
        assert!(why.contains("generation 2") && why.contains("rank 1 sent no heartbeat"), "{why}");
        assert!(s.check(a, 1, 11.0).is_err(), "generation 1 is over");

        assert_eq!(s.join(info(Some(1), 3), 12.0), Ok(1), "a replacement takes the dead rank");
        assert!(!s.start_training(), "the survivor has not joined generation 2 yet");
        assert_eq!(s.join(info(Some(0), 1), 12.0), Ok(0), "the survivor keeps its rank");
        assert!(s.start_training());
        assert_eq!(s.leave(a, false, "ring broke", true, 13.0), None);
        assert!(matches!(&s.outcome, Outcome::Failed(m) if m.contains("ring broke") && m.contains("max_restarts = 1")));
        let e = s.join(info(Some(0), 1), 14.0).unwrap_err().to_string();
        assert!(e.starts_with("the job failed: rank 0 failed: ring broke"), "a rejoin hears why: {e}");
    }

    /// A failure before a generation trains frees the rank without using a
    /// restart; a survivor that never comes back is dropped.
    #[test]
    fn failures_while_gathering_free_the_rank() {
        let mut s = state_with(2, RecoveryPolicy { max_restarts: 5, ..Default::default() });
        let (a, b) = (join(&mut s, 1, 0.0), join(&mut s, 2, 0.0));
        s.start_training();
        assert_eq!(s.leave(b, false, "ring broke", true, 1.0), Some(2));
        assert_eq!(s.leave(a, false, "connect failed", true, 2.0), None, "generation 2 has not trained");
        assert_eq!((s.restarts, s.members.joined()), (1, 0));
        assert_eq!(s.join(info(Some(0), 1), 3.0), Ok(0));
        assert_eq!(s.check_liveness(20.0), Some(Liveness::Dropped { rank: 0 }));
        assert_eq!((s.restarts, s.outcome.clone()), (1, Outcome::Running));
    }

    /// A new worker may not take a rank whose holder is alive; one whose
    /// holder went quiet in this generation is told to retry; one held by
    /// a quiet survivor of an aborted generation is taken over.
    #[test]
    fn a_replacement_takes_only_a_quiet_rank() {
        let mut s = state_with(2, RecoveryPolicy { max_restarts: 1, ..Default::default() });
        join(&mut s, 1, 0.0);
        join(&mut s, 2, 0.0);
        s.start_training();
        assert!(matches!(s.join(info(Some(1), 3), 1.0), Err(JoinError::RankTaken { rank: 1, .. })));
        assert!(matches!(s.join(info(Some(1), 3), 5.0), Err(JoinError::RankBusy { rank: 1, .. })));
        s.leave(0, false, "ring broke", true, 5.0);
        assert_eq!(s.members.generation, 2);
        assert_eq!(s.join(info(Some(1), 3), 5.0), Ok(1), "rank 1 is a quiet survivor of generation 1");
        assert!(matches!(s.join(info(Some(1), 2), 5.0), Err(JoinError::RankTaken { .. })), "replaced");
    }

    /// An elastic job whose replacement does not come goes on with the
    /// ranks that rejoined, renumbered from 0.
    #[test]
    fn an_elastic_job_shrinks_when_no_replacement_comes() {
        let policy = RecoveryPolicy { max_restarts: 1, elastic: true, elastic_timeout_s: 5.0, join_timeout_s: 60.0 };
        let mut s = state_with(2, policy);
        assert_eq!(s.check_gathering(10.0), Gathering::Waiting, "the first generation never shrinks");
        join(&mut s, 1, 0.0);
        join(&mut s, 2, 0.0);
        s.start_training();
        assert!(s.check(1, 1, 9.0).is_ok());
        assert_eq!(s.check_liveness(10.5), Some(Liveness::Dead { rank: 0, recovery: Some(2) }));
        assert_eq!(s.join(info(Some(1), 2), 11.0), Ok(1));
        assert_eq!(s.check_gathering(15.0), Gathering::Waiting);
        assert_eq!(s.check_gathering(15.5), Gathering::Shrunk(1));
        assert_eq!(s.members.world_size, 1);
        let id = s.members.members[0].as_ref().unwrap().id;
        assert_eq!(s.members.by_id(id).map(|(r, m)| (r, m.info.pid)), Some((0, 2)), "rank 1 became rank 0");
        assert!(s.start_training());
    }

    /// A coordinator started on a stored job goes past every generation a
    /// worker may still speak for, and keeps counting restarts.
    #[test]
    fn a_restarted_coordinator_starts_a_later_generation() {
        let spec = JobSpec { total_steps: 9, seed: 3, global_batch: 4, ..Default::default() };
        let stored = StoredJob { generation: 3, restarts: 1, committed: vec![4], ..Default::default() };
        let s = JobState::resume(spec, 2, 10.0, RecoveryPolicy::default(), Some(&stored), vec![4]);
        assert_eq!((s.members.generation, s.restarts, s.coordinator_restarts), (4, 1, 1));
        assert_eq!((s.start_step, s.steps_done()), (4, 4));
        let back = s.stored();
        assert_eq!((back.generation, back.committed, back.seed, back.global_batch), (4, vec![4], 3, 4));
    }

    /// The checkpoint a generation resumed from is spared from pruning
    /// until every rank has trained a step after it.
    #[test]
    fn a_resumed_generation_loads_its_checkpoint_until_a_step_is_done() {
        let spec = JobSpec { total_steps: 9, seed: 3, global_batch: 4, ..Default::default() };
        let stored = StoredJob { generation: 3, restarts: 1, committed: vec![4], ..Default::default() };
        let mut s = JobState::resume(spec, 2, 10.0, RecoveryPolicy::default(), Some(&stored), vec![4]);
        assert_eq!(s.loading_checkpoint(), Some(4));
        s.committed(6, 1);
        assert_eq!(s.loading_checkpoint(), Some(4), "a commit landing meanwhile does not end the loading");
        let generation = s.members.generation;
        assert!(s.report(StepReport { rank: 0, generation, step: 4, ..Default::default() }, 0.0).is_none());
        assert_eq!(s.loading_checkpoint(), Some(4), "rank 1 may still be loading");
        assert!(s.report(StepReport { rank: 1, generation, step: 4, ..Default::default() }, 0.0).is_some());
        assert_eq!(s.loading_checkpoint(), None);
        assert_eq!(state(1).loading_checkpoint(), None, "a job from step 0 loads none");
    }

    #[test]
    fn committed_checkpoints_are_pruned_like_the_directory() {
        let mut s = state(1);
        for step in [2, 4, 6, 4] {
            s.committed(step, 2);
        }
        assert_eq!(s.committed, vec![4, 6]);
    }
}
