//! Test support for the tests of every file of the ring: real ranks on
//! threads of this process, connected over loopback, a time limit that turns
//! a hang into a failure, and reproducible inputs whose summation order shows
//! in the low bits.

use super::link::{LinkOptions, Transport};
use super::RingCollective;
use crate::engine::cpu::Real;
use anyhow::Result;
use std::net::TcpListener;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

pub(super) const GENERATION: u64 = 7;
pub(super) const CONNECT: Duration = Duration::from_secs(20);

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `secs`: a hang must fail the test, not stall the suite.
pub(super) fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(r) => {
            let _ = h.join();
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("no result after {secs} s: the collective hangs"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("the test thread ended without a result"),
        },
    }
}

pub(super) fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    (ls, addrs)
}

/// The job token of the tests' rings, so that every test runs the proofs.
pub(super) const TOKEN: &[u8] = b"token-of-the-test-job";

pub(super) fn default_opts(n: usize) -> Vec<LinkOptions> {
    vec![LinkOptions { max: Transport::Shm, ring_bytes: DEFAULT_RING_BYTES }; n]
}

/// Connects n ranks, each on its own thread, rank i in `generations[i]`.
pub(super) fn connect_ring<T: Real>(generations: &[u64]) -> Vec<Result<RingCollective<T>>> {
    connect_ring_opts(generations, &default_opts(generations.len()))
}

/// Connects n ranks of one generation, rank i with `tokens[i]`.
pub(super) fn connect_ring_tokens<T: Real>(tokens: &[&[u8]]) -> Vec<Result<RingCollective<T>>> {
    let n = tokens.len();
    connect_ring_full(&vec![GENERATION; n], &default_opts(n), tokens)
}

#[cfg(target_os = "linux")]
pub(super) const DEFAULT_RING_BYTES: usize = super::super::shm::DEFAULT_RING_BYTES;
#[cfg(not(target_os = "linux"))]
pub(super) const DEFAULT_RING_BYTES: usize = 0;

/// [`connect_ring`] with link options per rank.
pub(super) fn connect_ring_opts<T: Real>(generations: &[u64], opts: &[LinkOptions]) -> Vec<Result<RingCollective<T>>> {
    connect_ring_full(generations, opts, &vec![TOKEN; generations.len()])
}

/// [`connect_ring`] with link options and a token per rank.
pub(super) fn connect_ring_full<T: Real>(
    generations: &[u64],
    opts: &[LinkOptions],
    tokens: &[&[u8]],
) -> Vec<Result<RingCollective<T>>> {
    let n = generations.len();
    let (ls, addrs) = listeners(n);
    thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .zip(generations.iter().zip(opts).zip(tokens))
            .enumerate()
            .map(|(rank, (l, ((&g, &o), &t)))| {
                let addrs = &addrs;
                s.spawn(move || RingCollective::<T>::connect_opts(rank, n, l, addrs, g, CONNECT, o, t))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The links' kinds of every rank: (successor, predecessor).
pub(super) fn kinds<T>(rings: &[RingCollective<T>]) -> Vec<(&'static str, &'static str)> {
    rings.iter().map(|c| c.shared.links.as_ref().unwrap().kinds()).collect()
}

pub(super) fn ring<T: Real>(n: usize) -> Vec<RingCollective<T>> {
    connect_ring(&vec![GENERATION; n]).into_iter().map(|r| r.unwrap()).collect()
}

/// A ring whose links go no further than `max`, and the kind its data links
/// then have (Tcp: loopback TCP; Shm: shared memory on Linux).
pub(super) fn ring_over<T: Real>(n: usize, max: Transport) -> (Vec<RingCollective<T>>, &'static str) {
    let opts = vec![LinkOptions { max, ring_bytes: DEFAULT_RING_BYTES }; n];
    let rings = connect_ring_opts(&vec![GENERATION; n], &opts).into_iter().map(|r| r.unwrap()).collect();
    let kind = match max {
        _ if !cfg!(target_os = "linux") => "tcp",
        Transport::Tcp => "tcp",
        Transport::Unix => "unix",
        Transport::Shm => "shm",
    };
    (rings, kind)
}

/// Runs `f` on every rank at once, one thread per rank.
pub(super) fn on_all<T: Real, R: Send>(
    rings: Vec<RingCollective<T>>,
    f: impl Fn(&mut RingCollective<T>) -> R + Sync,
) -> Vec<(RingCollective<T>, R)> {
    let f = &f;
    thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let r = f(&mut c);
                    (c, r)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Reproducible values of mixed sign and magnitude, so that the order of
/// summation shows in the low bits.
pub(super) fn value(rank: usize, i: usize) -> f64 {
    let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let h = h ^ (h >> 29);
    let unit = (h.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 11) as f64 / (1u64 << 53) as f64;
    (unit - 0.5) * 10f64.powi((i % 7) as i32 - 3)
}

pub(super) fn input<T: Real>(rank: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::of(value(rank, i))).collect()
}

pub(super) fn bits<T: Real>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.f64().to_bits()).collect()
}
