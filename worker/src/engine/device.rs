//! Which device a worker computes on: `--device cpu`, `cuda:K`, `auto`, or
//! `cuda-emu`, the emulated CUDA device (a test device: the CUDA backend's
//! kernels run on the CPU; never chosen by `auto`).
//!
//! `auto` takes the GPU of the worker's local rank (LOCAL_RANK or
//! SLURM_LOCALID, else 0) when the CUDA backend can run here, and the CPU
//! otherwise. `cuda:K` is checked before anything else starts: a build
//! without the `cuda` feature, or a machine without a CUDA library, gets one
//! line that says which.

use anyhow::{bail, Result};

/// A device error that leaves the GPU's context unusable ("sticky"): an
/// illegal address, a trap, a hardware fault. Every later call on the
/// context fails too, so the worker must exit (and be replaced) rather
/// than rejoin the job with it.
#[derive(Debug)]
pub struct DeviceLost(pub String);

impl std::fmt::Display for DeviceLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; the GPU's context cannot be used after this error, so this worker exits to be replaced \
             (restart it, on another GPU if the error repeats)",
            self.0
        )
    }
}

impl std::error::Error for DeviceLost {}

/// The CUDA driver errors after which the context is unusable.
const STICKY: [&str; 11] = [
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
];

/// Whether a device error message names a sticky error.
pub fn is_sticky(message: &str) -> bool {
    STICKY.iter().any(|s| message.contains(s))
}

/// Whether `e` (or an error it wraps) is a [`DeviceLost`].
pub fn device_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<DeviceLost>())
}

/// What a worker built without the emulated device says to `cuda-emu`.
pub const NO_EMULATOR: &str = "--device cuda-emu: this worker was built without the emulated CUDA device; rebuild it \
     with `cargo build --release -p tessera-worker --features cuda-emu` (needs a C++ compiler)";

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    CudaEmu,
    Auto,
}

/// Where the worker will run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    CudaEmu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(k) => write!(f, "cuda:{k}"),
            Device::CudaEmu => write!(f, "cuda-emu"),
        }
    }
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda-emu" => Ok(DeviceSpec::CudaEmu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(k)) => Ok(DeviceSpec::Cuda(k)),
                _ => bail!("--device {s:?}: expected cpu, cuda:K (K = 0, 1, ...), auto or cuda-emu (the emulated GPU)"),
            },
        }
    }

    /// The device to run on; `local_rank` picks the GPU for `auto`.
    pub fn resolve(self, local_rank: Option<usize>) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(k) => {
                cuda_probe(k)?;
                Ok(Device::Cuda(k))
            }
            DeviceSpec::CudaEmu if cfg!(feature = "cuda-emu") => Ok(Device::CudaEmu),
            DeviceSpec::CudaEmu => bail!(NO_EMULATOR),
            DeviceSpec::Auto if cuda_available() => Ok(Device::Cuda(local_rank.unwrap_or(0))),
            DeviceSpec::Auto => Ok(Device::Cpu),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_probe(k: usize) -> Result<()> {
    let gpu = super::cuda::probe(k)?;
    tracing::info!(device = %format!("cuda:{k}"), name = %gpu.name, sm = %format!("{}{}", gpu.compute_capability.0, gpu.compute_capability.1), "found the GPU");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_probe(k: usize) -> Result<()> {
    bail!("--device cuda:{k}: this worker was built without CUDA support; rebuild it with `cargo build --release -p tessera-worker --features cuda`, or use --device cpu")
}

#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    super::cuda::available()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}

pub use tessera_job::config::Precision;

/// The CUDA backend's math mode for a job's precision.
#[cfg(feature = "cuda")]
pub fn math_mode(precision: Precision) -> Result<super::cuda::MathMode> {
    match precision {
        Precision::F32 => Ok(super::cuda::MathMode::F32),
        Precision::Tf32 => Ok(super::cuda::MathMode::Tf32),
        Precision::Bf16 => Ok(super::cuda::MathMode::Bf16),
    }
}

/// The emulated CUDA device in the math mode of `precision`.
#[cfg(feature = "cuda-emu")]
pub fn emulated_cuda(precision: Precision) -> Result<super::cuda::Cuda> {
    super::cuda::Cuda::emulated(math_mode(precision)?)
}

/// Never called: `resolve` refuses `cuda-emu` in a build without it.
#[cfg(all(feature = "cuda", not(feature = "cuda-emu")))]
pub fn emulated_cuda(_precision: Precision) -> Result<super::cuda::Cuda> {
    bail!(NO_EMULATOR)
}

/// What a job asking for `precision` on the CPU is told: the CPU computes
/// f32 whatever the precision, which matters only for "bf16" (the f32 and
/// TF32 defaults say nothing new).
pub fn cpu_precision_note(precision: Precision) -> Option<&'static str> {
    (precision == Precision::Bf16)
        .then_some("precision = \"bf16\" applies to GPUs: the CPU backend stores and computes in f32")
}

/// Logs [`cpu_precision_note`], where there is one.
pub fn note_cpu_precision(precision: Precision) {
    if let Some(note) = cpu_precision_note(precision) {
        tracing::info!("{note}");
    }
}

/// Runs `$body` with `$be` bound to the backend of `$device` (the CPU
/// backend, or the CUDA backend on GPU K with `$precision`), so one generic
/// function serves both. The caller returns `anyhow::Result`.
#[cfg(feature = "cuda")]
#[macro_export]
macro_rules! on_device {
    ($device:expr, $precision:expr, |$be:ident| $body:expr) => {
        match $device {
            $crate::engine::device::Device::Cpu => {
                $crate::engine::device::note_cpu_precision($precision);
                let $be = &$crate::engine::cpu::Cpu::<f32>::new();
                $body
            }
            $crate::engine::device::Device::Cuda(k) => {
                let $be = &$crate::engine::cuda::Cuda::new(k, $crate::engine::device::math_mode($precision)?)?;
                $body
            }
            $crate::engine::device::Device::CudaEmu => {
                let $be = &$crate::engine::device::emulated_cuda($precision)?;
                $body
            }
        }
    };
}

#[cfg(not(feature = "cuda"))]
#[macro_export]
macro_rules! on_device {
    ($device:expr, $precision:expr, |$be:ident| $body:expr) => {
        match $device {
            $crate::engine::device::Device::Cpu => {
                $crate::engine::device::note_cpu_precision($precision);
                let $be = &$crate::engine::cpu::Cpu::<f32>::new();
                $body
            }
            $crate::engine::device::Device::Cuda(k) => {
                anyhow::bail!("cuda:{k}: this worker was built without CUDA support; rebuild it with `cargo build --release -p tessera-worker --features cuda`")
            }
            $crate::engine::device::Device::CudaEmu => {
                anyhow::bail!($crate::engine::device::NO_EMULATOR)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_by_name() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::parse("cuda-emu").unwrap(), DeviceSpec::CudaEmu);
        for bad in ["gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "CPU", "cuda-emulated"] {
            let e = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("cpu, cuda:K"), "{e}");
        }
    }

    /// Illegal addresses and traps are sticky, out of memory is not; a
    /// DeviceLost is found under context added on the way up.
    #[test]
    fn sticky_errors_are_told_apart() {
        assert!(is_sticky(
            "cuda:0: a kernel failed: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")"
        ));
        assert!(is_sticky("CUDA_ERROR_LAUNCH_FAILED (emulated): gather_rows_f32 called __trap()"));
        assert!(!is_sticky("cuda:0: upload failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"));
        let e = anyhow::Error::new(DeviceLost("x".into())).context("step 3");
        assert!(device_lost(&e) && e.root_cause().to_string().contains("exits to be replaced"));
        assert!(!device_lost(&anyhow::anyhow!("a peer went away")));
    }

    /// A job asking for bf16 on the CPU is told it computes in f32; the
    /// defaults say nothing.
    #[test]
    fn the_cpu_says_when_bf16_does_not_apply() {
        assert!(cpu_precision_note(Precision::Bf16).is_some_and(|n| n.contains("f32")));
        assert_eq!(cpu_precision_note(Precision::Tf32), None);
        assert_eq!(cpu_precision_note(Precision::F32), None);
    }

    /// On a machine with no usable GPU (CI), `auto` is the CPU and `cuda:0`
    /// is refused with the reason: no CUDA in this build, or the missing
    /// library by name.
    #[test]
    fn without_a_gpu_auto_is_cpu_and_cuda_says_why() {
        if cuda_available() {
            return; // a GPU machine: covered by engine::cuda's test
        }
        assert_eq!(DeviceSpec::Auto.resolve(Some(1)).unwrap(), Device::Cpu);
        assert_eq!(DeviceSpec::Cpu.resolve(None).unwrap(), Device::Cpu);
        let e = DeviceSpec::Cuda(0).resolve(None).unwrap_err().to_string();
        if cfg!(feature = "cuda") {
            assert!(e.contains("cannot be loaded") || e.contains("GPU(s)"), "{e}");
        } else {
            assert!(e.contains("built without CUDA support") && e.contains("--features cuda"), "{e}");
        }
    }
}
