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
use crate::engine::cuda::emu_ffi::{self, EmuBuild};
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
    /// Device memory in bytes (`TESSERA_EMU_MEMORY_GIB`), for tests of
    /// what a GPU of that size refuses; unlimited when unset.
    capacity: Option<u64>,
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
            if emu_ffi::kernel_names(EmuBuild::from(b)).is_empty() {
                bail!("cuda-emu: the {b:?} build of the kernels is missing from this binary");
            }
        }
        // Blocks run on every core unless TESSERA_EMU_THREADS says otherwise;
        // blocks are independent, so the results are the same for any count.
        if std::env::var_os("TESSERA_EMU_THREADS").is_none() {
            emu_ffi::set_threads(std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
        }
        let capacity = match std::env::var("TESSERA_EMU_MEMORY_GIB") {
            Err(_) => None,
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(g) if g > 0.0 && g.is_finite() => Some((g * (1u64 << 30) as f64) as u64),
                _ => bail!("TESSERA_EMU_MEMORY_GIB={v:?}: expected a positive number of GiB"),
            },
        };
        Ok(EmuDriver { builds: builds.to_vec(), stream: Mutex::new(()), memory: Mutex::default(), capacity })
    }

    fn in_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Names a kernel fault by the CUDA error a GPU raises for it, so that the
/// backend treats it as it would on a GPU (both are sticky: the context is
/// lost, device.rs).
fn as_gpu_error(e: String) -> String {
    let illegal = ["past the end of an allocation", "before the start of an allocation", "stack overflow"];
    if e.contains("__trap()") {
        format!("CUDA_ERROR_LAUNCH_FAILED (emulated): {e}")
    } else if illegal.iter().any(|m| e.contains(m)) {
        format!("CUDA_ERROR_ILLEGAL_ADDRESS (emulated): {e}")
    } else {
        e
    }
}

impl Driver for EmuDriver {
    fn alloc_zeroed(&self, bytes: usize) -> Result<u64, String> {
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if self.capacity.is_some_and(|c| m.in_use + bytes as u64 > c) {
            return Err("CUDA_ERROR_OUT_OF_MEMORY (emulated: TESSERA_EMU_MEMORY_GIB)".into());
        }
        let addr = emu_ffi::alloc(bytes).ok_or_else(|| format!("the host cannot map {bytes} bytes"))?;
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
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        let _order = self.in_order();
        emu_ffi::launch(EmuBuild::from(storage), kernel, [g.0, g.1, g.2], [b.0, b.1, b.2], cfg.shared_mem_bytes, args)
            .map_err(as_gpu_error)
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
        let c = self.capacity?;
        let in_use = self.memory.lock().unwrap_or_else(|p| p.into_inner()).in_use;
        Some((c.saturating_sub(in_use) as usize, c as usize))
    }

    fn sms(&self) -> u32 {
        EMULATED_SMS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::device::is_sticky;

    /// Traps and out-of-bounds accesses carry the GPU's error name (sticky);
    /// a bad launch shape does not.
    #[test]
    fn kernel_faults_get_the_gpu_error_names() {
        let trap = as_gpu_error("kernel gather_rows_f32 (f32 build): __trap() at embedding.cu:17".into());
        assert!(trap.starts_with("CUDA_ERROR_LAUNCH_FAILED") && is_sticky(&trap), "{trap}");
        let oob = as_gpu_error("kernel k: invalid write at 0x1, past the end of an allocation of 4 bytes".into());
        assert!(oob.starts_with("CUDA_ERROR_ILLEGAL_ADDRESS") && is_sticky(&oob), "{oob}");
        let shape = as_gpu_error("kernel k: a block of 2048 threads (at most 1024)".into());
        assert!(!is_sticky(&shape), "{shape}");
    }

    /// Negative control through the driver: a test kernel that writes one
    /// value past its buffer is stopped at the guard page and named.
    #[test]
    fn an_index_one_past_the_end_is_caught_and_named() {
        let drv = EmuDriver::new(&[Storage::F32]).unwrap();
        let n = 1000u64;
        let addr = drv.alloc_zeroed(n as usize * 4).unwrap();
        let args = [Arg::Ptr(addr), Arg::U64(n)];
        let e = emu_ffi::launch(EmuBuild::Test, "oob_index_f32", [4, 1, 1], [256, 1, 1], 0, &args)
            .map_err(as_gpu_error)
            .unwrap_err();
        assert!(e.contains("oob_index_f32") && e.contains("past the end of an allocation of 4000 bytes"), "{e}");
        assert!(e.starts_with("CUDA_ERROR_ILLEGAL_ADDRESS"), "{e}");
        drv.free(addr);
    }
}
