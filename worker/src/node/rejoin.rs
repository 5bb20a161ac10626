//! How a generation that did not finish the job ended, and what comes next:
//! errors sorted into fatal (the job is over for this worker) and rejoin
//! (join the next generation), and the rejoin itself.

use super::generation::Generation;
use anyhow::{bail, Context, Result};
use std::time::Duration;
use tessera_proto::client::Client;
use tessera_proto::v1::{JoinRequest, LeaveRequest};

/// How a generation ended, when it did not finish the job.
pub(super) enum Failure {
    /// Join the next generation: a peer or the coordinator went away, or
    /// the coordinator moved the job on.
    Rejoin(anyhow::Error),
    /// The job is over for this worker (a bad config, a stop signal, the
    /// coordinator ended the job).
    Fatal(anyhow::Error),
}

/// Sorts errors: everything before the generation meets is about the job
/// or this machine (fatal); from the rendezvous on, about who is there.
pub(super) trait Classify<T> {
    fn fatal(self) -> Result<T, Failure>;
    fn rejoin(self) -> Result<T, Failure>;
}

impl<T> Classify<T> for Result<T> {
    fn fatal(self) -> Result<T, Failure> {
        self.map_err(Failure::Fatal)
    }
    fn rejoin(self) -> Result<T, Failure> {
        self.map_err(Failure::Rejoin)
    }
}

/// What a worker needs to join the next generation.
pub(super) struct Rejoin<'a> {
    pub(super) client: &'a Client,
    pub(super) request: JoinRequest,
    pub(super) patience: Duration,
    /// The job config of the first join: a coordinator restarted with
    /// another config is a different job.
    pub(super) config: String,
}

impl Rejoin<'_> {
    /// Tells the coordinator this generation is over for us, then joins the
    /// next one with the same rank (a coordinator that restarted may take a
    /// while to come back: retried with backoff within the patience).
    pub(super) fn next(&self, gen: &Generation, why: &anyhow::Error) -> Result<Generation> {
        let leave = LeaveRequest {
            rank: gen.rank,
            generation: gen.generation,
            error: format!("{why:#}"),
            will_rejoin: true,
            ..Default::default()
        };
        // The coordinator may be gone or already in the next generation.
        let _ = self.client.leave(leave);
        let request = JoinRequest { rank: Some(gen.rank), ..self.request.clone() };
        let joined = self.client.join_patiently(request, self.patience)?;
        let spec = joined.job.as_ref().context("the coordinator sent no job")?;
        if spec.config_toml != self.config {
            bail!("the coordinator now runs another job config than the one this worker started with: start the workers again");
        }
        Ok(Generation::from(&joined))
    }
}
