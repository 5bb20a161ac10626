//! Training checkpoints (issue 6, DESIGN.md section 3): everything a run
//! needs to go on exactly as if it had never stopped, beside (never inside)
//! a VILA-layout model directory.
//!
//! ```text
//! CHECKPOINT_DIR/step-00000300/
//!     model/               the VILA layout (f32), loadable by debug-step and transformers
//!     optimizer-00000-of-00004.safetensors
//!     ...                  AdamW's m and v ("m.<name>", "v.<name>"), one part per rank:
//!     optimizer-00003-of-00004.safetensors  rank r holds parameters i % 4 == r (sorted names)
//!     state.json           step, data cursor (micro-batches consumed), seed
//!     manifest.json        every file above with its size and SHA-256; written last
//! CHECKPOINT_DIR/.step-00000400.g2.staging/   parts of step 400 being written (generation 2)
//! ```
//!
//! Writing is two-phase, so that every rank of a multi-worker job writes
//! its share of the optimizer state (twice the model) in parallel:
//!
//! 1. Each rank writes its part into the hidden staging directory of the
//!    step and generation ([`staging_dir`], [`write_part`]): its optimizer
//!    file, and on rank 0 also the model and `state.json`. Every file and
//!    directory is fsynced, and the rank reports the files it wrote with
//!    their sizes and SHA-256 ([`FileEntry`]), hashed as they were written.
//! 2. The coordinator, once every rank has reported, [`commit`]s: it checks
//!    the parts are all there at the reported sizes, writes the manifest
//!    from the reports, fsyncs, renames the staging directory to
//!    `step-NNNNNNNN`, and fsyncs the root.
//!
//! [`save`] does both in one process (`worker train`, world size 1). So a
//! `step-*` directory either holds a complete checkpoint or was damaged
//! afterwards, which the manifest detects: [`latest_intact`] verifies every
//! size and checksum, and a damaged checkpoint is reported and skipped for
//! the newest intact one. A staging directory is never taken for a
//! checkpoint; stale ones (an aborted generation, a writer that died) are
//! removed by the next commit. Older checkpoints are deleted ([`prune`])
//! only after a newer one is in place. [`load`] merges the optimizer parts
//! by name, so a run may resume with another world size.

use crate::model::weights::{decode, encode, read_file, SaveDtype};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
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
const FORMAT: &str = "tessera-checkpoint-2";
/// Still read: the same, with one `optimizer.safetensors`.
const FORMAT_1: &str = "tessera-checkpoint-1";
const PREFIX: &str = "step-";
const MANIFEST: &str = "manifest.json";
const STATE: &str = "state.json";
const MODEL: &str = "model";
const LEGACY_OPTIMIZER: &str = "optimizer.safetensors";

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

/// What a checkpoint holds besides the model directory.
pub struct Parts<'a> {
    pub state: &'a RunState,
    pub m: &'a BTreeMap<String, Vec<f32>>,
    pub v: &'a BTreeMap<String, Vec<f32>>,
}

/// What rank `rank` of `world` contributes to a checkpoint. `m` and `v`
/// hold every trainable parameter's moments (all ranks hold the same after
/// the all-reduced update); the rank writes its share of them.
pub struct RankPart<'a> {
    pub rank: usize,
    pub world: usize,
    pub state: &'a RunState,
    pub m: &'a BTreeMap<String, Vec<f32>>,
    pub v: &'a BTreeMap<String, Vec<f32>>,
}

/// Writes the checkpoint of `parts.state.step` under `root` from this one
/// process (a world of one rank): `write_model` fills the model directory
/// it is given (the VILA layout). Returns the committed directory.
pub fn save(root: &Path, parts: &Parts, write_model: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let step = parts.state.step;
    let staging = staging_dir(root, step, 0);
    if staging.exists() {
        // Left by a writer that died: never committed, and this process is
        // its only writer, so it starts afresh.
        std::fs::remove_dir_all(&staging).with_context(|| format!("cannot remove the stale {}", staging.display()))?;
    }
    let part = RankPart { rank: 0, world: 1, state: parts.state, m: parts.m, v: parts.v };
    let files = write_part(&staging, &part, Some(write_model))?;
    commit(root, &staging, step, files)
}

/// Phase one: writes rank `part.rank`'s part of a checkpoint into
/// `staging` (see [`staging_dir`]; the ranks of a job write into the same
/// one at once): its optimizer file, holding the moments of the
/// parameters whose index in sorted name order is `rank` modulo `world`
/// (written even when that is none, so the set of parts is complete), and
/// on rank 0, which alone gets `write_model`, the model directory and
/// `state.json`. Every file and directory written is fsynced. Returns the
/// files written, for [`commit`].
pub fn write_part(
    staging: &Path,
    part: &RankPart,
    write_model: Option<impl FnOnce(&Path) -> Result<()>>,
) -> Result<Vec<FileEntry>> {
    let (rank, world) = (part.rank, part.world);
    if rank >= world {
        bail!("rank {rank} of {world}: no such rank");
    }
    if !part.m.keys().eq(part.v.keys()) {
        bail!("the first and second moments are of different parameters");
    }
    match (rank, write_model.is_some()) {
        (0, false) => bail!("rank 0 writes the model, but has no model writer"),
        (r, true) if r != 0 => bail!("rank {r} has a model writer; only rank 0 writes the model"),
        _ => {}
    }
    // Directories this call may create: their entries in their parents must
    // be synced too. Another rank may create them at the same moment, which
    // create_dir_all accepts; syncing a parent twice is harmless.
    let mut created = Vec::new();
    let mut dir = staging;
    while !dir.exists() {
        created.push(dir.to_path_buf());
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p,
            _ => break,
        }
    }
    std::fs::create_dir_all(staging).with_context(|| format!("cannot create {}", staging.display()))?;

    let mut files = Vec::new();
    if let Some(write_model) = write_model {
        let model = staging.join(MODEL);
        if model.exists() {
            // Left by an earlier attempt at this step that died; only rank 0
            // writes here, so nothing stale can end up in the checkpoint.
            std::fs::remove_dir_all(&model).with_context(|| format!("cannot remove the stale {}", model.display()))?;
        }
        write_model(&model)?;
        // Written by someone else's code: synced and hashed by reading back.
        for path in files_under(&model)? {
            sync_file(&path)?;
            let (bytes, sha256) = digest(&path)?;
            files.push(FileEntry { path: relative(staging, &path), bytes, sha256 });
        }
        for dir in dirs_under(&model)? {
            sync_dir(&dir)?;
        }
        files.push(write_synced(staging, STATE, &serde_json::to_vec_pretty(part.state)?)?);
    }
    let mine: Vec<&String> = part.m.keys().enumerate().filter(|(i, _)| i % world == rank).map(|(_, k)| k).collect();
    let moments = moments_bytes(&mine, part.m, part.v)?;
    files.push(write_synced(staging, &optimizer_part_name(rank, world), &moments)?);
    sync_dir(staging)?;
    for dir in &created {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
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

/// Reads a checkpoint that `latest_intact` (or `verify`) has just checked:
/// hashing every file again would read the whole checkpoint twice, which
/// at 3B parameters is tens of gigabytes. `read_model` reads its model
/// directory. The optimizer parts are merged by name, whatever world size
/// wrote them.
pub fn load(dir: &Path, read_model: impl FnOnce(&Path) -> Result<BTreeMap<String, Vec<f32>>>) -> Result<Checkpoint> {
    let state_path = dir.join(STATE);
    let state: RunState = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a run state", state_path.display()))?;
    let weights = read_model(&dir.join(MODEL))?;
    let (m, v) = read_optimizer(dir)?;
    Ok(Checkpoint { dir: dir.to_path_buf(), state, weights, m, v })
}

/// Checks that `names` (optimizer part file names) are one complete set:
/// every rank of one world size exactly once.
fn complete_parts<'a>(names: &[&'a str]) -> Result<Vec<&'a str>> {
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

/// The optimizer state of checkpoint `dir`: every part, or the single
/// file of the first format.
fn read_optimizer(dir: &Path) -> Result<Moments> {
    let (mut parts, mut legacy) = (Vec::new(), false);
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry.with_context(|| format!("cannot list {}", dir.display()))?.file_name();
        let name = name.to_string_lossy();
        if name == LEGACY_OPTIMIZER {
            legacy = true;
        } else if name.starts_with("optimizer-") && name.ends_with(".safetensors") {
            parts.push(name.into_owned());
        }
    }
    let names: Vec<&str> = match (legacy, parts.is_empty()) {
        (true, true) => vec![LEGACY_OPTIMIZER],
        (true, false) => bail!("{}: both {LEGACY_OPTIMIZER} and optimizer parts; which one is current?", dir.display()),
        (false, _) => {
            let names: Vec<&str> = parts.iter().map(String::as_str).collect();
            complete_parts(&names).with_context(|| format!("{}: the optimizer state is incomplete", dir.display()))?
        }
    };
    let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
    for name in names {
        let path = dir.join(name);
        let (pm, pv) = read_moments(&path)?;
        for (which, part, all) in [("m", pm, &mut m), ("v", pv, &mut v)] {
            for (k, x) in part {
                if all.insert(k.clone(), x).is_some() {
                    bail!("{}: {which}.{k} is in another optimizer part too", path.display());
                }
            }
        }
    }
    Ok((m, v))
}

/// A safetensors file of the moments of `names`.
fn moments_bytes(names: &[&String], m: &BTreeMap<String, Vec<f32>>, v: &BTreeMap<String, Vec<f32>>) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut bytes = Vec::with_capacity(2 * names.len());
    for (which, moments) in [("m", m), ("v", v)] {
        for &name in names {
            let x = moments.get(name).with_context(|| format!("no {which} for {name}"))?;
            bytes.push((format!("{which}.{name}"), encode(x, SaveDtype::F32)));
        }
    }
    let views = bytes
        .iter()
        .map(|(k, b)| Ok((k.clone(), TensorView::new(Dtype::F32, vec![b.len() / 4], b)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, &None)?)
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

/// Writes `bytes` to `dir/name` and fsyncs it; the entry is hashed from
/// the bytes in memory rather than read back.
fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = dir.join(name);
    let mut f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))?;
    Ok(FileEntry { path: name.to_string(), bytes: bytes.len() as u64, sha256: hex(&Sha256::digest(bytes)) })
}

fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
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
    Ok((bytes, hex(&hasher.finalize())))
}

fn sync_file(path: &Path) -> Result<()> {
    let f = File::options().write(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

fn sync_dir(path: &Path) -> Result<()> {
    let d = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    d.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

/// `path` relative to `root`, `/`-separated on every platform (the
/// manifest's form).
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Every regular file below `root`, sorted.
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

    fn state(step: u64) -> RunState {
        RunState { step, optimizer_step: step, micro_batches: 2 * step, seed: 7 }
    }

    /// A stand-in model directory: one file holding the weights as JSON.
    fn write_model(step: u64) -> impl FnOnce(&Path) -> Result<()> {
        move |dir: &Path| {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("weights.json"), serde_json::to_vec(&moments(step as f32 + 0.25))?)?;
            Ok(())
        }
    }

    fn save_step(root: &Path, step: u64) -> PathBuf {
        let (m, v) = (moments(step as f32), moments(-(step as f32)));
        save(root, &Parts { state: &state(step), m: &m, v: &v }, write_model(step)).unwrap()
    }

    fn read_model(dir: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
        Ok(serde_json::from_slice(&std::fs::read(dir.join("weights.json"))?)?)
    }

    /// Moments of `n` parameters, distinct per parameter and per moment.
    fn many(n: usize, sign: f32) -> BTreeMap<String, Vec<f32>> {
        (0..n).map(|i| (format!("p{i}.weight"), vec![sign * i as f32, sign * 0.5, i as f32 + 0.125])).collect()
    }

    /// Rank `rank` of `world` writes its part of step `step`.
    fn write_rank(staging: &Path, step: u64, rank: usize, world: usize, params: usize) -> Vec<FileEntry> {
        let (s, m, v) = (state(step), many(params, 1.0), many(params, -1.0));
        let part = RankPart { rank, world, state: &s, m: &m, v: &v };
        write_part(staging, &part, (rank == 0).then(|| write_model(step))).unwrap()
    }

    /// Every rank of `world` writes, in `order`; their reports together.
    fn write_ranks(
        root: &Path,
        step: u64,
        generation: u64,
        order: &[usize],
        params: usize,
    ) -> (PathBuf, Vec<FileEntry>) {
        let staging = staging_dir(root, step, generation);
        let files = order.iter().flat_map(|&r| write_rank(&staging, step, r, order.len(), params)).collect();
        (staging, files)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_saved_checkpoint_loads_back_exactly() {
        let root = tempfile::tempdir().unwrap();
        let dir = save_step(root.path(), 3);
        assert_eq!(dir.file_name().unwrap(), "step-00000003");
        let c = load(&dir, read_model).unwrap();
        assert_eq!(c.state, state(3));
        assert_eq!((c.m, c.v, c.weights), (moments(3.0), moments(-3.0), moments(3.25)));
        // Nothing temporary is left, and the manifest lists every file.
        assert_eq!(names(root.path()), ["step-00000003"]);
        let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        for f in ["model/weights.json", "optimizer-00000-of-00001.safetensors", "state.json"] {
            assert!(manifest.contains(f), "{manifest}");
        }
        verify(&dir).unwrap();
    }

    /// Ranks write at once into a staging directory none has created yet;
    /// the commit's checkpoint verifies and loads back every moment.
    #[test]
    fn parts_written_at_once_by_three_ranks_commit_and_load_back() {
        let root = tempfile::tempdir().unwrap();
        let ck = root.path().join("ck");
        let staging = staging_dir(&ck, 6, 1);
        let reports: Vec<Vec<FileEntry>> = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn({
                        let st = &staging;
                        move || write_rank(st, 6, r, 3, 5)
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let dir = commit(&ck, &staging, 6, reports.concat()).unwrap();
        assert_eq!(names(&ck), ["step-00000006"]);
        verify(&dir).unwrap();
        let c = load(&dir, read_model).unwrap();
        assert_eq!((c.state, c.weights), (state(6), moments(6.25)));
        assert_eq!((c.m, c.v), (many(5, 1.0), many(5, -1.0)), "every parameter's moments, from all parts");
        // Each part holds its rank's share: parameters i % 3 == r.
        let (m1, _) = read_moments(&dir.join("optimizer-00001-of-00003.safetensors")).unwrap();
        assert_eq!(m1.keys().collect::<Vec<_>>(), ["p1.weight", "p4.weight"]);
    }

    /// The order the ranks finish in does not matter, and a rank with no
    /// parameter still writes its part; a resume merges the parts whatever
    /// world size wrote them.
    #[test]
    fn parts_in_any_order_and_an_empty_one_load_back() {
        let root = tempfile::tempdir().unwrap();
        for (step, order) in [(2, vec![2, 0, 1]), (4, vec![3, 1, 2, 0])] {
            let (staging, files) = write_ranks(root.path(), step, 0, &order, 3);
            let dir = commit(root.path(), &staging, step, files).unwrap();
            let c = load(&dir, read_model).unwrap();
            assert_eq!((c.m, c.v), (many(3, 1.0), many(3, -1.0)), "world {}", order.len());
        }
        let empty = root.path().join("step-00000004/optimizer-00003-of-00004.safetensors");
        assert_eq!(read_moments(&empty).unwrap(), (BTreeMap::new(), BTreeMap::new()));
    }

    #[test]
    fn commit_refuses_a_missing_part_or_a_wrong_size() {
        let root = tempfile::tempdir().unwrap();
        let staging = staging_dir(root.path(), 5, 0);
        let reports: Vec<Vec<FileEntry>> = (0..3).map(|r| write_rank(&staging, 5, r, 3, 4)).collect();
        let without_1 = [reports[0].clone(), reports[2].clone()].concat();
        let e = format!("{:#}", commit(root.path(), &staging, 5, without_1).unwrap_err());
        assert!(e.contains("optimizer-00001-of-00003.safetensors is missing"), "{e}");
        let without_0 = [reports[1].clone(), reports[2].clone()].concat();
        let e = format!("{:#}", commit(root.path(), &staging, 5, without_0).unwrap_err());
        assert!(e.contains("state.json is not reported"), "{e}");
        let e = format!("{:#}", commit(root.path(), &staging, 6, reports.concat()).unwrap_err());
        assert!(e.contains("holds step 5, the commit is of step 6"), "{e}");

        let files = reports.concat();
        let mut wrong = files.clone();
        wrong.iter_mut().filter(|f| f.path.starts_with("optimizer-00002")).for_each(|f| f.bytes += 1);
        let e = format!("{:#}", commit(root.path(), &staging, 5, wrong).unwrap_err());
        assert!(e.contains("optimizer-00002-of-00003.safetensors") && e.contains("the rank reported"), "{e}");
        std::fs::remove_file(staging.join("model/weights.json")).unwrap();
        let e = format!("{:#}", commit(root.path(), &staging, 5, files).unwrap_err());
        assert!(e.contains("weights.json") && e.contains("not in the staging directory"), "{e}");
        assert!(committed_steps(root.path()).unwrap().is_empty(), "nothing was committed");
    }

    /// A resume refuses an incomplete or doubled set of parts.
    #[test]
    fn load_refuses_an_incomplete_set_of_parts() {
        let root = tempfile::tempdir().unwrap();
        let (staging, files) = write_ranks(root.path(), 3, 0, &[0, 1, 2], 4);
        let dir = commit(root.path(), &staging, 3, files).unwrap();
        let part = dir.join("optimizer-00002-of-00003.safetensors");
        let copy = dir.join("optimizer-2-of-3.safetensors");
        std::fs::copy(&part, &copy).unwrap();
        let e = format!("{:#}", load(&dir, read_model).err().unwrap());
        assert!(e.contains("rank 2's part twice"), "{e}");
        std::fs::remove_file(&copy).unwrap();
        std::fs::remove_file(&part).unwrap();
        let e = format!("{:#}", load(&dir, read_model).err().unwrap());
        assert!(e.contains("optimizer-00002-of-00003.safetensors is missing"), "{e}");
    }

    /// A checkpoint of the first format, one optimizer.safetensors, still loads.
    #[test]
    fn a_single_optimizer_file_still_loads() {
        let root = tempfile::tempdir().unwrap();
        let dir = save_step(root.path(), 1);
        std::fs::rename(dir.join(optimizer_part_name(0, 1)), dir.join("optimizer.safetensors")).unwrap();
        let c = load(&dir, read_model).unwrap();
        assert_eq!((c.m, c.v), (moments(1.0), moments(-1.0)));
    }

    /// A bit flip or a truncation is found by the manifest, named, and the
    /// previous checkpoint is used instead.
    #[test]
    fn damaged_checkpoints_are_named_and_skipped() {
        let root = tempfile::tempdir().unwrap();
        save_step(root.path(), 2);
        let newest = save_step(root.path(), 4);
        let opt = newest.join(optimizer_part_name(0, 1));
        let mut bytes = std::fs::read(&opt).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        std::fs::write(&opt, &bytes).unwrap();
        let e = verify(&newest).unwrap_err().to_string();
        assert!(e.contains("optimizer-00000-of-00001.safetensors") && e.contains("checksum mismatch"), "{e}");
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

    /// A commit over a damaged checkpoint of the same step replaces it,
    /// and nothing of the old one (nor the aside copy) is left.
    #[test]
    fn a_commit_replaces_a_damaged_checkpoint_of_the_same_step() {
        let root = tempfile::tempdir().unwrap();
        let old = save_step(root.path(), 4);
        std::fs::write(old.join("state.json"), b"{").unwrap();
        std::fs::write(old.join("left-over"), b"x").unwrap();
        assert!(latest_intact(root.path(), &mut |_| {}).unwrap().is_none());
        // A replaced copy left by an earlier commit that died.
        std::fs::create_dir_all(root.path().join(".step-00000004.replaced")).unwrap();
        let (staging, files) = write_ranks(root.path(), 4, 3, &[1, 0], 2);
        let dir = commit(root.path(), &staging, 4, files).unwrap();
        assert_eq!(names(root.path()), ["step-00000004"]);
        assert_eq!(latest_intact(root.path(), &mut |w| panic!("{w}")).unwrap(), Some(dir.clone()));
        assert!(!dir.join("left-over").exists());
        assert_eq!(load(&dir, read_model).unwrap().state, state(4));
    }

    /// A staging directory is never taken for a checkpoint; the next commit
    /// removes those of its step and older ones (an aborted generation, a
    /// writer that died), and keeps those of later steps.
    #[test]
    fn staging_directories_are_invisible_and_removed_by_a_later_commit() {
        let root = tempfile::tempdir().unwrap();
        save_step(root.path(), 1);
        let aborted = staging_dir(root.path(), 2, 0);
        write_rank(&aborted, 2, 1, 2, 3); // rank 0 never wrote: generation 0 aborted
        let tmp = root.path().join(".step-00000002.tmp");
        std::fs::create_dir_all(tmp.join("model")).unwrap();
        let later = staging_dir(root.path(), 9, 1);
        write_rank(&later, 9, 0, 2, 3);
        assert_eq!(aborted.file_name().unwrap(), ".step-00000002.g0.staging");
        assert_eq!(committed_steps(root.path()).unwrap(), vec![1]);
        assert!(latest_intact(root.path(), &mut |w| panic!("{w}")).unwrap().unwrap().ends_with("step-00000001"));

        let (staging, files) = write_ranks(root.path(), 3, 1, &[0, 1], 3);
        commit(root.path(), &staging, 3, files).unwrap();
        assert_eq!(names(root.path()), [".step-00000009.g1.staging", "step-00000001", "step-00000003"]);
        // A single process replaces its own unfinished write.
        write_rank(&staging_dir(root.path(), 4, 0), 4, 0, 1, 7);
        save_step(root.path(), 4);
        let c = load(&root.path().join("step-00000004"), read_model).unwrap();
        assert_eq!(c.m, moments(4.0), "nothing of the unfinished write is left");
        assert_eq!(committed_steps(root.path()).unwrap(), vec![1, 3, 4]);
    }

    #[test]
    fn committed_steps_take_only_step_and_digits() {
        let root = tempfile::tempdir().unwrap();
        for name in ["step-00000002", "step-+3", "step-4x", "step-", ".step-00000005", "steps-6", "step-00000010"] {
            std::fs::create_dir_all(root.path().join(name)).unwrap();
        }
        assert_eq!(committed_steps(root.path()).unwrap(), vec![2, 10]);
        assert!(committed_step(&root.path().join("step-+3")).is_err());
    }

    #[test]
    fn write_part_checks_its_rank() {
        let root = tempfile::tempdir().unwrap();
        let (s, m) = (state(1), moments(1.0));
        let part = |rank, world| RankPart { rank, world, state: &s, m: &m, v: &m };
        let none = None::<fn(&Path) -> Result<()>>;
        assert!(write_part(root.path(), &part(2, 2), none).unwrap_err().to_string().contains("no such rank"));
        assert!(write_part(root.path(), &part(0, 2), none).unwrap_err().to_string().contains("no model writer"));
        let e = write_part(root.path(), &part(1, 2), Some(write_model(1))).unwrap_err().to_string();
        assert!(e.contains("only rank 0"), "{e}");
    }

    #[test]
    fn prune_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        for step in [3, 6, 9, 12] {
            save_step(root.path(), step);
        }
        prune(root.path(), 2, None).unwrap();
        assert_eq!(committed_steps(root.path()).unwrap(), vec![9, 12]);
        prune(root.path(), 0, Some(9)).unwrap();
        assert_eq!(committed_steps(root.path()).unwrap(), vec![9, 12], "the spared one stays");
        prune(root.path(), 0, None).unwrap();
        assert_eq!(committed_steps(root.path()).unwrap(), vec![12], "the newest is always kept");
    }
}
