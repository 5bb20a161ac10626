//! One generation of a multi-worker job, phase by phase: meet the other
//! ranks, build the model (or resume it from the committed checkpoint),
//! connect the collective, train the assigned steps with their checkpoints,
//! and finish (rank 0 saves and evaluates the model).

use super::heartbeat::{Aborter, Heartbeat};
use super::process::Process;
use super::rejoin::{Classify, Failure};
use crate::codec::SaveDtype;
use crate::collective::Collective;
use crate::data::loader::{Dataset, LoadedBatch, Prefetcher};
use crate::engine::Backend;
use crate::eval::evaluate;
use crate::model::weights::save_model_dir;
use crate::model::{Batch, Vlm};
use crate::train::grad_sync::{BucketSizes, CommThread};
use crate::train::job_checkpoint::{restore, write_checkpoint_part};
use crate::train::optimizer::Optimizer;
use crate::train::setup::build_model;
use crate::train::trainer::{synced_params, train_step_dp};
use anyhow::{anyhow, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tessera_job::checkpoint as manifest;
use tessera_proto::v1::{
    AssignmentRequest, CheckpointFile, CheckpointPart, EvalResult, JoinReply, RendezvousReply, RendezvousRequest,
    StepReport, Timings,
};

/// What a worker that finished the job tells the coordinator: the
/// evaluation and the saved model (rank 0's; the other ranks have neither).
pub(super) type Finished = (Option<EvalResult>, Option<String>);

/// This worker's place in the current generation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Generation {
    pub(super) rank: u32,
    pub(super) generation: u64,
    pub(super) member_id: u64,
    pub(super) world: usize,
}

impl From<&JoinReply> for Generation {
    fn from(j: &JoinReply) -> Self {
        Generation { rank: j.rank, generation: j.generation, member_id: j.member_id, world: j.world_size as usize }
    }
}

/// One step's share for this rank, cut into micro-batches.
struct Share {
    micro: Vec<LoadedBatch>,
}

impl Share {
    /// The micro-batches that hold samples, with the count of samples
    /// skipped as bad and of samples cut to the maximum length.
    fn into_batches(self) -> (Vec<Batch>, usize, usize) {
        let (mut bad, mut truncated) = (0, 0);
        let mut micro = Vec::new();
        for lb in self.micro {
            bad += lb.bad.len();
            truncated += lb.truncated;
            if lb.batch.batch > 0 {
                micro.push(lb.batch);
            }
        }
        (micro, bad, truncated)
    }
}

impl Process<'_> {
    /// One generation: meet the others, build the model (from the last
    /// committed checkpoint, if any), connect the collective and train the
    /// assigned steps.
    pub(super) fn generation<B: Backend, C: Collective<Buf = B::Buf> + 'static>(
        &self,
        gen: &mut Generation,
        be: &B,
        new_nccl_id: &impl Fn(usize) -> Result<Vec<u8>>,
        connect: &impl Fn(&RendezvousReply) -> Result<(C, Aborter)>,
    ) -> Result<Finished, Failure>
    where
        B::Buf: Send + 'static,
    {
        // Heartbeats from their own thread, so a long step never looks like death.
        let interval = Duration::from_secs_f64(self.spec.heartbeat_interval_s.max(0.05));
        let heartbeat = Heartbeat::start(self.client, gen.rank, gen.generation, interval);
        let mut round = Round { process: self, gen, heartbeat };
        let rdv = round.rendezvous(new_nccl_id)?;
        round.take_place(&rdv);
        let (mut vlm, mut opt) = round.load_or_resume(be, rdv.start_step)?;
        let comm = round.connect(&rdv, connect)?;
        round.train_steps(be, &mut vlm, &mut opt, &comm, rdv.start_step)?;
        round.finish(be, &mut vlm)
    }
}

/// One generation in progress: what stays from the process, this worker's
/// place in the generation and the heartbeat that watches it (stopped when
/// the round ends, however it ends).
struct Round<'r, 'p> {
    process: &'r Process<'p>,
    gen: &'r mut Generation,
    heartbeat: Heartbeat,
}

impl Round<'_, '_> {
    /// Meets the other ranks: asks the coordinator until every rank of the
    /// generation is there. Rank 0 brings the NCCL id the others connect
    /// with; making it is about this machine (fatal), the coordinator's
    /// answers are about who is there (rejoin).
    fn rendezvous(&self, new_nccl_id: &impl Fn(usize) -> Result<Vec<u8>>) -> Result<RendezvousReply, Failure> {
        let generation = self.gen.generation;
        // A job of one GPU needs no id (and no NCCL).
        let mut nccl_id = if self.gen.rank == 0 { new_nccl_id(self.gen.world).fatal()? } else { Vec::new() };
        loop {
            if let Some(v) = self.heartbeat.verdict() {
                return Err(v.into_failure("stopped while waiting for the other workers".into()));
            }
            let req = RendezvousRequest {
                rank: self.gen.rank,
                generation,
                nccl_unique_id: nccl_id.clone(),
                member_id: self.gen.member_id,
            };
            let r = self.process.client.rendezvous(req).rejoin()?;
            if r.rank == 0 && nccl_id.is_empty() {
                // Renumbered to rank 0 (an elastic shrink): the NCCL id is ours to make.
                nccl_id = new_nccl_id(self.gen.world).fatal()?;
            }
            if r.ready {
                return Ok(r);
            }
            tracing::info!(joined = r.joined, world_size = r.world_size, generation, "waiting for the other workers");
        }
    }

    /// Takes the rank and world size the rendezvous settled: a job that
    /// shrank renumbers its ranks, and the heartbeat, the steps and a later
    /// Leave all speak for the new rank.
    fn take_place(&mut self, rdv: &RendezvousReply) {
        if rdv.rank != self.gen.rank {
            tracing::warn!(
                from = self.gen.rank,
                to = rdv.rank,
                world_size = rdv.world_size,
                "the job shrank: this worker has a new rank"
            );
        }
        self.gen.rank = rdv.rank;
        self.gen.world = rdv.world_size as usize;
        self.heartbeat.set_rank(rdv.rank);
    }

    /// Every generation starts from the same bits: a fresh model from the
    /// seed, then the checkpoint the coordinator resumes from (at
    /// `start_step`). A failure here is about the job or this machine: fatal.
    fn load_or_resume<B: Backend>(&self, be: &B, start_step: u64) -> Result<(Vlm<B>, Optimizer<B>), Failure> {
        let (job, cfg) = (self.process.job, self.process.cfg);
        let (mut vlm, mut opt) = build_model(be, job, cfg, self.gen.world).fatal()?;
        if start_step > 0 {
            let root = job
                .checkpoint
                .dir
                .as_ref()
                .context("the coordinator resumes at a step, but the job has no checkpoint.dir")
                .fatal()?;
            let dir = root.join(manifest::step_dir_name(start_step));
            let done = restore(be, job, cfg, &mut vlm, &mut opt, &dir).fatal()?;
            tracing::info!(rank = self.gen.rank, step = done, checkpoint = %dir.display(), "resumed from the checkpoint");
        }
        Ok((vlm, opt))
    }

    /// Connects the collective to the other ranks (a failure is about who
    /// is there: rejoin) and hands its abort to the heartbeat, so that a
    /// verdict also releases a blocked all-reduce.
    fn connect<C: Collective + 'static>(
        &self,
        rdv: &RendezvousReply,
        connect: &impl Fn(&RendezvousReply) -> Result<(C, Aborter)>,
    ) -> Result<CommThread<C::Buf>, Failure>
    where
        C::Buf: Send + 'static,
    {
        let (collective, aborter) = connect(rdv).rejoin()?;
        self.heartbeat.arm(aborter);
        let comm = CommThread::new(collective);
        let (rank, generation) = (self.gen.rank, self.gen.generation);
        tracing::info!(rank, generation, peers = ?rdv.ring_peers, "collective connected; training");
        Ok(comm)
    }

    /// The assigned steps, from `start` to the job's last: each loads this
    /// rank's share, trains it with the gradients all-reduced, reports it to
    /// the coordinator and writes this rank's part of a checkpoint when one
    /// is due. A stop signal ends the job at a step every rank agrees on.
    fn train_steps<B: Backend>(
        &self,
        be: &B,
        vlm: &mut Vlm<B>,
        opt: &mut Optimizer<B>,
        comm: &CommThread<B::Buf>,
        start: u64,
    ) -> Result<(), Failure>
    where
        B::Buf: Send + 'static,
    {
        let (job, spec) = (self.process.job, self.process.spec);
        let (rank, generation) = (self.gen.rank, self.gen.generation);
        let sizes = BucketSizes::from_mb(job.cluster.first_bucket_mb, job.cluster.bucket_mb);
        let synced = synced_params(vlm, opt);
        let mut loader = self.loader(start);
        let mut last_step_at = Instant::now();
        for step in start..spec.total_steps {
            if let Some(v) = self.heartbeat.verdict() {
                return Err(v.into_failure(format!("stopping at step {step}")));
            }
            self.heartbeat.set_step(step);
            let tick = Instant::now();
            let share = loader.next_batch().map_err(|e| self.failed(step, e))?;
            let data_wait = tick.elapsed();
            let (micro, bad, truncated) = share.into_batches();
            let samples: usize = micro.iter().map(|b| b.batch).sum();
            let stop_wanted = self.process.stop_signal.as_deref().is_some_and(|f| f.load(Ordering::Relaxed));
            let r = train_step_dp(be, vlm, opt, &micro, comm, sizes, &synced, stop_wanted)
                .map_err(|e| self.failed(step, e))?;
            let Some(r) = r else { return Err(self.stop_with_checkpoint(be, vlm, opt, step, stop_wanted)) };
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
            self.process.client.report(report).map_err(|e| self.failed(step, e))?;
            // Every rank holds the same weights after the all-reduced update
            // and writes its part of the checkpoint. After the report: the
            // step is in the metrics before any checkpoint that includes it.
            self.commit(be, vlm, opt, step + 1, false).map_err(|e| self.failed(step, e))?;
        }
        Ok(())
    }

    /// This rank's data from step `start` on: each step's share is the
    /// coordinator's assignment, loaded ahead of the step it is for.
    fn loader(&self, start: u64) -> Prefetcher<Share> {
        let (rank, generation) = (self.gen.rank, self.gen.generation);
        let accum = self.process.job.train.grad_accum;
        let (client, ds) = (self.process.client.clone(), self.process.dataset.clone());
        let load = move |step: u64| -> Result<Share> {
            let a = client.assignment(AssignmentRequest { rank, generation, step })?;
            if a.done {
                return Ok(Share { micro: vec![] });
            }
            let refs: Vec<(usize, usize)> = a.samples.iter().map(|s| (s.part as usize, s.index as usize)).collect();
            // Contiguous micro-batches; an empty share still takes part in the all-reduce.
            let per = refs.len().div_ceil(accum).max(1);
            refs.chunks(per).map(|c| ds.load_samples(c, step)).collect::<Result<Vec<_>>>().map(|micro| Share { micro })
        };
        let prefetch = self.process.data_cfg.prefetch;
        Prefetcher::with(load, start, prefetch.clamp(1, 2), prefetch)
    }

    /// A failure in a step: the heartbeat's verdict, when it has one, is the
    /// news; otherwise a peer or the coordinator went away (rejoin).
    fn failed(&self, step: u64, e: anyhow::Error) -> Failure {
        if crate::engine::device::device_lost(&e) {
            // Rejoining would only fail again on the broken context.
            return Failure::Fatal(e.context(format!("step {step}")));
        }
        match self.heartbeat.verdict() {
            Some(v) => v.into_failure(format!("stopping at step {step}")),
            None => Failure::Rejoin(e.context(format!("step {step}"))),
        }
    }

    /// Writes this rank's part of the checkpoint after `done` steps when one
    /// is due (or `force`d) and hands it to the coordinator, which commits
    /// the checkpoint once every part is in: then returns its directory.
    fn commit<B: Backend>(
        &self,
        be: &B,
        vlm: &Vlm<B>,
        opt: &Optimizer<B>,
        done: u64,
        force: bool,
    ) -> Result<Option<PathBuf>> {
        let (job, cfg) = (self.process.job, self.process.cfg);
        let (rank, world, generation) = (self.gen.rank, self.gen.world, self.gen.generation);
        let part = write_checkpoint_part(be, job, cfg, vlm, opt, done, force, rank as usize, world, generation)?;
        let Some((_, files)) = part else { return Ok(None) };
        let files =
            files.into_iter().map(|f| CheckpointFile { path: f.path, bytes: f.bytes, sha256: f.sha256 }).collect();
        let ack = self.process.client.commit_checkpoint(CheckpointPart { rank, generation, step: done, files })?;
        Ok(ack.committed.then(|| PathBuf::from(ack.dir)))
    }

    /// A rank was asked to stop: all learned it at this step's first
    /// all-reduce, none trained it, and every rank writes its part of the
    /// checkpoint of what is done. The job is over for this worker (fatal),
    /// with how to resume it.
    fn stop_with_checkpoint<B: Backend>(
        &self,
        be: &B,
        vlm: &Vlm<B>,
        opt: &Optimizer<B>,
        step: u64,
        stop_wanted: bool,
    ) -> Failure {
        let total = self.process.spec.total_steps;
        let dir = match self.commit(be, vlm, opt, step, true) {
            Ok(dir) => dir,
            Err(e) => return Failure::Fatal(e),
        };
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
        Failure::Fatal(anyhow!("{msg}; {held}: start the job again to resume"))
    }

    /// The end of the job for this rank. Rank 0 speaks for the job (every
    /// rank holds the same weights): it saves the model and evaluates it; a
    /// failure then is fatal.
    fn finish<B: Backend>(&self, be: &B, vlm: &mut Vlm<B>) -> Result<Finished, Failure> {
        if self.gen.rank != 0 {
            return Ok((None, None));
        }
        self.save_and_evaluate(be, vlm).fatal()
    }

    /// Rank 0's report of the job: the model saved to the job's output
    /// directory and its evaluation on the eval datasets, each when asked.
    fn save_and_evaluate<B: Backend>(&self, be: &B, vlm: &mut Vlm<B>) -> Result<Finished> {
        let (spec, cfg, data_cfg) = (self.process.spec, self.process.cfg, self.process.data_cfg);
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
