//! The links of a rank: a [`Stream`] (the TCP connection of the handshake,
//! or the Unix socket it moved to), [`Links`] (a rank's two streams and the
//! shared rings that may carry their data), the [`Transport`] a caller may
//! cap them at, and opening TCP connections before a deadline. The
//! all-reduce reads and writes through `Links` only, so it never needs to
//! know which kind of link it runs on.

use super::wire::{Wire, FEATURE_SHM, FEATURE_UNIX, LOCAL_FEATURES};
#[cfg(target_os = "linux")]
use crate::collective::shm::{Reader, Writer};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
#[cfg(target_os = "linux")]
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The fastest link a ring may use between two ranks on one host. Ranks on
/// different hosts always use TCP; so does every link on systems other than
/// Linux. The default, [`RingCollective::connect`], is `Shm`; the others are
/// for comparison (the benchmark) and tests.
///
/// [`RingCollective::connect`]: super::RingCollective::connect
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
    pub(super) fn features(self) -> u32 {
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
pub(super) struct LinkOptions {
    pub(super) max: Transport,
    /// Size of the shared ring this rank creates for its successor.
    pub(super) ring_bytes: usize,
}

/// One link of the ring: the TCP connection of the handshake, or the Unix
/// socket it was moved to.
pub(super) enum Stream {
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Unix(UnixStream),
}

impl Stream {
    pub(super) fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            #[cfg(target_os = "linux")]
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// True if the peer has already closed this link (a read would return
    /// end of file or an error at once). Only for error messages of a call
    /// that is failing anyway: it may consume a byte.
    pub(super) fn closed_now(&self) -> bool {
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

    pub(super) fn kind(&self) -> &'static str {
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
pub(super) struct Links {
    /// Opened by this rank; carries data to the successor.
    pub(super) next: Stream,
    /// Accepted by this rank; carries data from the predecessor.
    pub(super) prev: Stream,
    /// "rank R (successor, host:port)", for error messages.
    pub(super) next_name: String,
    pub(super) prev_name: String,
    /// The shared ring to the successor, written by this rank; `next` then
    /// carries only wakeups.
    #[cfg(target_os = "linux")]
    pub(super) next_shm: Option<Writer>,
    /// The shared ring from the predecessor, read by this rank.
    #[cfg(target_os = "linux")]
    pub(super) prev_shm: Option<Reader>,
}

impl Links {
    /// Appends `bytes` to the stream to the successor.
    pub(super) fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(w) = &self.next_shm {
            return w.write_all(&self.next, bytes);
        }
        (&self.next).write_all(bytes)
    }

    /// Reads the next `buf.len()` bytes from the predecessor.
    pub(super) fn recv_exact(&self, buf: &mut [u8]) -> std::io::Result<()> {
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
    pub(super) fn kinds(&self) -> (&'static str, &'static str) {
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
pub(super) fn recv_add<E: Wire>(links: &Links, seg: &mut [E], scratch: &mut [u8]) -> std::io::Result<bool> {
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

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A read timeout that is never zero (std refuses a zero timeout).
pub(super) fn read_timeout(deadline: Instant) -> Duration {
    remaining(deadline).max(Duration::from_millis(1))
}

/// Connects to `addr`, retrying with backoff until `deadline`: the peer may
/// not have bound its listener yet, or its name may not resolve yet.
pub(super) fn connect_with_retry(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream> {
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
pub(super) fn accept_until(listener: &TcpListener, deadline: Instant, what: &str) -> Result<(TcpStream, SocketAddr)> {
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
