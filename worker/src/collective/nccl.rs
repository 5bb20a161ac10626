//! NCCL collectives for GPU workers (built with `--features cuda`): the
//! all-reduce, and the reduce-scatter and all-gather of a sharded optimizer,
//! all three in place.
//!
//! Rank 0 creates the unique id; the coordinator hands it to every rank
//! with the generation (docs/DESIGN.md section 5), and each rank joins the
//! communicator with it. Reductions run on their own stream: the gradient
//! bucket's copies were queued on the compute stream, and the compute
//! thread recorded an event right after them (`Backend::mark_ready`), so
//! the NCCL stream waits for that event, not for the rest of backward, then
//! runs the collective in place; the calling thread (the all-reduce thread,
//! never the compute thread) waits for the NCCL stream, so a returned
//! bucket holds the results.
//!
//! A job of one GPU opens no NCCL at all: its collectives are the identity.
//!
//! Another thread (the heartbeat loop, on a shutdown or a dead peer) may
//! abort the communicator: a peer that died leaves NCCL waiting forever,
//! and `ncclCommAbort` is the one way to release it. So the communicator is
//! non-blocking (`blocking = 0`): init and every call return at once and
//! are polled with a deadline; the handle is used only under a lock that
//! the abort takes too (never a handle another thread destroyed), and a
//! collective that was aborted is an error, never a half-summed bucket.

use super::nccl_lib::{self, Comm, Config, Nccl, UniqueId, NCCL_IN_PROGRESS, NCCL_SUCCESS};
use super::{check_shardable, shard_range, Collective};
use crate::engine::cuda::{Buf, Cuda, Event, Storage};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use std::ffi::{c_int, c_void};
#[cfg(test)]
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes in an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Creates the id rank 0 sends to the coordinator; a job of one GPU needs
/// none (and so no NCCL).
pub fn new_unique_id(world_size: usize) -> Result<Vec<u8>> {
    if world_size <= 1 {
        return Ok(Vec::new());
    }
    let nccl = nccl_lib::load().map_err(|e| anyhow!(e))?;
    let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: `id` is a live ncclUniqueId.
    let r = unsafe { (nccl.get_unique_id)(&mut id) };
    if r != NCCL_SUCCESS {
        bail!("NCCL ({}) cannot create a unique id: {}", nccl.path.display(), nccl.error(r));
    }
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The in-place collectives issued here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::ReduceScatter => "reduce-scatter",
            Op::AllGather => "all-gather",
        }
    }
}

/// One in-place collective: `len` values of NCCL type `ty`, `size` bytes
/// each, at device address `ptr`.
#[derive(Clone, Copy)]
struct InPlace {
    op: Op,
    ptr: u64,
    len: usize,
    ty: c_int,
    size: usize,
}

/// The communicator handle, taken out exactly once by `abort` or drop.
struct Communicator {
    nccl: &'static Nccl,
    raw: Mutex<Option<SendComm>>,
    aborted: AtomicBool,
    /// This rank and the world size, which place its shard.
    rank: usize,
    world_size: usize,
}

struct SendComm(Comm);
// SAFETY: an NCCL communicator may be used from any thread; this program
// issues calls from one thread at a time (the mutex) and may abort from
// another, which NCCL documents as the way to tear down a hung one.
unsafe impl Send for SendComm {}

impl Communicator {
    /// Runs `f` with the live handle, under the lock the abort takes.
    fn with<T>(&self, f: impl FnOnce(Comm) -> T) -> Result<T> {
        match self.raw.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(c) if !self.aborted.load(Ordering::SeqCst) => Ok(f(c.0)),
            _ => bail!("the NCCL communicator was aborted (a shutdown, or a rank of the job failed)"),
        }
    }

    /// The communicator's state: success, in progress, or its error.
    fn state(&self) -> Result<c_int> {
        let nccl = self.nccl;
        self.with(|c| {
            let mut state = NCCL_SUCCESS;
            // SAFETY: `c` is live (held under the lock).
            let r = unsafe { (nccl.comm_get_async_error)(c, &mut state) };
            if r != NCCL_SUCCESS {
                r
            } else {
                state
            }
        })
    }

    /// Polls until the last call finished, failed, was aborted or `deadline` passed.
    fn settle(&self, what: &str, deadline: Instant) -> Result<()> {
        loop {
            match self.state()? {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
                NCCL_IN_PROGRESS => bail!("{what} did not finish in time"),
                r => bail!("{what} failed: {}", self.nccl.error(r)),
            }
        }
    }

    /// Issues `call` on `stream` under the abort lock, and waits until NCCL
    /// has taken it (a non-blocking call may still be queueing). In place as
    /// NCCL defines it: a reduce-scatter writes its result into this rank's
    /// shard of the buffer (recvbuff = sendbuff + rank * recvcount), an
    /// all-gather sends from it (sendbuff = recvbuff + rank * sendcount).
    fn enqueue(&self, call: InPlace, stream: *mut c_void) -> Result<()> {
        let InPlace { op, ptr, len, ty, size } = call;
        let nccl = self.nccl;
        let shard = shard_range(len, self.world_size, self.rank);
        let own = ptr + (shard.start * size) as u64;
        let (all, count) = (ptr as *mut c_void, shard.len());
        let r = self.with(|c| {
            // SAFETY: `ptr` holds `len` values of `ty` on this communicator's
            // GPU, and `own` is this rank's shard inside them; `c` is live
            // under the lock.
            unsafe {
                match op {
                    Op::AllReduce => (nccl.all_reduce)(all, all, len, ty, nccl_lib::NCCL_SUM, c, stream),
                    Op::ReduceScatter => {
                        (nccl.reduce_scatter)(all, own as *mut _, count, ty, nccl_lib::NCCL_SUM, c, stream)
                    }
                    Op::AllGather => (nccl.all_gather)(own as *const _, all, count, ty, c, stream),
                }
            }
        })?;
        if r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS {
            bail!("NCCL {} of {len} values failed: {}", op.name(), nccl.error(r));
        }
        self.settle(&format!("NCCL {} of {len} values", op.name()), Instant::now() + Duration::from_secs(600))
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(c) = self.raw.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the handle came from ncclCommInitRankConfig and is aborted once.
            let r = unsafe { (self.nccl.comm_abort)(c.0) };
            if r != NCCL_SUCCESS {
                tracing::warn!(error = %self.nccl.error(r), "ncclCommAbort failed");
            }
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Aborts the communicator from another thread (a shutdown or a dead peer).
#[derive(Clone)]
pub struct NcclAbortHandle(Option<Arc<Communicator>>);

impl NcclAbortHandle {
    pub fn abort(&self) {
        if let Some(c) = &self.0 {
            c.abort();
        }
    }
}

/// What a job of several GPUs holds: the communicator and NCCL's stream.
struct Group {
    comm: Arc<Communicator>,
    /// The backend's compute stream, which produced the buffers.
    compute: Arc<CudaStream>,
    /// NCCL's own stream, so reductions overlap backward.
    stream: Arc<CudaStream>,
    /// A small device buffer for the step's counters.
    counts: CudaSlice<u64>,
}

pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    /// None for a job of one GPU.
    group: Option<Group>,
}

impl NcclCollective {
    /// Joins the communicator of `world_size` ranks named by `unique_id`.
    /// Init is non-blocking and given up after `timeout` (a rank that never
    /// comes), with the communicator aborted, so nothing is left hanging.
    pub fn connect(cu: &Cuda, rank: usize, world_size: usize, unique_id: &[u8], timeout: Duration) -> Result<Self> {
        if world_size <= 1 {
            tracing::info!(rank, "one GPU: no NCCL communicator");
            return Ok(NcclCollective { rank, world_size, group: None });
        }
        if unique_id.len() != UNIQUE_ID_BYTES {
            bail!("the NCCL unique id from the coordinator has {} bytes, expected {UNIQUE_ID_BYTES}", unique_id.len());
        }
        let Some(gpu) = cu.gpu() else {
            bail!("NCCL needs a real GPU: the emulated CUDA device runs jobs of one rank only (NCCL is not emulated)");
        };
        let nccl = nccl_lib::load().map_err(|e| anyhow!(e))?;
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (d, &s) in id.internal.iter_mut().zip(unique_id) {
            *d = s as std::ffi::c_char;
        }
        let compute = gpu.stream().clone();
        let stream = compute.context().new_stream().map_err(|e| anyhow!("cannot create the NCCL stream: {e:?}"))?;
        compute.context().bind_to_thread().map_err(|e| anyhow!("cannot bind the CUDA context: {e:?}"))?;
        let mut raw: Comm = std::ptr::null_mut();
        let mut config = Config::new(false);
        // SAFETY: `raw` receives the communicator; the id is 128 bytes; the
        // config is NCCL_CONFIG_INITIALIZER's layout with blocking = 0.
        let r = unsafe { (nccl.comm_init_rank_config)(&mut raw, world_size as c_int, id, rank as c_int, &mut config) };
        if (r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS) || raw.is_null() {
            bail!("NCCL init of rank {rank} of {world_size} failed: {}", nccl.error(r));
        }
        let comm = Arc::new(Communicator {
            nccl,
            raw: Mutex::new(Some(SendComm(raw))),
            aborted: AtomicBool::new(false),
            rank,
            world_size,
        });
        if let Err(e) = comm.settle(&format!("NCCL init of rank {rank} of {world_size}"), Instant::now() + timeout) {
            comm.abort();
            return Err(e.context(format!(
                "within {:.0} s: a rank is missing or cannot be reached (NCCL_SOCKET_IFNAME and NCCL_DEBUG=INFO help \
                 find out which)",
                timeout.as_secs_f64()
            )));
        }
        let counts = stream.alloc_zeros::<u64>(16).map_err(|e| anyhow!("cannot allocate NCCL counters: {e:?}"))?;
        tracing::info!(rank, world_size, nccl = %nccl.path.display(), "NCCL communicator ready");
        Ok(NcclCollective { rank, world_size, group: Some(Group { comm, compute, stream, counts }) })
    }

    pub fn abort_handle(&self) -> NcclAbortHandle {
        NcclAbortHandle(self.group.as_ref().map(|g| g.comm.clone()))
    }
}

impl Group {
    /// Runs `call` on the NCCL stream; returns once its results are there,
    /// or with an error when the communicator failed or was aborted
    /// meanwhile (the buffer then holds partial results and must not be
    /// used).
    fn run(&self, call: InPlace) -> Result<()> {
        self.comm.enqueue(call, self.stream.cu_stream() as *mut _)?;
        self.wait_stream(call.op, call.len)
    }

    /// Waits for the NCCL stream, watching for an abort or a failed peer.
    fn wait_stream(&self, op: Op, len: usize) -> Result<()> {
        let op = op.name();
        loop {
            // SAFETY: the stream is live (held by self).
            let q = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match q {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => break,
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => bail!("waiting for the NCCL {op} of {len} values failed: {e:?}"),
            }
            match self.comm.state()? {
                NCCL_SUCCESS | NCCL_IN_PROGRESS => std::thread::sleep(Duration::from_micros(50)),
                r => bail!("NCCL {op} of {len} values failed: {}", self.comm.nccl.error(r)),
            }
        }
        // An abort racing the last poll: the results may be partial.
        if self.comm.aborted.load(Ordering::SeqCst) {
            bail!("the NCCL {op} of {len} values was aborted; its buffer holds partial results");
        }
        Ok(())
    }

    /// The NCCL stream waits for the ops that wrote `buf`: up to its ready
    /// event, or without one, for everything queued on the compute stream.
    fn after_compute(&self, buf: &Buf) -> Result<()> {
        let wait = |e: &cudarc::driver::CudaEvent| {
            self.stream.wait(e).map_err(|e| anyhow!("the NCCL stream cannot wait for compute: {e:?}"))
        };
        match &buf.ready {
            Some(Event::Gpu(ready)) => wait(ready),
            Some(Event::Host) => bail!("a buffer of the emulated device was handed to NCCL"),
            None => wait(&self.compute.record_event(None).map_err(|e| anyhow!("cannot record a CUDA event: {e:?}"))?),
        }
    }
}

impl Collective for NcclCollective {
    type Buf = Buf;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut Buf) -> Result<()> {
        self.in_place(buf, Op::AllReduce)
    }

    fn all_reduce_sum_u64(&mut self, values: &mut [u64]) -> Result<()> {
        let Some(g) = &mut self.group else { return Ok(()) };
        if values.len() > g.counts.len() {
            g.counts = g.stream.alloc_zeros::<u64>(values.len()).context("NCCL counters")?;
        }
        let stream = g.stream.clone();
        let ptr = {
            let mut view = g.counts.slice_mut(..values.len());
            stream.memcpy_htod(values, &mut view).map_err(|e| anyhow!("uploading counters: {e:?}"))?;
            let (ptr, synced) = view.device_ptr_mut(&stream);
            drop(synced);
            ptr
        };
        g.run(InPlace { op: Op::AllReduce, ptr, len: values.len(), ty: nccl_lib::NCCL_UINT64, size: 8 })?;
        stream.memcpy_dtoh(&g.counts.slice(..values.len()), values).map_err(|e| anyhow!("reading counters: {e:?}"))?;
        stream.synchronize().map_err(|e| anyhow!("reading counters: {e:?}"))
    }

    fn reduce_scatter_sum(&mut self, buf: &mut Buf) -> Result<()> {
        self.in_place(buf, Op::ReduceScatter)
    }

    fn all_gather(&mut self, buf: &mut Buf) -> Result<()> {
        self.in_place(buf, Op::AllGather)
    }
}

impl NcclCollective {
    /// `op` on a device buffer: on NCCL's stream, after the compute ops
    /// that wrote it. A length the shards do not tile is refused before
    /// NCCL sees the call (so the communicator stays usable).
    fn in_place(&mut self, buf: &mut Buf, op: Op) -> Result<()> {
        if op != Op::AllReduce {
            check_shardable(buf.len, self.world_size)
                .with_context(|| format!("rank {} of {}: NCCL {}", self.rank, self.world_size, op.name()))?;
        }
        let Some(g) = &self.group else { return Ok(()) };
        if buf.len == 0 {
            return Ok(());
        }
        g.after_compute(buf)?;
        // Gradient buckets are f32 state; a bf16 buffer sums in bf16.
        let ty = match buf.storage {
            Storage::F32 => nccl_lib::NCCL_FLOAT32,
            Storage::Bf16 => nccl_lib::NCCL_BFLOAT16,
        };
        let done = g.run(InPlace { op, ptr: buf.data.addr(), len: buf.len, ty, size: buf.storage.size() });
        if done.is_err() {
            // The caller drops the bucket on an error, which frees it on the
            // compute stream: NCCL must be done with it first.
            let _ = g.stream.synchronize();
        }
        done.with_context(|| format!("rank {} of {}", self.rank, self.world_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_char;
    use std::sync::atomic::AtomicUsize;

    // A stand-in NCCL whose communicators stay "in progress" (a peer that
    // never answers), except those on the list of completing ones. It
    // remembers which handles (fake addresses, one per test) were aborted,
    // counts calls made on them after that, and records each collective.
    static CALLS_AFTER_ABORT: AtomicUsize = AtomicUsize::new(0);
    static ABORTED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static COMPLETING: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static ISSUED: Mutex<Vec<Issued>> = Mutex::new(Vec::new());

    /// A collective as the stand-in saw it.
    #[derive(Debug, PartialEq)]
    struct Issued {
        comm: usize,
        name: &'static str,
        send: usize,
        recv: usize,
        count: usize,
    }

    fn aborted(c: Comm) -> bool {
        ABORTED.lock().unwrap().contains(&(c as usize))
    }

    fn issue(name: &'static str, send: *const c_void, recv: *mut c_void, count: usize, c: Comm) -> c_int {
        if aborted(c) {
            CALLS_AFTER_ABORT.fetch_add(1, Ordering::SeqCst);
        }
        let comm = c as usize;
        ISSUED.lock().unwrap().push(Issued { comm, name, send: send as usize, recv: recv as usize, count });
        NCCL_IN_PROGRESS
    }

    fn issued(comm: usize) -> Vec<Issued> {
        let mut all = ISSUED.lock().unwrap();
        let (mine, others) = std::mem::take(&mut *all).into_iter().partition(|i| i.comm == comm);
        *all = others;
        mine
    }

    unsafe extern "C" fn unique_id(_: *mut UniqueId) -> c_int {
        NCCL_SUCCESS
    }
    unsafe extern "C" fn init(_: *mut Comm, _: c_int, _: UniqueId, _: c_int, _: *mut Config) -> c_int {
        NCCL_IN_PROGRESS
    }
    unsafe extern "C" fn all_reduce(
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        _: c_int,
        _: c_int,
        c: Comm,
        _: *mut c_void,
    ) -> c_int {
        issue("all_reduce", send, recv, count, c)
    }
    unsafe extern "C" fn reduce_scatter(
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        _: c_int,
        _: c_int,
        c: Comm,
        _: *mut c_void,
    ) -> c_int {
        issue("reduce_scatter", send, recv, count, c)
    }
    unsafe extern "C" fn all_gather(
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        _: c_int,
        c: Comm,
        _: *mut c_void,
    ) -> c_int {
        issue("all_gather", send, recv, count, c)
    }
    unsafe extern "C" fn async_error(c: Comm, state: *mut c_int) -> c_int {
        if aborted(c) {
            CALLS_AFTER_ABORT.fetch_add(1, Ordering::SeqCst);
        }
        let done = COMPLETING.lock().unwrap().contains(&(c as usize));
        *state = if done { NCCL_SUCCESS } else { NCCL_IN_PROGRESS };
        NCCL_SUCCESS
    }
    unsafe extern "C" fn abort(c: Comm) -> c_int {
        ABORTED.lock().unwrap().push(c as usize);
        NCCL_SUCCESS
    }

    fn communicator(handle: usize) -> Communicator {
        Communicator {
            nccl: &STAND_IN,
            raw: Mutex::new(Some(SendComm(handle as Comm))),
            aborted: AtomicBool::new(false),
            rank: 2,
            world_size: 3,
        }
    }
    unsafe extern "C" fn error_string(_: c_int) -> *const c_char {
        c"stand-in error".as_ptr()
    }

    static STAND_IN: Nccl = Nccl {
        path: PathBuf::new(),
        get_unique_id: unique_id,
        comm_init_rank_config: init,
        all_reduce,
        reduce_scatter,
        all_gather,
        comm_get_async_error: async_error,
        comm_abort: abort,
        get_error_string: error_string,
        _lib: None,
    };

    /// Another thread aborts while a call is still in progress: the call
    /// returns an error (never "done" with partial sums), the handle is
    /// never used once aborted, and later calls are refused.
    #[test]
    fn an_abort_during_a_call_is_an_error_and_the_handle_is_not_used_after() {
        let comm = Arc::new(communicator(0x1000));
        let aborter = NcclAbortHandle(Some(comm.clone()));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            aborter.abort();
        });
        let started = Instant::now();
        let e = comm.settle("all-reduce", started + Duration::from_secs(30)).unwrap_err().to_string();
        t.join().unwrap();
        assert!(e.contains("aborted"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "the abort did not end the wait");
        assert_eq!(CALLS_AFTER_ABORT.load(Ordering::SeqCst), 0, "the aborted handle was used");
        assert!(comm.with(|_| ()).is_err());
        comm.abort(); // a second abort is a no-op
    }

    /// Each collective goes to its NCCL call in place, as NCCL defines it
    /// (here for rank 2 of 3): the reduce-scatter receives into and the
    /// all-gather sends from this rank's shard of the buffer.
    #[test]
    fn each_collective_is_issued_in_place() {
        let comm = communicator(0x3000);
        COMPLETING.lock().unwrap().push(0x3000);
        let at = 0x10_0000;
        for (op, size) in [(Op::AllReduce, 4), (Op::ReduceScatter, 4), (Op::AllGather, 4), (Op::ReduceScatter, 2)] {
            let call = InPlace { op, ptr: at as u64, len: 12, ty: nccl_lib::NCCL_FLOAT32, size };
            comm.enqueue(call, std::ptr::null_mut()).unwrap();
        }
        let i = |name, send, recv, count| Issued { comm: 0x3000, name, send, recv, count };
        let shard = at + 2 * 4 * 4;
        assert_eq!(
            issued(0x3000),
            [
                i("all_reduce", at, at, 12),
                i("reduce_scatter", at, shard, 4),
                i("all_gather", shard, at, 4),
                i("reduce_scatter", at, at + 2 * 4 * 2, 4),
            ]
        );
    }

    /// A reduce-scatter or all-gather in progress goes through the same
    /// abort-safe path as the all-reduce: an abort from another thread ends
    /// it with an error, and the aborted handle is never used again.
    #[test]
    fn an_abort_during_a_sharded_collective_is_an_error() {
        for (k, op) in [Op::ReduceScatter, Op::AllGather].into_iter().enumerate() {
            let handle = 0x4000 + k;
            let comm = Arc::new(communicator(handle));
            let aborter = NcclAbortHandle(Some(comm.clone()));
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                aborter.abort();
            });
            let call = InPlace { op, ptr: 0x20_0000, len: 6, ty: nccl_lib::NCCL_BFLOAT16, size: 2 };
            let started = Instant::now();
            let e = comm.enqueue(call, std::ptr::null_mut()).unwrap_err().to_string();
            t.join().unwrap();
            assert!(e.contains("aborted"), "{op:?}: {e}");
            assert!(started.elapsed() < Duration::from_secs(5), "{op:?}: the abort did not end the wait");
            let e = comm.enqueue(call, std::ptr::null_mut()).unwrap_err().to_string();
            assert!(e.contains("aborted"), "{op:?}: {e}");
            assert_eq!(issued(handle).len(), 1, "{op:?}: issued again after the abort");
            assert_eq!(CALLS_AFTER_ABORT.load(Ordering::SeqCst), 0, "{op:?}: the aborted handle was used");
        }
    }

    /// Init that never completes is given up at its deadline.
    #[test]
    fn a_call_that_never_completes_fails_at_its_deadline() {
        let comm = communicator(0x2000);
        let e = comm.settle("NCCL init", Instant::now() + Duration::from_millis(30)).unwrap_err().to_string();
        assert!(e.contains("did not finish in time"), "{e}");
        // Dropping it aborts it.
        drop(comm);
        assert!(aborted(0x2000 as Comm));
    }

    /// A job of one GPU makes no unique id, so it never opens NCCL.
    #[test]
    fn one_gpu_needs_no_nccl() {
        assert_eq!(new_unique_id(1).unwrap(), Vec::<u8>::new());
        if nccl_lib::load().is_err() {
            let e = new_unique_id(2).unwrap_err().to_string();
            assert!(e.contains("libnccl.so.2") && e.contains("pip install"), "{e}");
        }
    }

    /// On the emulated device a one-GPU collective needs nothing and its
    /// collectives are the identity; more ranks are refused (NCCL is not
    /// emulated).
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn the_emulated_device_runs_one_rank_and_refuses_more() {
        use crate::engine::backend::Backend;
        let cu = Cuda::emulated(crate::engine::cuda::MathMode::F32).unwrap();
        let mut one = NcclCollective::connect(&cu, 0, 1, &[], Duration::from_secs(1)).unwrap();
        let mut b = cu.upload(&[1.0, 2.0]);
        one.all_reduce_sum(&mut b).unwrap();
        one.reduce_scatter_sum(&mut b).unwrap();
        one.all_gather(&mut b).unwrap();
        assert_eq!(cu.download(&b), [1.0, 2.0]);
        one.abort_handle().abort();
        let e = NcclCollective::connect(&cu, 0, 2, &[0; UNIQUE_ID_BYTES], Duration::from_secs(1)).err().unwrap();
        assert!(e.to_string().contains("NCCL is not emulated"), "{e}");
    }
}
