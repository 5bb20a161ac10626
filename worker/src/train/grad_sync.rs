//! Gradient all-reduce that overlaps backward, as DDP does. Backward says
//! which parameters' gradients are final (layer by layer, last layer first);
//! they are gathered into buckets (a small first one so communication starts
//! early, then about 25 MB), and each full bucket goes to a communication
//! thread that all-reduces it while backward carries on. `finish` flushes
//! the last bucket, waits, and writes the sums back into the gradients.
//!
//! Buckets close at the same parameters on every rank because every rank
//! runs the same backward and so calls `ready` in the same order.

use crate::collective::Collective;
use crate::engine::Backend;
use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use std::time::{Duration, Instant};

enum Job<Buf> {
    Reduce(Buf),
    Counts(Vec<u64>),
}

enum Done<Buf> {
    Reduced(Result<Buf>),
    Counts(Result<Vec<u64>>),
}

/// The collective, owned by its own thread so reductions run beside compute.
pub struct CommThread<Buf: Send + 'static> {
    jobs: Option<Sender<Job<Buf>>>,
    done: Receiver<Done<Buf>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub rank: usize,
    pub world_size: usize,
}

impl<Buf: Send + 'static> CommThread<Buf> {
    pub fn new<C: Collective<Buf = Buf> + 'static>(mut c: C) -> Self {
        let (rank, world_size) = (c.rank(), c.world_size());
        let (jobs, job_rx) = crossbeam_channel::unbounded::<Job<Buf>>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("all-reduce".into())
            .spawn(move || {
                for job in job_rx {
                    let out = match job {
                        Job::Reduce(mut b) => Done::Reduced(c.all_reduce_sum(&mut b).map(|_| b)),
                        Job::Counts(mut v) => Done::Counts(c.all_reduce_sum_u64(&mut v).map(|_| v)),
                    };
                    if done_tx.send(out).is_err() {
                        break;
                    }
                }
            })
            .ok();
        CommThread { jobs: Some(jobs), done, thread, rank, world_size }
    }

    fn send(&self, job: Job<Buf>) -> Result<()> {
        let jobs = self.jobs.as_ref().context("the all-reduce thread has stopped")?;
        jobs.send(job).map_err(|_| anyhow!("the all-reduce thread has stopped"))
    }

    /// Sums counters across ranks (blocking).
    pub fn sum_counts(&self, values: Vec<u64>) -> Result<Vec<u64>> {
        self.send(Job::Counts(values))?;
        match self.done.recv().map_err(|_| anyhow!("the all-reduce thread has stopped"))? {
            Done::Counts(r) => r.context("all-reduce of the step's counts"),
            Done::Reduced(_) => Err(anyhow!("all-reduce results arrived out of order")),
        }
    }
}

impl<Buf: Send + 'static> Drop for CommThread<Buf> {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bucket sizes in elements.
#[derive(Clone, Copy, Debug)]
pub struct BucketSizes {
    pub first: usize,
    pub rest: usize,
}

impl BucketSizes {
    /// From megabytes of f32 gradients.
    pub fn from_mb(first_mb: f64, rest_mb: f64) -> Self {
        let elems = |mb: f64| ((mb * 1e6 / 4.0) as usize).max(1);
        BucketSizes { first: elems(first_mb), rest: elems(rest_mb) }
    }
}

/// One step's gradient synchronization.
pub struct GradSync<'a, B: Backend> {
    be: &'a B,
    comm: &'a CommThread<B::Buf>,
    sizes: BucketSizes,
    /// Whose gradients take part: trainable parameters that receive one.
    wanted: &'a [bool],
    /// Parameters gathered for the open bucket, and their element count.
    open: Vec<usize>,
    open_len: usize,
    /// Buckets sent, in order, with their parameters.
    sent: Vec<Vec<usize>>,
    /// Time spent in `finish` waiting for reductions backward did not hide.
    pub wait: Duration,
    /// The first failure inside `ready` (backward cannot stop for it).
    error: Option<anyhow::Error>,
}

impl<'a, B: Backend> GradSync<'a, B>
where
    B::Buf: Send + 'static,
{
    pub fn new(be: &'a B, comm: &'a CommThread<B::Buf>, sizes: BucketSizes, wanted: &'a [bool]) -> Self {
        GradSync { be, comm, sizes, wanted, open: vec![], open_len: 0, sent: vec![], wait: Duration::ZERO, error: None }
    }

    /// Backward's signal: the gradients of `ids` are final. A failure is
    /// kept and returned by `finish`.
    pub fn ready(&mut self, grads: &[B::Buf], ids: &[usize]) {
        if self.error.is_none() {
            if let Err(e) = self.gather(grads, ids) {
                self.error = Some(e);
            }
        }
    }

    fn gather(&mut self, grads: &[B::Buf], ids: &[usize]) -> Result<()> {
        for &i in ids {
            if self.wanted.get(i).copied().unwrap_or(false) {
                self.open.push(i);
                self.open_len += self.be.buf_len(&grads[i]);
            }
        }
        let cap = if self.sent.is_empty() { self.sizes.first } else { self.sizes.rest };
        if self.open_len >= cap {
            self.flush(grads)?;
        }
        Ok(())
    }

    fn flush(&mut self, grads: &[B::Buf]) -> Result<()> {
        if self.open.is_empty() {
            return Ok(());
        }
        let mut bucket = self.be.alloc(self.open_len);
        let mut off = 0;
        for &i in &self.open {
            let n = self.be.buf_len(&grads[i]);
            self.be.copy(&grads[i], 0, &mut bucket, off, n);
            off += n;
        }
        self.comm.send(Job::Reduce(bucket))?;
        self.sent.push(std::mem::take(&mut self.open));
        self.open_len = 0;
        Ok(())
    }

    /// Sends what is left, waits for every bucket and writes the sums back.
    /// Parameters never marked ready are reduced here too, so nothing is
    /// left unsummed whatever backward reported.
    pub fn finish(mut self, grads: &mut [B::Buf]) -> Result<Duration> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let marked: std::collections::HashSet<usize> = self.sent.iter().flatten().chain(&self.open).copied().collect();
        let rest: Vec<usize> = (0..grads.len()).filter(|i| self.wanted[*i] && !marked.contains(i)).collect();
        for i in rest {
            self.open.push(i);
            self.open_len += self.be.buf_len(&grads[i]);
        }
        self.flush(grads)?;
        let t = Instant::now();
        for ids in std::mem::take(&mut self.sent) {
            let bucket = match self.comm.done.recv().map_err(|_| anyhow!("the all-reduce thread has stopped"))? {
                Done::Reduced(r) => r.context("gradient all-reduce")?,
                Done::Counts(_) => return Err(anyhow!("all-reduce results arrived out of order")),
            };
            let mut off = 0;
            for i in ids {
                let n = self.be.buf_len(&grads[i]);
                self.be.copy(&bucket, off, &mut grads[i], 0, n);
                off += n;
            }
        }
        self.wait = t.elapsed();
        Ok(self.wait)
    }
}
