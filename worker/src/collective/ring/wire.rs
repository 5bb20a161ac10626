//! The bytes on the wire: the hello that each end of a link sends first,
//! the header sent before every collective, and how elements are encoded,
//! decoded and summed. They live in one file so that a change of meaning on
//! the wire, and the bump of [`PROTOCOL_VERSION`] it needs, shows in one
//! place.

use crate::engine::cpu::Real;
use anyhow::{bail, Result};

/// First bytes of every handshake, so a stray connection (another program,
/// an old build) is refused by name instead of being read as data.
pub(super) const MAGIC: [u8; 8] = *b"TESSRING";
/// Bumped whenever the bytes on the wire change meaning. 2: the hello
/// carries a nonce and both ends prove the job token (step 4). 3: the call
/// header names the operation, and chunk c of an all-reduce starts at rank
/// c+1 (it started at rank c), so ranks of version 2 would sum the wrong
/// chunks together.
pub(super) const PROTOCOL_VERSION: u32 = 3;
/// Feature bit in [`Hello::features`]: the sender can move the link to a
/// Unix socket after the handshake. A peer without it (another OS, an older
/// build: the field was reserved and zero) keeps TCP.
pub(super) const FEATURE_UNIX: u32 = 1;
/// Feature bit: the sender can move the data of a Unix link into a shared
/// memory ring (step 6 of the handshake; needs [`FEATURE_UNIX`] too).
pub(super) const FEATURE_SHM: u32 = 2;
/// The features this build offers.
pub(super) const LOCAL_FEATURES: u32 = if cfg!(target_os = "linux") { FEATURE_UNIX | FEATURE_SHM } else { 0 };

/// A rank's identity as the peer at the other end checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    pub(super) version: u32,
    pub(super) world_size: u64,
    pub(super) generation: u64,
    /// The rank that sent this hello.
    pub(super) from: u64,
    /// The rank the sender believes it is talking to.
    pub(super) to: u64,
    /// Optional abilities ([`FEATURE_UNIX`]); not checked, only intersected.
    pub(super) features: u32,
    /// Fresh random bytes for this link, so that a token proof answers this
    /// handshake only and a recorded one cannot be replayed.
    pub(super) nonce: [u8; NONCE_BYTES],
}

/// The part of the hello that every protocol version shares, so a peer of
/// another version is read far enough to be named, not waited for.
pub(super) const HELLO_HEAD_BYTES: usize = 48;
pub(super) const NONCE_BYTES: usize = 32;
pub(super) const HELLO_BYTES: usize = HELLO_HEAD_BYTES + NONCE_BYTES;

impl Hello {
    pub(super) fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.features.to_le_bytes());
        b[16..24].copy_from_slice(&self.world_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..40].copy_from_slice(&self.from.to_le_bytes());
        b[40..48].copy_from_slice(&self.to.to_le_bytes());
        b[HELLO_HEAD_BYTES..].copy_from_slice(&self.nonce);
        b
    }

    pub(super) fn decode(b: &[u8; HELLO_BYTES]) -> Result<Hello> {
        if b[0..8] != MAGIC {
            bail!("it is not a Tessera ring peer (magic bytes {:02x?}, expected {:02x?})", &b[0..8], MAGIC);
        }
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(w)
        };
        Ok(Hello {
            version: u32_at(8),
            features: u32_at(12),
            world_size: u64_at(16),
            generation: u64_at(24),
            from: u64_at(32),
            to: u64_at(40),
            nonce: {
                let mut n = [0u8; NONCE_BYTES];
                n.copy_from_slice(&b[HELLO_HEAD_BYTES..]);
                n
            },
        })
    }

    /// Every field that differs from what this rank expects, in words.
    pub(super) fn check(&self, expected: &Hello) -> Result<()> {
        let mut diffs = Vec::new();
        if self.version != expected.version {
            diffs.push(format!("protocol version {} (this rank speaks {})", self.version, expected.version));
        }
        if self.world_size != expected.world_size {
            diffs.push(format!("world size {} (this rank has {})", self.world_size, expected.world_size));
        }
        if self.generation != expected.generation {
            diffs.push(format!("generation {} (this rank is in {})", self.generation, expected.generation));
        }
        if self.from != expected.from {
            diffs.push(format!("sender rank {} (expected rank {})", self.from, expected.from));
        }
        if self.to != expected.to {
            diffs.push(format!("addressed to rank {} (this is rank {})", self.to, expected.to));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            bail!("handshake mismatch: peer sent {}", diffs.join(", "))
        }
    }
}

/// Sent before every collective, so ranks that disagree about the call (a
/// different operation, length or element type, a skipped call) fail with a
/// message instead of summing unrelated bytes or waiting forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CallHeader {
    pub(super) seq: u64,
    pub(super) op: Phase,
    pub(super) kind: u8,
    pub(super) len: u64,
}

pub(super) const CALL_BYTES: usize = 24;
const CALL_TAG: u8 = b'C';

impl CallHeader {
    pub(super) fn encode(&self) -> [u8; CALL_BYTES] {
        let mut b = [0u8; CALL_BYTES];
        b[0] = CALL_TAG;
        b[1] = self.kind;
        b[2] = self.op as u8;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; CALL_BYTES]) -> Result<CallHeader> {
        if b[0] != CALL_TAG {
            bail!("the stream is out of step (call tag {:#04x}, expected {:#04x})", b[0], CALL_TAG);
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[16..24]);
        let op = match b[2] {
            0 => Phase::AllReduce,
            1 => Phase::ReduceScatter,
            2 => Phase::AllGather,
            code => bail!("unknown collective operation {code} in the call header"),
        };
        Ok(CallHeader { seq: u64::from_le_bytes(seq), op, kind: b[1], len: u64::from_le_bytes(len) })
    }
}

/// The operation of a call: which steps of the ring's all-reduce schedule
/// it runs (see `allreduce`). The value is its code in the call header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    /// Every rank ends with every sum.
    AllReduce = 0,
    /// Rank r ends with the sum of shard r.
    ReduceScatter = 1,
    /// Shard r of rank r reaches every rank.
    AllGather = 2,
}

impl Phase {
    pub(super) fn name(self) -> &'static str {
        match self {
            Phase::AllReduce => "an all-reduce",
            Phase::ReduceScatter => "a reduce-scatter",
            Phase::AllGather => "an all-gather",
        }
    }
}

pub(super) fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "f32",
        2 => "f64",
        3 => "u64",
        _ => "unknown",
    }
}

/// How elements go on the wire (little-endian) and are summed.
pub(super) trait Wire: Copy + Send + Sync + 'static {
    /// Element type code in the call header.
    const KIND: u8;
    const BYTES: usize;
    /// `dst` holds exactly `src.len() * BYTES` bytes.
    fn encode(src: &[Self], dst: &mut [u8]);
    /// `dst[i] = decode(src[i])`.
    fn decode(src: &[u8], dst: &mut [Self]);
    /// `dst[i] += decode(src[i])`; false if an exact sum overflowed.
    fn add_decoded(src: &[u8], dst: &mut [Self]) -> bool;
    /// True when the bytes of `Self` in memory are its wire bytes (f32, f64
    /// and u64 on little-endian targets), so segments can be written from
    /// and read into the caller's buffer without a copy.
    fn plain() -> bool;
}

/// The bytes of `s` in memory, when they are its wire bytes. Sending from
/// (and, below, receiving into) the caller's buffer saves a copy of every
/// byte sent and of half the bytes received; loopback TCP on a few cores is
/// bound by exactly such memory traffic.
pub(super) fn wire_bytes<E: Wire>(s: &[E]) -> Option<&[u8]> {
    if !E::plain() {
        return None;
    }
    // SAFETY: `plain` holds only for f32, f64 and u64 (checked by TypeId for
    // `Real`), which have no padding, so all `size_of_val(s)` bytes from the
    // start of `s` are initialized; u8 needs no alignment; the view borrows
    // `s`.
    Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) })
}

/// [`wire_bytes`] for receiving into `s`.
pub(super) fn wire_bytes_mut<E: Wire>(s: &mut [E]) -> Option<&mut [u8]> {
    if !E::plain() {
        return None;
    }
    // SAFETY: as in `wire_bytes`; moreover every bit pattern is a valid f32,
    // f64 or u64, so whatever is written through the view leaves valid
    // values, and the view holds the only (mutable) borrow of `s`.
    Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) })
}

/// `Real` has no byte conversion of its own. Its only types are f32 and f64,
/// and both round-trip exactly through f64, so the wire format goes through
/// `f64()`/`of()`; the compiler folds those conversions away.
impl<T: Real> Wire for T {
    const KIND: u8 = if Self::BYTES == 4 { 1 } else { 2 };
    const BYTES: usize = {
        let b = std::mem::size_of::<T>();
        assert!(b == 4 || b == 8, "the ring sends only 4-byte (f32) or 8-byte (f64) reals");
        b
    };

    #[inline]
    fn encode(src: &[T], dst: &mut [u8]) {
        if Self::BYTES == 4 {
            for (d, x) in dst.as_chunks_mut::<4>().0.iter_mut().zip(src) {
                *d = (x.f64() as f32).to_le_bytes();
            }
        } else {
            for (d, x) in dst.as_chunks_mut::<8>().0.iter_mut().zip(src) {
                *d = x.f64().to_le_bytes();
            }
        }
    }

    #[inline]
    fn decode(src: &[u8], dst: &mut [T]) {
        if Self::BYTES == 4 {
            for (x, b) in dst.iter_mut().zip(src.as_chunks::<4>().0) {
                *x = T::of(f32::from_le_bytes(*b) as f64);
            }
        } else {
            for (x, b) in dst.iter_mut().zip(src.as_chunks::<8>().0) {
                *x = T::of(f64::from_le_bytes(*b));
            }
        }
    }

    #[inline]
    fn add_decoded(src: &[u8], dst: &mut [T]) -> bool {
        if Self::BYTES == 4 {
            for (x, b) in dst.iter_mut().zip(src.as_chunks::<4>().0) {
                *x += T::of(f32::from_le_bytes(*b) as f64);
            }
        } else {
            for (x, b) in dst.iter_mut().zip(src.as_chunks::<8>().0) {
                *x += T::of(f64::from_le_bytes(*b));
            }
        }
        true
    }

    #[inline]
    fn plain() -> bool {
        use std::any::TypeId;
        let t = TypeId::of::<T>();
        cfg!(target_endian = "little") && (t == TypeId::of::<f32>() || t == TypeId::of::<f64>())
    }
}

impl Wire for u64 {
    const KIND: u8 = 3;
    const BYTES: usize = 8;

    fn encode(src: &[u64], dst: &mut [u8]) {
        for (d, x) in dst.as_chunks_mut::<8>().0.iter_mut().zip(src) {
            *d = x.to_le_bytes();
        }
    }

    fn decode(src: &[u8], dst: &mut [u64]) {
        for (x, b) in dst.iter_mut().zip(src.as_chunks::<8>().0) {
            *x = u64::from_le_bytes(*b);
        }
    }

    fn add_decoded(src: &[u8], dst: &mut [u64]) -> bool {
        let mut ok = true;
        for (x, b) in dst.iter_mut().zip(src.as_chunks::<8>().0) {
            let (sum, overflow) = x.overflowing_add(u64::from_le_bytes(*b));
            *x = sum;
            ok &= !overflow;
        }
        ok
    }

    fn plain() -> bool {
        cfg!(target_endian = "little")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copying wire path (taken on big-endian targets) agrees with the
    /// in-memory bytes the little-endian fast path sends.
    #[test]
    fn wire_encoding_is_little_endian() {
        fn check<E: Wire + std::fmt::Debug + PartialEq>(v: &[E], le: impl Fn(&E) -> Vec<u8>) {
            let mut bytes = vec![0u8; v.len() * E::BYTES];
            E::encode(v, &mut bytes);
            assert_eq!(bytes, v.iter().flat_map(le).collect::<Vec<u8>>());
            if E::plain() {
                assert_eq!(wire_bytes(v), Some(&bytes[..]));
            }
            let mut back = v.to_vec();
            back.reverse();
            E::decode(&bytes, &mut back);
            assert_eq!(back, v);
        }
        check(&[1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38], |x| x.to_le_bytes().to_vec());
        check(&[1.5f64, -0.0, f64::MIN_POSITIVE, 1e300], |x| x.to_le_bytes().to_vec());
        check(&[0u64, 1, u64::MAX, 1 << 40], |x| x.to_le_bytes().to_vec());
        assert!(f32::plain() && f64::plain() && u64::plain());

        let mut acc = [1.0f32, 2.0];
        let mut b = vec![0u8; 8];
        f32::encode(&[0.5, -2.0], &mut b);
        assert!(f32::add_decoded(&b, &mut acc));
        assert_eq!(acc, [1.5, 0.0]);
        let mut acc = [u64::MAX - 1, 7];
        let mut b = vec![0u8; 16];
        u64::encode(&[1, 2], &mut b);
        assert!(u64::add_decoded(&b, &mut acc));
        assert_eq!(acc, [u64::MAX, 9]);
        assert!(!u64::add_decoded(&b, &mut acc));
    }

    /// The call header carries every operation, and refuses a code it does
    /// not know.
    #[test]
    fn call_headers_round_trip() {
        for op in [Phase::AllReduce, Phase::ReduceScatter, Phase::AllGather] {
            let h = CallHeader { seq: 41, op, kind: 2, len: 1 << 40 };
            assert_eq!(CallHeader::decode(&h.encode()).unwrap(), h);
        }
        let mut b = CallHeader { seq: 0, op: Phase::AllGather, kind: 1, len: 3 }.encode();
        b[2] = 9;
        let e = CallHeader::decode(&b).unwrap_err().to_string();
        assert!(e.contains("unknown collective operation 9"), "{e}");
    }
}
