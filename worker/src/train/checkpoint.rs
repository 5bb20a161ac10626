//! Training checkpoints (issue 6, DESIGN.md section 3): everything a run
//! needs to go on exactly as if it had never stopped, beside (never inside)
//! a VILA-layout model directory.
//!
//! ```text
//! CHECKPOINT_DIR/step-00000300/
//!     model/               the VILA layout (f32), loadable by debug-step and transformers
//!     optimizer.safetensors  AdamW's m and v per trainable parameter ("m.<name>", "v.<name>")
//!     state.json           step, data cursor (micro-batches consumed), seed
//!     manifest.json        every file above with its size and SHA-256; written last
//! ```
//!
//! A checkpoint is written into a hidden temporary directory; every file is
//! fsynced, the manifest last, then the directory is renamed into place and
//! the parent fsynced. So a `step-*` directory either holds a complete
//! checkpoint or was damaged afterwards, which the manifest detects: loading
//! verifies every size and checksum, and a damaged checkpoint is reported
//! and skipped for the newest intact one. Older checkpoints are deleted only
//! after a newer one is in place.

use crate::model::weights::{decode, encode, read_file, SaveDtype};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// A checkpoint's contents, on the host.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: RunState,
    /// Parameter values by checkpoint name.
    pub weights: BTreeMap<String, Vec<f32>>,
    /// AdamW's first and second moments by parameter name (trainable ones).
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    files: Vec<ManifestEntry>,
}

#[derive(Serialize, Deserialize)]
struct ManifestEntry {
    path: String,
    bytes: u64,
    sha256: String,
}

const FORMAT: &str = "tessera-checkpoint-1";
const PREFIX: &str = "step-";

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// What a checkpoint holds besides the model directory.
pub struct Parts<'a> {
    pub state: &'a RunState,
    pub m: &'a BTreeMap<String, Vec<f32>>,
    pub v: &'a BTreeMap<String, Vec<f32>>,
}

/// Writes the checkpoint of `parts.state.step` under `root`, atomically:
/// `write_model` fills the model directory it is given (the VILA layout).
/// Returns the committed directory.
pub fn save(root: &Path, parts: &Parts, write_model: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create checkpoint directory {}", root.display()))?;
    let name = step_dir_name(parts.state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        // Left by a writer that died: never committed, safe to replace.
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_model(&tmp.join("model"))?;
    write_moments(&tmp.join("optimizer.safetensors"), parts.m, parts.v)?;
    let state = serde_json::to_vec_pretty(parts.state)?;
    std::fs::write(tmp.join("state.json"), state)
        .with_context(|| format!("cannot write {}/state.json", tmp.display()))?;
    let mut files = Vec::new();
    for path in files_under(&tmp)? {
        sync_file(&path)?;
        let rel = relative(&tmp, &path);
        let (bytes, sha256) = digest(&path)?;
        files.push(ManifestEntry { path: rel, bytes, sha256 });
    }
    let manifest = serde_json::to_vec_pretty(&Manifest { format: FORMAT.into(), files })?;
    let manifest_path = tmp.join("manifest.json");
    std::fs::write(&manifest_path, manifest).with_context(|| format!("cannot write {}", manifest_path.display()))?;
    sync_file(&manifest_path)?;
    for dir in dirs_under(&tmp)? {
        sync_dir(&dir)?;
    }
    let dest = root.join(&name);
    if dest.exists() {
        // A checkpoint of the same step (a rerun of a step after a restart):
        // the new one is complete, so the old one may go.
        std::fs::remove_dir_all(&dest).with_context(|| format!("cannot replace {}", dest.display()))?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("cannot commit {} as {}", tmp.display(), dest.display()))?;
    sync_dir(root)?;
    Ok(dest)
}

/// Deletes all but the newest `keep` committed checkpoints (and any
/// temporary directory older than the newest commit).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let steps = committed_steps(root)?;
    for step in steps.iter().rev().skip(keep.max(1)) {
        let dir = root.join(step_dir_name(*step));
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot delete old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Steps of the committed (renamed into place) checkpoints, oldest first.
pub fn committed_steps(root: &Path) -> Result<Vec<u64>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<u64>().ok()) {
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
        .and_then(|n| n.strip_prefix(PREFIX))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{} is not a checkpoint directory ({PREFIX}NNNNNNNN)", dir.display()))
}

/// Checks a checkpoint directory against its manifest: every file listed
/// with its size and SHA-256, nothing missing.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read(&manifest_path)
        .with_context(|| format!("{}: no manifest (the checkpoint is incomplete)", dir.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{}: the manifest is not valid JSON (damaged)", manifest_path.display()))?;
    if manifest.format != FORMAT {
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

/// Reads a checkpoint that `latest_intact` (or `verify`) has just checked:
/// hashing every file again would read the whole checkpoint twice, which
/// at 3B parameters is tens of gigabytes. `read_model` reads its model
/// directory.
pub fn load(dir: &Path, read_model: impl FnOnce(&Path) -> Result<BTreeMap<String, Vec<f32>>>) -> Result<Checkpoint> {
    let state_path = dir.join("state.json");
    let state: RunState = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a run state", state_path.display()))?;
    let weights = read_model(&dir.join("model"))?;
    let (m, v) = read_moments(&dir.join("optimizer.safetensors"))?;
    Ok(Checkpoint { dir: dir.to_path_buf(), state, weights, m, v })
}

fn write_moments(path: &Path, m: &BTreeMap<String, Vec<f32>>, v: &BTreeMap<String, Vec<f32>>) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(String, Vec<u8>)> = m
        .iter()
        .map(|(k, x)| (format!("m.{k}"), x))
        .chain(v.iter().map(|(k, x)| (format!("v.{k}"), x)))
        .map(|(k, x)| (k, encode(x, SaveDtype::F32)))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b)| Ok((k.clone(), TensorView::new(Dtype::F32, vec![b.len() / 4], b)?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, &None)?;
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

type Moments = (BTreeMap<String, Vec<f32>>, BTreeMap<String, Vec<f32>>);

fn read_moments(path: &Path) -> Result<Moments> {
    let bytes = read_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::tensor::Dtype::F32 {
            bail!("{}: {name} is {:?}, expected F32", path.display(), t.dtype());
        }
        let values = decode(t.data(), t.dtype());
        match (name.strip_prefix("m."), name.strip_prefix("v.")) {
            (Some(p), _) => m.insert(p.to_string(), values),
            (_, Some(p)) => v.insert(p.to_string(), values),
            _ => bail!("{}: unexpected tensor {name}", path.display()),
        };
    }
    Ok((m, v))
}

/// Size and hex SHA-256 of a file, read in 1 MiB pieces.
fn digest(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

fn sync_file(path: &Path) -> Result<()> {
    let f = File::options().write(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

fn sync_dir(path: &Path) -> Result<()> {
    let d = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    d.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned()
}

/// Every regular file below `root`, sorted (the manifest's order).
fn files_under(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, &mut |p, is_dir| {
        if !is_dir {
            out.push(p.to_path_buf())
        }
    })?;
    out.sort();
    Ok(out)
}

/// `root` and every directory below it, deepest first (children are
/// synced before the entries that name them).
fn dirs_under(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![root.to_path_buf()];
    walk(root, &mut |p, is_dir| {
        if is_dir {
            out.push(p.to_path_buf())
        }
    })?;
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(out)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, bool)) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let is_dir = entry.file_type().with_context(|| format!("cannot stat {}", path.display()))?.is_dir();
        f(&path, is_dir);
        if is_dir {
            walk(&path, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(seed: f32) -> BTreeMap<String, Vec<f32>> {
        [("a.weight".to_string(), vec![seed, 2.0, -3.5]), ("b.bias".to_string(), vec![seed * 0.5])].into()
    }

    /// A stand-in model directory: one file holding the weights as JSON.
    fn save_step(root: &Path, step: u64) -> PathBuf {
        let state = RunState { step, optimizer_step: step, micro_batches: 2 * step, seed: 7 };
        let (m, v) = (moments(step as f32), moments(-(step as f32)));
        save(root, &Parts { state: &state, m: &m, v: &v }, |dir| {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("weights.json"), serde_json::to_vec(&moments(step as f32 + 0.25))?)?;
            Ok(())
        })
        .unwrap()
    }

    fn read_model(dir: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
        Ok(serde_json::from_slice(&std::fs::read(dir.join("weights.json"))?)?)
    }

    #[test]
    fn a_saved_checkpoint_loads_back_exactly() {
        let root = tempfile::tempdir().unwrap();
        let dir = save_step(root.path(), 3);
        assert_eq!(dir.file_name().unwrap(), "step-00000003");
        let c = load(&dir, read_model).unwrap();
        assert_eq!(c.state, RunState { step: 3, optimizer_step: 3, micro_batches: 6, seed: 7 });
        assert_eq!((c.m, c.v, c.weights), (moments(3.0), moments(-3.0), moments(3.25)));
        // Nothing temporary is left, and the manifest lists every file.
        let names: Vec<String> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(names, vec!["step-00000003".to_string()]);
        let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        for f in ["model/weights.json", "optimizer.safetensors", "state.json"] {
            assert!(manifest.contains(f), "{manifest}");
        }
    }

    /// A bit flip or a truncation is found by the manifest, named, and the
    /// previous checkpoint is used instead.
    #[test]
    fn damaged_checkpoints_are_named_and_skipped() {
        let root = tempfile::tempdir().unwrap();
        save_step(root.path(), 2);
        let newest = save_step(root.path(), 4);
        let opt = newest.join("optimizer.safetensors");
        let mut bytes = std::fs::read(&opt).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        std::fs::write(&opt, &bytes).unwrap();
        let e = verify(&newest).unwrap_err().to_string();
        assert!(e.contains("optimizer.safetensors") && e.contains("checksum mismatch"), "{e}");
        let mut warnings = Vec::new();
        let got = latest_intact(root.path(), &mut |w| warnings.push(w)).unwrap().unwrap();
        assert!(got.ends_with("step-00000002"), "{got:?}");
        assert!(warnings.len() == 1 && warnings[0].contains("step-00000004"), "{warnings:?}");

        let state = newest.join("state.json");
        let text = std::fs::read(&state).unwrap();
        std::fs::write(&state, &text[..text.len() / 2]).unwrap();
        std::fs::write(&opt, {
            bytes[last] ^= 0x10;
            &bytes
        })
        .unwrap();
        let e = verify(&newest).unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("truncated"), "{e}");
        std::fs::remove_file(newest.join("manifest.json")).unwrap();
        assert!(verify(&newest).unwrap_err().to_string().contains("incomplete"));
    }

    /// A writer that died leaves only its hidden temporary directory, which
    /// is never taken for a checkpoint and is replaced by the next save.
    #[test]
    fn an_unfinished_write_is_invisible() {
        let root = tempfile::tempdir().unwrap();
        save_step(root.path(), 1);
        let tmp = root.path().join(".step-00000002.tmp");
        std::fs::create_dir_all(tmp.join("model")).unwrap();
        std::fs::write(tmp.join("state.json"), b"{").unwrap();
        assert_eq!(committed_steps(root.path()).unwrap(), vec![1]);
        assert!(latest_intact(root.path(), &mut |w| panic!("{w}")).unwrap().unwrap().ends_with("step-00000001"));
        save_step(root.path(), 2);
        assert!(!tmp.exists());
        assert_eq!(committed_steps(root.path()).unwrap(), vec![1, 2]);
    }

    #[test]
    fn prune_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        for step in [3, 6, 9, 12] {
            save_step(root.path(), step);
        }
        prune(root.path(), 2).unwrap();
        assert_eq!(committed_steps(root.path()).unwrap(), vec![9, 12]);
        prune(root.path(), 0).unwrap();
        assert_eq!(committed_steps(root.path()).unwrap(), vec![12], "the newest is always kept");
    }
}
