//! The CUDA backend's state: one GPU, one compute stream, a cuBLAS handle
//! and every kernel of `kernels/*.cu`, compiled once at start with NVRTC
//! for the device's compute capability and kept as loaded functions.
//!
//! The Backend trait has no error channel (model code stays free of device
//! plumbing), so a failed launch, copy or GEMM is recorded here and the
//! first one is returned by `check()`, which the training loop calls at
//! every step boundary. Kernel faults surface there too, at the next sync.

use super::kernels;
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How f32 GEMMs run on the tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MathMode {
    /// Full f32 (the reference for op parity at 1e-5).
    F32,
    /// TF32 tensor-core GEMMs: 10-bit mantissa inputs, f32 accumulate.
    Tf32,
}

pub struct Cuda {
    pub(super) ordinal: usize,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    pub(super) math: MathMode,
    funcs: HashMap<&'static str, CudaFunction>,
    first_error: Mutex<Option<String>>,
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
        let stream = ctx.new_stream().map_err(|e| anyhow!("cuda:{ordinal}: cannot create a stream: {e:?}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuda:{ordinal}: cannot start cuBLAS: {e:?}"))?;
        let mode = match math {
            MathMode::F32 => cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            MathMode::Tf32 => cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: the handle is alive; the mode is a valid enum value.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
            .result()
            .map_err(|e| anyhow!("cuda:{ordinal}: cannot set the cuBLAS math mode: {e:?}"))?;
        let arch = arch_name(gpu.compute_capability)?;
        let mut funcs = HashMap::new();
        for (name, src) in kernels::SOURCES {
            let ptx = kernels::compile(name, src, arch)?;
            let module = ctx.load_module(ptx).map_err(|e| anyhow!("cuda:{ordinal}: cannot load {name}.cu: {e:?}"))?;
            for entry in kernels::entry_points(src) {
                let f = module
                    .load_function(entry)
                    .map_err(|e| anyhow!("cuda:{ordinal}: {name}.cu has no kernel {entry}: {e:?}"))?;
                funcs.insert(entry, f);
            }
        }
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("cuda:{ordinal}: cannot read the SM count: {e:?}"))? as u32;
        tracing::info!(device = %format!("cuda:{ordinal}"), name = %gpu.name, arch, kernels = funcs.len(), ?math, "CUDA backend ready");
        Ok(Cuda { ordinal, ctx, stream, blas, math, funcs, first_error: Mutex::new(None), sms })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A loaded kernel by its `extern "C"` name.
    pub(super) fn func(&self, name: &str) -> &CudaFunction {
        match self.funcs.get(name) {
            Some(f) => f,
            // Every name used in the Rust code is checked against the .cu
            // sources by a test, so this is a bug, not user input.
            None => panic!("no CUDA kernel named {name} in kernels/*.cu"),
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
        LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
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
/// the launch keeps pointers to them until it is submitted.
macro_rules! launch {
    ($cu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg;
        let cu: &$crate::engine::cuda::Cuda = $cu;
        let mut builder = cu.stream.launch_builder(cu.func($name));
        $( builder.arg($arg); )+
        // SAFETY: the kernel's parameter list matches these arguments (each
        // launcher sits beside its kernel's signature in the .cu file and
        // the device-check op tests run every one).
        let launched = unsafe { builder.launch($cfg) };
        cu.record($name, launched);
    }};
}
pub(crate) use launch;
