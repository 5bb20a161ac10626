//! The heartbeat of a generation: a thread beats to the coordinator at the
//! job's interval, so a long step never looks like death, and turns the
//! answer (go on, abort, the job is over, or silence) into a verdict the
//! training checks; a verdict also releases a blocked collective.

use super::rejoin::Failure;
use anyhow::anyhow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tessera_proto::client::Client;
use tessera_proto::v1::{Action, HeartbeatRequest};

/// Releases a blocked collective from another thread (on a shutdown).
pub(super) type Aborter = Box<dyn Fn() + Send>;

/// Why the heartbeat thread stopped the generation.
#[derive(Clone, Debug)]
pub(super) enum Verdict {
    /// The coordinator moved the job to another generation, or is gone.
    Abort(String),
    /// The job is over.
    Shutdown(String),
}

impl Verdict {
    /// How the generation ends, with what it was doing then (`context`).
    pub(super) fn into_failure(self, context: String) -> Failure {
        match self {
            Verdict::Abort(why) => Failure::Rejoin(anyhow!("{context}: {why}")),
            Verdict::Shutdown(why) => Failure::Fatal(anyhow!("{context}: {why}")),
        }
    }
}

/// The heartbeat thread of one generation and what it shares with the
/// training: the step and rank it reports, its verdict, and the abort of
/// the collective. Dropping it stops and joins the thread, however the
/// generation ends.
pub(super) struct Heartbeat {
    step: Arc<AtomicU64>,
    /// The rank may change at the rendezvous (an elastic job shrinking).
    rank: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    verdict: Arc<Mutex<Option<Verdict>>>,
    /// Set once the collective is up: a verdict then also releases a blocked all-reduce.
    abort: Arc<Mutex<Option<Aborter>>>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating for `rank` in `generation` every `interval`.
    pub(super) fn start(client: &Client, rank: u32, generation: u64, interval: Duration) -> Self {
        let step = Arc::new(AtomicU64::new(0));
        let rank = Arc::new(AtomicU64::new(rank as u64));
        let stop = Arc::new(AtomicBool::new(false));
        let verdict: Arc<Mutex<Option<Verdict>>> = Arc::new(Mutex::new(None));
        let abort: Arc<Mutex<Option<Aborter>>> = Arc::new(Mutex::new(None));
        let thread = {
            let (client, step_now, stop, verdict) = (client.clone(), step.clone(), stop.clone(), verdict.clone());
            let (abort, rank_now) = (abort.clone(), rank.clone());
            std::thread::spawn(move || {
                heartbeat_loop(&client, &rank_now, generation, interval, &step_now, &stop, &verdict);
                if !stop.load(Ordering::Relaxed) {
                    if let Some(a) = abort.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        a();
                    }
                }
            })
        };
        Heartbeat { step, rank, stop, verdict, abort, thread: Some(thread) }
    }

    /// Why the generation has to stop, once the heartbeat knows.
    pub(super) fn verdict(&self) -> Option<Verdict> {
        self.verdict.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The step the next beats report.
    pub(super) fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// The rank the next beats speak for.
    pub(super) fn set_rank(&self, rank: u32) {
        self.rank.store(rank as u64, Ordering::Relaxed);
    }

    /// Hands over the collective's abort: a verdict from now on also
    /// releases a blocked all-reduce.
    pub(super) fn arm(&self, aborter: Aborter) {
        *self.abort.lock().unwrap_or_else(|e| e.into_inner()) = Some(aborter);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Beats until stopped or until the coordinator's answer (or five failed
/// beats in a row) gives a verdict, which it leaves in `verdict`.
fn heartbeat_loop(
    client: &Client,
    rank: &AtomicU64,
    generation: u64,
    interval: Duration,
    step: &AtomicU64,
    stop: &AtomicBool,
    verdict: &Mutex<Option<Verdict>>,
) {
    let mut failures = 0;
    // Opened at the first beat, opened again after any error.
    let mut stream = None;
    let patience = (2 * interval).max(Duration::from_secs(10));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(interval);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let rank = rank.load(Ordering::Relaxed) as u32;
        let req = HeartbeatRequest { rank, generation, step: step.load(Ordering::Relaxed) };
        let answer = match stream.take() {
            Some(open) => Ok(open),
            None => client.heartbeats(),
        }
        .and_then(|open| open.beat(req, patience));
        let v = match answer {
            Ok((r, open)) if r.action == Action::Continue as i32 => {
                stream = Some(open);
                failures = 0;
                None
            }
            Ok((r, _)) if r.action == Action::Abort as i32 => Some(Verdict::Abort(r.reason)),
            Ok((r, _)) => Some(Verdict::Shutdown(if r.reason.is_empty() {
                "the coordinator ended the job".into()
            } else {
                r.reason
            })),
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "heartbeat failed");
                // Training cannot go on without the coordinator: rejoin, which
                // waits for it to come back (within the connect patience).
                (failures >= 5).then(|| Verdict::Abort(format!("lost the coordinator: {e:#}")))
            }
        };
        if let Some(v) = v {
            *verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
            break;
        }
    }
}
