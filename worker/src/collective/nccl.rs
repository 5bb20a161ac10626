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
//! The communicator is held behind an `Arc` so that another thread (the
//! heartbeat loop, on a shutdown) can abort it: a peer that died leaves
//! NCCL waiting forever, and `ncclCommAbort` is the one way to release it.

use super::Collective;
use crate::engine::cuda::Event;
use crate::engine::cuda::{Buf, Cuda, Storage};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaStream, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes in an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Creates the id rank 0 sends to the coordinator.
pub fn new_unique_id() -> Result<Vec<u8>> {
    let id = nccl::get_uniqueid().map_err(|e| anyhow!("NCCL cannot create a unique id: {e:?}"))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The communicator; aborted exactly once, by `abort` or on drop.
struct Communicator {
    raw: Mutex<Option<SendComm>>,
}

struct SendComm(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread; this program
// issues collectives from one thread and may abort from another, which
// NCCL documents as the way to tear down a hung communicator.
unsafe impl Send for SendComm {}

impl Communicator {
    fn get(&self) -> Result<sys::ncclComm_t> {
        match self.raw.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(c) => Ok(c.0),
            None => bail!("the NCCL communicator was aborted"),
        }
    }

    fn abort(&self) {
        if let Some(c) = self.raw.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the handle came from ncclCommInitRank and is aborted once.
            if let Err(e) = unsafe { nccl::comm_abort(c.0) } {
                tracing::warn!(error = ?e, "ncclCommAbort failed");
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
pub struct NcclAbortHandle(Arc<Communicator>);

impl NcclAbortHandle {
    pub fn abort(&self) {
        self.0.abort();
    }
}

pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    comm: Arc<Communicator>,
    /// The backend's compute stream, which produced the buffers.
    compute: Arc<CudaStream>,
    /// NCCL's own stream, so reductions overlap backward.
    stream: Arc<CudaStream>,
    /// A small device buffer for the step's counters.
    counts: cudarc::driver::CudaSlice<u64>,
}

impl NcclCollective {
    /// Joins the communicator of `world_size` ranks named by `unique_id`.
    /// `ncclCommInitRank` blocks until every rank has joined; a rank that
    /// never comes would hold this one forever, so the init runs on its own
    /// thread and is given up after `timeout` (the worker then exits with
    /// the reason, which also ends the stuck thread).
    pub fn connect(cu: &Cuda, rank: usize, world_size: usize, unique_id: &[u8], timeout: Duration) -> Result<Self> {
        if unique_id.len() != UNIQUE_ID_BYTES {
            bail!("the NCCL unique id from the coordinator has {} bytes, expected {UNIQUE_ID_BYTES}", unique_id.len());
        }
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(unique_id) {
            *d = s as std::ffi::c_char;
        }
        let Some(gpu) = cu.gpu() else {
            bail!("NCCL needs a real GPU: the emulated CUDA device runs jobs of one rank only (NCCL is not emulated)");
        };
        let compute = gpu.stream().clone();
        let stream = compute.context().new_stream().map_err(|e| anyhow!("cannot create the NCCL stream: {e:?}"))?;
        let ctx = compute.context().clone();
        let (done, joined) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nccl-init".into())
            .spawn(move || {
                let mut raw = std::mem::MaybeUninit::uninit();
                let r =
                    ctx.bind_to_thread().map_err(|e| format!("cannot bind the CUDA context: {e:?}")).and_then(|_| {
                        // SAFETY: `raw` receives the communicator; the id is 128 bytes.
                        unsafe {
                            nccl::comm_init_rank(
                                raw.as_mut_ptr(),
                                world_size as i32,
                                sys::ncclUniqueId { internal },
                                rank as i32,
                            )
                        }
                        .map_err(|e| format!("{e:?}"))
                        // SAFETY: initialized by the successful call.
                        .map(|_| SendComm(unsafe { raw.assume_init() }))
                    });
                let _ = done.send(r);
            })
            .context("cannot start the NCCL init thread")?;
        let raw = match joined.recv_timeout(timeout) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => bail!("NCCL init of rank {rank} of {world_size} failed: {e}"),
            Err(_) => bail!(
                "NCCL init of rank {rank} of {world_size} did not finish within {:.0} s: a rank is missing or cannot be \
                 reached (NCCL_SOCKET_IFNAME and NCCL_DEBUG=INFO help find out which)",
                timeout.as_secs_f64()
            ),
        };
        let comm = Arc::new(Communicator { raw: Mutex::new(Some(raw)) });
        let counts = stream.alloc_zeros::<u64>(16).map_err(|e| anyhow!("cannot allocate NCCL counters: {e:?}"))?;
        tracing::info!(rank, world_size, "NCCL communicator ready");
        Ok(NcclCollective { rank, world_size, comm, compute, stream, counts })
    }

    pub fn abort_handle(&self) -> NcclAbortHandle {
        NcclAbortHandle(self.comm.clone())
    }

    /// In-place sum of `len` values of type `ty` at `ptr` on the NCCL stream.
    fn sum_in_place(&self, ptr: cudarc::driver::sys::CUdeviceptr, len: usize, ty: sys::ncclDataType_t) -> Result<()> {
        let comm = self.comm.get()?;
        // SAFETY: `ptr` holds `len` values of `ty` on this communicator's GPU.
        unsafe {
            nccl::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                ty,
                sys::ncclRedOp_t::ncclSum,
                comm,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| anyhow!("NCCL all-reduce of {len} values failed: {e:?}"))?;
        self.stream.synchronize().map_err(|e| anyhow!("waiting for the NCCL all-reduce failed: {e:?}"))
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
        if buf.len == 0 {
            return Ok(());
        }
        self.after_compute(buf)?;
        // Gradient buckets are f32 state; a bf16 buffer sums in bf16.
        let ty = match buf.storage {
            Storage::F32 => sys::ncclDataType_t::ncclFloat32,
            Storage::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        };
        let summed = self.sum_in_place(buf.data.addr(), buf.len, ty);
        if summed.is_err() {
            // The caller drops the bucket on an error, which frees it on the
            // compute stream: NCCL must be done with it first.
            let _ = self.stream.synchronize();
        }
        summed
    }

    fn all_reduce_sum_u64(&mut self, values: &mut [u64]) -> Result<()> {
        if values.len() > self.counts.len() {
            self.counts = self.stream.alloc_zeros::<u64>(values.len()).context("NCCL counters")?;
        }
        let stream = self.stream.clone();
        let ptr = {
            let mut view = self.counts.slice_mut(..values.len());
            stream.memcpy_htod(values, &mut view).map_err(|e| anyhow!("uploading counters: {e:?}"))?;
            let (ptr, synced) = view.device_ptr_mut(&stream);
            drop(synced);
            ptr
        };
        self.sum_in_place(ptr, values.len(), sys::ncclDataType_t::ncclUint64)?;
        stream
            .memcpy_dtoh(&self.counts.slice(..values.len()), values)
            .map_err(|e| anyhow!("reading counters: {e:?}"))?;
        stream.synchronize().map_err(|e| anyhow!("reading counters: {e:?}"))
    }
}
