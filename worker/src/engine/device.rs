//! Which device a worker computes on: `--device cpu`, `cuda:K` or `auto`.
//!
//! `auto` takes the GPU of the worker's local rank (LOCAL_RANK or
//! SLURM_LOCALID, else 0) when the CUDA backend can run here, and the CPU
//! otherwise. `cuda:K` is checked before anything else starts: a build
//! without the `cuda` feature, or a machine without a CUDA library, gets one
//! line that says which.

use anyhow::{bail, Result};

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Auto,
}

/// Where the worker will run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(k) => write!(f, "cuda:{k}"),
        }
    }
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(k)) => Ok(DeviceSpec::Cuda(k)),
                _ => bail!("--device {s:?}: expected cpu, cuda:K (K = 0, 1, ...) or auto"),
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

/// The one place that stops a CUDA run until the backend exists (issue 5):
/// the device is probed and named, then refused with the reason.
pub fn require_cpu(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(k) => bail!(
            "--device cuda:{k}: the GPU is there, but the CUDA backend is not written yet (issue 5); use --device cpu"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_by_name() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "CPU"] {
            let e = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("cpu, cuda:K"), "{e}");
        }
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
        assert!(require_cpu(Device::Cpu).is_ok());
        assert!(require_cpu(Device::Cuda(0)).unwrap_err().to_string().contains("not written yet"));
    }
}
