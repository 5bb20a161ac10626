//! The checkpoint manifest protocol that ranks and the coordinator share:
//! directory names, the files a rank reports ([`FileEntry`]), the two-phase
//! commit, verification against the manifest, the newest intact checkpoint
//! and pruning. What the files hold (the model directory, the optimizer
//! parts) is written and read by the worker (`tessera_worker::train::checkpoint`);
//! the layout is in docs/CHECKPOINTS.md.
//!
//! ```text
//! CHECKPOINT_DIR/step-00000300/
//!     model/               the VILA layout (f32)
//!     optimizer-RRRRR-of-WWWWW.safetensors   one part per rank
//!     state.json           step, data cursor (micro-batches consumed), seed
//!     manifest.json        every file above with its size and SHA-256; written last
//! CHECKPOINT_DIR/.step-00000400.g2.staging/   parts of step 400 being written (generation 2)
//! ```
//!
//! A `step-*` directory either holds a complete checkpoint or was damaged
//! afterwards, which the manifest detects. A staging directory is never
//! taken for a checkpoint; stale ones are removed by the next commit, and
//! older checkpoints are deleted only after a newer one is in place.

use crate::fs::{digest, files_under, relative, sha256_hex, sync_dir};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Where the run stands, besides its tensors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// Training steps completed (the loop's position).
    pub step: u64,
    /// AdamW steps taken (fewer than `step` when a step had only bad samples).
    pub optimizer_step: u64,
    /// Micro-batches the data loader has handed out (its cursor: the data
    /// order is a pure function of seed and this index).
    pub micro_batches: u64,
    pub seed: u64,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    files: Vec<FileEntry>,
}

/// A file of a checkpoint, as a rank reports it and the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the contents.
    pub sha256: String,
}

/// Optimizer state in per-rank parts.
pub const FORMAT: &str = "tessera-checkpoint-2";
/// Still read: the same, with one `optimizer.safetensors`.
pub const FORMAT_1: &str = "tessera-checkpoint-1";
pub const PREFIX: &str = "step-";
pub const MANIFEST: &str = "manifest.json";
pub const STATE: &str = "state.json";
pub const MODEL: &str = "model";
pub const LEGACY_OPTIMIZER: &str = "optimizer.safetensors";

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// The hidden directory the ranks of `generation` write the parts of
/// step `step`'s checkpoint into, before the commit renames it.
pub fn staging_dir(root: &Path, step: u64, generation: u64) -> PathBuf {
    root.join(format!(".{}.g{generation}.staging", step_dir_name(step)))
}

/// The file name of rank `rank`'s share of the optimizer state.
pub fn optimizer_part_name(rank: usize, world: usize) -> String {
    format!("optimizer-{rank:05}-of-{world:05}.safetensors")
}

/// Phase two, once every rank has written its part into `staging`:
/// commits it as the checkpoint of `step` under `root`. `files` are the
/// ranks' reports together. Checks that each is there at its reported size
/// (without hashing again: at 3B parameters that is tens of gigabytes),
/// that `state.json` holds `step` and that the optimizer parts are all
/// there; writes the manifest, renames `staging` to `step-NNNNNNNN`
/// (replacing a checkpoint of the same step, e.g. a damaged one or one a
/// restarted run wrote before), and removes stale staging directories of
/// this step and older ones. Returns the committed directory; [`prune`]
/// afterwards deletes the old checkpoints.
pub fn commit(root: &Path, staging: &Path, step: u64, mut files: Vec<FileEntry>) -> Result<PathBuf> {
    let here = staging.display();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = files.windows(2).find(|w| w[0].path == w[1].path) {
        bail!("{here}: {} is reported twice", w[0].path);
    }
    for f in &files {
        let plain = !f.path.is_empty() && Path::new(&f.path).components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || f.path == MANIFEST {
            bail!("{here}: {:?} is not a file a rank may write", f.path);
        }
        let path = staging.join(&f.path);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("{}: reported by a rank, but not in the staging directory", path.display()))?;
        if !meta.is_file() {
            bail!("{}: reported as a file, but is not one", path.display());
        }
        if meta.len() != f.bytes {
            bail!("{}: {} bytes, the rank reported {} (truncated or rewritten)", path.display(), meta.len(), f.bytes);
        }
    }
    if !files.iter().any(|f| f.path == STATE) {
        bail!("{here}: {STATE} is not reported (rank 0 did not report its part)");
    }
    let state_path = staging.join(STATE);
    let state: RunState = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a run state", state_path.display()))?;
    if state.step != step {
        bail!("{}: holds step {}, the commit is of step {step}", state_path.display(), state.step);
    }
    if !files.iter().any(|f| f.path.starts_with(&format!("{MODEL}/"))) {
        bail!("{here}: no model file is reported (rank 0 did not report its part)");
    }
    let parts: Vec<&str> = files.iter().map(|f| f.path.as_str()).filter(|p| p.starts_with("optimizer-")).collect();
    complete_parts(&parts).with_context(|| format!("{here}: the optimizer state is incomplete"))?;
    // The checkpoint holds exactly what its manifest lists: anything else
    // was left by an earlier attempt at this step that died.
    for path in files_under(staging)? {
        let rel = relative(staging, &path);
        if rel != MANIFEST && files.binary_search_by(|f| f.path.as_str().cmp(&rel)).is_err() {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
    }

    let manifest = serde_json::to_vec_pretty(&Manifest { format: FORMAT.into(), files })?;
    write_synced(staging, MANIFEST, &manifest)?;
    sync_dir(staging)?;
    let name = step_dir_name(step);
    let dest = root.join(&name);
    let aside = root.join(format!(".{name}.replaced"));
    if aside.exists() {
        // Left by a commit that died before it could remove it.
        std::fs::remove_dir_all(&aside).with_context(|| format!("cannot remove {}", aside.display()))?;
    }
    // A checkpoint of the same step (damaged, or written before a restart
    // reran the step) goes aside rather than away until the new one is in
    // place: a crash in between leaves the previous step's checkpoint.
    let replacing = dest.exists();
    if replacing {
        std::fs::rename(&dest, &aside)
            .with_context(|| format!("cannot move {} aside to {}", dest.display(), aside.display()))?;
    }
    std::fs::rename(staging, &dest).with_context(|| format!("cannot commit {here} as {}", dest.display()))?;
    sync_dir(root)?;
    if replacing {
        std::fs::remove_dir_all(&aside).with_context(|| {
            format!("{} is committed, but the replaced {} cannot be removed", dest.display(), aside.display())
        })?;
    }
    remove_stale(root, step).with_context(|| format!("{} is committed", dest.display()))?;
    Ok(dest)
}

/// Removes the hidden directories of steps up to `step` (staging
/// directories of an aborted generation or of a writer that died, older
/// temporary directories, checkpoints set aside): a checkpoint of `step`
/// is committed, so none of them will be.
fn remove_stale(root: &Path, step: u64) -> Result<()> {
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((digits, rest)) =
            name.strip_prefix('.').and_then(|n| n.strip_prefix(PREFIX)).and_then(|n| n.split_once('.'))
        else {
            continue;
        };
        let ours = rest == "tmp"
            || rest == "replaced"
            || rest.strip_prefix('g').and_then(|r| r.strip_suffix(".staging")).and_then(number::<u64>).is_some();
        if ours && number::<u64>(digits).is_some_and(|s| s <= step) {
            let path = entry.path();
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
    }
    Ok(())
}

/// Deletes all but the newest `keep` committed checkpoints, and never the
/// one of step `spare` (a checkpoint that ranks may still be loading).
pub fn prune(root: &Path, keep: usize, spare: Option<u64>) -> Result<()> {
    let steps = committed_steps(root)?;
    for step in steps.iter().rev().skip(keep.max(1)).filter(|&&s| Some(s) != spare) {
        let dir = root.join(step_dir_name(*step));
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot delete old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// A decimal number of ASCII digits only (`parse` also takes a sign).
fn number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The step of a committed checkpoint's directory name: `step-` and digits.
fn parse_step_name(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX).and_then(number)
}

/// Steps of the committed (renamed into place) checkpoints, oldest first.
pub fn committed_steps(root: &Path) -> Result<Vec<u64>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        if let Some(step) = parse_step_name(&entry.file_name().to_string_lossy()) {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// The step a committed checkpoint directory holds, from its name.
pub fn committed_step(dir: &Path) -> Result<u64> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_step_name)
        .with_context(|| format!("{} is not a checkpoint directory ({PREFIX}NNNNNNNN)", dir.display()))
}

/// Checks a checkpoint directory against its manifest: every file listed
/// with its size and SHA-256, nothing missing.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read(&manifest_path)
        .with_context(|| format!("{}: no manifest (the checkpoint is incomplete)", dir.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{}: the manifest is not valid JSON (damaged)", manifest_path.display()))?;
    if manifest.format != FORMAT && manifest.format != FORMAT_1 {
        bail!("{}: format {:?}, expected {FORMAT:?}", manifest_path.display(), manifest.format);
    }
    for f in &manifest.files {
        let path = dir.join(&f.path);
        let (bytes, sha256) = digest(&path).with_context(|| format!("{}: a file the manifest lists", dir.display()))?;
        if bytes != f.bytes {
            bail!("{}: {} bytes, the manifest says {} (truncated or replaced)", path.display(), bytes, f.bytes);
        }
        if sha256 != f.sha256 {
            bail!("{}: checksum mismatch (the file is damaged)", path.display());
        }
    }
    Ok(())
}

/// The newest intact checkpoint under `root`, if any; damaged ones are
/// reported through `warn` (naming the file and what is wrong) and skipped.
pub fn latest_intact(root: &Path, warn: &mut dyn FnMut(String)) -> Result<Option<PathBuf>> {
    for step in committed_steps(root)?.into_iter().rev() {
        let dir = root.join(step_dir_name(step));
        match verify(&dir) {
            Ok(()) => return Ok(Some(dir)),
            Err(e) => warn(format!("skipping damaged checkpoint {}: {e:#}", dir.display())),
        }
    }
    Ok(None)
}

/// Checks that `names` (optimizer part file names) are one complete set:
/// every rank of one world size exactly once.
pub fn complete_parts<'a>(names: &[&'a str]) -> Result<Vec<&'a str>> {
    let mut world = None;
    let mut by_rank = BTreeMap::new();
    for &name in names {
        let (rank, w) = name
            .strip_prefix("optimizer-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.split_once("-of-"))
            .and_then(|(r, w)| Some((number::<usize>(r)?, number::<usize>(w)?)))
            .with_context(|| format!("{name}: not an optimizer part (optimizer-RRRRR-of-WWWWW.safetensors)"))?;
        if rank >= w {
            bail!("{name}: rank {rank} of {w} is no rank");
        }
        match world {
            None => world = Some((w, name)),
            Some((first, other)) if first != w => bail!("{name} and {other}: parts of writes by different world sizes"),
            _ => {}
        }
        if let Some(other) = by_rank.insert(rank, name) {
            bail!("{name} and {other}: rank {rank}'s part twice");
        }
    }
    let Some((world, _)) = world else { bail!("no optimizer part ({})", optimizer_part_name(0, 1)) };
    if let Some(r) = (0..world).find(|r| !by_rank.contains_key(r)) {
        bail!("{} is missing (rank {r} of {world} did not write or report its part)", optimizer_part_name(r, world));
    }
    Ok(by_rank.into_values().collect())
}

/// Writes `bytes` to `dir/name` and fsyncs it; the entry is hashed from
/// the bytes in memory rather than read back.
pub fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = dir.join(name);
    let mut f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))?;
    Ok(FileEntry { path: name.to_string(), bytes: bytes.len() as u64, sha256: sha256_hex(bytes) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_steps_take_only_step_and_digits() {
        let root = tempfile::tempdir().unwrap();
        for name in ["step-00000002", "step-+3", "step-4x", "step-", ".step-00000005", "steps-6", "step-00000010"] {
            std::fs::create_dir_all(root.path().join(name)).unwrap();
        }
        assert_eq!(committed_steps(root.path()).unwrap(), vec![2, 10]);
        assert!(committed_step(&root.path().join("step-+3")).is_err());
    }
}
