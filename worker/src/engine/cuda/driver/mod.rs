//! The narrow layer under the CUDA backend: memory, copies, kernel
//! launches, GEMMs and stream order. Everything above it (buffers, storage
//! roles, launch shapes and arguments, GEMM descriptors) is the same code
//! whichever driver runs it, so the emulated device checks the code a GPU
//! runs. Two implementations:
//! - [`gpu::GpuDriver`]: the CUDA driver, NVRTC and cuBLAS through cudarc;
//! - [`emu::EmuDriver`] (feature `cuda-emu`): the same kernel sources
//!   compiled as C++ and run on the CPU, a host GEMM with cuBLAS's
//!   semantics, and guarded, tracked allocations. A test device only.
//!
//! Errors are strings: the backend records the first one and returns it at
//! the next `check()` (context.rs), as a GPU reports faults at a sync.

use super::kernels::Storage;
use std::marker::PhantomData;
use std::sync::Arc;

#[cfg(feature = "cuda-emu")]
pub(crate) mod emu;
pub(crate) mod gpu;
#[cfg(feature = "cuda-emu")]
mod host_gemm;

/// A launch's shape, as cuLaunchKernel takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// One kernel argument by value: a device address or a scalar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    U64(u64),
    I32(i32),
    F32(f32),
    F64(f64),
}

/// What can be passed to a kernel (the `launch!` macro calls this on each
/// argument, through references).
pub trait KernelArg {
    fn kernel_arg(&self) -> Arg;
}

/// Scalars pass by value, each as the `Arg` of its type.
macro_rules! scalar_arg {
    ($($t:ty => $variant:ident),+) => {$(
        impl KernelArg for $t {
            fn kernel_arg(&self) -> Arg {
                Arg::$variant(*self)
            }
        }
    )+};
}
scalar_arg!(u64 => U64, i32 => I32, f32 => F32, f64 => F64);

/// How a GEMM's f32 operands enter the multiply (cuBLAS compute types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    /// `CUBLAS_COMPUTE_32F`: f32 products (bf16 operands as they are).
    F32,
    /// `CUBLAS_COMPUTE_32F_FAST_TF32`: f32 operands rounded to TF32.
    FastTf32,
    /// `CUBLAS_COMPUTE_32F_FAST_16BF`: f32 operands rounded to bf16.
    Fast16Bf,
}

/// One matrix of a strided-batched GEMM in cuBLAS's column-major terms.
#[derive(Clone, Copy, Debug)]
pub struct GemmMatrix {
    pub addr: u64,
    pub storage: Storage,
    pub ld: usize,
    pub stride: usize,
}

/// Exactly the arguments of `cublasGemmStridedBatchedEx` as the backend
/// calls it (column-major): `C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b]`
/// with `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C` `[m, n]`, f32 accumulation.
#[derive(Clone, Copy, Debug)]
pub struct GemmDesc {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: GemmMatrix,
    pub b: GemmMatrix,
    pub beta: f32,
    pub c: GemmMatrix,
    pub batch: usize,
    pub compute: Compute,
}

/// A point in a stream's order that another stream can wait for.
pub enum Event {
    Gpu(cudarc::driver::CudaEvent),
    /// The emulator runs every op when it is issued: every event has passed.
    Host,
}

/// The device operations the backend is built on, in stream order.
pub trait Driver: Send + Sync {
    /// Zero-filled device memory of `bytes` (at least 1).
    fn alloc_zeroed(&self, bytes: usize) -> Result<u64, String>;
    /// Frees `addr` once the work queued before this call is done.
    fn free(&self, addr: u64);
    fn htod(&self, src: &[u8], dst: u64) -> Result<(), String>;
    /// Copies to the host; returns when the bytes are there.
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String>;
    fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), String>;
    /// Launches `kernel` from the build whose act_t is `storage`.
    fn launch(&self, storage: Storage, kernel: &'static str, cfg: &LaunchConfig, args: &[Arg]) -> Result<(), String>;
    fn gemm(&self, g: &GemmDesc) -> Result<(), String>;
    /// Waits for everything queued; returns a fault it raised.
    fn synchronize(&self) -> Result<(), String>;
    fn record_event(&self) -> Result<Event, String>;
    /// The high-water mark of allocated bytes, where the device keeps one.
    fn peak_bytes(&self) -> Option<u64>;
    /// (free, total) bytes, for an out-of-memory message.
    fn mem_info(&self) -> Option<(usize, usize)>;
    /// Streaming multiprocessors, to size grid-stride launches.
    fn sms(&self) -> u32;
    /// The real GPU behind this driver, for NCCL; None on the emulator.
    fn gpu(&self) -> Option<&gpu::GpuDriver> {
        None
    }
}

/// Device memory owned by a buffer: freed through its driver on drop.
pub struct DevMem {
    addr: u64,
    bytes: usize,
    driver: Arc<dyn Driver>,
}

impl DevMem {
    pub(crate) fn new(driver: &Arc<dyn Driver>, bytes: usize) -> Result<DevMem, String> {
        let addr = driver.alloc_zeroed(bytes.max(1))?;
        Ok(DevMem { addr, bytes, driver: driver.clone() })
    }

    /// The device address (for NCCL and the GEMM descriptors).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Bytes `start..start + len`, bounds checked.
    pub fn slice(&self, start: usize, len: usize) -> DevSlice<'_> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.bytes),
            "device slice {start}..{} of a {}-byte buffer",
            start.saturating_add(len),
            self.bytes
        );
        DevSlice { addr: self.addr + start as u64, bytes: len, _buf: PhantomData }
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.driver.free(self.addr);
    }
}

impl KernelArg for DevMem {
    fn kernel_arg(&self) -> Arg {
        Arg::Ptr(self.addr)
    }
}

/// A range of a buffer's bytes, borrowed from it.
#[derive(Clone, Copy)]
pub struct DevSlice<'a> {
    pub(crate) addr: u64,
    pub(crate) bytes: usize,
    _buf: PhantomData<&'a DevMem>,
}

impl KernelArg for DevSlice<'_> {
    fn kernel_arg(&self) -> Arg {
        Arg::Ptr(self.addr)
    }
}

/// Host values as device bytes and back (little-endian, as the devices are).
pub trait HostValue: Copy {
    const SIZE: usize;
    fn from_bytes(b: &[u8]) -> Self;
    fn put_bytes(self, out: &mut Vec<u8>);
}

macro_rules! host_value {
    ($($t:ty),+) => {$(
        impl HostValue for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_bytes(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
            fn put_bytes(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )+};
}
host_value!(f64, u64, i32, f32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_read_little_endian_bytes() {
        assert_eq!(f64::from_bytes(&1.5f64.to_le_bytes()), 1.5);
        assert_eq!(u64::from_bytes(&7u64.to_le_bytes()), 7);
        assert_eq!(i32::from_bytes(&(-3i32).to_le_bytes()), -3);
        let mut bytes = Vec::new();
        (-3i32).put_bytes(&mut bytes);
        2.5f64.put_bytes(&mut bytes);
        assert_eq!((i32::from_bytes(&bytes[..4]), f64::from_bytes(&bytes[4..])), (-3, 2.5));
        assert_eq!(7u64.kernel_arg(), Arg::U64(7));
        assert_eq!(2.5f32.kernel_arg(), Arg::F32(2.5));
    }
}
