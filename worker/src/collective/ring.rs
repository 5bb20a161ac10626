//! The CPU collective: a ring all-reduce over TCP (on one host: Unix sockets
//! and shared memory).
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
//! another generation or in a later handshake. Each end checks the peer's
//! proof in constant time, and a peer that sends a wrong proof (another
//! token, or none) is refused on both ends with an error saying that the job
//! token does not match. The proofs travel over TCP, before any move to a
//! Unix socket or shared memory. This keeps out anyone who can reach a
//! rank's port without the token; it does not encrypt the gradients.
//!
//! On Linux, two neighbours in the same network namespace (in practice: on
//! the same host) then move their link to a Unix domain socket, offered by
//! the accepting rank under a random abstract name and claimed with a random
//! token sent over the checked TCP connection (step 5 of the handshake). A
//! Unix socket moves the same bytes with the same two copies but skips the
//! TCP/IP stack, a large part of loopback TCP's cost (docs/BENCHMARKS.md).
//! Peers on other hosts, or an upgrade that fails, keep the TCP connection.
//!
//! On such a Unix link the data then moves through shared memory (step 6,
//! [`super::shm`]): the writing rank creates a ring buffer in a memfd and
//! passes it over the socket; from then on it copies its bytes once into the
//! ring and the reading rank adds (reduce-scatter) or copies (all-gather)
//! straight from it, while the socket carries only one-byte wakeups for a
//! side that waits. The bytes of the stream, and so the results, are those of
//! the socket path; a link where the memfd cannot be made or mapped keeps
//! the Unix socket.
//!
//! Every rank holds two connections: one it opened to its successor
//! (`rank + 1`), on which it only writes, and one it accepted from its
//! predecessor (`rank - 1`), on which it only reads. An all-reduce is a
//! reduce-scatter followed by an all-gather, 2(n-1) steps over n chunks of the
//! buffer, and each chunk travels in segments so that a rank forwards the first
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
//! Reduction order: chunk `c` is summed as `((x[c] + x[c+1]) + ...) + x[c-1]`
//! (rank indices mod n; chunk c starts at rank c and ends complete at rank
//! c-1) in every call, and the all-gather copies the final
//! bits to every rank, so results repeat bit for bit and agree on all ranks.
//! The order does not depend on the segment size: the bytes on each link are
//! the same whatever the segmentation, which may even differ between ranks.
//!
//! Failure: any error (a dead or aborted peer, a mismatched call) shuts down
//! both sockets of the rank that saw it. Its neighbours then fail their next
//! read or write, so the error goes round the ring and no rank stays blocked.
//! On a shared-memory link every wait is a blocking read on the socket, so
//! the same shutdown (or a dead peer's closed socket) ends it.
//! The collective is then broken for good; recovery builds a new one with the
//! next generation.

use super::Collective;
use crate::engine::cpu::Real;
use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::marker::PhantomData;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
#[cfg(target_os = "linux")]
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// First bytes of every handshake, so a stray connection (another program,
/// an old build) is refused by name instead of being read as data.
const MAGIC: [u8; 8] = *b"TESSRING";
/// Bumped whenever the bytes on the wire change meaning. 2: the hello
/// carries a nonce and both ends prove the job token (step 4).
const PROTOCOL_VERSION: u32 = 2;
/// Feature bit in [`Hello::features`]: the sender can move the link to a
/// Unix socket after the handshake. A peer without it (another OS, an older
/// build: the field was reserved and zero) keeps TCP.
const FEATURE_UNIX: u32 = 1;
/// Feature bit: the sender can move the data of a Unix link into a shared
/// memory ring (step 6 of the handshake; needs [`FEATURE_UNIX`] too).
const FEATURE_SHM: u32 = 2;
/// The features this build offers.
const LOCAL_FEATURES: u32 = if cfg!(target_os = "linux") { FEATURE_UNIX | FEATURE_SHM } else { 0 };
/// Default segment size. Large enough that per-segment overhead (a channel
/// hop, a syscall) is small against the copy, small enough that the pipeline
/// fills quickly and both scratch buffers stay in L2/L3.
pub const DEFAULT_SEGMENT_BYTES: usize = 512 * 1024;

/// The fastest link a ring may use between two ranks on one host. Ranks on
/// different hosts always use TCP; so does every link on systems other than
/// Linux. The default, [`RingCollective::connect`], is `Shm`; the others are
/// for comparison (the benchmark) and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// Stay on the TCP connection of the handshake.
    Tcp,
    /// Move to a Unix domain socket.
    Unix,
    /// Move to a Unix domain socket, and the data to a shared-memory ring.
    Shm,
}

impl Transport {
    fn features(self) -> u32 {
        LOCAL_FEATURES
            & match self {
                Transport::Tcp => 0,
                Transport::Unix => FEATURE_UNIX,
                Transport::Shm => FEATURE_UNIX | FEATURE_SHM,
            }
    }
}

/// Link options fixed at connect time.
#[derive(Clone, Copy, Debug)]
struct LinkOptions {
    max: Transport,
    /// Size of the shared ring this rank creates for its successor.
    ring_bytes: usize,
}

/// A rank's identity as the peer at the other end checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    version: u32,
    world_size: u64,
    generation: u64,
    /// The rank that sent this hello.
    from: u64,
    /// The rank the sender believes it is talking to.
    to: u64,
    /// Optional abilities ([`FEATURE_UNIX`]); not checked, only intersected.
    features: u32,
    /// Fresh random bytes for this link, so that a token proof answers this
    /// handshake only and a recorded one cannot be replayed.
    nonce: [u8; NONCE_BYTES],
}

/// The part of the hello that every protocol version shares, so a peer of
/// another version is read far enough to be named, not waited for.
const HELLO_HEAD_BYTES: usize = 48;
const NONCE_BYTES: usize = 32;
const HELLO_BYTES: usize = HELLO_HEAD_BYTES + NONCE_BYTES;

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
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

    fn decode(b: &[u8; HELLO_BYTES]) -> Result<Hello> {
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
    fn check(&self, expected: &Hello) -> Result<()> {
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
/// different length or element type, a skipped call) fail with a message
/// instead of summing unrelated bytes or waiting forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CallHeader {
    seq: u64,
    kind: u8,
    len: u64,
}

const CALL_BYTES: usize = 24;
const CALL_TAG: u8 = b'C';

impl CallHeader {
    fn encode(&self) -> [u8; CALL_BYTES] {
        let mut b = [0u8; CALL_BYTES];
        b[0] = CALL_TAG;
        b[1] = self.kind;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; CALL_BYTES]) -> Result<CallHeader> {
        if b[0] != CALL_TAG {
            bail!("the stream is out of step (call tag {:#04x}, expected {:#04x})", b[0], CALL_TAG);
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[16..24]);
        Ok(CallHeader { seq: u64::from_le_bytes(seq), kind: b[1], len: u64::from_le_bytes(len) })
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "f32",
        2 => "f64",
        3 => "u64",
        _ => "unknown",
    }
}

/// How elements go on the wire (little-endian) and are summed.
trait Wire: Copy + Send + Sync + 'static {
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
fn wire_bytes<E: Wire>(s: &[E]) -> Option<&[u8]> {
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
fn wire_bytes_mut<E: Wire>(s: &mut [E]) -> Option<&mut [u8]> {
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

/// One link of the ring: the TCP connection of the handshake, or the Unix
/// socket it was moved to.
enum Stream {
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Unix(UnixStream),
}

impl Stream {
    fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// True if the peer has already closed this link (a read would return
    /// end of file or an error at once). Only for error messages of a call
    /// that is failing anyway: it may consume a byte.
    fn closed_now(&self) -> bool {
        let nonblocking = |on: bool| match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.set_nonblocking(on),
        };
        if nonblocking(true).is_err() {
            return false;
        }
        let closed = match (&*self).read(&mut [0u8]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        };
        let _ = nonblocking(false);
        closed
    }

    fn kind(&self) -> &'static str {
        match self {
            Stream::Tcp(_) => "tcp",
            #[cfg(target_os = "linux")]
            Stream::Unix(_) => "unix",
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The two sockets of a rank with more than one rank in its job.
struct Links {
    /// Opened by this rank; carries data to the successor.
    next: Stream,
    /// Accepted by this rank; carries data from the predecessor.
    prev: Stream,
    /// "rank R (successor, host:port)", for error messages.
    next_name: String,
    prev_name: String,
    /// The shared ring to the successor, written by this rank; `next` then
    /// carries only wakeups.
    #[cfg(target_os = "linux")]
    next_shm: Option<super::shm::Writer>,
    /// The shared ring from the predecessor, read by this rank.
    #[cfg(target_os = "linux")]
    prev_shm: Option<super::shm::Reader>,
}

impl Links {
    /// Appends `bytes` to the stream to the successor.
    fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(w) = &self.next_shm {
            return w.write_all(&self.next, bytes);
        }
        (&self.next).write_all(bytes)
    }

    /// Reads the next `buf.len()` bytes from the predecessor.
    fn recv_exact(&self, buf: &mut [u8]) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(r) = &self.prev_shm {
            return r.read_exact(&self.prev, buf);
        }
        (&self.prev).read_exact(buf)
    }

    /// Hands the next `len` bytes from the predecessor to `f`, in pieces
    /// that may end inside an element: straight from the shared ring, or
    /// read into `scratch` (which holds at least `len` bytes) in one piece.
    fn recv_with(&self, len: usize, scratch: &mut [u8], mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(r) = &self.prev_shm {
            return r.read_with(&self.prev, len, f);
        }
        let bytes = &mut scratch[..len];
        (&self.prev).read_exact(bytes)?;
        f(bytes);
        Ok(())
    }

    /// "tcp", "unix" or "shm" for the two links.
    fn kinds(&self) -> (&'static str, &'static str) {
        #[cfg(target_os = "linux")]
        let (next_shm, prev_shm) = (self.next_shm.is_some(), self.prev_shm.is_some());
        #[cfg(not(target_os = "linux"))]
        let (next_shm, prev_shm) = (false, false);
        let kind = |s: &Stream, shm: bool| if shm { "shm" } else { s.kind() };
        (kind(&self.next, next_shm), kind(&self.prev, prev_shm))
    }
}

/// Receives `len` bytes from the predecessor and adds them, decoded, into
/// `seg` (`len == seg.len() * E::BYTES`). False if an exact sum overflowed.
fn recv_add<E: Wire>(links: &Links, seg: &mut [E], scratch: &mut [u8]) -> std::io::Result<bool> {
    let mut ok = true;
    let mut done = 0usize;
    // An element cut by a piece boundary (the shared ring wraps at any byte).
    let mut carry = [0u8; 8];
    let mut carried = 0usize;
    links.recv_with(seg.len() * E::BYTES, scratch, |mut piece| {
        if carried > 0 {
            let take = (E::BYTES - carried).min(piece.len());
            carry[carried..carried + take].copy_from_slice(&piece[..take]);
            carried += take;
            piece = &piece[take..];
            if carried < E::BYTES {
                return;
            }
            ok &= E::add_decoded(&carry[..E::BYTES], &mut seg[done..done + 1]);
            done += 1;
            carried = 0;
        }
        let whole = piece.len() / E::BYTES;
        ok &= E::add_decoded(&piece[..whole * E::BYTES], &mut seg[done..done + whole]);
        done += whole;
        let rest = &piece[whole * E::BYTES..];
        carry[..rest.len()].copy_from_slice(rest);
        carried = rest.len();
    })?;
    Ok(ok)
}

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

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A read timeout that is never zero (std refuses a zero timeout).
fn read_timeout(deadline: Instant) -> Duration {
    remaining(deadline).max(Duration::from_millis(1))
}

/// Connects to `addr`, retrying with backoff until `deadline`: the peer may
/// not have bound its listener yet, or its name may not resolve yet.
fn connect_with_retry(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last_error = match addr.to_socket_addrs() {
            Err(e) => format!("cannot resolve the address: {e}"),
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                let mut last = format!("{addr} resolves to no address");
                for a in addrs {
                    let budget = remaining(deadline).clamp(Duration::from_millis(10), Duration::from_secs(5));
                    match TcpStream::connect_timeout(&a, budget) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = format!("{a}: {e}"),
                    }
                }
                last
            }
        };
        let left = remaining(deadline);
        if left.is_zero() {
            bail!("could not connect to {what} after {attempts} attempts; last error: {last_error}");
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Accepts one connection before `deadline` (std has no accept timeout, so
/// the listener is polled in non-blocking mode).
fn accept_until(listener: &TcpListener, deadline: Instant, what: &str) -> Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).context("cannot make the listener non-blocking")?;
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                // Some platforms let accepted sockets inherit O_NONBLOCK.
                s.set_nonblocking(false).with_context(|| format!("cannot make the connection from {a} blocking"))?;
                return Ok((s, a));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) =>
            {
                let left = remaining(deadline);
                if left.is_zero() {
                    bail!("{what} did not connect to this rank's listener {local} in time");
                }
                std::thread::sleep(left.min(Duration::from_millis(5)));
            }
            Err(e) => return Err(e).with_context(|| format!("accepting on {local} (waiting for {what}) failed")),
        }
    }
}

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

/// Step 4: proving the job token. On each link both ends send
/// HMAC-SHA256(token, label, role, the connecting end's hello, the accepting
/// end's hello), the hellos as sent, so the proof binds both nonces, the
/// direction, world size, generation and both ranks: it answers this link
/// of this handshake only, and the role byte keeps a peer from reflecting a
/// proof back at its sender. The token itself never travels.
mod auth {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

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
            format!(
                "reading the token proof of {} failed (did it refuse this rank's job token? see its log)",
                peer.name
            )
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
}

/// Step 5 of the handshake: moving same-host links to Unix sockets.
mod upgrade {
    use super::*;

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
                    let (s, _) = listener
                        .accept()
                        .with_context(|| format!("accepting the Unix socket of {prev_name} failed"))?;
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
    #[cfg(target_os = "linux")]
    pub(super) fn to_shm(
        next: &Stream,
        prev: &Stream,
        (next_can, prev_can): (bool, bool),
        (rank, generation, ring_bytes): (usize, u64, usize),
        deadline: Instant,
        (next_name, prev_name): (&str, &str),
    ) -> Result<(Option<super::super::shm::Writer>, Option<super::super::shm::Reader>)> {
        use super::super::shm::{recv_with_fd, send_with_fd, Reader, Writer};
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
}

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
    /// share a network namespace (see the module docs). A world size of 1
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
        let ring_bytes = super::shm::DEFAULT_RING_BYTES;
        #[cfg(not(target_os = "linux"))]
        let ring_bytes = 0;
        let opts = LinkOptions { max, ring_bytes };
        Self::connect_opts(rank, world_size, listener, peers, generation, timeout, opts, token)
    }

    #[allow(clippy::too_many_arguments)]
    fn connect_opts(
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
            Some(Self::handshake(rank, world_size, &listener, peers, generation, deadline, opts, token)?)
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
    fn handshake(
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
            .and_then(|h| {
                h.check(&Hello { from: prev_rank as u64, to: rank as u64, ..me(prev_rank) }).map(|()| h.features)
            })
            .with_context(|| {
                format!("rank {rank}: the connection from {prev_addr} (expected: {prev_advertised}) was refused")
            })?;
        answer.with_context(|| format!("answering the handshake of {prev_name} failed"))?;

        // 3. The successor's answer.
        let hello_from_next = read_hello(&next, deadline).with_context(|| {
            format!("reading the handshake answer of {next_name} failed (did it refuse this rank? see its log)")
        })?;
        let next_features = Hello::decode(&hello_from_next)
            .and_then(|h| {
                h.check(&Hello { from: next_rank as u64, to: rank as u64, ..me(next_rank) }).map(|()| h.features)
            })
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
        self.reduce(buf, "all_reduce_sum")
    }

    fn reduce<E: Wire>(&mut self, buf: &mut [E], op: &str) -> Result<()> {
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
        let result = run_ring(
            links,
            Step { rank: self.rank, n: self.world_size, seq, seg_elems },
            buf,
            &mut self.recv_scratch,
            &mut self.send_scratch,
        );
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

/// The parameters of one collective call.
#[derive(Clone, Copy)]
struct Step {
    rank: usize,
    n: usize,
    seq: u64,
    seg_elems: usize,
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
fn run_ring<E: Wire>(
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

impl<T: Real> Collective for RingCollective<T> {
    type Buf = Vec<T>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut Vec<T>) -> Result<()> {
        self.reduce(buf.as_mut_slice(), "all_reduce_sum")
    }

    fn all_reduce_sum_u64(&mut self, values: &mut [u64]) -> Result<()> {
        self.reduce(values, "all_reduce_sum_u64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    const GENERATION: u64 = 7;
    const CONNECT: Duration = Duration::from_secs(20);

    /// Runs `f` on its own thread and fails the test if it takes longer than
    /// `secs`: a hang must fail the test, not stall the suite.
    fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> R {
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

    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
        let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        (ls, addrs)
    }

    /// The job token of the tests' rings, so that every test runs the proofs.
    const TOKEN: &[u8] = b"token-of-the-test-job";

    fn default_opts(n: usize) -> Vec<LinkOptions> {
        vec![LinkOptions { max: Transport::Shm, ring_bytes: DEFAULT_RING_BYTES }; n]
    }

    /// Connects n ranks, each on its own thread, rank i in `generations[i]`.
    fn connect_ring<T: Real>(generations: &[u64]) -> Vec<Result<RingCollective<T>>> {
        connect_ring_opts(generations, &default_opts(generations.len()))
    }

    /// Connects n ranks of one generation, rank i with `tokens[i]`.
    fn connect_ring_tokens<T: Real>(tokens: &[&[u8]]) -> Vec<Result<RingCollective<T>>> {
        let n = tokens.len();
        connect_ring_full(&vec![GENERATION; n], &default_opts(n), tokens)
    }

    #[cfg(target_os = "linux")]
    const DEFAULT_RING_BYTES: usize = super::super::shm::DEFAULT_RING_BYTES;
    #[cfg(not(target_os = "linux"))]
    const DEFAULT_RING_BYTES: usize = 0;

    /// [`connect_ring`] with link options per rank.
    fn connect_ring_opts<T: Real>(generations: &[u64], opts: &[LinkOptions]) -> Vec<Result<RingCollective<T>>> {
        connect_ring_full(generations, opts, &vec![TOKEN; generations.len()])
    }

    /// [`connect_ring`] with link options and a token per rank.
    fn connect_ring_full<T: Real>(
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
    fn kinds<T>(rings: &[RingCollective<T>]) -> Vec<(&'static str, &'static str)> {
        rings.iter().map(|c| c.shared.links.as_ref().unwrap().kinds()).collect()
    }

    fn ring<T: Real>(n: usize) -> Vec<RingCollective<T>> {
        connect_ring(&vec![GENERATION; n]).into_iter().map(|r| r.unwrap()).collect()
    }

    /// Runs `f` on every rank at once, one thread per rank.
    fn on_all<T: Real, R: Send>(
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
    fn value(rank: usize, i: usize) -> f64 {
        let h =
            (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let h = h ^ (h >> 29);
        let unit = (h.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 11) as f64 / (1u64 << 53) as f64;
        (unit - 0.5) * 10f64.powi((i % 7) as i32 - 3)
    }

    fn input<T: Real>(rank: usize, len: usize) -> Vec<T> {
        (0..len).map(|i| T::of(value(rank, i))).collect()
    }

    fn bits<T: Real>(v: &[T]) -> Vec<u64> {
        v.iter().map(|x| x.f64().to_bits()).collect()
    }

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
