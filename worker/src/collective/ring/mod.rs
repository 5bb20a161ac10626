//! The CPU collective: a ring all-reduce over TCP (on one host: Unix sockets
//! and shared memory). This file holds [`RingCollective`], the handle that
//! sums, with its abort and failure handling; each concern of the ring has a
//! file of its own beside it:
//!
//! - `wire`: the bytes on the wire (the hello, the call header, the encoding
//!   and summing of elements);
//! - `link`: a rank's two sockets (TCP, Unix, shared ring), the
//!   [`Transport`] they may be capped at, and opening TCP connections;
//! - `connect`: the constructors, [`RingCollective::connect`] and its
//!   variants;
//! - `handshake`: the six steps that turn a listener and the peers'
//!   addresses into two checked links;
//! - `auth`: step 4, the proof that both ends hold the job token;
//! - `upgrade`: steps 5 and 6, the move of same-host links to a Unix socket
//!   and of their data to shared memory;
//! - `allreduce`: the schedule of one all-reduce, reduce-scatter or
//!   all-gather (one schedule, of which the latter two run a half), and its
//!   reduction order;
//! - `testkit` (tests only): rings of ranks on threads, for every file's tests.
//!
//! Ranks find each other and check each other's identity over TCP: a hello
//! (magic, version, world size, generation, ranks, and a fresh random nonce)
//! each way on every link.
//!
//! Authentication: the job has a secret token (bytes, possibly empty), and a
//! link carries no gradient byte until both of its ends proved that they hold
//! the same one (step 4 of the handshake, `auth`). Each end sends
//! HMAC-SHA256 keyed with the token over a label, its role (connecting or
//! accepting end) and the link's two hellos as sent, which hold both
//! nonces, world size, generation and the two ranks; the token never
//! travels, and a recorded proof is worth nothing on another link, in
//! another generation or in a later handshake.
//!
//! On Linux, two neighbours on the same host then move their link to a Unix
//! domain socket, and its data to a shared-memory ring (`upgrade`); peers on
//! other hosts, or an upgrade that fails, keep the TCP connection. The bytes
//! of the stream, and so the results, are the same on every transport.
//!
//! Every rank holds two connections: one it opened to its successor
//! (`rank + 1`), on which it only writes, and one it accepted from its
//! predecessor (`rank - 1`), on which it only reads; an all-reduce is a
//! reduce-scatter followed by an all-gather over them (`allreduce`), and
//! each of those two is also a collective of its own.
//!
//! Failure: any error (a dead or aborted peer, a mismatched call) shuts down
//! both sockets of the rank that saw it. Its neighbours then fail their next
//! read or write, so the error goes round the ring and no rank stays blocked.
//! On a shared-memory link every wait is a blocking read on the socket, so
//! the same shutdown (or a dead peer's closed socket) ends it.
//! The collective is then broken for good; recovery builds a new one with the
//! next generation.

mod allreduce;
mod auth;
mod connect;
mod handshake;
mod link;
#[cfg(test)]
mod testkit;
mod upgrade;
mod wire;

pub use allreduce::DEFAULT_SEGMENT_BYTES;
pub use link::Transport;

use super::{check_shardable, Collective};
use crate::engine::cpu::Real;
use allreduce::{run_ring, Step};
use anyhow::{bail, Context, Result};
use link::Links;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::{kind_name, Phase, Wire};

/// State shared with [`AbortHandle`]s, which other threads hold.
struct Shared {
    aborted: AtomicBool,
    links: Option<Links>,
}

impl Shared {
    /// Closes both directions of both sockets. A thread blocked in a read or
    /// write on them (here, or in a neighbour through the dead connection)
    /// returns with an error.
    fn shutdown(&self) {
        if let Some(l) = &self.links {
            let _ = l.next.shutdown();
            let _ = l.prev.shutdown();
        }
    }
}

/// Aborts a [`RingCollective`] from any thread, including while another
/// thread is blocked inside one of its collectives (that call then returns an
/// error, and so do the blocked calls of the other ranks as the closed
/// connections are noticed round the ring). Failure recovery uses it when the
/// coordinator announces a new generation.
#[derive(Clone)]
pub struct AbortHandle {
    shared: Arc<Shared>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.shutdown();
    }
}

/// A ring all-reduce over TCP for CPU workers. See the module docs.
pub struct RingCollective<T> {
    rank: usize,
    world_size: usize,
    generation: u64,
    shared: Arc<Shared>,
    segment_bytes: usize,
    /// Reused across calls: the reading thread's segment buffer...
    recv_scratch: Vec<u8>,
    /// ...and the sending thread's.
    send_scratch: Vec<u8>,
    /// Collectives started so far; checked against the predecessor's count.
    calls: u64,
    /// Why the ring stopped working, once it has.
    broken: Option<String>,
    _elem: PhantomData<fn() -> T>,
}

impl<T: Real> RingCollective<T> {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A handle that aborts this collective from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { shared: self.shared.clone() }
    }

    /// Shuts down both sockets; this and every later collective returns an
    /// error, and so do the neighbours' (see [`AbortHandle`]).
    pub fn abort(&self) {
        self.abort_handle().abort();
    }

    /// Segment size in bytes (at least one element). Only a tuning knob: it
    /// changes neither the bytes on the wire nor the result, and ranks need
    /// not agree on it.
    pub fn set_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(1);
    }

    /// Fails a collective whose read or write blocks longer than `timeout`
    /// (None: wait forever, the default). It guards against a peer host that
    /// vanishes without closing its connections; it must exceed the longest
    /// legitimate wait, i.e. the step-time skew between ranks.
    pub fn set_io_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        if let Some(l) = &self.shared.links {
            for (s, name) in [(&l.next, &l.next_name), (&l.prev, &l.prev_name)] {
                s.set_read_timeout(timeout)
                    .with_context(|| format!("setting the read timeout towards {name} failed"))?;
                s.set_write_timeout(timeout)
                    .with_context(|| format!("setting the write timeout towards {name} failed"))?;
            }
        }
        Ok(())
    }

    /// [`Collective::all_reduce_sum`] on a slice (a bucket inside a larger
    /// buffer, say).
    pub fn all_reduce_sum_slice(&mut self, buf: &mut [T]) -> Result<()> {
        self.run(buf, Phase::AllReduce, "all_reduce_sum")
    }

    /// Runs `phase` on `buf`; `op` names the call in errors. Any failure,
    /// a length a sharded operation refuses included, breaks the ring: the
    /// other ranks may already be in the call, and the shutdown releases
    /// them.
    fn run<E: Wire>(&mut self, buf: &mut [E], phase: Phase, op: &str) -> Result<()> {
        if self.shared.aborted.load(Ordering::SeqCst) {
            bail!("rank {}: {op} on a ring collective that was aborted (generation {})", self.rank, self.generation);
        }
        if let Some(why) = &self.broken {
            bail!("rank {}: {op} on a ring collective broken by an earlier error: {why}", self.rank);
        }
        let seq = self.calls;
        self.calls += 1;
        let Some(links) = &self.shared.links else {
            return Ok(());
        };
        let seg_elems = (self.segment_bytes / E::BYTES).max(1);
        let shardable = match phase {
            Phase::AllReduce => Ok(()),
            Phase::ReduceScatter | Phase::AllGather => check_shardable(buf.len(), self.world_size),
        };
        let result = shardable.and_then(|()| {
            run_ring(
                links,
                Step { rank: self.rank, n: self.world_size, seq, seg_elems, phase },
                buf,
                &mut self.recv_scratch,
                &mut self.send_scratch,
            )
        });
        result.map_err(|e| {
            self.shared.shutdown();
            let e =
                if self.shared.aborted.load(Ordering::SeqCst) { e.context("the collective was aborted") } else { e };
            let e = e.context(format!(
                "rank {} of {}: {op} #{seq} ({} {} elements, generation {}) failed",
                self.rank,
                self.world_size,
                buf.len(),
                kind_name(E::KIND),
                self.generation
            ));
            self.broken = Some(format!("{e:#}"));
            e
        })
    }
}

impl<T: Real> Collective for RingCollective<T> {
    type Buf = Vec<T>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut Vec<T>) -> Result<()> {
        self.run(buf.as_mut_slice(), Phase::AllReduce, "all_reduce_sum")
    }

    fn all_reduce_sum_u64(&mut self, values: &mut [u64]) -> Result<()> {
        self.run(values, Phase::AllReduce, "all_reduce_sum_u64")
    }

    fn reduce_scatter_sum(&mut self, buf: &mut Vec<T>) -> Result<()> {
        self.run(buf.as_mut_slice(), Phase::ReduceScatter, "reduce_scatter_sum")
    }

    fn all_gather(&mut self, buf: &mut Vec<T>) -> Result<()> {
        self.run(buf.as_mut_slice(), Phase::AllGather, "all_gather")
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use std::thread;

    /// Both ends blocked on a shared ring (the writer for space, the reader
    /// for data): an abort releases this rank, and the peer's next call
    /// fails instead of waiting on the dead ring.
    #[test]
    fn abort_releases_calls_blocked_on_shared_memory() {
        within(30, || {
            let mut rings = ring::<f32>(2);
            if cfg!(target_os = "linux") {
                assert_eq!(kinds(&rings), vec![("shm", "shm"); 2]);
            }
            let mut peer = rings.pop().unwrap();
            let mut me = rings.pop().unwrap();
            let handle = me.abort_handle();
            // 3 MiB per chunk: more than the ring holds.
            let blocked = thread::spawn(move || {
                let r = me.all_reduce_sum(&mut vec![1.0; 3 << 20]);
                (me, r)
            });
            thread::sleep(Duration::from_millis(200));
            handle.abort();
            let (_me, r) = blocked.join().unwrap();
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("aborted"), "{e}");
            let e = format!("{:#}", peer.all_reduce_sum(&mut vec![1.0; 3 << 20]).unwrap_err());
            assert!(e.contains("rank 0 ("), "{e}");
        });
    }

    /// The peer is aborted while this rank waits on the shared ring: the
    /// call fails naming the peer.
    #[test]
    fn aborted_peer_releases_a_call_blocked_on_shared_memory() {
        within(30, || {
            let mut rings = ring::<f64>(2);
            let peer = rings.pop().unwrap();
            let mut me = rings.pop().unwrap();
            let handle = peer.abort_handle();
            let killer = thread::spawn(move || {
                thread::sleep(Duration::from_millis(200));
                handle.abort();
            });
            let e = format!("{:#}", me.all_reduce_sum(&mut vec![1.0; 1 << 20]).unwrap_err());
            killer.join().unwrap();
            assert!(e.contains("rank 1 ("), "{e}");
            drop(peer);
        });
    }

    /// Rank 2 stays out of the collective and is aborted from another
    /// thread: ranks 0 and 1, blocked in the call, get errors.
    #[test]
    fn aborted_peer_makes_all_reduce_fail() {
        within(30, || {
            let mut rings = ring::<f32>(3);
            let idle = rings.pop().unwrap();
            let handle = idle.abort_handle();
            let killer = thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                handle.abort();
            });
            let out = on_all(rings, |c| c.all_reduce_sum(&mut vec![1.0; 1 << 20]));
            killer.join().unwrap();
            let e0 = format!("{:#}", out[0].1.as_ref().unwrap_err());
            assert!(e0.contains("rank 2 (predecessor"), "{e0}");
            assert!(out[1].1.is_err());
            let mut idle = idle;
            let e = format!("{:#}", idle.all_reduce_sum(&mut vec![1.0]).unwrap_err());
            assert!(e.contains("aborted"), "{e}");
        });
    }

    /// The sharded operations, by name, for the tests that run both.
    type Op = fn(&mut RingCollective<f32>, &mut Vec<f32>) -> Result<()>;
    const SHARDED: [(&str, Op); 2] =
        [("reduce_scatter_sum", |c, v| c.reduce_scatter_sum(v)), ("all_gather", |c, v| c.all_gather(v))];

    /// `aborted_peer_makes_all_reduce_fail` for the sharded operations, over
    /// TCP and shared memory: the errors name the rank, the operation, the
    /// element count and the generation, and the aborted rank's own next
    /// call is refused.
    #[test]
    fn aborted_peer_makes_sharded_ops_fail() {
        within(60, || {
            for max in [Transport::Tcp, Transport::Shm] {
                for (name, op) in SHARDED {
                    let (mut rings, _) = ring_over::<f32>(3, max);
                    let idle = rings.pop().unwrap();
                    let handle = idle.abort_handle();
                    let killer = thread::spawn(move || {
                        thread::sleep(Duration::from_millis(100));
                        handle.abort();
                    });
                    let len = 3 << 20;
                    let out = on_all(rings, |c| op(c, &mut vec![1.0; len]));
                    killer.join().unwrap();
                    for (c, r) in &out {
                        let e = format!("{:#}", r.as_ref().unwrap_err());
                        let want = format!(
                            "rank {} of 3: {name} #0 ({len} f32 elements, generation {GENERATION}) failed",
                            c.rank()
                        );
                        assert!(e.contains(&want), "{max:?}: {e}");
                    }
                    let e0 = format!("{:#}", out[0].1.as_ref().unwrap_err());
                    assert!(e0.contains("rank 2 (predecessor"), "{max:?}: {e0}");
                    let mut idle = idle;
                    let e = format!("{:#}", op(&mut idle, &mut vec![1.0; 3]).unwrap_err());
                    assert!(e.contains(&format!("rank 2: {name} on a ring collective that was aborted")), "{e}");
                }
            }
        });
    }

    /// `abort_releases_a_blocked_call` for the sharded operations: a rank
    /// blocked in one, its peer never joining, is released by its abort.
    #[test]
    fn abort_releases_a_blocked_sharded_call() {
        within(30, || {
            for (name, op) in SHARDED {
                let mut rings = ring::<f32>(2);
                let _peer = rings.pop().unwrap();
                let mut me = rings.pop().unwrap();
                let handle = me.abort_handle();
                let blocked = thread::spawn(move || {
                    let r = op(&mut me, &mut vec![1.0; 1 << 21]);
                    (me, r)
                });
                thread::sleep(Duration::from_millis(100));
                handle.abort();
                let (mut me, r) = blocked.join().unwrap();
                let e = format!("{:#}", r.unwrap_err());
                assert!(e.contains(&format!("rank 0 of 2: {name} #0")) && e.contains("aborted"), "{e}");
                assert!(op(&mut me, &mut vec![1.0; 2]).is_err());
            }
        });
    }

    /// A peer that is gone (its process died and the kernel closed its
    /// sockets) makes the others' collectives fail.
    #[test]
    fn dead_peer_makes_all_reduce_fail() {
        within(30, || {
            let mut rings = ring::<f64>(3);
            drop(rings.remove(1));
            let out = on_all(rings, |c| c.all_reduce_sum(&mut vec![1.0; 100_000]));
            for (c, r) in &out {
                let e = format!("{:#}", r.as_ref().unwrap_err());
                assert!(e.contains(&format!("rank {} of 3", c.rank())), "{e}");
            }
            let e2 = format!("{:#}", out[1].1.as_ref().unwrap_err());
            assert!(e2.contains("rank 1 (predecessor"), "{e2}");
        });
    }

    /// The recovery path: this rank is blocked in a collective its peers
    /// never join, and its own abort handle releases it.
    #[test]
    fn abort_releases_a_blocked_call() {
        within(30, || {
            let mut rings = ring::<f32>(2);
            let _peer = rings.pop().unwrap();
            let mut me = rings.pop().unwrap();
            let handle = me.abort_handle();
            let blocked = thread::spawn(move || {
                let r = me.all_reduce_sum(&mut vec![1.0; 1 << 20]);
                (me, r)
            });
            thread::sleep(Duration::from_millis(100));
            handle.abort();
            let (mut me, r) = blocked.join().unwrap();
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("aborted"), "{e}");
            assert!(me.all_reduce_sum_u64(&mut [1]).is_err());
        });
    }

    #[test]
    fn io_timeout_fails_a_call_whose_peer_never_comes() {
        within(30, || {
            let mut rings = ring::<f32>(2);
            let _peer = rings.pop().unwrap();
            let mut me = rings.pop().unwrap();
            me.set_io_timeout(Some(Duration::from_millis(200))).unwrap();
            assert!(me.all_reduce_sum(&mut vec![1.0; 16]).is_err());
        });
    }
}
