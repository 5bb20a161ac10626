//! NCCL all-reduce for GPU workers (built with `--features cuda`).
//!
//! Rank 0 creates the unique id; the coordinator hands it to every rank
//! with the generation (docs/DESIGN.md section 5), and each rank joins the
//! communicator with it. Reductions run on their own stream: the gradient
//! bucket's copies were queued on the compute stream, and the compute
//! thread recorded an event right after them (`Backend::mark_ready`), so
//! the NCCL stream waits for that event, not for the rest of backward, then
//! sums in place; the calling thread (the all-reduce thread, never the
//! compute thread) waits for the NCCL stream, so a returned bucket holds
//! the sums.
//!
//! A job of one GPU opens no NCCL at all: its sums are the identity.
//!
//! Another thread (the heartbeat loop, on a shutdown or a dead peer) may
//! abort the communicator: a peer that died leaves NCCL waiting forever,
//! and `ncclCommAbort` is the one way to release it. So the communicator is
//! non-blocking (`blocking = 0`): init and every call return at once and
//! are polled with a deadline; the handle is used only under a lock that
//! the abort takes too (never a handle another thread destroyed), and a
//! reduction that was aborted is an error, never a half-summed bucket.

use super::nccl_lib::{self, Comm, Config, Nccl, UniqueId, NCCL_IN_PROGRESS, NCCL_SUCCESS};
use super::Collective;
use crate::engine::cuda::{Buf, Cuda, Event, Storage};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use std::ffi::c_int;
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

/// The communicator handle, taken out exactly once by `abort` or drop.
struct Communicator {
    nccl: &'static Nccl,
    raw: Mutex<Option<SendComm>>,
    aborted: AtomicBool,
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
        let comm =
            Arc::new(Communicator { nccl, raw: Mutex::new(Some(SendComm(raw))), aborted: AtomicBool::new(false) });
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
    /// In-place sum of `len` values of type `ty` at `ptr` on the NCCL
    /// stream; returns once the sums are there, or with an error when the
    /// communicator failed or was aborted meanwhile (the buffer then holds
    /// partial sums and must not be used).
    fn sum_in_place(&self, ptr: u64, len: usize, ty: c_int) -> Result<()> {
        let nccl = self.comm.nccl;
        let s = self.stream.cu_stream();
        let r = self.comm.with(|c| {
            // SAFETY: `ptr` holds `len` values of `ty` on this communicator's
            // GPU; `c` is live under the lock.
            unsafe { (nccl.all_reduce)(ptr as *const _, ptr as *mut _, len, ty, nccl_lib::NCCL_SUM, c, s as *mut _) }
        })?;
        if r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS {
            bail!("NCCL all-reduce of {len} values failed: {}", nccl.error(r));
        }
        // Enqueued (a non-blocking call may still be queueing).
        self.comm.settle(&format!("NCCL all-reduce of {len} values"), Instant::now() + Duration::from_secs(600))?;
        self.wait_stream(len)
    }

    /// Waits for the NCCL stream, watching for an abort or a failed peer.
    fn wait_stream(&self, len: usize) -> Result<()> {
        loop {
            // SAFETY: the stream is live (held by self).
            let q = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match q {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => break,
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => bail!("waiting for the NCCL all-reduce of {len} values failed: {e:?}"),
            }
            match self.comm.state()? {
                NCCL_SUCCESS | NCCL_IN_PROGRESS => std::thread::sleep(Duration::from_micros(50)),
                r => bail!("NCCL all-reduce of {len} values failed: {}", self.comm.nccl.error(r)),
            }
        }
        // An abort racing the last poll: the sums may be partial.
        if self.comm.aborted.load(Ordering::SeqCst) {
            bail!("the NCCL all-reduce of {len} values was aborted; its buffer holds partial sums");
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
        let summed = g.sum_in_place(buf.data.addr(), buf.len, ty);
        if summed.is_err() {
            // The caller drops the bucket on an error, which frees it on the
            // compute stream: NCCL must be done with it first.
            let _ = g.stream.synchronize();
        }
        summed
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
        g.sum_in_place(ptr, values.len(), nccl_lib::NCCL_UINT64)?;
        stream.memcpy_dtoh(&g.counts.slice(..values.len()), values).map_err(|e| anyhow!("reading counters: {e:?}"))?;
        stream.synchronize().map_err(|e| anyhow!("reading counters: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::{c_char, c_void};
    use std::sync::atomic::AtomicUsize;

    // A stand-in NCCL whose communicators stay "in progress" (a peer that
    // never answers). It remembers which handles (fake addresses, one per
    // test) were aborted, and counts calls made on them after that.
    static CALLS_AFTER_ABORT: AtomicUsize = AtomicUsize::new(0);
    static ABORTED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    fn aborted(c: Comm) -> bool {
        ABORTED.lock().unwrap().contains(&(c as usize))
    }

    unsafe extern "C" fn unique_id(_: *mut UniqueId) -> c_int {
        NCCL_SUCCESS
    }
    unsafe extern "C" fn init(_: *mut Comm, _: c_int, _: UniqueId, _: c_int, _: *mut Config) -> c_int {
        NCCL_IN_PROGRESS
    }
    unsafe extern "C" fn all_reduce(
        _: *const c_void,
        _: *mut c_void,
        _: usize,
        _: c_int,
        _: c_int,
        _: Comm,
        _: *mut c_void,
    ) -> c_int {
        NCCL_IN_PROGRESS
    }
    unsafe extern "C" fn async_error(c: Comm, state: *mut c_int) -> c_int {
        if aborted(c) {
            CALLS_AFTER_ABORT.fetch_add(1, Ordering::SeqCst);
        }
        *state = NCCL_IN_PROGRESS;
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

    /// On the emulated device a one-GPU collective needs nothing and sums
    /// as the identity; more ranks are refused (NCCL is not emulated).
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn the_emulated_device_runs_one_rank_and_refuses_more() {
        use crate::engine::backend::Backend;
        let cu = Cuda::emulated(crate::engine::cuda::MathMode::F32).unwrap();
        let mut one = NcclCollective::connect(&cu, 0, 1, &[], Duration::from_secs(1)).unwrap();
        let mut b = cu.upload(&[1.0, 2.0]);
        one.all_reduce_sum(&mut b).unwrap();
        assert_eq!(cu.download(&b), [1.0, 2.0]);
        one.abort_handle().abort();
        let e = NcclCollective::connect(&cu, 0, 2, &[0; UNIQUE_ID_BYTES], Duration::from_secs(1)).err().unwrap();
        assert!(e.to_string().contains("NCCL is not emulated"), "{e}");
    }
}
