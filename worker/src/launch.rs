//! Where a worker gets its rank, its coordinator and its device: flags
//! first, then the variables cluster launchers set (torchrun's RANK,
//! WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK; Slurm's SLURM_PROCID,
//! SLURM_LOCALID, SLURM_NTASKS).

use crate::engine::device::DeviceSpec;
use anyhow::{bail, Context, Result};

/// The worker's command-line flags (all optional).
#[derive(Clone, Debug, Default)]
pub struct LaunchFlags {
    pub rank: Option<u32>,
    pub coordinator: Option<String>,
    pub device: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// None: the coordinator assigns one.
    pub rank: Option<u32>,
    pub coordinator: String,
    pub device: DeviceSpec,
    /// The rank among the workers on this host (LOCAL_RANK or
    /// SLURM_LOCALID): the GPU `--device auto` takes.
    pub local_rank: Option<usize>,
    /// What the launcher says the world size is, checked against the job's.
    pub world_size: Option<usize>,
}

/// Resolves the launch from flags and an environment lookup.
pub fn resolve(flags: &LaunchFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<Launch> {
    let number = |key: &str| -> Result<Option<u64>> {
        match env(key) {
            Some(v) => v.trim().parse().map(Some).with_context(|| format!("{key}={v:?} is not a number")),
            None => Ok(None),
        }
    };
    let rank = match flags.rank {
        Some(r) => Some(r),
        None => match number("RANK")?.or(number("SLURM_PROCID")?) {
            Some(r) => Some(u32::try_from(r).with_context(|| format!("rank {r} is too large"))?),
            None => None,
        },
    };
    let coordinator = match (&flags.coordinator, env("MASTER_ADDR")) {
        (Some(url), _) => url.clone(),
        (None, Some(addr)) => {
            let port = number("MASTER_PORT")?.unwrap_or(29500);
            format!("http://{addr}:{port}")
        }
        (None, None) => bail!("no coordinator given: pass --coordinator URL (e.g. http://head-node:29500) or set MASTER_ADDR and MASTER_PORT"),
    };
    let coordinator = if coordinator.contains("://") { coordinator } else { format!("http://{coordinator}") };
    let device = DeviceSpec::parse(flags.device.as_deref().unwrap_or("auto"))?;
    let local_rank = number("LOCAL_RANK")?.or(number("SLURM_LOCALID")?).map(|n| n as usize);
    let world_size = number("WORLD_SIZE")?.or(number("SLURM_NTASKS")?).map(|n| n as usize);
    Ok(Launch { rank, coordinator, device, local_rank, world_size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn flags_win_over_the_environment() {
        let flags = LaunchFlags { rank: Some(3), coordinator: Some("http://h:1".into()), device: Some("cpu".into()) };
        let l = resolve(&flags, &env(&[("RANK", "1"), ("MASTER_ADDR", "x")])).unwrap();
        assert_eq!(
            l,
            Launch {
                rank: Some(3),
                coordinator: "http://h:1".into(),
                device: DeviceSpec::Cpu,
                local_rank: None,
                world_size: None
            }
        );
    }

    #[test]
    fn torchrun_and_slurm_variables_are_read() {
        let l = resolve(
            &LaunchFlags::default(),
            &env(&[("RANK", "2"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "head"), ("MASTER_PORT", "1234")]),
        )
        .unwrap();
        assert_eq!((l.rank, l.coordinator.as_str(), l.world_size), (Some(2), "http://head:1234", Some(4)));
        let flags = LaunchFlags { coordinator: Some("head:29500".into()), ..Default::default() };
        let l = resolve(&flags, &env(&[("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS", "8")])).unwrap();
        assert_eq!((l.rank, l.coordinator.as_str(), l.world_size), (Some(5), "http://head:29500", Some(8)));
        assert_eq!((l.local_rank, l.device), (Some(1), DeviceSpec::Auto), "auto takes the GPU of SLURM_LOCALID");
        let l = resolve(&flags, &env(&[])).unwrap();
        assert_eq!(l.rank, None, "without any rank the coordinator assigns one");
    }

    #[test]
    fn bad_values_are_named() {
        let e = resolve(&LaunchFlags::default(), &env(&[])).unwrap_err().to_string();
        assert!(e.contains("--coordinator") && e.contains("MASTER_ADDR"), "{e}");
        let flags = LaunchFlags { coordinator: Some("http://h:1".into()), ..Default::default() };
        let e = resolve(&flags, &env(&[("RANK", "one")])).unwrap_err().to_string();
        assert!(e.contains("RANK=\"one\""), "{e}");
        let flags = LaunchFlags { device: Some("gpu".into()), ..flags };
        let e = resolve(&flags, &env(&[])).unwrap_err().to_string();
        assert!(e.contains("--device \"gpu\""), "{e}");
    }
}
