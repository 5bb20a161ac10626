//! The connection sequence of one rank: [`open_links`] turns this rank's
//! listener and the peers' addresses into its two checked links, in six
//! steps that cannot deadlock whatever order the ranks start in (step 4, the
//! token proof, is in `auth`; steps 5 and 6, the move to a Unix socket and to
//! shared memory, are in `upgrade`).

use super::auth;
use super::link::{accept_until, connect_with_retry, read_timeout, LinkOptions, Links};
use super::upgrade;
#[cfg(target_os = "linux")]
use super::wire::FEATURE_SHM;
use super::wire::{Hello, FEATURE_UNIX, HELLO_BYTES, HELLO_HEAD_BYTES, MAGIC, PROTOCOL_VERSION};
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// Reads a hello: its head, and its nonce only when the head is of this
/// version (another version's hello may be shorter; [`Hello::check`] then
/// names the version, while waiting for more bytes would hang).
fn read_hello(mut s: &TcpStream, deadline: Instant) -> std::io::Result<[u8; HELLO_BYTES]> {
    s.set_read_timeout(Some(read_timeout(deadline)))?;
    let mut b = [0u8; HELLO_BYTES];
    s.read_exact(&mut b[..HELLO_HEAD_BYTES])?;
    if b[0..8] == MAGIC && b[8..12] == PROTOCOL_VERSION.to_le_bytes() {
        s.read_exact(&mut b[HELLO_HEAD_BYTES..])?;
    }
    Ok(b)
}

/// Opens the successor link and accepts the predecessor link. No step
/// waits for a peer to do anything but bind its listener and run the
/// same sequence, so ranks starting in any order cannot deadlock:
/// 1. connect to the successor and send our hello (it fits the socket
///    buffer, so it does not wait for the successor to accept);
/// 2. accept the predecessor, read its hello, answer with ours, check;
/// 3. read the successor's answer and check it;
/// 4. prove the job token on both links (writes only, small enough for
///    the socket buffers), then check both peers' proofs (`auth`), so
///    each end of a mismatched link sees the peer's proof and says so;
/// 5. move same-host links to Unix sockets (`upgrade::to_unix`);
/// 6. move the data of those to shared memory (`upgrade::to_shm`).
///
/// Nothing but hellos and proofs moves before step 4 has passed.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_links(
    rank: usize,
    n: usize,
    listener: &TcpListener,
    peers: &[String],
    generation: u64,
    deadline: Instant,
    opts: LinkOptions,
    token: &[u8],
) -> Result<Links> {
    let features = opts.max.features();
    let next_rank = (rank + 1) % n;
    let prev_rank = (rank + n - 1) % n;
    let me = |to: usize| Hello {
        version: PROTOCOL_VERSION,
        world_size: n as u64,
        generation,
        from: rank as u64,
        to: to as u64,
        features,
        // rand's thread RNG is a CSPRNG seeded from the OS.
        nonce: rand::random(),
    };
    let next_name = format!("rank {next_rank} (successor, {})", peers[next_rank]);

    // 1. Successor.
    let next = connect_with_retry(&peers[next_rank], deadline, &next_name)?;
    next.set_nodelay(true).with_context(|| format!("setting TCP_NODELAY towards {next_name} failed"))?;
    let hello_to_next = me(next_rank).encode();
    (&next).write_all(&hello_to_next).with_context(|| format!("sending the handshake to {next_name} failed"))?;

    // 2. Predecessor.
    let prev_advertised = format!("rank {prev_rank} (predecessor, advertised as {})", peers[prev_rank]);
    let (prev, prev_addr) = accept_until(listener, deadline, &prev_advertised)?;
    let prev_name = format!("rank {prev_rank} (predecessor, {prev_addr})");
    prev.set_nodelay(true).with_context(|| format!("setting TCP_NODELAY towards {prev_name} failed"))?;
    let hello_from_prev = read_hello(&prev, deadline)
        .with_context(|| format!("reading the handshake of the connection from {prev_addr} failed"))?;
    // Answer before checking, so the peer can name the mismatch too.
    let hello_to_prev = me(prev_rank).encode();
    let answer = (&prev).write_all(&hello_to_prev);
    let prev_features = Hello::decode(&hello_from_prev)
        .and_then(|h| h.check(&Hello { from: prev_rank as u64, to: rank as u64, ..me(prev_rank) }).map(|()| h.features))
        .with_context(|| {
            format!("rank {rank}: the connection from {prev_addr} (expected: {prev_advertised}) was refused")
        })?;
    answer.with_context(|| format!("answering the handshake of {prev_name} failed"))?;

    // 3. The successor's answer.
    let hello_from_next = read_hello(&next, deadline).with_context(|| {
        format!("reading the handshake answer of {next_name} failed (did it refuse this rank? see its log)")
    })?;
    let next_features = Hello::decode(&hello_from_next)
        .and_then(|h| h.check(&Hello { from: next_rank as u64, to: rank as u64, ..me(next_rank) }).map(|()| h.features))
        .with_context(|| format!("rank {rank}: {next_name} answered the handshake wrongly"))?;

    // 4. The job token. This rank connected to its successor and
    // accepted its predecessor; each proof covers the link's two hellos
    // in that (connector, acceptor) order. A failed send is reported
    // after the peer's proof is checked: a peer that already refused
    // this rank has sent its proof, and a mismatch is the clearer error.
    let proof = auth::prove(token, auth::BY_CONNECTOR, &hello_to_next, &hello_from_next)?;
    let sent_next = (&next).write_all(&proof);
    let proof = auth::prove(token, auth::BY_ACCEPTOR, &hello_from_prev, &hello_to_prev)?;
    let sent_prev = (&prev).write_all(&proof);
    let peer = auth::Peer { rank, name: &prev_name, token, deadline };
    auth::expect_proof(&prev, &peer, auth::BY_CONNECTOR, &hello_from_prev, &hello_to_prev)?;
    sent_prev.with_context(|| format!("sending the token proof to {prev_name} failed"))?;
    let peer = auth::Peer { name: &next_name, ..peer };
    auth::expect_proof(&next, &peer, auth::BY_ACCEPTOR, &hello_to_next, &hello_from_next)?;
    sent_next.with_context(|| format!("sending the token proof to {next_name} failed"))?;

    // 5. Same-host links move to Unix sockets where both ends can.
    let (next, prev) = upgrade::to_unix(
        next,
        prev,
        features & next_features & FEATURE_UNIX != 0,
        features & prev_features & FEATURE_UNIX != 0,
        deadline,
        (&next_name, &prev_name),
    )?;

    // 6. Their data moves to shared memory where both ends can.
    #[cfg(target_os = "linux")]
    let (next_shm, prev_shm) = upgrade::to_shm(
        &next,
        &prev,
        (features & next_features & FEATURE_SHM != 0, features & prev_features & FEATURE_SHM != 0),
        (rank, generation, opts.ring_bytes),
        deadline,
        (&next_name, &prev_name),
    )?;

    // Collectives block for as long as the slowest rank takes; failure
    // detection is the coordinator's heartbeat plus `abort`, or an
    // explicit `set_io_timeout`.
    for (s, name) in [(&next, &next_name), (&prev, &prev_name)] {
        s.set_read_timeout(None).with_context(|| format!("clearing the read timeout towards {name} failed"))?;
    }
    let links = Links {
        next,
        prev,
        next_name,
        prev_name,
        #[cfg(target_os = "linux")]
        next_shm,
        #[cfg(target_os = "linux")]
        prev_shm,
    };
    let (successor_link, predecessor_link) = links.kinds();
    tracing::debug!(
        rank,
        world_size = n,
        generation,
        successor = %links.next_name,
        successor_link,
        predecessor = %links.prev_name,
        predecessor_link,
        "ring connected"
    );
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::wire::{Hello, HELLO_BYTES, HELLO_HEAD_BYTES, LOCAL_FEATURES, NONCE_BYTES, PROTOCOL_VERSION};
    use super::super::RingCollective;
    use crate::collective::Collective;
    use anyhow::Result;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::{Duration, Instant};

    #[test]
    fn generation_mismatch_is_named_on_both_sides() {
        within(30, || {
            let out = connect_ring::<f32>(&[3, 4]);
            for (rank, r) in out.iter().enumerate() {
                let e = format!("{:#}", r.as_ref().err().unwrap());
                assert!(e.contains("generation"), "rank {rank}: {e}");
            }
            let e = format!("{:#}", out[0].as_ref().err().unwrap());
            assert!(e.contains("generation 4 (this rank is in 3)"), "{e}");
        });
    }

    /// A fake predecessor that sends `hello` to rank 0 of a two-rank ring
    /// whose successor is a bare listener; returns rank 0's error.
    fn refused_by_rank0(hello: &[u8]) -> String {
        let (mut ls, addrs) = listeners(2);
        let l0 = ls.remove(0);
        let _fake_successor = ls.remove(0); // the kernel completes rank 0's connect
        let addr0 = addrs[0].clone();
        let hello = hello.to_vec();
        let fake = thread::spawn(move || {
            let mut s = TcpStream::connect(&addr0).unwrap();
            s.write_all(&hello).unwrap();
            let mut answer = [0u8; HELLO_BYTES];
            let _ = s.read_exact(&mut answer);
            answer
        });
        let e = RingCollective::<f32>::connect_with_token(0, 2, l0, &addrs, GENERATION, CONNECT, TOKEN).err().unwrap();
        let answer = fake.join().unwrap();
        // Rank 0 answered with its own identity before refusing.
        let h = Hello::decode(&answer).unwrap();
        assert_eq!((h.world_size, h.generation, h.from, h.to), (2, GENERATION, 0, 1));
        format!("{e:#}")
    }

    #[test]
    fn bad_magic_is_refused() {
        within(30, || {
            let mut junk = [b'x'; HELLO_BYTES];
            junk[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
            let e = refused_by_rank0(&junk);
            assert!(e.contains("not a Tessera ring peer"), "{e}");
        });
    }

    #[test]
    fn handshake_mismatch_names_every_difference() {
        within(30, || {
            let h = Hello {
                version: PROTOCOL_VERSION + 1,
                world_size: 3,
                generation: GENERATION,
                from: 2,
                to: 0,
                features: LOCAL_FEATURES,
                nonce: [7; NONCE_BYTES],
            };
            let e = refused_by_rank0(&h.encode());
            for part in [
                &format!("protocol version {} (this rank speaks {PROTOCOL_VERSION})", PROTOCOL_VERSION + 1),
                "world size 3 (this rank has 2)",
                "sender rank 2 (expected rank 1)",
                "rank 0",
            ] {
                assert!(e.contains(part), "missing {part:?} in: {e}");
            }
            assert!(!e.contains("generation 7 ("), "{e}");
        });
    }

    #[test]
    fn an_older_version_is_named_not_waited_for() {
        within(30, || {
            // A version 1 hello: the 48-byte head alone, no nonce.
            let h = Hello {
                version: 1,
                world_size: 2,
                generation: GENERATION,
                from: 1,
                to: 0,
                features: 0,
                nonce: [0; NONCE_BYTES],
            };
            let e = refused_by_rank0(&h.encode()[..HELLO_HEAD_BYTES]);
            assert!(e.contains(&format!("protocol version 1 (this rank speaks {PROTOCOL_VERSION})")), "{e}");
        });
    }

    #[test]
    fn ranks_starting_in_any_order_connect() {
        within(120, || {
            let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
            for order in orders {
                let (ls, addrs) = listeners(3);
                let out: Vec<Result<RingCollective<f32>>> = thread::scope(|s| {
                    let hs: Vec<_> = ls
                        .into_iter()
                        .enumerate()
                        .map(|(rank, l)| {
                            let addrs = &addrs;
                            let delay = 60 * order.iter().position(|&r| r == rank).unwrap() as u64;
                            s.spawn(move || {
                                thread::sleep(Duration::from_millis(delay));
                                RingCollective::connect_with_token(rank, 3, l, addrs, GENERATION, CONNECT, TOKEN)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let rings = out.into_iter().map(|r| r.unwrap_or_else(|e| panic!("order {order:?}: {e:#}"))).collect();
                let sums = on_all(rings, |c| {
                    let mut u = [1u64 << c.rank()];
                    c.all_reduce_sum_u64(&mut u).unwrap();
                    u[0]
                });
                assert!(sums.iter().all(|(_, u)| *u == 7), "order {order:?}");
            }
        });
    }

    #[test]
    fn unreachable_successor_times_out_naming_it() {
        within(30, || {
            let (mut ls, mut addrs) = listeners(2);
            drop(ls.remove(1));
            // Nobody listens there any more.
            addrs[1] = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            };
            let start = Instant::now();
            let e = RingCollective::<f32>::connect(0, 2, ls.remove(0), &addrs, 0, Duration::from_millis(300))
                .err()
                .unwrap();
            let e = format!("{e:#}");
            assert!(start.elapsed() < Duration::from_secs(5));
            assert!(e.contains(&format!("rank 1 (successor, {})", addrs[1])), "{e}");
        });
    }

    #[test]
    fn missing_predecessor_times_out_naming_it() {
        within(30, || {
            let (mut ls, addrs) = listeners(2);
            let l0 = ls.remove(0);
            let _fake_successor = ls.remove(0);
            let e = RingCollective::<f32>::connect(0, 2, l0, &addrs, 0, Duration::from_millis(300)).err().unwrap();
            let e = format!("{e:#}");
            assert!(e.contains("rank 1 (predecessor") && e.contains("did not connect"), "{e}");
        });
    }
}
