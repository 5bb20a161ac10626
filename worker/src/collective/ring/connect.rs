//! The constructors of [`RingCollective`]. They are one constructor with
//! growing options: [`connect`](RingCollective::connect) (no job token),
//! [`connect_with_token`](RingCollective::connect_with_token) (what a job
//! uses), [`connect_with_transport`](RingCollective::connect_with_transport)
//! (same-host links capped, for the benchmark), all ending in
//! `connect_opts` (every link option; the tests use it), which checks the
//! arguments and runs the handshake.

use super::allreduce::DEFAULT_SEGMENT_BYTES;
use super::handshake;
use super::link::{LinkOptions, Transport};
use super::{RingCollective, Shared};
use crate::engine::cpu::Real;
use anyhow::{bail, Result};
use std::marker::PhantomData;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl<T: Real> RingCollective<T> {
    /// Joins the ring of `world_size` ranks as `rank`.
    ///
    /// `listener` is this rank's already bound listener (its address was
    /// advertised); `peers[i]` is the "host:port" of rank i's listener.
    /// This rank connects to rank+1 (retrying until `timeout`, since peers
    /// start at different times) and accepts one connection from rank-1;
    /// both ends check magic bytes, protocol version, world size, generation
    /// and ranks, then prove to each other that they hold the same job token
    /// (here: the empty one; see [`connect_with_token`](Self::connect_with_token)).
    /// Then each link whose two ends can moves to a Unix socket when they
    /// share a network namespace (see the docs of the `ring` module). A world size of 1
    /// opens no sockets (the listener is dropped).
    pub fn connect(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        peers: &[String],
        generation: u64,
        timeout: Duration,
    ) -> Result<Self> {
        Self::connect_with_token(rank, world_size, listener, peers, generation, timeout, &[])
    }

    /// [`connect`](Self::connect) for a job with a secret `token`: a link
    /// is used only once the peer proved it holds the same token (without
    /// either end sending it). A peer without it, or with another one, is
    /// refused on both ends with an error that says the job token does not
    /// match.
    pub fn connect_with_token(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        peers: &[String],
        generation: u64,
        timeout: Duration,
        token: &[u8],
    ) -> Result<Self> {
        Self::connect_with_transport(rank, world_size, listener, peers, generation, timeout, Transport::Shm, token)
    }

    /// [`connect_with_token`](Self::connect_with_token), with same-host
    /// links limited to `max` (to compare transports; results are the same
    /// on all of them).
    #[allow(clippy::too_many_arguments)]
    pub fn connect_with_transport(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        peers: &[String],
        generation: u64,
        timeout: Duration,
        max: Transport,
        token: &[u8],
    ) -> Result<Self> {
        #[cfg(target_os = "linux")]
        let ring_bytes = crate::collective::shm::DEFAULT_RING_BYTES;
        #[cfg(not(target_os = "linux"))]
        let ring_bytes = 0;
        let opts = LinkOptions { max, ring_bytes };
        Self::connect_opts(rank, world_size, listener, peers, generation, timeout, opts, token)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn connect_opts(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        peers: &[String],
        generation: u64,
        timeout: Duration,
        opts: LinkOptions,
        token: &[u8],
    ) -> Result<Self> {
        if world_size == 0 {
            bail!("world size must be at least 1");
        }
        if rank >= world_size {
            bail!("rank {rank} is out of range for world size {world_size}");
        }
        if peers.len() != world_size {
            bail!("{} peer addresses for world size {world_size}", peers.len());
        }
        let links = if world_size == 1 {
            None
        } else {
            let deadline = Instant::now() + timeout;
            Some(handshake::open_links(rank, world_size, &listener, peers, generation, deadline, opts, token)?)
        };
        Ok(RingCollective {
            rank,
            world_size,
            generation,
            shared: Arc::new(Shared { aborted: AtomicBool::new(false), links }),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            recv_scratch: Vec::new(),
            send_scratch: Vec::new(),
            calls: 0,
            broken: None,
            _elem: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::RingCollective;
    use crate::collective::Collective;

    #[test]
    fn world_size_one_needs_no_sockets() {
        within(10, || {
            let (mut ls, addrs) = listeners(1);
            let mut c = RingCollective::<f64>::connect(0, 1, ls.remove(0), &addrs, 0, CONNECT).unwrap();
            assert!(c.shared.links.is_none());
            assert_eq!((c.rank(), c.world_size()), (0, 1));
            let mut v = vec![1.5, -2.0, 3.25];
            c.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, [1.5, -2.0, 3.25]);
            let mut u = [5u64, u64::MAX];
            c.all_reduce_sum_u64(&mut u).unwrap();
            assert_eq!(u, [5, u64::MAX]);
            // The sharded operations too: rank 0 owns the whole buffer.
            c.reduce_scatter_sum(&mut v).unwrap();
            c.all_gather(&mut v).unwrap();
            assert_eq!(v, [1.5, -2.0, 3.25]);
        });
    }

    #[test]
    fn bad_arguments_are_refused() {
        let (mut ls, addrs) = listeners(2);
        let e = RingCollective::<f32>::connect(2, 2, ls.remove(0), &addrs, 0, CONNECT).err().unwrap();
        assert!(format!("{e}").contains("out of range"), "{e}");
        let e = RingCollective::<f32>::connect(0, 3, ls.remove(0), &addrs, 0, CONNECT).err().unwrap();
        assert!(format!("{e}").contains("2 peer addresses for world size 3"), "{e}");
    }
}
