//! The ring schedule ([`run_ring`]) of the three collectives on n >= 2
//! ranks: an all-reduce is a reduce-scatter followed by an all-gather,
//! 2(n-1) steps over n chunks of the buffer; a reduce-scatter runs the
//! first n-1 of those steps and an all-gather the last n-1 ([`Phase`]).
//! Each chunk travels in segments, so that a rank forwards the first
//! segment of a chunk while the rest of it is still arriving.
//!
//! A rank writes to its successor and reads from its predecessor at the same
//! time: with blocking sockets and large messages, write-then-read would
//! deadlock once the kernel buffers fill. Each call therefore runs a scoped
//! sender thread that encodes and writes, while the calling thread reads and
//! reduces. Segments of the caller's buffer move between the two threads by
//! ownership (`&mut [E]` through channels), so no element is shared and no
//! `unsafe` is needed.
//!
//! Chunk c is `shard_range(len, n, c)`, and it ends complete at rank c: that
//! is what makes chunk r the shard that a reduce-scatter leaves on rank r.
//! Reduction order: chunk `c` is summed as `((x[c+1] + x[c+2]) + ...) + x[c]`
//! (rank indices mod n; chunk c starts at rank c+1) in every call, be it an
//! all-reduce or a reduce-scatter, so a reduce-scatter followed by an
//! all-gather gives an all-reduce's bits. The all-gather copies the final
//! bits to every rank, so results repeat bit for bit and agree on all ranks.
//! The order does not depend on the segment size: the bytes on each link are
//! the same whatever the segmentation, which may even differ between ranks.

use super::link::{recv_add, Links};
use super::wire::{kind_name, wire_bytes, wire_bytes_mut, CallHeader, Phase, Wire, CALL_BYTES};
use crate::collective::shard_range;
use anyhow::{anyhow, bail, Context, Result};
use std::ops::Range;
use std::sync::Mutex;

/// Default segment size. Large enough that per-segment overhead (a channel
/// hop, a syscall) is small against the copy, small enough that the pipeline
/// fills quickly and both scratch buffers stay in L2/L3.
pub const DEFAULT_SEGMENT_BYTES: usize = 512 * 1024;

impl Phase {
    /// The steps this phase runs, out of the all-reduce's `0..2(n-1)`: a
    /// reduce-scatter the first n-1 (they add), an all-gather the last n-1
    /// (they copy).
    fn steps(self, n: usize) -> Range<usize> {
        match self {
            Phase::AllReduce => 0..2 * (n - 1),
            Phase::ReduceScatter => 0..n - 1,
            Phase::AllGather => n - 1..2 * (n - 1),
        }
    }
}

/// The parameters of one collective call.
#[derive(Clone, Copy)]
pub(super) struct Step {
    pub(super) rank: usize,
    pub(super) n: usize,
    pub(super) seq: u64,
    pub(super) seg_elems: usize,
    pub(super) phase: Phase,
}

/// The buffer cut into n chunks, chunk c being `shard_range(len, n, c)`
/// (sizes differ by at most one element, and not at all when n divides the
/// length), and each chunk into segments. Segment ids are global, chunk by
/// chunk.
struct Plan {
    /// Element offset of chunk c; n + 1 entries.
    chunk_start: Vec<usize>,
    /// Id of the first segment of chunk c; n + 1 entries.
    seg_first: Vec<usize>,
    seg_elems: usize,
}

impl Plan {
    fn new(len: usize, n: usize, seg_elems: usize) -> Plan {
        let mut chunk_start = Vec::with_capacity(n + 1);
        let mut seg_first = Vec::with_capacity(n + 1);
        let mut seg = 0;
        for c in 0..n {
            let chunk = shard_range(len, n, c);
            chunk_start.push(chunk.start);
            seg_first.push(seg);
            seg += chunk.len().div_ceil(seg_elems);
        }
        chunk_start.push(len);
        seg_first.push(seg);
        Plan { chunk_start, seg_first, seg_elems }
    }

    fn segments(&self, chunk: usize) -> std::ops::Range<usize> {
        self.seg_first[chunk]..self.seg_first[chunk + 1]
    }

    /// Cuts `buf` into its segments, indexed by segment id.
    fn split<'a, E>(&self, buf: &'a mut [E]) -> Vec<Option<&'a mut [E]>> {
        let mut out = Vec::with_capacity(self.seg_first[self.seg_first.len() - 1]);
        let mut rest = buf;
        for c in 0..self.chunk_start.len() - 1 {
            let mut clen = self.chunk_start[c + 1] - self.chunk_start[c];
            while clen > 0 {
                let take = clen.min(self.seg_elems);
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
                out.push(Some(head));
                rest = tail;
                clen -= take;
            }
        }
        out
    }
}

/// Keeps the first error of the two threads of a call: once one fails it
/// shuts the sockets down, so the other's error is only an echo. One
/// exception: a finding of this rank's own (a mismatched call header, an
/// overflow) replaces an I/O error. A Unix socket fails a write to a peer
/// that has just shut down at once, so the sender's broken pipe can come
/// first although the reader is about to name the mismatch that caused it.
struct FirstError(Mutex<Option<anyhow::Error>>);

impl FirstError {
    fn record(&self, links: &Links, e: anyhow::Error) {
        if let Ok(mut slot) = self.0.lock() {
            let io = |e: &anyhow::Error| e.root_cause().is::<std::io::Error>();
            let replace = match &*slot {
                None => true,
                Some(old) => io(old) && !io(&e),
            };
            if replace {
                *slot = Some(e);
            }
        }
        let _ = links.next.shutdown();
        let _ = links.prev.shutdown();
    }
}

/// One collective (`step.phase`) on a ring of n >= 2 ranks. A reduce-scatter
/// or an all-gather needs a length that n divides (the caller checks).
///
/// Rank r's wire schedule, for an all-reduce: it first sends chunk r-1, then
/// forwards every chunk it receives except the last: at step t
/// (0 <= t < 2(n-1)) it receives chunk (r - 2 - t) mod n, adds it into its
/// own copy during the first n-1 steps (reduce-scatter: the last chunk it
/// completes, at step n-2, is chunk r) and overwrites its copy during the
/// rest (all-gather), and sends the result on at step t+1. The other phases
/// run a part of these steps, starting with a send of the chunk that the
/// step before their first would have received.
pub(super) fn run_ring<E: Wire>(
    links: &Links,
    step: Step,
    buf: &mut [E],
    recv_scratch: &mut Vec<u8>,
    send_scratch: &mut Vec<u8>,
) -> Result<()> {
    let Step { rank: r, n, seq, seg_elems, phase } = step;
    let plan = Plan::new(buf.len(), n, seg_elems);
    let steps = phase.steps(n);
    // The chunk received at step t, (r - 2 - t) mod n, for t <= 2n - 2.
    let chunk_at = |t: usize| (r + 2 * n - (t + 2)) % n;
    let seg_bytes = seg_elems.min(buf.len().div_ceil(n)).max(1) * E::BYTES;
    if recv_scratch.len() < seg_bytes {
        recv_scratch.resize(seg_bytes, 0);
    }
    if !E::plain() && send_scratch.len() < seg_bytes {
        send_scratch.resize(seg_bytes, 0);
    }
    let header = CallHeader { seq, op: phase, kind: E::KIND, len: buf.len() as u64 };
    let mut table = plan.split(buf);
    let first_error = FirstError(Mutex::new(None));

    // The header goes first, from this thread: 24 bytes into a socket
    // buffer that the last call left empty, so it cannot block (a shared
    // ring may still hold the end of the last call, which the successor
    // consumes without waiting for us), and it is on its way before this
    // rank can fail on the predecessor's header. Both ends of a mismatch
    // then name it.
    if let Err(e) = links.send(&header.encode()) {
        let e = anyhow::Error::new(e).context(format!("sending the call header to {} failed", links.next_name));
        // A Unix socket reports a closed successor at once (TCP only on a
        // later write), and the successor has often closed only because it
        // saw a dead rank first, maybe our predecessor: then name that too.
        if links.prev.closed_now() {
            return Err(e.context(format!("{} has closed its connection too", links.prev_name)));
        }
        return Err(e);
    }

    std::thread::scope(|scope| {
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<(usize, &mut [E])>();
        let (back_tx, back_rx) = crossbeam_channel::unbounded::<(usize, &mut [E])>();
        let first_error = &first_error;

        // The sender: segments in the order queued.
        let sender = scope.spawn(move || {
            let result = (|| -> Result<()> {
                for (id, seg) in job_rx {
                    let bytes = match wire_bytes(seg) {
                        Some(bytes) => bytes,
                        None => {
                            let bytes = &mut send_scratch[..seg.len() * E::BYTES];
                            E::encode(seg, bytes);
                            bytes
                        }
                    };
                    links.send(bytes).with_context(|| {
                        format!("sending {} bytes (segment {id}) to {} failed", bytes.len(), links.next_name)
                    })?;
                    // The reader may have returned early on an error.
                    let _ = back_tx.send((id, seg));
                }
                Ok(())
            })();
            if let Err(e) = result {
                first_error.record(links, e);
            }
        });

        // The reader and reducer: this thread.
        let result = (|| -> Result<()> {
            let mut h = [0u8; CALL_BYTES];
            // Queue our first chunk so the sender starts while we wait: the one
            // step `steps.start - 1` would have received (chunk_at repeats
            // every n steps), r-1 for an all-reduce or a reduce-scatter, our
            // own shard r for an all-gather.
            for id in plan.segments(chunk_at(steps.start + n - 1)) {
                let seg = table[id].take().ok_or_else(|| anyhow!("internal: segment {id} queued twice"))?;
                job_tx.send((id, seg)).map_err(|_| anyhow!("the sending thread stopped"))?;
            }
            links
                .recv_exact(&mut h)
                .with_context(|| format!("reading the call header from {} failed", links.prev_name))?;
            let theirs = CallHeader::decode(&h).with_context(|| format!("bad call header from {}", links.prev_name))?;
            if theirs != header {
                bail!(
                    "{} is in collective #{}, {} of {} {} elements; this rank is in #{}, {} of {} {} elements",
                    links.prev_name,
                    theirs.seq,
                    theirs.op.name(),
                    theirs.len,
                    kind_name(theirs.kind),
                    header.seq,
                    header.op.name(),
                    header.len,
                    kind_name(header.kind)
                );
            }
            for t in steps.clone() {
                let chunk = chunk_at(t);
                for id in plan.segments(chunk) {
                    let seg = match table[id].take() {
                        Some(seg) => seg,
                        // Sent earlier; wait until the sender is done with it.
                        None => loop {
                            let (got, seg) = back_rx.recv().map_err(|_| anyhow!("the sending thread stopped"))?;
                            if got == id {
                                break seg;
                            }
                            table[got] = Some(seg);
                        },
                    };
                    let len = seg.len() * E::BYTES;
                    let what =
                        || format!("reading {len} bytes (chunk {chunk}, step {t}) from {} failed", links.prev_name);
                    if t < n - 1 {
                        // Reduce-scatter: add the partial sum into ours.
                        if !recv_add(links, seg, recv_scratch).with_context(what)? {
                            bail!("a u64 sum overflowed in chunk {chunk}");
                        }
                    } else if let Some(bytes) = wire_bytes_mut(seg) {
                        // All-gather: the final sum replaces ours.
                        links.recv_exact(bytes).with_context(what)?;
                    } else {
                        let bytes = &mut recv_scratch[..len];
                        links.recv_exact(bytes).with_context(what)?;
                        E::decode(bytes, seg);
                    }
                    if t + 1 < steps.end {
                        job_tx.send((id, seg)).map_err(|_| anyhow!("the sending thread stopped"))?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            first_error.record(links, e);
        }
        // Ends the sender's loop once the queue is drained.
        drop(job_tx);
        if sender.join().is_err() {
            first_error.record(links, anyhow!("the sending thread panicked"));
        }
    });

    match first_error.0.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(anyhow!("internal: the error slot was poisoned")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::link::Transport;
    use super::super::testkit::*;
    use super::super::RingCollective;
    use super::*;
    use crate::collective::Collective;
    use crate::engine::cpu::Real;

    const LENGTHS: [usize; 9] = [0, 1, 2, 3, 4, 5, 17, 1000, 70_001];

    /// For world sizes 1 to 4 and lengths including 0, 1 and fewer than the
    /// world size: sums within rounding of the f64 sum, identical bits on
    /// every rank, and identical bits on a repeat run and with another
    /// segment size.
    fn sums_are_right_and_repeat_bit_for_bit<T: Real>() {
        for n in 1..=4 {
            let run = |rings: Vec<RingCollective<T>>, segment_bytes: usize| {
                on_all(rings, move |c| {
                    c.set_segment_bytes(segment_bytes);
                    LENGTHS
                        .iter()
                        .map(|&len| {
                            let mut v = input::<T>(c.rank(), len);
                            c.all_reduce_sum(&mut v).unwrap();
                            v
                        })
                        .collect::<Vec<_>>()
                })
            };
            // 64-byte segments: many segments per chunk, so the pipeline runs.
            let (rings, first): (Vec<_>, Vec<_>) = run(ring::<T>(n), 64).into_iter().unzip();
            let (rings, second): (Vec<_>, Vec<_>) = run(rings, 64).into_iter().unzip();
            let (_, third): (Vec<_>, Vec<_>) = run(rings, DEFAULT_SEGMENT_BYTES).into_iter().unzip();
            let eps = T::epsilon().f64();
            for (li, &len) in LENGTHS.iter().enumerate() {
                let got = &first[0][li];
                assert_eq!(got.len(), len);
                for (i, g) in got.iter().enumerate() {
                    let terms: Vec<f64> = (0..n).map(|r| T::of(value(r, i)).f64()).collect();
                    let exact: f64 = terms.iter().sum();
                    let bound: f64 = terms.iter().map(|x| x.abs()).sum::<f64>() * eps * n as f64;
                    let err = (g.f64() - exact).abs();
                    assert!(err <= bound, "n={n} len={len} i={i}: got {g:?}, exact {exact}");
                }
                let want = bits(got);
                for r in 0..n {
                    assert_eq!(bits(&first[r][li]), want, "n={n} len={len}: rank {r} differs from rank 0");
                    assert_eq!(bits(&second[r][li]), want, "n={n} len={len}: rank {r} differs on the repeat");
                    assert_eq!(bits(&third[r][li]), want, "n={n} len={len}: rank {r} differs with other segments");
                }
            }
        }
    }

    #[test]
    fn f32_sums_are_right_and_repeat_bit_for_bit() {
        within(120, sums_are_right_and_repeat_bit_for_bit::<f32>);
    }

    #[test]
    fn f64_sums_are_right_and_repeat_bit_for_bit() {
        within(120, sums_are_right_and_repeat_bit_for_bit::<f64>);
    }

    /// The summation order is the documented one, for an all-reduce and a
    /// reduce-scatter alike: chunk c is ((x[c+1] + x[c+2]) + ...) + x[c],
    /// ranks mod n.
    #[test]
    fn reduction_order_is_the_documented_one() {
        within(60, || {
            let n = 4;
            let len = 4; // one element per chunk
            let out = on_all(ring::<f32>(n), |c| {
                let mut all = input::<f32>(c.rank(), len);
                c.all_reduce_sum(&mut all).unwrap();
                let mut scattered = input::<f32>(c.rank(), len);
                c.reduce_scatter_sum(&mut scattered).unwrap();
                (all, scattered[c.rank()])
            });
            for chunk in 0..n {
                let mut acc = value((chunk + 1) % n, chunk) as f32;
                for k in 2..=n {
                    acc += value((chunk + k) % n, chunk) as f32;
                }
                assert_eq!(out[0].1 .0[chunk].to_bits(), acc.to_bits(), "all-reduce, chunk {chunk}");
                assert_eq!(out[chunk].1 .1.to_bits(), acc.to_bits(), "reduce-scatter, chunk {chunk}");
            }
        });
    }

    /// Small integers: every partial sum is exact, in any order.
    fn integer(rank: usize, i: usize) -> f64 {
        ((rank * 37 + i * 11) % 201) as f64 - 100.0
    }

    /// What one rank saw for one length in `sharded_ops_agree_with_all_reduce`.
    struct Sharded<T> {
        /// Its shard after a reduce-scatter of `integer` inputs.
        exact: Vec<T>,
        /// Its shard after a reduce-scatter of `input`...
        scattered: Vec<T>,
        /// ...the whole buffer after an all-gather that followed...
        gathered: Vec<T>,
        /// ...and after an all-reduce of the same `input` instead.
        all_reduced: Vec<T>,
        /// An all-gather of `input` alone.
        gathered_only: Vec<T>,
    }

    /// For 2 to 4 ranks over TCP and over shared memory, with lengths 0 and
    /// multiples of the world size (segments that differ between ranks and
    /// cut each shard into many): a reduce-scatter leaves the exact sums in
    /// each rank's shard, and the bits of an all-reduce of the same inputs
    /// there; an all-gather after it gives every rank the all-reduce's bits;
    /// an all-gather alone gives every rank the owners' shards. A length
    /// the world size does not divide is an error that breaks the ring.
    fn sharded_ops_agree_with_all_reduce<T: Real>() {
        for max in [Transport::Tcp, Transport::Shm] {
            for n in 2..=4 {
                let lengths = [0, n, 7 * n, 250 * n, 4099 * n];
                let (rings, kind) = ring_over::<T>(n, max);
                assert_eq!(kinds(&rings), vec![(kind, kind); n]);
                let out = on_all(rings, |c| {
                    c.set_segment_bytes(64 + 8 * c.rank());
                    let r = c.rank();
                    let seen: Vec<Sharded<T>> = lengths
                        .iter()
                        .map(|&len| {
                            let own = shard_range(len, n, r);
                            let mut exact: Vec<T> = (0..len).map(|i| T::of(integer(r, i))).collect();
                            c.reduce_scatter_sum(&mut exact).unwrap();
                            let mut gathered = input::<T>(r, len);
                            c.reduce_scatter_sum(&mut gathered).unwrap();
                            let scattered = gathered[own.clone()].to_vec();
                            c.all_gather(&mut gathered).unwrap();
                            let mut all_reduced = input::<T>(r, len);
                            c.all_reduce_sum(&mut all_reduced).unwrap();
                            let mut gathered_only = input::<T>(r, len);
                            c.all_gather(&mut gathered_only).unwrap();
                            Sharded { exact: exact[own].to_vec(), scattered, gathered, all_reduced, gathered_only }
                        })
                        .collect();
                    let refused = c.reduce_scatter_sum(&mut vec![T::of(1.0); 3 * n + 1]).map_err(|e| format!("{e:#}"));
                    let after = c.all_gather(&mut vec![T::of(1.0); n]).map_err(|e| format!("{e:#}"));
                    (seen, refused, after)
                });
                for (li, &len) in lengths.iter().enumerate() {
                    let what = format!("{max:?} n={n} len={len}");
                    let owner = |i: usize| (0..n).find(|&q| shard_range(len, n, q).contains(&i)).unwrap();
                    let concatenated: Vec<T> = (0..len).map(|i| T::of(value(owner(i), i))).collect();
                    for (r, (_, (seen, _, _))) in out.iter().enumerate() {
                        let s = &seen[li];
                        let sums: Vec<T> =
                            shard_range(len, n, r).map(|i| T::of((0..n).map(|q| integer(q, i)).sum())).collect();
                        assert_eq!(bits(&s.exact), bits(&sums), "{what}: rank {r}'s exact sums");
                        let own = shard_range(len, n, r);
                        assert_eq!(bits(&s.scattered), bits(&s.all_reduced[own]), "{what}: rank {r}'s shard");
                        assert_eq!(bits(&s.gathered), bits(&s.all_reduced), "{what}: rank {r}");
                        assert_eq!(bits(&s.all_reduced), bits(&out[0].1 .0[li].all_reduced), "{what}: rank {r}");
                        assert_eq!(bits(&s.gathered_only), bits(&concatenated), "{what}: rank {r}'s all-gather");
                    }
                }
                let bad = 3 * n + 1;
                for (r, (_, (_, refused, after))) in out.iter().enumerate() {
                    let e = refused.as_ref().unwrap_err();
                    let want = format!("rank {r} of {n}: reduce_scatter_sum #{}", 5 * lengths.len());
                    assert!(e.contains(&want), "{e}");
                    assert!(e.contains(&format!("length {bad} is not a multiple of the world size {n}")), "{e}");
                    let e = after.as_ref().unwrap_err();
                    assert!(e.contains("all_gather on a ring collective broken by an earlier error"), "{e}");
                }
            }
        }
    }

    #[test]
    fn f32_sharded_ops_agree_with_all_reduce() {
        within(120, sharded_ops_agree_with_all_reduce::<f32>);
    }

    #[test]
    fn f64_sharded_ops_agree_with_all_reduce() {
        within(120, sharded_ops_agree_with_all_reduce::<f64>);
    }

    #[test]
    fn u64_sums_are_exact() {
        within(60, || {
            for n in 1..=4 {
                let lens = [0usize, 1, 3, 5, 1000];
                let v = |r: usize, i: usize| (1u64 << 60) + r as u64 * 1_000_003 + i as u64;
                let out = on_all(ring::<f32>(n), |c| {
                    c.set_segment_bytes(24);
                    lens.iter()
                        .map(|&len| {
                            let mut x: Vec<u64> = (0..len).map(|i| v(c.rank(), i)).collect();
                            c.all_reduce_sum_u64(&mut x).unwrap();
                            x
                        })
                        .collect::<Vec<_>>()
                });
                for (li, &len) in lens.iter().enumerate() {
                    let want: Vec<u64> = (0..len).map(|i| (0..n).map(|r| v(r, i)).sum()).collect();
                    for (r, (_, got)) in out.iter().enumerate() {
                        assert_eq!(got[li], want, "n={n} len={len} rank {r}");
                    }
                }
            }
        });
    }

    #[test]
    fn u64_overflow_is_an_error_on_every_rank() {
        within(60, || {
            let out = on_all(ring::<f32>(2), |c| c.all_reduce_sum_u64(&mut [u64::MAX / 2 + 1]));
            for (c, r) in &out {
                let e = format!("{:#}", r.as_ref().unwrap_err());
                assert!(e.contains("all_reduce_sum_u64"), "rank {}: {e}", c.rank());
            }
            assert!(out.iter().any(|(_, r)| format!("{:#}", r.as_ref().unwrap_err()).contains("overflow")));
        });
    }

    /// Buffers far larger than the kernel's socket buffers, with the default
    /// segment size: would deadlock if a rank wrote before reading.
    #[test]
    fn large_buffers_do_not_deadlock() {
        within(120, || {
            for n in [2, 3] {
                let len = 3 << 20; // 12 MiB of f32
                let out = on_all(ring::<f32>(n), |c| {
                    let mut v = vec![c.rank() as f32 + 1.0; len];
                    c.all_reduce_sum(&mut v).unwrap();
                    c.all_reduce_sum(&mut v).unwrap();
                    v
                });
                let once: f32 = (1..=n).map(|r| r as f32).sum();
                for (_, v) in &out {
                    assert!(v.iter().all(|&x| x == once * n as f32), "n={n}");
                }
            }
        });
    }

    #[test]
    fn mismatched_calls_fail_on_every_rank() {
        within(30, || {
            // Different lengths.
            let out = on_all(ring::<f32>(2), |c| c.all_reduce_sum(&mut vec![1.0; 10 + c.rank()]));
            for (c, r) in &out {
                let e = format!("{:#}", r.as_ref().unwrap_err());
                assert!(e.contains("elements"), "rank {}: {e}", c.rank());
            }
            let e = format!("{:#}", out[1].1.as_ref().unwrap_err());
            assert!(e.contains("an all-reduce of 10 f32 elements; this rank is in #0, an all-reduce of 11"), "{e}");
            // The ring is broken for good afterwards.
            let out = on_all(out.into_iter().map(|(c, _)| c).collect(), |c| c.all_reduce_sum(&mut vec![1.0; 4]));
            for (_, r) in &out {
                assert!(format!("{:#}", r.as_ref().unwrap_err()).contains("broken by an earlier error"));
            }
            // Different operations on the same buffer.
            let out = on_all(ring::<f32>(2), |c| {
                let mut v = vec![1.0; 4];
                if c.rank() == 0 {
                    c.reduce_scatter_sum(&mut v)
                } else {
                    c.all_reduce_sum(&mut v)
                }
            });
            let e = format!("{:#}", out[1].1.as_ref().unwrap_err());
            assert!(e.contains("a reduce-scatter of 4 f32 elements; this rank is in #0, an all-reduce of 4"), "{e}");
            assert!(out[0].1.is_err());
            // A skipped call: rank 0 sums counters first, rank 1 does not.
            let out = on_all(ring::<f32>(3), |c| {
                if c.rank() == 0 {
                    c.all_reduce_sum_u64(&mut [1])?;
                }
                c.all_reduce_sum(&mut vec![1.0; 8])
            });
            for (c, r) in &out {
                assert!(r.is_err(), "rank {} succeeded", c.rank());
            }
        });
    }
}
