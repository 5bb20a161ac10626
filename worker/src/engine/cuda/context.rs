//! The CUDA backend's state: a driver (the GPU, or the emulated device),
//! the math mode and storage type, and the first device error.
//!
//! The Backend trait has no error channel (model code stays free of device
//! plumbing), so a failed launch, copy or GEMM is recorded here and the
//! first one is returned by `check()`, which the training loop calls at
//! every step boundary. Kernel faults surface there too, at the next sync.

use super::driver::{Arg, DevMem, Driver, HostValue, LaunchConfig};
use super::kernels::Storage;
use anyhow::{bail, Result};
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

    fn storage(self) -> Storage {
        if self == MathMode::Bf16 {
            Storage::Bf16
        } else {
            Storage::F32
        }
    }

    /// The kernel builds a backend in this mode loads: f32 always (state
    /// buffers), bf16 too when activations are bf16.
    fn builds(self) -> &'static [Storage] {
        if self == MathMode::Bf16 {
            &[Storage::F32, Storage::Bf16]
        } else {
            &[Storage::F32]
        }
    }
}

pub struct Cuda {
    /// "cuda:K", or "cuda-emu" on the emulated device.
    pub(super) device: String,
    pub(super) driver: Arc<dyn Driver>,
    pub(super) math: MathMode,
    /// The storage type of activations (bf16 in `MathMode::Bf16`).
    pub(super) storage: Storage,
    first_error: Mutex<Option<String>>,
    /// RoPE's cos/sin tables, built once (rope.rs).
    pub(super) rope_tables: Mutex<super::rope::RopeTables>,
    /// Streaming multiprocessors, to size grid-stride launches.
    pub(super) sms: u32,
}

/// Threads per block for elementwise and row kernels.
pub(super) const THREADS: u32 = 256;

impl Cuda {
    /// Opens GPU `ordinal` and compiles every kernel for it (the libraries
    /// are probed first, so a machine without one is told which).
    pub fn new(ordinal: usize, math: MathMode) -> Result<Self> {
        let driver = super::driver::gpu::GpuDriver::new(ordinal, math.builds())?;
        Ok(Self::on(format!("cuda:{ordinal}"), Arc::new(driver), math))
    }

    /// The emulated device: the same backend over the kernels compiled for
    /// the host (driver/emu.rs). For tests and bring-up, never a fallback.
    #[cfg(feature = "cuda-emu")]
    pub fn emulated(math: MathMode) -> Result<Self> {
        let driver = super::driver::emu::EmuDriver::new(math.builds())?;
        tracing::info!(device = "cuda-emu", ?math, "emulated CUDA device ready (kernels run on the CPU)");
        Ok(Self::on("cuda-emu".to_string(), Arc::new(driver), math))
    }

    fn on(device: String, driver: Arc<dyn Driver>, math: MathMode) -> Self {
        let sms = driver.sms();
        Cuda {
            device,
            driver,
            math,
            storage: math.storage(),
            first_error: Mutex::new(None),
            rope_tables: Mutex::new(Default::default()),
            sms,
        }
    }

    /// The real GPU under this backend (NCCL needs its stream); None on
    /// the emulated device.
    pub fn gpu(&self) -> Option<&super::driver::gpu::GpuDriver> {
        self.driver.gpu()
    }

    /// Keeps the first device error for `check()`.
    pub(super) fn record<T>(&self, what: &str, r: std::result::Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    *first = Some(format!("{}: {what} failed: {e}", self.device));
                }
                None
            }
        }
    }

    /// Waits for the stream and returns the first error since the last
    /// check, naming the op; a sticky error is a `DeviceLost`.
    pub fn check(&self) -> Result<()> {
        let synced = self.driver.synchronize();
        self.record("a kernel (reported at stream synchronize)", synced);
        if let Some(e) = self.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if crate::engine::device::is_sticky(&e) {
                return Err(crate::engine::device::DeviceLost(e).into());
            }
            bail!(e);
        }
        Ok(())
    }

    /// Launches `kernel` of the `storage` build; a failure is recorded.
    pub(super) fn launch(&self, storage: Storage, kernel: &'static str, cfg: &LaunchConfig, args: &[Arg]) {
        let launched = self.driver.launch(storage, kernel, cfg, args);
        self.record(kernel, launched);
    }

    /// Zero-filled device memory for `len` values of `T`. Out of memory is
    /// the one device error a config can cause (a batch too large for the
    /// card); it stops the worker with the size it asked for rather than
    /// run on with no buffer.
    pub(super) fn zeros<T>(&self, len: usize) -> DevMem {
        let bytes = len * std::mem::size_of::<T>();
        match DevMem::new(&self.driver, bytes) {
            Ok(m) => m,
            Err(e) => {
                let (free, total) = self.driver.mem_info().unwrap_or((0, 0));
                panic!(
                    "{}: cannot allocate {:.1} MiB ({e}); {:.0} of {:.0} MiB free. Lower train.batch_size \
                     (more train.grad_accum keeps the global batch)",
                    self.device,
                    bytes as f64 / (1 << 20) as f64,
                    free as f64 / (1 << 20) as f64,
                    total as f64 / (1 << 20) as f64
                )
            }
        }
    }

    /// Device memory holding `values` (None after a recorded failure, as
    /// in `read`).
    pub(super) fn upload_values<T: HostValue>(&self, what: &str, values: &[T]) -> Option<DevMem> {
        let mem = self.zeros::<T>(values.len());
        if !values.is_empty() {
            let mut bytes = Vec::with_capacity(values.len() * T::SIZE);
            values.iter().for_each(|v| v.put_bytes(&mut bytes));
            self.record(what, self.driver.htod(&bytes, mem.addr()))?;
        }
        Some(mem)
    }

    /// Values `start..start + count` of `T` from device memory (None after
    /// a recorded failure).
    pub(super) fn read<T: HostValue>(&self, what: &str, mem: &DevMem, start: usize, count: usize) -> Option<Vec<T>> {
        let mut bytes = vec![0u8; count * T::SIZE];
        let slice = mem.slice(start * T::SIZE, count * T::SIZE);
        self.record(what, self.driver.dtoh(slice.addr, &mut bytes))?;
        Some(bytes.chunks_exact(T::SIZE).map(T::from_bytes).collect())
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

/// Launches `$name` on the backend's stream with the given arguments
/// (buffers, slices of them, or u64/i32/f32/f64 scalars, each taken by
/// value); a failed launch is recorded for `check()`. The kernel comes
/// from the build of the backend's storage type, or of `storage = S` when
/// given (elementwise ops on f32 state buffers in a bf16 backend).
macro_rules! launch {
    ($cu:expr, storage = $storage:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        #[allow(unused_imports)]
        use $crate::engine::cuda::driver::KernelArg;
        let cu: &$crate::engine::cuda::Cuda = $cu;
        let args = [$( ($arg).kernel_arg() ),+];
        cu.launch($storage, $name, &$cfg, &args);
    }};
    ($cu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let cu: &$crate::engine::cuda::Cuda = $cu;
        launch!(cu, storage = cu.storage, $name, $cfg, $($arg),+)
    }};
}
pub(crate) use launch;
