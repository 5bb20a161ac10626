//! What a run measures besides the clients' latencies: steps done (lines
//! of metrics.jsonl as it grows), each step's time, and the machine's CPU.

use anyhow::{Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Counts the complete lines of a file as it grows, reading only new bytes.
pub(crate) struct LineCounter {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    pub(crate) lines: u64,
}

impl LineCounter {
    pub(crate) fn poll(&mut self) -> Result<u64> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", self.path.display())),
        };
        let len = f.metadata().with_context(|| format!("cannot stat {}", self.path.display()))?.len();
        if len < self.offset {
            // Rewritten (a recovery cut it back): count again.
            self.offset = 0;
            self.lines = 0;
        }
        f.seek(SeekFrom::Start(self.offset)).with_context(|| format!("cannot seek {}", self.path.display()))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).with_context(|| format!("cannot read {}", self.path.display()))?;
        // Only complete lines: a line being written is counted next time.
        if let Some(last) = buf.iter().rposition(|&b| b == b'\n') {
            self.lines += buf[..=last].iter().filter(|&&b| b == b'\n').count() as u64;
            self.offset += last as u64 + 1;
        }
        Ok(self.lines)
    }
}

/// Step number and `seconds` of every line of a metrics.jsonl.
pub(crate) fn step_seconds(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let step = v["step"].as_u64().with_context(|| format!("{} line {}: no step", path.display(), i + 1))?;
        let s = v["seconds"].as_f64().with_context(|| format!("{} line {}: no seconds", path.display(), i + 1))?;
        out.push((step, s));
    }
    Ok(out)
}

/// CPU seconds every process on the machine has used, all cores (/proc/stat:
/// user, nice, system, irq, softirq, steal).
pub(crate) fn machine_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    Some(busy as f64 / 100.0)
}
