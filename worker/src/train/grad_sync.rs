//! Gradient all-reduce that overlaps backward, as DDP does. Backward says
//! which parameters' gradients are final (layer by layer, last layer first);
//! they are gathered into buckets (a small first one so communication starts
//! early, then about 25 MB), and each full bucket goes to a communication
//! thread that all-reduces it while backward carries on. `finish` flushes
//! the last bucket, waits, and writes the sums back into the gradients.
//!
//! The buckets are fixed before backward starts (parameters in reverse
//! order, which is the order backward finishes them), and they are reduced
//! strictly in that order: a rank whose backward skips a module (a
//! micro-batch without images, or no samples at all) still issues the same
//! sequence of all-reduces with the same contents, only later.

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
}

impl<Buf: Send + 'static> CommThread<Buf> {
    pub fn new<C: Collective<Buf = Buf> + 'static>(mut c: C) -> Self {
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
        CommThread { jobs: Some(jobs), done, thread }
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
    /// Parameters of each bucket, in reduction order.
    buckets: Vec<Vec<usize>>,
    bucket_len: Vec<usize>,
    /// Per parameter: its bucket, if it takes part.
    bucket_of: Vec<Option<usize>>,
    /// Per bucket: parameters not yet ready.
    pending: Vec<usize>,
    marked: Vec<bool>,
    /// Buckets handed to the communication thread (always a prefix).
    sent: usize,
    /// Time spent in `finish` waiting for reductions backward did not hide.
    pub wait: Duration,
    /// The first failure inside `ready` (backward cannot stop for it).
    error: Option<anyhow::Error>,
}

/// Groups the parameters that take part into buckets: reverse parameter
/// order, a small first bucket, then buckets of about `sizes.rest` elements.
pub fn plan_buckets(lens: &[usize], wanted: &[bool], sizes: BucketSizes) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let (mut open, mut open_len) = (Vec::new(), 0);
    for i in (0..lens.len()).rev().filter(|&i| wanted[i]) {
        open.push(i);
        open_len += lens[i];
        let cap = if buckets.is_empty() { sizes.first } else { sizes.rest };
        if open_len >= cap {
            buckets.push(std::mem::take(&mut open));
            open_len = 0;
        }
    }
    if !open.is_empty() {
        buckets.push(open);
    }
    buckets
}

impl<'a, B: Backend> GradSync<'a, B>
where
    B::Buf: Send + 'static,
{
    pub fn new(be: &'a B, comm: &'a CommThread<B::Buf>, sizes: BucketSizes, wanted: &[bool], grads: &[B::Buf]) -> Self {
        let lens: Vec<usize> = grads.iter().map(|g| be.buf_len(g)).collect();
        let buckets = plan_buckets(&lens, wanted, sizes);
        let mut bucket_of = vec![None; grads.len()];
        for (b, ids) in buckets.iter().enumerate() {
            for &i in ids {
                bucket_of[i] = Some(b);
            }
        }
        GradSync {
            be,
            comm,
            bucket_len: buckets.iter().map(|ids| ids.iter().map(|&i| lens[i]).sum()).collect(),
            pending: buckets.iter().map(|ids| ids.len()).collect(),
            marked: vec![false; grads.len()],
            buckets,
            bucket_of,
            sent: 0,
            wait: Duration::ZERO,
            error: None,
        }
    }

    /// Backward's signal: the gradients of `ids` are final. Every bucket
    /// whose parameters are all final (and whose predecessors are sent) is
    /// sent. A failure is kept and returned by `finish`.
    pub fn ready(&mut self, grads: &[B::Buf], ids: &[usize]) {
        for &i in ids {
            if let (Some(b), false) = (self.bucket_of.get(i).copied().flatten(), self.marked[i]) {
                self.marked[i] = true;
                self.pending[b] -= 1;
            }
        }
        while self.error.is_none() && self.sent < self.buckets.len() && self.pending[self.sent] == 0 {
            if let Err(e) = self.send_next(grads) {
                self.error = Some(e);
            }
        }
    }

    fn send_next(&mut self, grads: &[B::Buf]) -> Result<()> {
        let b = self.sent;
        // Gradients are f32 state, and so are their buckets.
        let mut bucket = self.be.alloc_state(self.bucket_len[b]);
        let mut off = 0;
        for &i in &self.buckets[b] {
            let n = self.be.buf_len(&grads[i]);
            self.be.copy(&grads[i], 0, &mut bucket, off, n);
            off += n;
        }
        self.be.mark_ready(&mut bucket);
        self.comm.send(Job::Reduce(bucket))?;
        self.sent += 1;
        Ok(())
    }

    /// Sends the buckets backward did not complete (their parameters got no
    /// gradient on this rank, so they hold zeros), waits for every bucket
    /// and writes the sums back into the gradients.
    pub fn finish(mut self, grads: &mut [B::Buf]) -> Result<Duration> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        while self.sent < self.buckets.len() {
            self.send_next(grads)?;
        }
        let t = Instant::now();
        for ids in &self.buckets {
            let bucket = match self.comm.done.recv().map_err(|_| anyhow!("the all-reduce thread has stopped"))? {
                Done::Reduced(r) => r.context("gradient all-reduce")?,
                Done::Counts(_) => return Err(anyhow!("all-reduce results arrived out of order")),
            };
            let mut off = 0;
            for &i in ids {
                let n = self.be.buf_len(&grads[i]);
                self.be.copy(&bucket, off, &mut grads[i], 0, n);
                off += n;
            }
        }
        self.wait = t.elapsed();
        Ok(self.wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_run_backwards_with_a_small_first_one() {
        let lens = [10, 40, 5, 30, 30, 20];
        let wanted = [true, true, false, true, true, true];
        let b = plan_buckets(&lens, &wanted, BucketSizes { first: 15, rest: 50 });
        assert_eq!(b, vec![vec![5], vec![4, 3], vec![1, 0]]);
        assert!(plan_buckets(&lens, &[false; 6], BucketSizes { first: 1, rest: 1 }).is_empty());
    }
}
