//! A shared-memory byte stream for a ring link between two ranks on one host
//! (Linux).
//!
//! A Unix socket copies every byte twice (sender into the kernel, kernel into
//! the receiver) and costs a socket-buffer allocation and often a wakeup per
//! few hundred KiB. Here the writing rank copies its bytes once into a ring
//! buffer in shared memory and the reading rank uses them straight from
//! there: the reduce-scatter adds from the shared ring into the caller's
//! buffer, the all-gather copies out of it once.
//!
//! The ring lives in an anonymous `memfd` created by the writer and passed
//! to the reader over the link's Unix socket (`SCM_RIGHTS`); both map it and
//! close the descriptor at once. There is no file to clean up: the kernel
//! frees the memory when the last mapping goes, whether the ranks drop the
//! ring, abort or die.
//!
//! Positions are two monotonic byte counters in the shared page: `head`
//! (bytes written, advanced only by the writer) and `tail` (bytes consumed,
//! advanced only by the reader). A side that must wait (the reader for data,
//! the writer for space) never spins: it stores the counter value it needs in
//! its `want` word, checks the counter once more, and blocks in `read()` on
//! the Unix socket. The other side, after advancing its counter, wakes it by
//! writing one byte to the socket if the wanted value is reached. Both use
//! sequentially consistent operations, so either the waiter sees the new
//! counter or the other side sees the wanted value (no lost wakeup); a stale
//! wake byte only causes one spurious check. The socket thus carries only
//! wake bytes, and it keeps its role for failures: shutting it down (an
//! abort, a failed rank) or closing it (a dead process) makes a blocked
//! `read()` return, so an error still goes round the ring and nobody hangs,
//! and the socket's read/write timeouts bound every wait.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes before the data: one cache line each for `head`, the reader's
/// `want`, `tail` and the writer's `want`, so the two processes do not
/// write to the same line.
const HEADER_BYTES: usize = 4096;
const HEAD_AT: usize = 0;
const READER_WANT_AT: usize = 64;
const TAIL_AT: usize = 128;
const WRITER_WANT_AT: usize = 192;
/// Default ring size. A few segments: enough that the writer rarely waits
/// for the reader, small enough to stay in the last-level cache.
pub(super) const DEFAULT_RING_BYTES: usize = 2 << 20;
/// The smallest and largest ring a reader accepts.
const MIN_RING_BYTES: usize = 64;
const MAX_RING_BYTES: usize = 1 << 30;
/// The writer publishes (advances `head`) at least every this many bytes, so
/// the reader can start on a segment before all of it is copied; the reader
/// frees space at least as often.
const PUBLISH_BYTES: usize = 128 * 1024;

/// A shared mapping of a ring's memfd.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory that lives until `drop`; which thread
// touches which bytes when is governed by `Writer`/`Reader` (one thread
// writes through a `Writer`, one reads through a `Reader`, in turn with the
// calls of the owning collective).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and nothing
        // borrows the mapping any more (its owner is being dropped).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

fn last_os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Mapping {
    fn map(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of a descriptor we own; the kernel
        // picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_os_error("mapping the shared ring failed"));
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }
}

/// The shared ring as either end sees it.
struct Ring {
    map: Mapping,
    /// Data bytes (after the header).
    cap: usize,
}

impl Ring {
    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is a multiple of 64 inside the header page, so the
        // address is aligned for u64 and in the mapping, which lives as long
        // as `self`. Both processes only ever access these words atomically.
        unsafe { &*self.map.ptr.add(at).cast::<AtomicU64>() }
    }
    fn head(&self) -> &AtomicU64 {
        self.word(HEAD_AT)
    }
    fn tail(&self) -> &AtomicU64 {
        self.word(TAIL_AT)
    }
    fn reader_want(&self) -> &AtomicU64 {
        self.word(READER_WANT_AT)
    }
    fn writer_want(&self) -> &AtomicU64 {
        self.word(WRITER_WANT_AT)
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the mapping is HEADER_BYTES + cap long.
        unsafe { self.map.ptr.add(HEADER_BYTES) }
    }
}

/// Blocks until `counter >= target`, sleeping in `read()` on `sock` (see the
/// module docs). Returns the counter's value.
fn wait(mut sock: impl Read, counter: &AtomicU64, want: &AtomicU64, target: u64) -> io::Result<u64> {
    loop {
        let v = counter.load(Ordering::SeqCst);
        if v >= target {
            return Ok(v);
        }
        want.store(target, Ordering::SeqCst);
        let v = counter.load(Ordering::SeqCst);
        if v >= target {
            // The other side may have taken the want and sent a byte anyway:
            // a stale byte, drained by a later wait.
            want.store(0, Ordering::SeqCst);
            return Ok(v);
        }
        // Drains stale wake bytes too; the loop checks the counter again.
        match sock.read(&mut [0u8; 16]) {
            Ok(0) => {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "the peer closed the link (shared-memory wait)"))
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Advances `counter` to `value` and wakes the other side if it waits for
/// that much.
fn publish(mut sock: impl Write, counter: &AtomicU64, want: &AtomicU64, value: u64) -> io::Result<()> {
    counter.store(value, Ordering::SeqCst);
    let w = want.load(Ordering::SeqCst);
    if w != 0 && value >= w && want.compare_exchange(w, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        sock.write_all(&[1])?;
    }
    Ok(())
}

/// The writing end of a link's shared ring.
pub(super) struct Writer {
    ring: Ring,
    /// The memfd until the offer is sent (`take_fd`).
    fd: Option<OwnedFd>,
}

impl Writer {
    /// Creates a zeroed ring of `cap` data bytes in a new memfd; `name`
    /// shows in /proc/PID/maps.
    pub(super) fn create(cap: usize, name: &str) -> io::Result<Writer> {
        if !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&cap) {
            return Err(io::Error::new(ErrorKind::InvalidInput, format!("ring size {cap} is out of range")));
        }
        let cname = std::ffi::CString::new(name).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid C string; the result is checked.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(last_os_error("memfd_create failed"));
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = HEADER_BYTES + cap;
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(last_os_error("sizing the shared ring failed"));
        }
        let map = Mapping::map(&fd, len)?;
        Ok(Writer { ring: Ring { map, cap }, fd: Some(fd) })
    }

    pub(super) fn capacity(&self) -> usize {
        self.ring.cap
    }

    /// The descriptor to hand to the reader; the writer keeps only its
    /// mapping.
    pub(super) fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// Appends `bytes` to the stream, waiting for space as needed; `sock`
    /// is the link's socket (for waits and wakeups).
    pub(super) fn write_all<S: Read + Write>(&self, mut sock: S, mut bytes: &[u8]) -> io::Result<()> {
        let r = &self.ring;
        let cap = r.cap as u64;
        // Only this end advances head.
        let mut head = r.head().load(Ordering::Relaxed);
        while !bytes.is_empty() {
            // Wait for a quarter of the ring (or all that is left to write),
            // not for one byte, so that a full ring costs few wakeups.
            let need = bytes.len().min(r.cap / 4).max(1) as u64;
            // Saturating: a peer that wrote nonsense into the shared words
            // can garble the data, but not make this end panic or leave
            // the mapping.
            let space = |tail: u64| cap.saturating_sub(head.saturating_sub(tail));
            let mut tail = r.tail().load(Ordering::SeqCst);
            if space(tail) < need {
                tail = wait(&mut sock, r.tail(), r.writer_want(), (head + need).saturating_sub(cap))?;
            }
            let at = (head % cap) as usize;
            let k = bytes.len().min(space(tail) as usize).min(r.cap - at).min(PUBLISH_BYTES);
            // SAFETY: [at, at + k) lies in the data area and is free: the
            // reader has consumed it (tail) and does not touch it until head
            // passes it, which happens below after the copy.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.data().add(at), k) };
            head += k as u64;
            publish(&mut sock, r.head(), r.reader_want(), head)?;
            bytes = &bytes[k..];
        }
        Ok(())
    }
}

/// The reading end of a link's shared ring.
pub(super) struct Reader {
    ring: Ring,
}

impl Reader {
    /// Maps the ring the writer offered; checks its size.
    pub(super) fn open(fd: OwnedFd, cap: usize) -> io::Result<Reader> {
        if !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&cap) {
            return Err(io::Error::new(ErrorKind::InvalidData, format!("offered ring size {cap} is out of range")));
        }
        // SAFETY: fstat on our descriptor into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(last_os_error("fstat of the offered ring failed"));
        }
        let len = HEADER_BYTES + cap;
        if st.st_size as u64 != len as u64 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("the offered ring has {} bytes, expected {len}", st.st_size),
            ));
        }
        let map = Mapping::map(&fd, len)?;
        Ok(Reader { ring: Ring { map, cap } })
    }

    /// Consumes the next `len` bytes of the stream, handing them to `f` in
    /// pieces (in order, straight from shared memory; a piece may end inside
    /// an element), waiting for data as needed.
    pub(super) fn read_with<S: Read + Write>(
        &self,
        mut sock: S,
        mut len: usize,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        let r = &self.ring;
        let cap = r.cap as u64;
        // Only this end advances tail.
        let mut tail = r.tail().load(Ordering::Relaxed);
        while len > 0 {
            let need = len.min(r.cap / 4).max(1) as u64;
            let mut head = r.head().load(Ordering::SeqCst);
            if head.saturating_sub(tail) < need {
                head = wait(&mut sock, r.head(), r.reader_want(), tail + need)?;
            }
            let at = (tail % cap) as usize;
            let k = len.min(head.saturating_sub(tail) as usize).min(r.cap - at).min(PUBLISH_BYTES);
            // SAFETY: [at, at + k) lies in the data area and holds published
            // bytes (below head) that the writer does not touch until tail
            // passes them, which happens below after `f`.
            f(unsafe { std::slice::from_raw_parts(r.data().add(at), k) });
            tail += k as u64;
            publish(&mut sock, r.tail(), r.writer_want(), tail)?;
            len -= k;
        }
        Ok(())
    }

    /// Consumes exactly `buf.len()` bytes into `buf`.
    pub(super) fn read_exact<S: Read + Write>(&self, sock: S, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        self.read_with(sock, buf.len(), |piece| {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        })
    }
}

/// Sends `bytes` on `sock`, with `fd` attached (`SCM_RIGHTS`) if given.
pub(super) fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    const FD_BYTES: u32 = std::mem::size_of::<libc::c_int>() as u32;
    // Aligned space for one control message with one descriptor.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: a zeroed msghdr is valid (no name, no control) and is filled
    // below with pointers that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: `control` has room for CMSG_SPACE(one int) bytes (64 >=
        // 24), is 8-byte aligned as cmsghdr needs, and CMSG_FIRSTHDR of a
        // msghdr with that control buffer points at its start.
        unsafe {
            let space = libc::CMSG_SPACE(FD_BYTES) as usize;
            debug_assert!(space <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(FD_BYTES) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        }
    }
    let sent = loop {
        // SAFETY: `msg` and everything it points to are valid for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // The descriptor went with the first byte; the rest (never, in practice,
    // for these few bytes) as plain data.
    let mut s = sock;
    s.write_all(&bytes[sent..])
}

/// Receives exactly `buf.len()` bytes from `sock` and the descriptor that
/// came with them, if any.
pub(super) fn recv_with_fd(sock: &UnixStream, buf: &mut [u8]) -> io::Result<Option<OwnedFd>> {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as in `send_with_fd`; recvmsg fills `buf` and `control`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let got = loop {
        // SAFETY: `msg` and everything it points to are valid for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if got == 0 && !buf.is_empty() {
        return Err(io::Error::new(ErrorKind::UnexpectedEof, "the peer closed the connection"));
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
    // well-formed control messages; CMSG_FIRSTHDR/NXTHDR walk them and
    // return null at the end; SCM_RIGHTS data is an array of ints, read
    // unaligned, each a new descriptor now owned by this process.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(ErrorKind::InvalidData, "the peer sent more descriptors than expected"));
    }
    let mut s = sock;
    s.read_exact(&mut buf[got..])?;
    if fds.len() > 1 {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("the peer sent {} descriptors, expected 1", fds.len()),
        ));
    }
    Ok(fds.pop())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A writer and a reader in two threads, a ring far smaller than the
    /// stream and of a size that cuts elements: the bytes arrive intact.
    #[test]
    fn bytes_arrive_in_order_through_a_small_ring() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = Writer::create(1000, "tessera-ring-test").unwrap();
        let fd = w.take_fd().unwrap();
        let r = Reader::open(fd, w.capacity()).unwrap();
        let data: Vec<u8> = (0..300_007u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let t = thread::spawn(move || {
            for part in sent.chunks(4099) {
                w.write_all(&a, part).unwrap();
            }
        });
        let mut got = vec![0u8; data.len()];
        for part in got.chunks_mut(333) {
            r.read_exact(&b, part).unwrap();
        }
        t.join().unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn a_descriptor_travels_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = Writer::create(4096, "tessera-ring-test-fd").unwrap();
        let fd = w.take_fd().unwrap();
        send_with_fd(&a, b"hello", Some(fd.as_raw_fd())).unwrap();
        drop(fd);
        let mut buf = [0u8; 5];
        let got = recv_with_fd(&b, &mut buf).unwrap().unwrap();
        assert_eq!(&buf, b"hello");
        let r = Reader::open(got, 4096).unwrap();
        w.write_all(&a, b"shared").unwrap();
        let mut out = [0u8; 6];
        r.read_exact(&b, &mut out).unwrap();
        assert_eq!(&out, b"shared");
        // No descriptor: none comes out.
        send_with_fd(&a, b"x", None).unwrap();
        assert!(recv_with_fd(&b, &mut [0u8]).unwrap().is_none());
    }

    #[test]
    fn a_closed_peer_ends_a_wait() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = Writer::create(4096, "tessera-ring-test-eof").unwrap();
        let r = Reader::open(w.take_fd().unwrap(), 4096).unwrap();
        let t = thread::spawn(move || r.read_exact(&b, &mut [0u8; 10]));
        thread::sleep(std::time::Duration::from_millis(50));
        a.shutdown(std::net::Shutdown::Both).unwrap();
        let e = t.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
        drop(w);
    }
}
