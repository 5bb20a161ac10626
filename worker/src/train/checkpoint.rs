//! Training checkpoints (docs/CHECKPOINTS.md): everything a run
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

use crate::codec::{decode, encode, SaveDtype};
use crate::model::weights::read_file;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tessera_job::checkpoint::{
    commit, complete_parts, optimizer_part_name, staging_dir, write_synced, FileEntry, RunState, LEGACY_OPTIMIZER,
    MODEL, STATE,
};
use tessera_job::fs::{digest, dirs_under, files_under, relative, sync_dir, sync_file};

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

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_job::checkpoint::{committed_steps, latest_intact, prune, verify};

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
