//! The CUDA C sources of the backend's kernels, embedded in the binary and
//! compiled with NVRTC for the device at start (the backend caches the
//! modules). The test below compiles every source for sm_80 (A100) and
//! sm_90 (H100/H200), so CI catches kernel source that does not compile
//! even though it has no GPU: it needs only libnvrtc, which `.ci/run` takes
//! from the `nvidia-cuda-nvrtc` 13.0 wheel.

use anyhow::{anyhow, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// (module name, CUDA C source) of every kernel file, one per op group as
/// in the CPU backend.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("kernels/elementwise.cu")),
    ("columns", include_str!("kernels/columns.cu")),
    ("activation", include_str!("kernels/activation.cu")),
    ("norm", include_str!("kernels/norm.cu")),
    ("attention", include_str!("kernels/attention.cu")),
    ("rope", include_str!("kernels/rope.cu")),
    ("embedding", include_str!("kernels/embedding.cu")),
    ("loss", include_str!("kernels/loss.cu")),
    ("image", include_str!("kernels/image.cu")),
    ("s2", include_str!("kernels/s2.cu")),
    ("optim", include_str!("kernels/optim.cu")),
];

/// The `extern "C" __global__` kernels a source declares, by name.
pub fn entry_points(source: &'static str) -> Vec<&'static str> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect()
}

/// Compiles one source to PTX for a virtual architecture such as
/// `compute_90`; the error carries NVRTC's log.
pub fn compile(name: &str, source: &str, arch: &'static str) -> Result<Ptx> {
    let opts = CompileOptions { arch: Some(arch), name: Some(format!("{name}.cu")), ..Default::default() };
    compile_ptx_with_opts(source, opts).map_err(|e| anyhow!("kernel source {name}.cu does not compile for {arch}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel source compiles for both architectures the clusters
    /// have, and each `extern "C" __global__` function is in the PTX. Needs
    /// libnvrtc (CI: the nvidia-cuda-nvrtc wheel on LD_LIBRARY_PATH).
    #[test]
    fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
        // SAFETY: only tries to dlopen the library.
        assert!(
            unsafe { cudarc::nvrtc::sys::is_culib_present() },
            "libnvrtc not found: `pip install nvidia-cuda-nvrtc==13.0.*` and put its nvidia/cu13/lib on LD_LIBRARY_PATH (see .ci/run)"
        );
        for (name, src) in SOURCES {
            let kernels = entry_points(src);
            assert!(!kernels.is_empty(), "{name}.cu declares no kernel");
            for arch in ["compute_80", "compute_90"] {
                let ptx = compile(name, src, arch).unwrap_or_else(|e| panic!("{e:#}"));
                let text = ptx.to_src();
                for k in &kernels {
                    assert!(text.contains(&format!(".entry {k}(")), "{name}.cu for {arch}: no entry {k} in the PTX");
                }
            }
        }
    }

    /// A broken source is refused with NVRTC's message, not a panic.
    #[test]
    fn a_broken_kernel_is_an_error_naming_the_file() {
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return; // the test above fails with the reason
        }
        let err = compile("broken", "extern \"C\" __global__ void f(float* x) { x[0] = y; }", "compute_80")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.cu") && err.contains("compute_80"), "{err}");
    }
}
