//! The emulated CUDA device: the backend's kernels, compiled from the same
//! `.cu` sources as C++ for the host (build.rs, `emu/`), run on the CPU one
//! launch at a time; GEMMs by a host implementation of the cuBLAS call
//! (host_gemm.rs); memory from a guarded allocator that faults on an access
//! past a buffer's end and tracks the peak bytes.
//!
//! Every op runs to completion when issued, so stream order holds and every
//! event has passed when it is recorded. What it cannot show: speed, cuBLAS
//! and NCCL themselves, the tensor cores' exact rounding inside a product,
//! and races between threads that a GPU would run at once.

use super::{Arg, Driver, Event, GemmDesc, LaunchConfig};
use crate::engine::cuda::emu_ffi::{self, EmuArg, EmuBuild};
use crate::engine::cuda::kernels::Storage;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// Streaming multiprocessors the emulated device reports: few, so that
/// grid-stride loops take several turns even on the small test shapes.
pub const EMULATED_SMS: u32 = 2;

pub struct EmuDriver {
    builds: Vec<Storage>,
    /// One stream: ops from several host threads run one at a time.
    stream: Mutex<()>,
    /// This device's allocations, so its peak is its own even when several
    /// emulated devices share the process (tests).
    memory: Mutex<Tracked>,
}

#[derive(Default)]
struct Tracked {
    sizes: HashMap<u64, usize>,
    in_use: u64,
    peak: u64,
}

impl EmuDriver {
    pub fn new(builds: &[Storage]) -> Result<Self> {
        for &b in builds {
            if emu_ffi::kernel_names(build(b)).is_empty() {
                bail!("cuda-emu: the {b:?} build of the kernels is missing from this binary");
            }
        }
        Ok(EmuDriver { builds: builds.to_vec(), stream: Mutex::new(()), memory: Mutex::default() })
    }

    fn in_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn build(s: Storage) -> EmuBuild {
    match s {
        Storage::F32 => EmuBuild::F32,
        Storage::Bf16 => EmuBuild::Bf16,
    }
}

impl Driver for EmuDriver {
    fn alloc_zeroed(&self, bytes: usize) -> Result<u64, String> {
        let addr = emu_ffi::alloc(bytes).ok_or_else(|| format!("the host cannot map {bytes} bytes"))?;
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        m.sizes.insert(addr, bytes);
        m.in_use += bytes as u64;
        m.peak = m.peak.max(m.in_use);
        Ok(addr)
    }

    fn free(&self, addr: u64) {
        let _order = self.in_order();
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bytes) = m.sizes.remove(&addr) {
            m.in_use -= bytes as u64;
        }
        // SAFETY: `addr` came from alloc_zeroed and is freed once (DevMem's drop).
        unsafe { emu_ffi::free(addr) }
    }

    fn htod(&self, src: &[u8], dst: u64) -> Result<(), String> {
        let _order = self.in_order();
        emu_ffi::check_range(dst, src.len()).map_err(|e| format!("host-to-device copy: {e}"))?;
        // SAFETY: the range lies in one live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String> {
        let _order = self.in_order();
        emu_ffi::check_range(src, dst.len()).map_err(|e| format!("device-to-host copy: {e}"))?;
        // SAFETY: as in htod.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<(), String> {
        let _order = self.in_order();
        emu_ffi::check_range(src, bytes).map_err(|e| format!("device copy (source): {e}"))?;
        emu_ffi::check_range(dst, bytes).map_err(|e| format!("device copy (destination): {e}"))?;
        // SAFETY: both ranges lie in live allocations; they may overlap, as
        // cuMemcpyDtoD's may not, which std::ptr::copy tolerates anyway.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn launch(&self, storage: Storage, kernel: &'static str, cfg: &LaunchConfig, args: &[Arg]) -> Result<(), String> {
        if !self.builds.contains(&storage) {
            return Err(format!("no kernel {kernel} in the {storage:?} build (not loaded in this math mode)"));
        }
        let args: Vec<EmuArg> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => EmuArg::Ptr(p),
                Arg::U64(v) => EmuArg::U64(v),
                Arg::I32(v) => EmuArg::I32(v),
                Arg::F32(v) => EmuArg::F32(v),
                Arg::F64(v) => EmuArg::F64(v),
            })
            .collect();
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        let _order = self.in_order();
        emu_ffi::launch(build(storage), kernel, [g.0, g.1, g.2], [b.0, b.1, b.2], cfg.shared_mem_bytes, &args)
    }

    fn gemm(&self, g: &GemmDesc) -> Result<(), String> {
        let _order = self.in_order();
        super::host_gemm::gemm(g)
    }

    fn synchronize(&self) -> Result<(), String> {
        Ok(())
    }

    fn record_event(&self) -> Result<Event, String> {
        Ok(Event::Host)
    }

    fn peak_bytes(&self) -> Option<u64> {
        Some(self.memory.lock().unwrap_or_else(|p| p.into_inner()).peak)
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        None
    }

    fn sms(&self) -> u32 {
        EMULATED_SMS
    }
}
