//! The schedule of one all-reduce on a ring of n >= 2 ranks ([`run_ring`]):
//! a reduce-scatter followed by an all-gather, 2(n-1) steps over n chunks of
//! the buffer, each chunk travelling in segments so that a rank forwards the
//! first segment of a chunk while the rest of it is still arriving.
//!
//! A rank writes to its successor and reads from its predecessor at the same
//! time: with blocking sockets and large messages, write-then-read would
//! deadlock once the kernel buffers fill. Each call therefore runs a scoped
//! sender thread that encodes and writes, while the calling thread reads and
//! reduces. Segments of the caller's buffer move between the two threads by
//! ownership (`&mut [E]` through channels), so no element is shared and no
//! `unsafe` is needed.
//!
//! Reduction order: chunk `c` is summed as `((x[c] + x[c+1]) + ...) + x[c-1]`
//! (rank indices mod n; chunk c starts at rank c and ends complete at rank
//! c-1) in every call, and the all-gather copies the final
//! bits to every rank, so results repeat bit for bit and agree on all ranks.
//! The order does not depend on the segment size: the bytes on each link are
//! the same whatever the segmentation, which may even differ between ranks.

use super::link::{recv_add, Links};
use super::wire::{kind_name, wire_bytes, wire_bytes_mut, CallHeader, Wire, CALL_BYTES};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::Mutex;

/// Default segment size. Large enough that per-segment overhead (a channel
/// hop, a syscall) is small against the copy, small enough that the pipeline
/// fills quickly and both scratch buffers stay in L2/L3.
pub const DEFAULT_SEGMENT_BYTES: usize = 512 * 1024;

/// The parameters of one collective call.
#[derive(Clone, Copy)]
pub(super) struct Step {
    pub(super) rank: usize,
    pub(super) n: usize,
    pub(super) seq: u64,
    pub(super) seg_elems: usize,
}

/// The buffer cut into n chunks (sizes differ by at most one element; the
/// first `len % n` are longer) and each chunk into segments. Segment ids are
/// global, chunk by chunk.
struct Plan {
    /// Element offset of chunk c; n + 1 entries.
    chunk_start: Vec<usize>,
    /// Id of the first segment of chunk c; n + 1 entries.
    seg_first: Vec<usize>,
    seg_elems: usize,
}

impl Plan {
    fn new(len: usize, n: usize, seg_elems: usize) -> Plan {
        let (base, extra) = (len / n, len % n);
        let mut chunk_start = Vec::with_capacity(n + 1);
        let mut seg_first = Vec::with_capacity(n + 1);
        let (mut at, mut seg) = (0, 0);
        for c in 0..n {
            chunk_start.push(at);
            seg_first.push(seg);
            let clen = base + usize::from(c < extra);
            at += clen;
            seg += clen.div_ceil(seg_elems);
        }
        chunk_start.push(at);
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

/// One all-reduce on a ring of n >= 2 ranks.
///
/// Rank r's wire schedule: it first sends chunk r, then forwards every chunk
/// it receives except the last: at step t (0 <= t < 2(n-1)) it receives
/// chunk (r - 1 - t) mod n, adds it into its own copy during the first n-1
/// steps (reduce-scatter) and overwrites its copy during the rest
/// (all-gather), and sends the result on at step t+1.
pub(super) fn run_ring<E: Wire>(
    links: &Links,
    step: Step,
    buf: &mut [E],
    recv_scratch: &mut Vec<u8>,
    send_scratch: &mut Vec<u8>,
) -> Result<()> {
    let Step { rank: r, n, seq, seg_elems } = step;
    let plan = Plan::new(buf.len(), n, seg_elems);
    let seg_bytes = seg_elems.min(buf.len().div_ceil(n)).max(1) * E::BYTES;
    if recv_scratch.len() < seg_bytes {
        recv_scratch.resize(seg_bytes, 0);
    }
    if !E::plain() && send_scratch.len() < seg_bytes {
        send_scratch.resize(seg_bytes, 0);
    }
    let header = CallHeader { seq, kind: E::KIND, len: buf.len() as u64 };
    let mut table = plan.split(buf);
    let first_error = FirstError(Mutex::new(None));
    let steps = 2 * (n - 1);

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
            // Queue our own chunk first so the sender starts while we wait.
            for id in plan.segments(r) {
                let seg = table[id].take().ok_or_else(|| anyhow!("internal: segment {id} queued twice"))?;
                job_tx.send((id, seg)).map_err(|_| anyhow!("the sending thread stopped"))?;
            }
            links
                .recv_exact(&mut h)
                .with_context(|| format!("reading the call header from {} failed", links.prev_name))?;
            let theirs = CallHeader::decode(&h).with_context(|| format!("bad call header from {}", links.prev_name))?;
            if theirs != header {
                bail!(
                    "{} is in collective #{} over {} {} elements; this rank is in #{} over {} {} elements",
                    links.prev_name,
                    theirs.seq,
                    theirs.len,
                    kind_name(theirs.kind),
                    header.seq,
                    header.len,
                    kind_name(header.kind)
                );
            }
            for t in 0..steps {
                let chunk = (r + 2 * n - 1 - t) % n;
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
                    if t + 1 < steps {
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

    /// The summation order is the documented one: chunk c is
    /// ((x[c] + x[c+1]) + ...) + x[c-1], ranks mod n.
    #[test]
    fn reduction_order_is_the_documented_one() {
        within(60, || {
            let n = 4;
            let len = 4; // one element per chunk
            let out = on_all(ring::<f32>(n), |c| {
                let mut v = input::<f32>(c.rank(), len);
                c.all_reduce_sum(&mut v).unwrap();
                v
            });
            for chunk in 0..n {
                let mut acc = value(chunk, chunk) as f32;
                for k in 1..n {
                    acc += value((chunk + k) % n, chunk) as f32;
                }
                assert_eq!(out[0].1[chunk].to_bits(), acc.to_bits(), "chunk {chunk}");
            }
        });
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
            assert!(e.contains("over 10 f32 elements; this rank is in #0 over 11 f32 elements"), "{e}");
            // The ring is broken for good afterwards.
            let out = on_all(out.into_iter().map(|(c, _)| c).collect(), |c| c.all_reduce_sum(&mut vec![1.0; 4]));
            for (_, r) in &out {
                assert!(format!("{:#}", r.as_ref().unwrap_err()).contains("broken by an earlier error"));
            }
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
