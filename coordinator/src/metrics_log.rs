//! metrics.jsonl: one line per finished step. A job that goes back to a
//! checkpoint (a recovery, or a coordinator started again) trains the steps
//! after it again, so the file is cut back to the steps before it: it always
//! reads as the one run that happened, each step once.

use crate::progress::StepSummary;
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: BufWriter<File>,
}

impl MetricsLog {
    /// A fresh file, or (resuming at `resume_at`) the earlier run's lines
    /// for the steps before it, which are returned. Unreadable lines (a
    /// line cut short by a kill) are dropped with a warning.
    pub fn open(path: &Path, resume_at: Option<u64>) -> Result<(Self, Vec<StepSummary>)> {
        let kept = match (resume_at, std::fs::read_to_string(path)) {
            (Some(step), Ok(text)) => parse(&text, path).into_iter().filter(|s| s.step < step).collect(),
            (Some(_), Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            (Some(_), Err(e)) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            (None, _) => Vec::new(),
        };
        let file = write_all(path, &kept)?;
        Ok((MetricsLog { path: path.to_path_buf(), file }, kept))
    }

    pub fn append(&mut self, s: &StepSummary) -> Result<()> {
        let line = serde_json::to_string(s)?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Replaces the file with these steps (after a recovery went back).
    pub fn rewrite(&mut self, steps: &[StepSummary]) -> Result<()> {
        self.file = write_all(&self.path, steps)?;
        Ok(())
    }
}

fn parse(text: &str, path: &Path) -> Vec<StepSummary> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<StepSummary>(line) {
            Ok(s) => out.push(s),
            Err(e) => {
                tracing::warn!(file = %path.display(), line = i + 1, error = %e, "dropping an unreadable metrics line")
            }
        }
    }
    out
}

/// Writes `steps` to a temporary file renamed over `path` (a kill leaves
/// the old file or the new one), and returns it open for appending.
fn write_all(path: &Path, steps: &[StepSummary]) -> Result<BufWriter<File>> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut w = BufWriter::new(File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
    for s in steps {
        writeln!(w, "{}", serde_json::to_string(s)?).with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    w.flush().with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(w);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    let file = File::options().append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(BufWriter::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64) -> StepSummary {
        StepSummary {
            step,
            loss: 1.0 / (step + 1) as f64,
            grad_norm: 0.5,
            lr_scale: 1.0,
            samples: 4,
            target_tokens: 9,
            llm_tokens: 30,
            tiles: 5,
            bad_samples: 0,
            truncated: 0,
            seconds: 0.25,
            tokens_per_s: 120.0,
            tiles_per_s: 20.0,
            plan_imbalance: 0.0,
            compute_imbalance: 0.1,
            comm_wait_s: 0.0,
            compute_s: vec![0.2, 0.22],
            step_s: vec![0.24, 0.25],
            rank_samples: vec![2, 2],
            stragglers: vec![],
        }
    }

    fn steps_in(path: &Path) -> Vec<u64> {
        parse(&std::fs::read_to_string(path).unwrap(), path).iter().map(|s| s.step).collect()
    }

    #[test]
    fn a_resumed_log_keeps_the_steps_before_the_checkpoint_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let (mut log, kept) = MetricsLog::open(&path, None).unwrap();
        assert!(kept.is_empty());
        for s in 0..5 {
            log.append(&step(s)).unwrap();
        }
        drop(log);
        // A kill can cut the last line short.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"step\": 5, \"lo");
        std::fs::write(&path, text).unwrap();

        let (mut log, kept) = MetricsLog::open(&path, Some(3)).unwrap();
        assert_eq!(kept, vec![step(0), step(1), step(2)]);
        assert_eq!(steps_in(&path), vec![0, 1, 2]);
        log.append(&step(3)).unwrap();
        assert_eq!(steps_in(&path), vec![0, 1, 2, 3]);
        log.rewrite(&kept[..1]).unwrap();
        log.append(&step(1)).unwrap();
        assert_eq!(steps_in(&path), vec![0, 1]);
        let (_, kept) = MetricsLog::open(&path, None).unwrap();
        assert!(kept.is_empty() && steps_in(&path).is_empty(), "a new job starts a new file");
    }

    /// Lines written before `step_s` existed still resume.
    #[test]
    fn a_line_without_step_times_is_read() {
        let mut v = serde_json::to_value(step(3)).unwrap();
        v.as_object_mut().unwrap().remove("step_s");
        let got = parse(&v.to_string(), Path::new("m.jsonl"));
        assert_eq!(got.len(), 1);
        assert!(got[0].step_s.is_empty());
    }
}
