//! The stop signal of a job with checkpoints: SIGTERM and SIGINT ask the
//! run to stop at a step boundary, with a checkpoint, instead of killing it.

use anyhow::{Context, Result};
use std::sync::Arc;
use tessera_job::config::TrainJob;

/// With checkpoints on, SIGTERM (a scheduler's preemption or time limit)
/// and SIGINT no longer kill the run at once: they set a flag, and the run
/// stops after the step in progress with a checkpoint of it. A second
/// signal ends the process at once (exit status 1).
pub(super) fn stop_on_signal(job: &TrainJob) -> Result<Option<Arc<std::sync::atomic::AtomicBool>>> {
    if job.checkpoint.dir.is_none() {
        return Ok(None);
    }
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, flag.clone())
            .context("cannot install the stop-signal handler")?;
        signal_hook::flag::register(signal, flag.clone()).context("cannot install the stop-signal handler")?;
    }
    Ok(Some(flag))
}
