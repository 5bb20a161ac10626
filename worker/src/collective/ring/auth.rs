//! Step 4: proving the job token. On each link both ends send
//! HMAC-SHA256(token, label, role, the connecting end's hello, the accepting
//! end's hello), the hellos as sent, so the proof binds both nonces, the
//! direction, world size, generation and both ranks: it answers this link
//! of this handshake only, and the role byte keeps a peer from reflecting a
//! proof back at its sender. The token itself never travels.
//!
//! This keeps out anyone who can reach a rank's port without the token; it
//! does not encrypt the gradients. Each end checks the peer's proof in
//! constant time, and a peer that sends a wrong proof (another token, or
//! none) is refused on both ends with an error saying that the job token
//! does not match. The proofs travel over TCP, before any move to a Unix
//! socket or shared memory.

use super::link::read_timeout;
use super::wire::HELLO_BYTES;
use anyhow::{anyhow, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::net::TcpStream;
use std::time::Instant;

pub(super) const PROOF_BYTES: usize = 32;
const LABEL: &[u8] = b"tessera ring token proof\0";
/// Who sends the proof: the end that connected (the link's
/// predecessor) or the end that accepted (its successor).
pub(super) const BY_CONNECTOR: u8 = b'C';
pub(super) const BY_ACCEPTOR: u8 = b'A';

fn mac(
    token: &[u8],
    role: u8,
    connector_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
) -> Result<Hmac<Sha256>> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token)
        .map_err(|e| anyhow!("cannot key HMAC-SHA256 with the job token: {e}"))?;
    m.update(LABEL);
    m.update(&[role]);
    m.update(connector_hello);
    m.update(acceptor_hello);
    Ok(m)
}

pub(super) fn prove(
    token: &[u8],
    role: u8,
    connector_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
) -> Result<[u8; PROOF_BYTES]> {
    Ok(mac(token, role, connector_hello, acceptor_hello)?.finalize().into_bytes().into())
}

/// Whether `proof` is the one a holder of `token` sends; compared in
/// constant time (`verify_slice`), so timing tells nothing about it.
pub(super) fn holds_token(
    proof: &[u8; PROOF_BYTES],
    token: &[u8],
    role: u8,
    connector_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
) -> Result<bool> {
    Ok(mac(token, role, connector_hello, acceptor_hello)?.verify_slice(proof).is_ok())
}

pub(super) fn read_proof(mut s: &TcpStream, deadline: Instant) -> std::io::Result<[u8; PROOF_BYTES]> {
    s.set_read_timeout(Some(read_timeout(deadline)))?;
    let mut b = [0u8; PROOF_BYTES];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// The link end a proof is expected from, as this rank sees it.
pub(super) struct Peer<'a> {
    pub rank: usize,
    pub name: &'a str,
    pub token: &'a [u8],
    pub deadline: Instant,
}

/// Reads the peer's proof (sent by `role`) and refuses the link unless
/// it shows the peer holds the token.
pub(super) fn expect_proof(
    s: &TcpStream,
    peer: &Peer,
    role: u8,
    connector_hello: &[u8; HELLO_BYTES],
    acceptor_hello: &[u8; HELLO_BYTES],
) -> Result<()> {
    let got = read_proof(s, peer.deadline).with_context(|| {
        format!("reading the token proof of {} failed (did it refuse this rank's job token? see its log)", peer.name)
    })?;
    if !holds_token(&got, peer.token, role, connector_hello, acceptor_hello)? {
        return Err(mismatch(peer.rank, peer.name, peer.token));
    }
    Ok(())
}

/// The refusal, the same words on both ends of the link; it names
/// neither the token nor the proofs.
pub(super) fn mismatch(rank: usize, peer: &str, token: &[u8]) -> anyhow::Error {
    let own = if token.is_empty() { " (this rank has no job token)" } else { "" };
    anyhow!(
        "rank {rank}: the job token does not match: {peer} could not prove it holds this job's token{own}; \
         the link was refused before any gradient moved"
    )
}

#[cfg(test)]
mod tests {
    use super::super::auth;
    use super::super::testkit::*;
    use super::super::wire::{Hello, HELLO_BYTES, LOCAL_FEATURES, NONCE_BYTES, PROTOCOL_VERSION};
    use super::super::RingCollective;
    use crate::collective::Collective;
    use crate::engine::cpu::Real;
    use anyhow::Result;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::thread;
    use std::time::Duration;

    #[test]
    fn ranks_with_the_same_token_connect_and_sum() {
        within(60, || {
            let token: &[u8] = b"\x00\xffsecret of job 42";
            let rings: Vec<RingCollective<f32>> =
                connect_ring_tokens(&[token; 3]).into_iter().map(|r| r.unwrap()).collect();
            let out = on_all(rings, |c| {
                let mut v = input::<f32>(c.rank(), 1000);
                c.all_reduce_sum(&mut v).unwrap();
                let mut u = [c.rank() as u64 + 1];
                c.all_reduce_sum_u64(&mut u).unwrap();
                (v, u[0])
            });
            for (rank, (_, (v, u))) in out.iter().enumerate() {
                assert_eq!(*u, 6, "rank {rank}");
                for (i, g) in v.iter().enumerate() {
                    let exact: f64 = (0..3).map(|r| f32::of(value(r, i)).f64()).sum();
                    assert!((g.f64() - exact).abs() <= 1e-5 * (1.0 + exact.abs()), "rank {rank} i={i}: {g}");
                }
                assert_eq!(bits(v), bits(&out[0].1 .0), "rank {rank} differs from rank 0");
            }
        });
    }

    #[test]
    fn ranks_without_a_token_still_connect() {
        within(60, || {
            let (ls, addrs) = listeners(2);
            let out: Vec<Result<RingCollective<f64>>> = thread::scope(|s| {
                let hs: Vec<_> = ls
                    .into_iter()
                    .enumerate()
                    .map(|(rank, l)| {
                        let addrs = &addrs;
                        s.spawn(move || RingCollective::connect(rank, 2, l, addrs, GENERATION, CONNECT))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let out = on_all(out.into_iter().map(|r| r.unwrap()).collect(), |c| {
                let mut v = vec![c.rank() as f64 + 0.5];
                c.all_reduce_sum(&mut v).unwrap();
                v[0]
            });
            assert!(out.iter().all(|(_, v)| *v == 2.0));
        });
    }

    /// Asserts that every rank was refused for the token, and that no error
    /// shows the tokens.
    fn assert_token_refused<T>(out: &[Result<RingCollective<T>>], tokens: &[&[u8]]) {
        for (rank, r) in out.iter().enumerate() {
            let e = format!("{:#}", r.as_ref().err().unwrap_or_else(|| panic!("rank {rank} connected")));
            assert!(e.contains("job token does not match"), "rank {rank}: {e}");
            for t in tokens.iter().filter(|t| !t.is_empty()) {
                assert!(!e.contains(&*String::from_utf8_lossy(t)), "rank {rank} shows a token: {e}");
            }
        }
    }

    #[test]
    fn another_token_is_refused_on_both_sides() {
        within(60, || {
            // Rank 2 is a neighbour of both others, so every rank refuses.
            let tokens: [&[u8]; 3] = [b"token-AAAA", b"token-AAAA", b"token-BBBB"];
            let out = connect_ring_tokens::<f32>(&tokens);
            assert_token_refused(&out, &tokens);
            let e = format!("{:#}", out[0].as_ref().err().unwrap());
            assert!(e.contains("rank 0: the job token does not match: rank 2 (predecessor"), "{e}");
            let e = format!("{:#}", out[1].as_ref().err().unwrap());
            assert!(e.contains("rank 1: the job token does not match: rank 2 (successor"), "{e}");
        });
    }

    #[test]
    fn a_rank_without_the_token_is_refused() {
        within(60, || {
            let tokens: [&[u8]; 2] = [b"", b"token-AAAA"];
            let out = connect_ring_tokens::<f32>(&tokens);
            assert_token_refused(&out, &tokens);
            let e = format!("{:#}", out[0].as_ref().err().unwrap());
            assert!(e.contains("this rank has no job token"), "{e}");
        });
    }

    /// What a fake rank 1 does once both hellos of a two-rank ring are
    /// exchanged with the real rank 0.
    enum FakeProof {
        /// 32 random bytes on both links.
        Garbage,
        /// None: it ends its side of both links.
        Nothing,
    }

    /// Runs a real rank 0 (with [`TOKEN`]) against a fake rank 1 that sends
    /// well-formed hellos but no valid token proof. Returns rank 0's error
    /// and every byte the fake got after the hellos, per link.
    fn against_fake_rank1(proof: FakeProof) -> (String, Vec<u8>, Vec<u8>) {
        let (mut ls, addrs) = listeners(2);
        let (l0, l1) = (ls.remove(0), ls.remove(0));
        let addr0 = addrs[0].clone();
        let fake = thread::spawn(move || {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                world_size: 2,
                generation: GENERATION,
                from: 1,
                to: 0,
                features: LOCAL_FEATURES,
                nonce: rand::random(),
            };
            // As successor: rank 0 connects and says hello first.
            let (mut from0, _) = l1.accept().unwrap();
            let mut got = [0u8; HELLO_BYTES];
            from0.read_exact(&mut got).unwrap();
            from0.write_all(&hello.encode()).unwrap();
            // As predecessor.
            let mut to0 = TcpStream::connect(&addr0).unwrap();
            to0.write_all(&hello.encode()).unwrap();
            to0.read_exact(&mut got).unwrap();
            for s in [&from0, &to0] {
                match proof {
                    FakeProof::Garbage => (&*s).write_all(&rand::random::<[u8; auth::PROOF_BYTES]>()).unwrap(),
                    FakeProof::Nothing => s.shutdown(Shutdown::Write).unwrap(),
                }
            }
            let rest = |mut s: &TcpStream| {
                let mut b = Vec::new();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let _ = s.read_to_end(&mut b);
                b
            };
            (rest(&from0), rest(&to0))
        });
        let e = RingCollective::<f32>::connect_with_token(0, 2, l0, &addrs, GENERATION, CONNECT, TOKEN).err().unwrap();
        let (from0, to0) = fake.join().unwrap();
        (format!("{e:#}"), from0, to0)
    }

    #[test]
    fn a_peer_with_a_garbage_proof_gets_no_data() {
        within(60, || {
            let (e, from0, to0) = against_fake_rank1(FakeProof::Garbage);
            assert!(e.contains("rank 0: the job token does not match: rank 1"), "{e}");
            // Rank 0's own proofs, then nothing: no offer, no call, no gradient.
            assert_eq!((from0.len(), to0.len()), (auth::PROOF_BYTES, auth::PROOF_BYTES));
        });
    }

    #[test]
    fn a_peer_without_a_proof_gets_no_data() {
        within(60, || {
            let (e, from0, to0) = against_fake_rank1(FakeProof::Nothing);
            assert!(e.contains("reading the token proof of rank 1"), "{e}");
            assert!(from0.len() <= auth::PROOF_BYTES && to0.len() <= auth::PROOF_BYTES);
        });
    }

    #[test]
    fn a_proof_answers_one_link_of_one_handshake() {
        let hello = |from: u64, to: u64, generation: u64, nonce: u8| {
            Hello {
                version: PROTOCOL_VERSION,
                world_size: 2,
                generation,
                from,
                to,
                features: 0,
                nonce: [nonce; NONCE_BYTES],
            }
            .encode()
        };
        let (c, a) = (hello(0, 1, 3, 1), hello(1, 0, 3, 2));
        let proof = auth::prove(TOKEN, auth::BY_CONNECTOR, &c, &a).unwrap();
        let holds = |token: &[u8], role, c: &[u8; HELLO_BYTES], a: &[u8; HELLO_BYTES]| {
            auth::holds_token(&proof, token, role, c, a).unwrap()
        };
        assert!(holds(TOKEN, auth::BY_CONNECTOR, &c, &a));
        assert!(!holds(b"another token", auth::BY_CONNECTOR, &c, &a));
        assert!(!holds(b"", auth::BY_CONNECTOR, &c, &a));
        // Reflected back at its sender.
        assert!(!holds(TOKEN, auth::BY_ACCEPTOR, &c, &a));
        // The other link of the same two ranks, another generation, fresh nonces.
        assert!(!holds(TOKEN, auth::BY_CONNECTOR, &hello(1, 0, 3, 1), &hello(0, 1, 3, 2)));
        assert!(!holds(TOKEN, auth::BY_CONNECTOR, &hello(0, 1, 4, 1), &hello(1, 0, 4, 2)));
        assert!(!holds(TOKEN, auth::BY_CONNECTOR, &c, &hello(1, 0, 3, 9)));
        assert!(!holds(TOKEN, auth::BY_CONNECTOR, &hello(0, 1, 3, 9), &a));
    }
}
