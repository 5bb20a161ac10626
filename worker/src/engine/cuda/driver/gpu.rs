//! The real device: the CUDA driver API, NVRTC and cuBLAS through cudarc.
//! One context, one compute stream; memory comes from the device's
//! stream-ordered pool (`cuMemAllocAsync`), kept as a caching allocator.

use super::{Arg, Compute, Driver, Event, GemmDesc, LaunchConfig};
use crate::engine::cuda::kernels::{self, Storage};
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::cublasComputeType_t::{
    CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_COMPUTE_32F_FAST_TF32,
};
use cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT as CUBLAS_GEMM_DEFAULT;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::cudaDataType_t::{self, CUDA_R_16BF, CUDA_R_32F};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

pub struct GpuDriver {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Every kernel of the f32 build, and of the bf16 build when the
    /// backend stores bf16 (state buffers use the f32 build in any mode).
    funcs: HashMap<(Storage, &'static str), CudaFunction>,
    sms: u32,
}

impl GpuDriver {
    /// Opens GPU `ordinal`, compiles every kernel for it in the `builds`
    /// storage types, and creates the stream and the cuBLAS handle.
    pub fn new(ordinal: usize, builds: &[Storage]) -> Result<Self> {
        let gpu = crate::engine::cuda::probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: cannot open the GPU: {e:?}"))?;
        // One compute stream, and NCCL's synchronized with explicit events:
        // cudarc's per-buffer event tracking would only add event calls.
        // SAFETY: called before any buffer of this context exists.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory_cached(&ctx, ordinal)?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("cuda:{ordinal}: cannot create a stream: {e:?}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuda:{ordinal}: cannot start cuBLAS: {e:?}"))?;
        // The handle stays in cuBLAS's default math: each GEMM names its
        // compute type, so F32 mode is never silently TF32.
        let arch = arch_name(gpu.compute_capability)?;
        let (driver_version, nvrtc_version) = read_versions(ordinal)?;
        check_versions(driver_version, nvrtc_version).map_err(|e| anyhow!("cuda:{ordinal}: {e}"))?;
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
        tracing::info!(device = %format!("cuda:{ordinal}"), name = %gpu.name, arch, kernels = funcs.len(), "GPU ready");
        Ok(GpuDriver { ordinal, ctx, stream, blas, funcs, sms })
    }

    /// The compute stream (NCCL waits on it and runs beside it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| format!("binding the CUDA context: {e:?}"))
    }
}

fn data_type(s: Storage) -> cudaDataType_t {
    match s {
        Storage::F32 => CUDA_R_32F,
        Storage::Bf16 => CUDA_R_16BF,
    }
}

impl Driver for GpuDriver {
    fn alloc_zeroed(&self, bytes: usize) -> Result<u64, String> {
        self.bind()?;
        let s = self.stream.cu_stream();
        // SAFETY: the stream is this context's; the memory is zeroed in
        // stream order before any use queued after this call.
        unsafe {
            let ptr = result::malloc_async(s, bytes).map_err(|e| format!("{e:?}"))?;
            result::memset_d8_async(ptr, 0, bytes, s).map_err(|e| format!("{e:?}"))?;
            Ok(ptr)
        }
    }

    fn free(&self, addr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `addr` came from alloc_zeroed; freed in stream order,
            // after the work queued on it.
            if let Err(e) = unsafe { result::free_async(addr, self.stream.cu_stream()) } {
                tracing::warn!(device = %format!("cuda:{}", self.ordinal), error = ?e, "cuMemFreeAsync failed");
            }
        }
    }

    fn htod(&self, src: &[u8], dst: u64) -> Result<(), String> {
        self.bind()?;
        // SAFETY: the caller sized `dst` for `src`; from pageable memory the
        // call returns once `src` has been read.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(|e| format!("{e:?}"))
    }

    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String> {
        self.bind()?;
        // SAFETY: `src` holds dst.len() bytes; the stream is synchronized
        // before `dst` is read.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(|e| format!("{e:?}"))?;
        self.synchronize()
    }

    fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), String> {
        self.bind()?;
        // SAFETY: both ranges hold `bytes` bytes (checked by the caller's slices).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(|e| format!("{e:?}"))
    }

    fn launch(&self, storage: Storage, kernel: &'static str, cfg: &LaunchConfig, args: &[Arg]) -> Result<(), String> {
        let Some(f) = self.funcs.get(&(storage, kernel)) else {
            return Err(format!("no kernel {kernel} in the {storage:?} build"));
        };
        let mut builder = self.stream.launch_builder(f);
        // Device pointers are u64 addresses, as a kernel's pointer
        // parameters take them.
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
                Arg::F64(v) => builder.arg(v),
            };
        }
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: cfg.grid_dim,
            block_dim: cfg.block_dim,
            shared_mem_bytes: cfg.shared_mem_bytes,
        };
        // SAFETY: the kernel's parameter list matches these arguments (a
        // test compares every launch with its kernel's signature, and the
        // emulated device checks each argument's type at run time).
        unsafe { builder.launch(cfg) }.map(|_| ()).map_err(|e| format!("{e:?}"))
    }

    fn gemm(&self, g: &GemmDesc) -> Result<(), String> {
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let compute = match g.compute {
            Compute::F32 => CUBLAS_COMPUTE_32F,
            Compute::FastTf32 => CUBLAS_COMPUTE_32F_FAST_TF32,
            Compute::Fast16Bf => CUBLAS_COMPUTE_32F_FAST_16BF,
        };
        self.bind()?;
        // SAFETY: the backend sizes every operand for `batch` matrices of
        // these shapes (matmul.rs); alpha and beta are host f32, as the
        // 32F compute types take them, alive for the call.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&g.alpha as *const f32).cast(),
                g.a.addr as *const _,
                data_type(g.a.storage),
                g.a.ld as i32,
                g.a.stride as i64,
                g.b.addr as *const _,
                data_type(g.b.storage),
                g.b.ld as i32,
                g.b.stride as i64,
                (&g.beta as *const f32).cast(),
                g.c.addr as *mut _,
                data_type(g.c.storage),
                g.c.ld as i32,
                g.c.stride as i64,
                g.batch as i32,
                compute,
                CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }

    fn synchronize(&self) -> Result<(), String> {
        self.stream.synchronize().map_err(|e| format!("{e:?}"))
    }

    fn record_event(&self) -> Result<Event, String> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        self.stream.record_event(flags).map(Event::Gpu).map_err(|e| format!("{e:?}"))
    }

    fn peak_bytes(&self) -> Option<u64> {
        if !self.ctx.has_async_alloc() {
            return None;
        }
        use cudarc::driver::sys::CUmemPool_attribute;
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
        read.ok().map(|_| used)
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        self.ctx.mem_get_info().ok()
    }

    fn sms(&self) -> u32 {
        self.sms
    }

    fn gpu(&self) -> Option<&GpuDriver> {
        Some(self)
    }
}

/// cudarc allocates from the device's default pool, whose release
/// threshold is 0: at every stream synchronize (one a step) the pool hands
/// its free memory back to the driver, and the next step maps it again. A
/// threshold of "never" makes the pool a caching allocator, as PyTorch's
/// is. Devices without stream-ordered allocation are left as they are.
fn keep_freed_memory_cached(ctx: &CudaContext, ordinal: usize) -> Result<()> {
    if !ctx.has_async_alloc() {
        bail!(
            "cuda:{ordinal}: this GPU or driver has no stream-ordered allocator (cuMemAllocAsync), which the backend \
             allocates with; update the NVIDIA driver"
        );
    }
    use cudarc::driver::sys::CUmemPool_attribute;
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

/// The CUDA version the driver supports (1000 * major + 10 * minor) and
/// NVRTC's (major, minor).
fn read_versions(ordinal: usize) -> Result<(i32, (i32, i32))> {
    let (mut driver, mut major, mut minor) = (0, 0, 0);
    // SAFETY: the out-pointers are live locals; both libraries were probed.
    unsafe {
        cudarc::driver::sys::cuDriverGetVersion(&mut driver)
            .result()
            .map_err(|e| anyhow!("cuda:{ordinal}: cannot read the driver's CUDA version: {e:?}"))?;
        let r = cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor);
        if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            bail!("cuda:{ordinal}: cannot read NVRTC's version: {r:?}");
        }
    }
    Ok((driver, (major, minor)))
}

/// PTX from NVRTC X.Y loads only on a driver for CUDA X.Y or newer; an
/// older driver refuses every module with a bare
/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`. Checked before compiling, with
/// what to change.
pub(crate) fn check_versions(driver: i32, nvrtc: (i32, i32)) -> Result<(), String> {
    let (dmaj, dmin) = (driver / 1000, (driver % 1000) / 10);
    if (dmaj, dmin) >= nvrtc {
        return Ok(());
    }
    let (nmaj, nmin) = nvrtc;
    Err(format!(
        "the NVIDIA driver supports CUDA {dmaj}.{dmin}, but the kernels are compiled by NVRTC {nmaj}.{nmin}, whose PTX \
         this driver cannot load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). Update the driver to one for CUDA {nmaj}.{nmin} \
         or newer (`nvidia-smi` shows the CUDA version it supports), or put an NVRTC no newer than {dmaj}.{dmin} \
         first on LD_LIBRARY_PATH (pip: nvidia-cuda-nvrtc=={dmaj}.{dmin}.*)"
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver older than NVRTC is refused with both versions and the
    /// fix; the same or a newer driver passes.
    #[test]
    fn a_driver_older_than_nvrtc_is_named_with_the_fix() {
        assert!(check_versions(13000, (13, 0)).is_ok());
        assert!(check_versions(13020, (13, 0)).is_ok());
        assert!(check_versions(14000, (13, 1)).is_ok());
        let e = check_versions(12040, (13, 0)).unwrap_err();
        assert!(e.contains("CUDA 12.4") && e.contains("NVRTC 13.0") && e.contains("Update the driver"), "{e}");
        assert!(e.contains("nvidia-cuda-nvrtc==12.4.*"), "{e}");
        assert!(check_versions(13000, (13, 1)).is_err());
    }
}
