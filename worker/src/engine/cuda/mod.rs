//! The CUDA side of the engine, built with `--features cuda`.
//! cudarc opens the CUDA libraries at run time (`dynamic-loading`), so
//! building needs no toolkit; here every library the backend needs is
//! probed before first use, so that a machine without one gets an error
//! naming it instead of a panic inside cudarc.

use anyhow::{anyhow, bail, Result};

mod activation;
mod attention;
mod backend;
mod buffer;
mod columns;
mod context;
pub(crate) mod driver;
mod elementwise;
mod embedding;
#[cfg(feature = "cuda-emu")]
pub(crate) mod emu_ffi;
mod image;
pub mod kernels;
mod loss;
mod matmul;
mod norm;
mod optim;
mod rope;
mod s2;

pub use backend::{Buf, Idx};
pub use context::{Cuda, MathMode};
pub use driver::Event;
pub use kernels::Storage;

/// What `--device cuda:K` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) on H100.
    pub compute_capability: (i32, i32),
}

/// The CUDA libraries the backend calls, each with what it is for and
/// whether it can be opened on this machine. NCCL is not among them: only
/// a job of several GPUs opens it (collective/nccl_lib.rs).
pub fn libraries() -> Vec<(&'static str, &'static str, bool)> {
    // SAFETY: each probe only tries to dlopen the library by its usual
    // names and closes it again; nothing from it is called.
    unsafe {
        vec![
            ("libcuda", "the NVIDIA driver", cudarc::driver::sys::is_culib_present()),
            ("libnvrtc", "the CUDA runtime compiler, for the kernels", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas", "cuBLAS, for the GEMMs", cudarc::cublas::sys::is_culib_present()),
        ]
    }
}

/// The first library the backend needs that cannot be opened.
pub fn missing_library() -> Option<String> {
    libraries().into_iter().find(|l| !l.2).map(|(lib, what, _)| format!("{lib} ({what})"))
}

/// Whether this machine can run the CUDA backend: every library opens and
/// the driver sees at least one GPU.
pub fn available() -> bool {
    missing_library().is_none() && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Checks that GPU `ordinal` can be used and describes it.
pub fn probe(ordinal: usize) -> Result<GpuInfo> {
    if let Some(lib) = missing_library() {
        bail!(
            "--device cuda:{ordinal}: {lib} cannot be loaded on this machine; is this a GPU node with the NVIDIA \
             driver and the CUDA 13 libraries installed (and on LD_LIBRARY_PATH)? Use --device cpu to run on the CPU"
        );
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| anyhow!("--device cuda:{ordinal}: the NVIDIA driver cannot list the GPUs: {e:?}"))?;
    if ordinal >= count.max(0) as usize {
        bail!("--device cuda:{ordinal}: this machine has {count} GPU(s) (cuda:0 to cuda:{})", count - 1);
    }
    let ctx = cudarc::driver::CudaContext::new(ordinal)
        .map_err(|e| anyhow!("--device cuda:{ordinal}: cannot open the GPU: {e:?}"))?;
    let name = ctx.name().map_err(|e| anyhow!("--device cuda:{ordinal}: cannot read the GPU's name: {e:?}"))?;
    let compute_capability = ctx
        .compute_capability()
        .map_err(|e| anyhow!("--device cuda:{ordinal}: cannot read the compute capability: {e:?}"))?;
    Ok(GpuInfo { ordinal, name, compute_capability })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the NVIDIA driver (CI, the dev VM) the probe
    /// names the driver library and nothing panics; where a GPU exists, it
    /// describes GPU 0 and refuses an ordinal past the last GPU.
    #[test]
    fn probe_names_the_missing_library_or_describes_the_gpu() {
        let libs = libraries();
        // A single-GPU job needs no NCCL: it is not a library the backend probes.
        assert_eq!(libs.iter().map(|l| l.0).collect::<Vec<_>>(), ["libcuda", "libnvrtc", "libcublas"]);
        if !libs[0].2 {
            let err = probe(0).unwrap_err().to_string();
            assert!(err.contains("libcuda (the NVIDIA driver)") && err.contains("--device cpu"), "{err}");
            assert!(!available());
        } else if available() {
            let gpu = probe(0).unwrap();
            assert!(gpu.compute_capability.0 >= 7, "{gpu:?}");
            let err = probe(1 << 20).unwrap_err().to_string();
            assert!(err.contains("GPU(s)"), "{err}");
        }
    }
}
