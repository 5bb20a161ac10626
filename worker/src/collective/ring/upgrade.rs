//! Steps 5 and 6 of the handshake: moving same-host links to Unix sockets,
//! and then their data to shared memory.
//!
//! On Linux, two neighbours in the same network namespace (in practice: on
//! the same host) move their link to a Unix domain socket, offered by the
//! accepting rank under a random abstract name and claimed with a random
//! token sent over the checked TCP connection (step 5, [`to_unix`]). A Unix
//! socket moves the same bytes with the same two copies but skips the
//! TCP/IP stack, a large part of loopback TCP's cost (docs/BENCHMARKS.md).
//! Peers on other hosts, or an upgrade that fails, keep the TCP connection.
//!
//! On such a Unix link the data then moves through shared memory (step 6,
//! `to_shm`, with [`crate::collective::shm`]): the writing rank creates a
//! ring buffer in a memfd and passes it over the socket; from then on it
//! copies its bytes once into the ring and the reading rank adds
//! (reduce-scatter) or copies (all-gather) straight from it, while the
//! socket carries only one-byte wakeups for a side that waits. The bytes of
//! the stream, and so the results, are those of the socket path; a link
//! where the memfd cannot be made or mapped keeps the Unix socket.

#[cfg(target_os = "linux")]
use super::link::read_timeout;
use super::link::Stream;
use anyhow::Result;
#[cfg(target_os = "linux")]
use anyhow::{bail, Context};
#[cfg(target_os = "linux")]
use std::io::{Read, Write};
use std::net::TcpStream;
#[cfg(target_os = "linux")]
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

/// What the accepting end sends over the checked TCP connection: a tag,
/// then (for [`OFFER_UNIX`]) the random abstract socket name and the
/// random token that the connecting end must present on it.
const OFFER_BYTES: usize = 33;
const OFFER_UNIX: u8 = b'U';
const OFFER_NONE: u8 = b'-';
/// The connecting end's answer: it connected and sent the token, or not.
const CLAIMED: u8 = b'Y';
const DECLINED: u8 = b'N';

#[cfg(not(target_os = "linux"))]
pub(super) fn to_unix(
    next: TcpStream,
    prev: TcpStream,
    _next_can: bool,
    _prev_can: bool,
    _deadline: Instant,
    _names: (&str, &str),
) -> Result<(Stream, Stream)> {
    Ok((Stream::Tcp(next), Stream::Tcp(prev)))
}

/// `next_can`/`prev_can`: both ends of that link announced
/// [`FEATURE_UNIX`]. Like steps 1-4, no step waits for a peer to do more
/// than run the same sequence:
/// a. offer the predecessor a Unix socket (bind a listener under a random
///    abstract name, send name and token);
/// b. read the successor's offer; connect to the name and send the token
///    (the connection waits in the listener's backlog, so this needs no
///    accept yet); tell the successor whether that worked;
/// c. read the predecessor's answer; if it connected, accept and check
///    the token.
///
/// The abstract name exists only in this network namespace, so the
/// connect fails for a peer on another host, which then keeps TCP.
///
/// [`FEATURE_UNIX`]: super::wire::FEATURE_UNIX
#[cfg(target_os = "linux")]
pub(super) fn to_unix(
    next: TcpStream,
    prev: TcpStream,
    next_can: bool,
    prev_can: bool,
    deadline: Instant,
    (next_name, prev_name): (&str, &str),
) -> Result<(Stream, Stream)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr as UnixAddr;
    let name = |id: &[u8]| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        UnixAddr::from_abstract_name(format!("tessera-ring-{hex}"))
    };

    // a.
    let mut offered = None;
    if prev_can {
        let mut offer = [0u8; OFFER_BYTES];
        offer[0] = OFFER_NONE;
        let (id, token): ([u8; 16], [u8; 16]) = (rand::random(), rand::random());
        // A failed bind (no abstract sockets here) only means no offer.
        if let Ok(listener) = name(&id).and_then(|a| UnixListener::bind_addr(&a)) {
            offer[0] = OFFER_UNIX;
            offer[1..17].copy_from_slice(&id);
            offer[17..33].copy_from_slice(&token);
            offered = Some((listener, token));
        }
        (&prev).write_all(&offer).with_context(|| format!("sending the link offer to {prev_name} failed"))?;
    }

    // b.
    let mut next_unix = None;
    if next_can {
        let mut offer = [0u8; OFFER_BYTES];
        next.set_read_timeout(Some(read_timeout(deadline)))?;
        (&next).read_exact(&mut offer).with_context(|| format!("reading the link offer of {next_name} failed"))?;
        next_unix = match offer[0] {
            OFFER_UNIX => name(&offer[1..17])
                .and_then(|a| UnixStream::connect_addr(&a))
                .and_then(|s| (&s).write_all(&offer[17..33]).map(|()| s))
                .map_err(|e| tracing::debug!(peer = %next_name, error = %e, "keeping TCP: no Unix socket"))
                .ok(),
            OFFER_NONE => None,
            tag => bail!("{next_name} sent a bad link offer (tag {tag:#04x})"),
        };
        let answer = if next_unix.is_some() { CLAIMED } else { DECLINED };
        (&next).write_all(&[answer]).with_context(|| format!("answering the link offer of {next_name} failed"))?;
    }

    // c.
    let mut prev_unix = None;
    if let Some((listener, token)) = offered {
        let mut answer = [0u8];
        prev.set_read_timeout(Some(read_timeout(deadline)))?;
        (&prev)
            .read_exact(&mut answer)
            .with_context(|| format!("reading {prev_name}'s answer to the link offer failed"))?;
        match answer[0] {
            CLAIMED => {
                // Already in the backlog, so a blocking accept returns at once.
                let (s, _) =
                    listener.accept().with_context(|| format!("accepting the Unix socket of {prev_name} failed"))?;
                s.set_read_timeout(Some(read_timeout(deadline)))?;
                let mut got = [0u8; 16];
                (&s).read_exact(&mut got)
                    .with_context(|| format!("reading the token of {prev_name}'s Unix socket failed"))?;
                if got != token {
                    bail!("the Unix socket offered to {prev_name} was claimed with a wrong token");
                }
                prev_unix = Some(s);
            }
            DECLINED => {}
            tag => bail!("{prev_name} answered the link offer wrongly (tag {tag:#04x})"),
        }
    }
    let next = next_unix.map_or(Stream::Tcp(next), Stream::Unix);
    let prev = prev_unix.map_or(Stream::Tcp(prev), Stream::Unix);
    Ok((next, prev))
}

/// The shared-memory offer: a tag, then (for [`OFFER_SHM`]) the ring's
/// data size; the memfd travels with it (`SCM_RIGHTS`).
#[cfg(target_os = "linux")]
const SHM_OFFER_BYTES: usize = 9;
#[cfg(target_os = "linux")]
const OFFER_SHM: u8 = b'M';

/// Step 6: moving the data of Unix links into shared memory, where both
/// ends announced [`FEATURE_SHM`]. The same three moves as step 5:
/// a. create a ring for the successor and send it (or [`OFFER_NONE`]);
/// b. receive the predecessor's ring, map it, answer whether that worked;
/// c. read the successor's answer; on a decline drop the ring.
///
/// [`FEATURE_SHM`]: super::wire::FEATURE_SHM
#[cfg(target_os = "linux")]
pub(super) fn to_shm(
    next: &Stream,
    prev: &Stream,
    (next_can, prev_can): (bool, bool),
    (rank, generation, ring_bytes): (usize, u64, usize),
    deadline: Instant,
    (next_name, prev_name): (&str, &str),
) -> Result<(Option<crate::collective::shm::Writer>, Option<crate::collective::shm::Reader>)> {
    use crate::collective::shm::{recv_with_fd, send_with_fd, Reader, Writer};
    use std::os::fd::AsRawFd;

    // a.
    let mut writer = None;
    if let (true, Stream::Unix(s)) = (next_can, next) {
        let mut offer = [0u8; SHM_OFFER_BYTES];
        offer[0] = OFFER_NONE;
        // A failure only means no offer: the link stays a Unix socket.
        let name = format!("tessera-ring-g{generation}-r{rank}");
        match Writer::create(ring_bytes, &name) {
            Ok(mut w) => {
                let fd = w.take_fd();
                offer[0] = OFFER_SHM;
                offer[1..9].copy_from_slice(&(w.capacity() as u64).to_le_bytes());
                send_with_fd(s, &offer, fd.as_ref().map(|f| f.as_raw_fd()))
                    .with_context(|| format!("sending the shared-memory offer to {next_name} failed"))?;
                writer = Some(w);
            }
            Err(e) => {
                tracing::debug!(peer = %next_name, error = %e, "keeping the Unix socket: no shared ring");
                send_with_fd(s, &offer, None)
                    .with_context(|| format!("sending the shared-memory offer to {next_name} failed"))?;
            }
        }
    }

    // b.
    let mut reader = None;
    if let (true, Stream::Unix(s)) = (prev_can, prev) {
        let mut offer = [0u8; SHM_OFFER_BYTES];
        s.set_read_timeout(Some(read_timeout(deadline)))?;
        let fd = recv_with_fd(s, &mut offer)
            .with_context(|| format!("reading the shared-memory offer of {prev_name} failed"))?;
        reader = match (offer[0], fd) {
            (OFFER_SHM, Some(fd)) => {
                let mut cap = [0u8; 8];
                cap.copy_from_slice(&offer[1..9]);
                usize::try_from(u64::from_le_bytes(cap))
                    .map_err(std::io::Error::other)
                    .and_then(|cap| Reader::open(fd, cap))
                    .map_err(|e| {
                        tracing::debug!(peer = %prev_name, error = %e, "keeping the Unix socket: cannot map the ring")
                    })
                    .ok()
            }
            (OFFER_SHM, None) => bail!("{prev_name} offered a shared ring without its descriptor"),
            (OFFER_NONE, _) => None,
            (tag, _) => bail!("{prev_name} sent a bad shared-memory offer (tag {tag:#04x})"),
        };
        let answer = if reader.is_some() { CLAIMED } else { DECLINED };
        (&*s)
            .write_all(&[answer])
            .with_context(|| format!("answering the shared-memory offer of {prev_name} failed"))?;
    }

    // c.
    if let (Some(_), Stream::Unix(s)) = (&writer, next) {
        let mut answer = [0u8];
        s.set_read_timeout(Some(read_timeout(deadline)))?;
        (&*s)
            .read_exact(&mut answer)
            .with_context(|| format!("reading {next_name}'s answer to the shared-memory offer failed"))?;
        match answer[0] {
            CLAIMED => {}
            DECLINED => writer = None,
            tag => bail!("{next_name} answered the shared-memory offer wrongly (tag {tag:#04x})"),
        }
    }
    Ok((writer, reader))
}

#[cfg(test)]
mod tests {
    use super::super::link::{LinkOptions, Transport};
    use super::super::testkit::*;
    use super::super::RingCollective;
    use crate::collective::Collective;
    use crate::engine::cpu::Real;

    /// On Linux, ranks on one host talk over Unix sockets after the TCP
    /// handshake, and their data moves to shared memory; elsewhere they keep
    /// TCP.
    #[test]
    fn same_host_links_move_to_unix_sockets() {
        within(30, || {
            let linux = cfg!(target_os = "linux");
            let (stream, data) = if linux { ("unix", "shm") } else { ("tcp", "tcp") };
            let rings = ring::<f32>(3);
            for c in &rings {
                let l = c.shared.links.as_ref().unwrap();
                assert_eq!((l.next.kind(), l.prev.kind()), (stream, stream), "rank {}", c.rank);
            }
            assert_eq!(kinds(&rings), vec![(data, data); 3]);
        });
    }

    /// The same calls over TCP, Unix sockets, shared memory and a mix of
    /// them (a rank that offers less: its links fall back), with segment
    /// sizes that differ between ranks and a shared ring of 1000 bytes, so
    /// that elements are cut at its wrap: the same bits everywhere.
    fn transports_agree_bit_for_bit<T: Real>() {
        use Transport::{Shm, Tcp, Unix};
        let linux = cfg!(target_os = "linux");
        for n in [2usize, 3] {
            let mixed = if n == 2 { vec![Shm, Unix] } else { vec![Shm, Shm, Unix] };
            let setups = [vec![Tcp; n], vec![Unix; n], vec![Shm; n], mixed];
            let mut results = Vec::new();
            for maxes in &setups {
                let opts: Vec<LinkOptions> = maxes.iter().map(|&max| LinkOptions { max, ring_bytes: 1000 }).collect();
                let rings: Vec<RingCollective<T>> =
                    connect_ring_opts(&vec![GENERATION; n], &opts).into_iter().map(|r| r.unwrap()).collect();
                // Link r -> r+1 is as good as the lesser end allows.
                let link = |r: usize| match maxes[r].min(maxes[(r + 1) % n]) {
                    _ if !linux => "tcp",
                    Tcp => "tcp",
                    Unix => "unix",
                    Shm => "shm",
                };
                let want: Vec<_> = (0..n).map(|r| (link(r), link((r + n - 1) % n))).collect();
                assert_eq!(kinds(&rings), want, "n={n} {maxes:?}");
                let out = on_all(rings, |c| {
                    c.set_segment_bytes(4096 + 44 * c.rank());
                    let mut out = Vec::new();
                    for len in [0usize, 1, 5, 17, 1001, 70_001, 250_001] {
                        let mut v = input::<T>(c.rank(), len);
                        c.all_reduce_sum(&mut v).unwrap();
                        out.push(bits(&v));
                        // u64 after an odd number of f32: 8-byte elements
                        // straddle the ring's wrap.
                        let mut u: Vec<u64> = (0..len.min(999)).map(|i| (c.rank() * 1_000_003 + i) as u64).collect();
                        c.all_reduce_sum_u64(&mut u).unwrap();
                        let want: Vec<u64> =
                            (0..u.len()).map(|i| (0..n).map(|r| (r * 1_000_003 + i) as u64).sum()).collect();
                        assert_eq!(u, want, "n={n} {maxes:?} len={len}");
                    }
                    out
                });
                for (r, (_, o)) in out.iter().enumerate() {
                    assert_eq!(o, &out[0].1, "n={n} {maxes:?}: rank {r} differs from rank 0");
                }
                results.push(out.into_iter().next().unwrap().1);
            }
            for (i, r) in results.iter().enumerate() {
                assert_eq!(r, &results[0], "n={n}: {:?} differs from {:?}", setups[i], setups[0]);
            }
        }
    }

    #[test]
    fn f32_transports_agree_bit_for_bit() {
        within(120, transports_agree_bit_for_bit::<f32>);
    }

    #[test]
    fn f64_transports_agree_bit_for_bit() {
        within(120, transports_agree_bit_for_bit::<f64>);
    }

    /// The shared rings leave nothing behind: their descriptors are closed
    /// once mapped (no file exists at any time: they are memfds), and the
    /// mappings go when the collectives are dropped, aborted or not.
    #[cfg(target_os = "linux")]
    #[test]
    fn shared_rings_leave_nothing_behind() {
        within(30, || {
            let generation = 0x5EED_0001u64;
            let tag = format!("tessera-ring-g{generation}-");
            let maps =
                || std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains(&tag)).count();
            let fds = || {
                std::fs::read_dir("/proc/self/fd")
                    .unwrap()
                    .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|p| p.to_string_lossy().contains(&tag))
                    .count()
            };
            let rings: Vec<RingCollective<f32>> =
                connect_ring(&[generation; 3]).into_iter().map(|r| r.unwrap()).collect();
            // Each rank maps its own ring and its predecessor's.
            assert_eq!(maps(), 6);
            assert_eq!(fds(), 0);
            let out = on_all(rings, |c| c.all_reduce_sum(&mut vec![1.0; 1000]));
            assert!(out.iter().all(|(_, r)| r.is_ok()));
            out[1].0.abort();
            drop(out);
            assert_eq!(maps(), 0);
            assert_eq!(fds(), 0);
            assert!(!std::fs::read_dir("/dev/shm")
                .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().contains(&tag)))
                .unwrap_or(false));
        });
    }
}
