//! The CUDA backend's state: one GPU, one compute stream, a cuBLAS handle
//! and every kernel of `kernels/*.cu`, compiled once at start with NVRTC
//! for the device's compute capability and kept as loaded functions.
//!
//! The Backend trait has no error channel (model code stays free of device
//! plumbing), so a failed launch, copy or GEMM is recorded here and the
//! first one is returned by `check()`, which the training loop calls at
//! every step boundary. Kernel faults surface there too, at the next sync.

use super::kernels::{self, Storage};
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How the backend computes: the cuBLAS compute type of f32 GEMMs
/// (matmul.rs), and in `Bf16` the storage type of activations too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MathMode {
    /// Full f32 (the reference for op parity at 1e-5).
    F32,
    /// TF32 tensor-core GEMMs: 10-bit mantissa inputs, f32 accumulate.
    Tf32,
    /// bf16 tensor-core GEMMs: inputs rounded to bf16 (8-bit mantissa),
    /// f32 accumulate. Twice TF32's tensor-core rate. Activations and the
    /// weights' compute copies are stored in bf16 too (half the memory
    /// traffic); master weights, gradients and AdamW state stay f32.
    Bf16,
}

impl MathMode {
    /// The lower-case name used in logs, `Backend::name` and bench JSON.
    pub fn name(self) -> &'static str {
        match self {
            MathMode::F32 => "f32",
            MathMode::Tf32 => "tf32",
            MathMode::Bf16 => "bf16",
        }
    }
}

pub struct Cuda {
    pub(super) ordinal: usize,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    pub(super) math: MathMode,
    /// The storage type of activations (bf16 in `MathMode::Bf16`).
    pub(super) storage: Storage,
    /// Every kernel of the f32 build, and of the bf16 build when the
    /// storage is bf16 (state buffers use the f32 build in any mode).
    funcs: HashMap<(Storage, &'static str), CudaFunction>,
    first_error: Mutex<Option<String>>,
    /// RoPE's cos/sin tables, built once (rope.rs).
    pub(super) rope_tables: Mutex<super::rope::RopeTables>,
    /// Streaming multiprocessors, to size grid-stride launches.
    pub(super) sms: u32,
}

/// Threads per block for elementwise and row kernels.
pub(super) const THREADS: u32 = 256;

impl Cuda {
    /// Opens GPU `ordinal`, compiles every kernel for it and creates the
    /// stream and cuBLAS handle. The libraries are probed first, so a
    /// machine without one is told which.
    pub fn new(ordinal: usize, math: MathMode) -> Result<Self> {
        let gpu = super::probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: cannot open the GPU: {e:?}"))?;
        // One compute stream, and the gradient stream of NCCL synchronized
        // with explicit events: cudarc's per-buffer event tracking would
        // only add two event calls to every launch.
        // SAFETY: called before any buffer of this context exists.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory_cached(&ctx, ordinal)?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("cuda:{ordinal}: cannot create a stream: {e:?}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuda:{ordinal}: cannot start cuBLAS: {e:?}"))?;
        // The handle stays in cuBLAS's default math: each GEMM names its
        // compute type (matmul.rs), so F32 mode is never silently TF32.
        let arch = arch_name(gpu.compute_capability)?;
        let storage = if math == MathMode::Bf16 { Storage::Bf16 } else { Storage::F32 };
        let builds: &[Storage] = if storage == Storage::F32 { &[Storage::F32] } else { &[Storage::F32, Storage::Bf16] };
        let mut funcs = HashMap::new();
        for &build in builds {
            for (name, src) in kernels::SOURCES {
                let ptx = kernels::compile(name, src, arch, build)?;
                let module = ctx
                    .load_module(ptx)
                    .map_err(|e| anyhow!("cuda:{ordinal}: cannot load {name}.cu ({build:?}): {e:?}"))?;
                for entry in kernels::entry_points(src) {
                    let f = module
                        .load_function(entry)
                        .map_err(|e| anyhow!("cuda:{ordinal}: {name}.cu has no kernel {entry}: {e:?}"))?;
                    funcs.insert((build, entry), f);
                }
            }
        }
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("cuda:{ordinal}: cannot read the SM count: {e:?}"))? as u32;
        tracing::info!(device = %format!("cuda:{ordinal}"), name = %gpu.name, arch, kernels = funcs.len(), ?math, "CUDA backend ready");
        Ok(Cuda {
            ordinal,
            ctx,
            stream,
            blas,
            math,
            storage,
            funcs,
            first_error: Mutex::new(None),
            rope_tables: Mutex::new(Default::default()),
            sms,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A loaded kernel by its `extern "C"` name, from the build whose act_t
    /// is `storage`.
    pub(super) fn func(&self, storage: Storage, name: &'static str) -> &CudaFunction {
        match self.funcs.get(&(storage, name)) {
            Some(f) => f,
            // Every name used in the Rust code is checked against the .cu
            // sources by a test, and a bf16 buffer exists only when the bf16
            // build is loaded, so this is a bug, not user input.
            None => panic!("no CUDA kernel named {name} for {storage:?} storage in kernels/*.cu"),
        }
    }

    /// Keeps the first device error for `check()`.
    pub(super) fn record<T, E: std::fmt::Debug>(&self, what: &str, r: std::result::Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    *first = Some(format!("cuda:{}: {what} failed: {e:?}", self.ordinal));
                }
                None
            }
        }
    }

    /// Waits for the stream and returns the first error since the last
    /// check, naming the op.
    pub fn check(&self) -> Result<()> {
        let synced = self.stream.synchronize();
        self.record("a kernel (reported at stream synchronize)", synced);
        if let Some(e) = self.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bail!(e);
        }
        Ok(())
    }

    /// The high-water mark of memory allocated from the device's pool
    /// (every buffer comes from there), or None where the device has no
    /// stream-ordered allocator.
    pub(super) fn pool_used_high(&self) -> Option<u64> {
        if !self.ctx.has_async_alloc() {
            return None;
        }
        use cudarc::driver::{result, sys::CUmemPool_attribute};
        let mut used: u64 = 0;
        // SAFETY: the device is the context's; USED_MEM_HIGH is a u64
        // attribute and `used` outlives the call.
        let read = unsafe {
            result::device::get_default_mem_pool(self.ctx.cu_device()).and_then(|pool| {
                result::mem_pool::get_attribute(
                    pool,
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut used as *mut u64).cast(),
                )
            })
        };
        self.record("reading the memory pool's high-water mark", read).map(|_| used)
    }

    /// A zero-filled device buffer. Out of memory is the one device error a
    /// config can cause (a batch too large for the card); it stops the
    /// worker with the size it asked for rather than run on with no buffer.
    pub(super) fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> CudaSlice<T> {
        match self.stream.alloc_zeros::<T>(len.max(1)) {
            Ok(b) => b,
            Err(e) => {
                let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
                panic!(
                    "cuda:{}: cannot allocate {:.1} MiB ({e:?}); {:.0} of {:.0} MiB free. Lower train.batch_size \
                     (more train.grad_accum keeps the global batch)",
                    self.ordinal,
                    (len * std::mem::size_of::<T>()) as f64 / (1 << 20) as f64,
                    free as f64 / (1 << 20) as f64,
                    total as f64 / (1 << 20) as f64
                )
            }
        }
    }

    /// A grid-stride launch over `n` elements: enough blocks to fill the
    /// GPU a few times over, never more than the work needs.
    pub(super) fn elems(&self, n: usize) -> LaunchConfig {
        let blocks = (n as u64).div_ceil(THREADS as u64).clamp(1, (self.sms as u64) * 32) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block of `threads` per row (reductions over a row).
    pub(super) fn rows(&self, rows: usize, threads: u32) -> LaunchConfig {
        assert!(rows < 1 << 31, "{rows} rows exceed a grid's x size (2^31 - 1 blocks)");
        LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }
}

/// cudarc allocates with `cuMemAllocAsync` from the device's default pool,
/// whose release threshold is 0: at every stream synchronize (one a step,
/// in `check()`) the pool hands its free memory back to the driver, and the
/// next step maps it again. A threshold of "never" makes the pool a caching
/// allocator, as PyTorch's is: a step's buffers come from memory the last
/// step freed. Devices without stream-ordered allocation free synchronously
/// and are left as they are.
fn keep_freed_memory_cached(ctx: &CudaContext, ordinal: usize) -> Result<()> {
    if !ctx.has_async_alloc() {
        tracing::warn!(device = %format!("cuda:{ordinal}"), "no stream-ordered allocator: every buffer is a cuMemAlloc");
        return Ok(());
    }
    use cudarc::driver::{result, sys::CUmemPool_attribute};
    let mut threshold = u64::MAX;
    // SAFETY: the device is the context's; the release threshold is a u64
    // attribute and `threshold` outlives the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(|e| anyhow!("cuda:{ordinal}: cannot get the default memory pool: {e:?}"))?;
        result::mem_pool::set_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| anyhow!("cuda:{ordinal}: cannot keep freed memory in the pool: {e:?}"))
    }
}

/// The NVRTC virtual architecture for a compute capability.
fn arch_name(cc: (i32, i32)) -> Result<&'static str> {
    Ok(match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (major, minor) if major >= 8 => {
            tracing::warn!(major, minor, "unknown compute capability; compiling the kernels for compute_80");
            "compute_80"
        }
        (major, minor) => {
            bail!("compute capability {major}.{minor} is too old: Tessera's kernels need 8.0 (A100) or newer")
        }
    })
}

/// Launches `$name` on the backend's stream with the given arguments; a
/// failed launch is recorded for `check()`. Every argument must be a
/// reference to a value that outlives the call (bind scalars to locals):
/// the launch keeps pointers to them until it is submitted. The kernel
/// comes from the build of the backend's storage type, or of `storage =
/// S` when given (elementwise ops on f32 state buffers in a bf16 backend).
macro_rules! launch {
    ($cu:expr, storage = $storage:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg;
        let cu: &$crate::engine::cuda::Cuda = $cu;
        let mut builder = cu.stream.launch_builder(cu.func($storage, $name));
        $( builder.arg($arg); )+
        // SAFETY: the kernel's parameter list matches these arguments (each
        // launcher sits beside its kernel's signature in the .cu file and
        // the device-check op tests run every one).
        let launched = unsafe { builder.launch($cfg) };
        cu.record($name, launched);
    }};
    ($cu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let cu: &$crate::engine::cuda::Cuda = $cu;
        launch!(cu, storage = cu.storage, $name, $cfg, $($arg),+)
    }};
}
pub(crate) use launch;
