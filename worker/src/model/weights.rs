//! Loading and saving the safetensors weights of a VILA-layout model
//! directory (docs/DESIGN.md section 3).
//!
//! In memory the weights are a map from the full prefixed parameter name of
//! `param_specs` (`vision_tower.vision_model...`, `mm_projector.layers.1.weight`,
//! `llm.model.embed_tokens.weight`) to its f32 values in row-major order. On
//! disk each module folder holds `model.safetensors` (or, for any module,
//! `model.safetensors.index.json` + shards) with the names inside the folder.
//! Files may hold f32, bf16 or f16 tensors.

use super::params::{param_specs, Module, ParamSpec};
use crate::codec::{decode, encode, SaveDtype};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tessera_job::fs::{temp_path, write_atomic};
use tessera_job::hf_config::write_model_config;
use tessera_job::model::ModelConfig;

/// Parameter values by full prefixed name.
pub type Weights = BTreeMap<String, Vec<f32>>;

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The name a tensor of `module`'s file has in `param_specs` (prefix
/// stripped), or `None` for tensors that are ignored: SigLIP's
/// attention-pooling `head.*` and LLaMA's `rotary_emb.inv_freq` buffers.
/// transformers 5 saves vision tensors without the `vision_model.` prefix.
fn canonical_name(module: Module, name: &str) -> Option<Cow<'_, str>> {
    if name.ends_with(".rotary_emb.inv_freq") {
        return None;
    }
    if module == Module::VisionTower {
        if name.starts_with("head.") || name.starts_with("vision_model.head.") {
            return None;
        }
        if !name.starts_with("vision_model.") {
            return Some(Cow::Owned(format!("vision_model.{name}")));
        }
    }
    Some(Cow::Borrowed(name))
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{} does not exist", path.display()),
        _ => anyhow!("{}: cannot read: {e}", path.display()),
    })
}

/// Where one module's tensors are: its files, and for each expected name the
/// file that should hold it (for error messages).
struct ModuleFiles {
    files: Vec<PathBuf>,
    /// Per expected name; absent for names a shard index does not list.
    holder: HashMap<String, PathBuf>,
    /// The single file, or the index when sharded.
    main: PathBuf,
    sharded: bool,
}

fn locate_files(dir: &Path, module: Module) -> Result<ModuleFiles> {
    let folder = dir.join(module.folder());
    let single = folder.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(ModuleFiles { files: vec![single.clone()], holder: HashMap::new(), main: single, sharded: false });
    }
    let index = folder.join(INDEX_FILE);
    if !index.is_file() {
        bail!(
            "model directory {} has no {f}/{WEIGHTS_FILE} (nor {f}/{INDEX_FILE})",
            dir.display(),
            f = module.folder()
        );
    }
    let shown = index.display();
    let text = std::fs::read_to_string(&index).map_err(|e| anyhow!("{shown}: cannot read: {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow!("{shown}: not valid JSON: {e}"))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{shown}: key `weight_map` is missing or not an object"))?;
    let mut files = BTreeSet::new();
    let mut holder = HashMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| anyhow!("{shown}: `weight_map` entry `{name}` must be a file name, found {file}"))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == "." || file == ".." {
            bail!("{shown}: `weight_map` entry `{name}` names `{file}`, which is not a file in {}", folder.display());
        }
        let path = folder.join(file);
        if !files.contains(&path) {
            if !path.is_file() {
                bail!("{shown}: names shard `{file}`, which does not exist ({})", path.display());
            }
            files.insert(path.clone());
        }
        if let Some(canon) = canonical_name(module, name) {
            holder.insert(canon.into_owned(), path);
        }
    }
    Ok(ModuleFiles { files: files.into_iter().collect(), holder, main: index, sharded: true })
}

/// Loads every parameter of `cfg` from a VILA-layout model directory,
/// converted to f32 and keyed by the full prefixed names of `param_specs`.
pub fn load_weights(dir: &Path, cfg: &ModelConfig) -> Result<Weights> {
    cfg.validate().map_err(|e| anyhow!("cannot load weights from {}: {e}", dir.display()))?;
    let specs = param_specs(cfg);
    let mut out = Weights::new();
    for module in Module::ALL {
        let mine: HashMap<&str, &ParamSpec> =
            specs.iter().filter(|s| s.module == module).map(|s| (s.file_name(), s)).collect();
        let files = locate_files(dir, module)?;
        let mut origin: HashMap<&str, &Path> = HashMap::new();
        for path in &files.files {
            load_file(path, module, &mine, &mut origin, &mut out)?;
        }
        for spec in specs.iter().filter(|s| s.module == module) {
            if out.contains_key(&spec.name) {
                continue;
            }
            let name = spec.file_name();
            match files.holder.get(name) {
                Some(file) => bail!("{} has no tensor `{name}` (expected shape {:?})", file.display(), spec.shape),
                None if files.sharded => bail!(
                    "{}: `weight_map` has no tensor `{name}` (expected shape {:?})",
                    files.main.display(),
                    spec.shape
                ),
                None => bail!("{} has no tensor `{name}` (expected shape {:?})", files.main.display(), spec.shape),
            }
        }
    }
    Ok(out)
}

fn load_file<'s>(
    path: &'s Path,
    module: Module,
    specs: &HashMap<&str, &'s ParamSpec>,
    origin: &mut HashMap<&'s str, &'s Path>,
    out: &mut Weights,
) -> Result<()> {
    let shown = path.display();
    let bytes = read_file(path)?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{shown}: truncated or corrupt safetensors file: {e}"))?;
    let mut names = st.names();
    names.sort();

    // Check names, dtypes and shapes of the whole file before converting.
    let mut todo = Vec::new();
    let mut unexpected = Vec::new();
    for name in names {
        let Some(canon) = canonical_name(module, name) else { continue };
        let Some(&spec) = specs.get(canon.as_ref()) else {
            unexpected.push(name.as_str());
            continue;
        };
        let view = st.tensor(name).map_err(|e| anyhow!("{shown}: tensor `{name}`: {e}"))?;
        match view.dtype() {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => {}
            other => bail!("tensor `{name}` in {shown} has dtype {other:?}; expected F32, BF16 or F16"),
        }
        if view.shape() != spec.shape.as_slice() {
            bail!("tensor `{name}` in {shown}: expected shape {:?}, found {:?}", spec.shape, view.shape());
        }
        if let Some(prev) = origin.insert(spec.file_name(), path) {
            bail!(
                "tensor `{name}` in {shown}: parameter `{}` was already loaded (from {})",
                spec.file_name(),
                prev.display()
            );
        }
        todo.push((spec, view));
    }
    if !unexpected.is_empty() {
        let shown_names: Vec<String> = unexpected.iter().take(5).map(|n| format!("`{n}`")).collect();
        let more = if unexpected.len() > 5 { format!(" and {} more", unexpected.len() - 5) } else { String::new() };
        bail!("{shown}: unexpected tensor {}{more}: not a parameter of this model config", shown_names.join(", "));
    }
    for (spec, view) in todo {
        out.insert(spec.name.clone(), decode(view.data(), view.dtype()));
    }
    Ok(())
}

/// A tensor to write: borrowed f32 values, encoded when the file is written.
struct OutTensor<'a> {
    data: &'a [f32],
    shape: &'a [usize],
    dtype: SaveDtype,
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(encode(self.data, self.dtype))
    }
    fn data_len(&self) -> usize {
        self.data.len() * self.dtype.size()
    }
}

/// Writes one safetensors file through a temporary name in the same folder.
fn write_safetensors(path: &Path, specs: &[&ParamSpec], weights: &Weights, dtype: SaveDtype) -> Result<()> {
    let tensors: Vec<(&str, OutTensor)> =
        specs.iter().map(|s| (s.file_name(), OutTensor { data: &weights[&s.name], shape: &s.shape, dtype })).collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let tmp = temp_path(path);
    let res = safetensors::serialize_to_file(tensors, &meta, &tmp)
        .map_err(|e| anyhow!("{e}"))
        .and_then(|()| Ok(std::fs::File::open(&tmp)?.sync_all()?))
        .and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: cannot write: {e}", path.display());
    }
    Ok(())
}

/// Checks that `weights` holds exactly the parameters of `specs`, each with
/// the right number of values.
fn check_weights(specs: &[ParamSpec], weights: &Weights) -> Result<()> {
    for s in specs {
        match weights.get(&s.name) {
            None => bail!("weights have no parameter `{}` (expected shape {:?})", s.name, s.shape),
            Some(v) if v.len() != s.numel() => {
                bail!("parameter `{}` has {} values; expected {} (shape {:?})", s.name, v.len(), s.numel(), s.shape)
            }
            Some(_) => {}
        }
    }
    if weights.len() != specs.len() {
        let known: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        if let Some(extra) = weights.keys().find(|k| !known.contains(k.as_str())) {
            bail!("weights have parameter `{extra}`, which is not in the model config");
        }
    }
    Ok(())
}

fn is_shard_name(name: &str) -> bool {
    name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors")
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow!("cannot remove stale {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes shard files in `folder` that are not in `keep`.
fn remove_stale_shards(folder: &Path, keep: &BTreeSet<String>) -> Result<()> {
    let entries = std::fs::read_dir(folder).with_context(|| format!("cannot list {}", folder.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", folder.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_shard_name(&name) && !keep.contains(&name) {
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// Writes a VILA-layout model directory: the four config.json files and the
/// three safetensors files (names without the folder prefix, vision names
/// with `vision_model.`). With `llm_shard_bytes`, the LLM is split into
/// `model-0000K-of-0000N.safetensors` shards of at most that many bytes (a
/// larger tensor gets a shard of its own) plus `model.safetensors.index.json`.
/// Each file is written under a temporary name and renamed into place; stale
/// LLM files of the other layout are removed.
pub fn save_model_dir(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &BTreeMap<String, Vec<f32>>,
    dtype: SaveDtype,
    llm_shard_bytes: Option<usize>,
) -> Result<()> {
    cfg.validate().map_err(|e| anyhow!("refusing to save {}: {e}", dir.display()))?;
    if llm_shard_bytes == Some(0) {
        bail!("llm_shard_bytes must be positive");
    }
    let specs = param_specs(cfg);
    check_weights(&specs, weights)?;
    write_model_config(dir, cfg)?;

    for module in [Module::VisionTower, Module::Projector] {
        let mine: Vec<&ParamSpec> = specs.iter().filter(|s| s.module == module).collect();
        let folder = dir.join(module.folder());
        write_safetensors(&folder.join(WEIGHTS_FILE), &mine, weights, dtype)?;
        remove_if_exists(&folder.join(INDEX_FILE))?;
    }

    let llm: Vec<&ParamSpec> = specs.iter().filter(|s| s.module == Module::Llm).collect();
    let folder = dir.join(Module::Llm.folder());
    match llm_shard_bytes {
        None => {
            write_safetensors(&folder.join(WEIGHTS_FILE), &llm, weights, dtype)?;
            remove_if_exists(&folder.join(INDEX_FILE))?;
            remove_stale_shards(&folder, &BTreeSet::new())?;
        }
        Some(limit) => {
            let mut shards: Vec<Vec<&ParamSpec>> = vec![Vec::new()];
            let mut bytes = 0usize;
            for &s in &llm {
                let b = s.numel() * dtype.size();
                if bytes > 0 && bytes + b > limit {
                    shards.push(Vec::new());
                    bytes = 0;
                }
                bytes += b;
                if let Some(last) = shards.last_mut() {
                    last.push(s);
                }
            }
            let n = shards.len();
            let mut weight_map = BTreeMap::new();
            let mut keep = BTreeSet::new();
            for (k, shard) in shards.iter().enumerate() {
                let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
                write_safetensors(&folder.join(&file), shard, weights, dtype)?;
                for s in shard {
                    weight_map.insert(s.file_name().to_string(), file.clone());
                }
                keep.insert(file);
            }
            let total: usize = llm.iter().map(|s| s.numel() * dtype.size()).sum();
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            let mut text = serde_json::to_string_pretty(&index)?;
            text.push('\n');
            write_atomic(&folder.join(INDEX_FILE), text.as_bytes())?;
            remove_if_exists(&folder.join(WEIGHTS_FILE))?;
            remove_stale_shards(&folder, &keep)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use tessera_job::hf_config::read_model_config;

    /// Deterministic values of varied magnitude and sign.
    fn fake_weights(cfg: &ModelConfig, seed: u64) -> Weights {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        param_specs(cfg)
            .into_iter()
            .map(|s| {
                let v = (0..s.numel())
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let u = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                        let e = ((state >> 20) % 12) as i32 - 8;
                        (u - 0.5) * 2f32.powi(e)
                    })
                    .collect();
                (s.name, v)
            })
            .collect()
    }

    struct Tensor {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }

    fn read_tensors(path: &Path) -> Vec<Tensor> {
        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<Tensor> = st
            .tensors()
            .into_iter()
            .map(|(name, t)| Tensor { name, dtype: t.dtype(), shape: t.shape().to_vec(), data: t.data().to_vec() })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn write_tensors(path: &Path, tensors: &[Tensor]) {
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .map(|t| (t.name.as_str(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    /// Rewrites one safetensors file through `edit`.
    fn edit_file(path: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
        let mut t = read_tensors(path);
        edit(&mut t);
        write_tensors(path, &t);
    }

    fn saved_tiny(dtype: SaveDtype, shard: Option<usize>) -> (tempfile::TempDir, ModelConfig, Weights) {
        let cfg = ModelConfig::tiny();
        let w = fake_weights(&cfg, 7);
        let d = tempfile::tempdir().unwrap();
        save_model_dir(d.path(), &cfg, &w, dtype, shard).unwrap();
        (d, cfg, w)
    }

    fn load_err(dir: &Path, cfg: &ModelConfig) -> String {
        format!("{:#}", load_weights(dir, cfg).expect_err("expected an error"))
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let (d, cfg, w) = saved_tiny(SaveDtype::F32, None);
        assert_eq!(read_model_config(d.path()).unwrap(), cfg);
        let back = load_weights(d.path(), &cfg).unwrap();
        assert_eq!(back, w);
        let vt = read_tensors(&d.path().join("vision_tower/model.safetensors"));
        assert!(vt.iter().all(|t| t.name.starts_with("vision_model.") && t.dtype == Dtype::F32));
        let pj = read_tensors(&d.path().join("mm_projector/model.safetensors"));
        let names: Vec<&str> = pj.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.1.bias",
                "layers.1.weight",
                "layers.2.bias",
                "layers.2.weight",
                "layers.4.bias",
                "layers.4.weight"
            ]
        );
        let llm = read_tensors(&d.path().join("llm/model.safetensors"));
        assert!(llm.iter().any(|t| t.name == "lm_head.weight" && t.shape == [256, 64]));
        assert!(!d.path().join("llm").join(INDEX_FILE).exists());
        // No temporary files are left behind.
        for m in Module::ALL {
            for e in std::fs::read_dir(d.path().join(m.folder())).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!n.starts_with('.'), "{n}");
            }
        }
    }

    #[test]
    fn bf16_round_trip_within_rounding() {
        let (d, cfg, w) = saved_tiny(SaveDtype::Bf16, None);
        let llm = read_tensors(&d.path().join("llm/model.safetensors"));
        assert!(llm.iter().all(|t| t.dtype == Dtype::BF16));
        let back = load_weights(d.path(), &cfg).unwrap();
        assert_eq!(back.len(), w.len());
        for (name, v) in &w {
            let b = &back[name];
            assert_eq!(b.len(), v.len());
            for (x, y) in v.iter().zip(b) {
                assert_eq!(*y, half::bf16::from_f32(*x).to_f32(), "{name}");
                assert!((x - y).abs() <= x.abs() * (1.0 / 256.0), "{name}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn f16_tensors_load() {
        let (d, cfg, w) = saved_tiny(SaveDtype::F32, None);
        let path = d.path().join("mm_projector/model.safetensors");
        edit_file(&path, |ts| {
            for t in ts.iter_mut() {
                let vals: Vec<f32> =
                    t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                t.data = vals.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect();
                t.dtype = Dtype::F16;
            }
        });
        let back = load_weights(d.path(), &cfg).unwrap();
        let want: Vec<f32> =
            w["mm_projector.layers.2.weight"].iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
        assert_eq!(back["mm_projector.layers.2.weight"], want);
        assert_eq!(back["llm.lm_head.weight"], w["llm.lm_head.weight"]);
    }

    #[test]
    fn sharded_llm_round_trip_and_relayout() {
        let (d, cfg, w) = saved_tiny(SaveDtype::F32, Some(100_000));
        let llm = d.path().join("llm");
        assert!(!llm.join(WEIGHTS_FILE).exists());
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(llm.join(INDEX_FILE)).unwrap()).unwrap();
        let files: BTreeSet<&str> =
            index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        assert!(files.len() >= 3, "{files:?}");
        let n = files.len();
        assert!(files.contains(format!("model-00001-of-{n:05}.safetensors").as_str()));
        let llm_bytes: usize =
            param_specs(&cfg).iter().filter(|s| s.module == Module::Llm).map(|s| s.numel() * 4).sum();
        assert_eq!(index["metadata"]["total_size"], serde_json::json!(llm_bytes));
        assert_eq!(load_weights(d.path(), &cfg).unwrap(), w);

        // Re-sharding removes the old shards; unsharded removes index and shards.
        save_model_dir(d.path(), &cfg, &w, SaveDtype::F32, Some(200_000)).unwrap();
        let count = || {
            std::fs::read_dir(&llm)
                .unwrap()
                .filter(|e| is_shard_name(&e.as_ref().unwrap().file_name().to_string_lossy()))
                .count()
        };
        assert!(count() < n && count() >= 2, "{}", count());
        assert_eq!(load_weights(d.path(), &cfg).unwrap(), w);
        save_model_dir(d.path(), &cfg, &w, SaveDtype::F32, None).unwrap();
        assert_eq!(count(), 0);
        assert!(!llm.join(INDEX_FILE).exists());
        assert_eq!(load_weights(d.path(), &cfg).unwrap(), w);
    }

    #[test]
    fn unprefixed_vision_names_head_and_inv_freq_are_accepted() {
        let (d, cfg, w) = saved_tiny(SaveDtype::F32, None);
        edit_file(&d.path().join("vision_tower/model.safetensors"), |ts| {
            for t in ts.iter_mut() {
                t.name = t.name.strip_prefix("vision_model.").unwrap().to_string();
            }
            for name in ["head.probe", "head.attention.in_proj_weight", "head.mlp.fc1.bias"] {
                ts.push(Tensor { name: name.into(), dtype: Dtype::F32, shape: vec![2], data: vec![0; 8] });
            }
        });
        edit_file(&d.path().join("llm/model.safetensors"), |ts| {
            ts.push(Tensor {
                name: "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
                dtype: Dtype::F32,
                shape: vec![8],
                data: vec![0; 32],
            });
        });
        assert_eq!(load_weights(d.path(), &cfg).unwrap(), w);
        // vision_model.head.* (transformers 4 names) is ignored too.
        edit_file(&d.path().join("vision_tower/model.safetensors"), |ts| {
            ts.push(Tensor {
                name: "vision_model.head.probe".into(),
                dtype: Dtype::BF16,
                shape: vec![1],
                data: vec![0; 2],
            });
        });
        assert_eq!(load_weights(d.path(), &cfg).unwrap(), w);
    }

    #[test]
    fn missing_files_are_named() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        std::fs::remove_file(d.path().join("mm_projector/model.safetensors")).unwrap();
        let e = load_err(d.path(), &cfg);
        assert!(
            e.contains(&format!("model directory {} has no mm_projector/model.safetensors", d.path().display())),
            "{e}"
        );
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        std::fs::remove_file(d.path().join("llm/model.safetensors")).unwrap();
        let e = load_err(d.path(), &cfg);
        assert!(e.contains("has no llm/model.safetensors (nor llm/model.safetensors.index.json)"), "{e}");
    }

    #[test]
    fn missing_shard_is_named() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, Some(100_000));
        let llm = d.path().join("llm");
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(llm.join(INDEX_FILE)).unwrap()).unwrap();
        let shard = index["weight_map"]["model.norm.weight"].as_str().unwrap().to_string();
        std::fs::remove_file(llm.join(&shard)).unwrap();
        let e = load_err(d.path(), &cfg);
        assert!(
            e.contains(&format!("llm/model.safetensors.index.json: names shard `{shard}`, which does not exist")),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_corrupt_files_are_errors() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        let path = d.path().join("llm/model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_err(d.path(), &cfg);
        assert!(e.contains("llm/model.safetensors: truncated or corrupt safetensors file: "), "{e}");
        for cut in [0, 5, 8, 20] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = load_err(d.path(), &cfg);
            assert!(e.contains("llm/model.safetensors: truncated or corrupt safetensors file: "), "{cut}: {e}");
        }
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = load_err(d.path(), &cfg);
        assert!(e.contains("truncated or corrupt"), "{e}");
    }

    #[test]
    fn bad_dtype_is_named() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        edit_file(&d.path().join("mm_projector/model.safetensors"), |ts| {
            let t = ts.iter_mut().find(|t| t.name == "layers.1.bias").unwrap();
            t.dtype = Dtype::I64;
            t.data.extend(vec![0u8; t.data.len()]);
        });
        let e = load_err(d.path(), &cfg);
        assert!(
            e.contains("tensor `layers.1.bias` in ")
                && e.contains("mm_projector/model.safetensors has dtype I64; expected F32, BF16 or F16"),
            "{e}"
        );
    }

    #[test]
    fn missing_tensor_is_named() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        edit_file(&d.path().join("mm_projector/model.safetensors"), |ts| ts.retain(|t| t.name != "layers.2.weight"));
        let e = load_err(d.path(), &cfg);
        assert!(
            e.ends_with("mm_projector/model.safetensors has no tensor `layers.2.weight` (expected shape [64, 256])"),
            "{e}"
        );

        // Sharded: missing from its shard, or from the index.
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, Some(100_000));
        let llm = d.path().join("llm");
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(llm.join(INDEX_FILE)).unwrap()).unwrap();
        let shard = index["weight_map"]["model.norm.weight"].as_str().unwrap().to_string();
        edit_file(&llm.join(&shard), |ts| ts.retain(|t| t.name != "model.norm.weight"));
        let e = load_err(d.path(), &cfg);
        assert!(e.ends_with(&format!("llm/{shard} has no tensor `model.norm.weight` (expected shape [64])")), "{e}");

        let (d, cfg, _) = saved_tiny(SaveDtype::F32, Some(100_000));
        let llm = d.path().join("llm");
        let mut index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(llm.join(INDEX_FILE)).unwrap()).unwrap();
        let shard = index["weight_map"]["model.norm.weight"].as_str().unwrap().to_string();
        index["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
        std::fs::write(llm.join(INDEX_FILE), index.to_string()).unwrap();
        edit_file(&llm.join(&shard), |ts| ts.retain(|t| t.name != "model.norm.weight"));
        let e = load_err(d.path(), &cfg);
        assert!(e.contains("model.safetensors.index.json: `weight_map` has no tensor `model.norm.weight`"), "{e}");
    }

    #[test]
    fn shape_mismatch_is_named() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        edit_file(&d.path().join("mm_projector/model.safetensors"), |ts| {
            let t = ts.iter_mut().find(|t| t.name == "layers.2.weight").unwrap();
            t.shape = vec![64, 255];
            t.data.truncate(64 * 255 * 4);
        });
        let e = load_err(d.path(), &cfg);
        assert!(
            e.contains("tensor `layers.2.weight` in ")
                && e.contains("mm_projector/model.safetensors: expected shape [64, 256], found [64, 255]"),
            "{e}"
        );
    }

    #[test]
    fn unexpected_tensor_is_named() {
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        edit_file(&d.path().join("llm/model.safetensors"), |ts| {
            ts.push(Tensor {
                name: "model.layers.2.mlp.up_proj.weight".into(),
                dtype: Dtype::F32,
                shape: vec![1],
                data: vec![0; 4],
            });
        });
        let e = load_err(d.path(), &cfg);
        assert!(
            e.contains("llm/model.safetensors: unexpected tensor `model.layers.2.mlp.up_proj.weight`: not a parameter"),
            "{e}"
        );
        // The same tensor under both vision names is a duplicate.
        let (d, cfg, _) = saved_tiny(SaveDtype::F32, None);
        edit_file(&d.path().join("vision_tower/model.safetensors"), |ts| {
            let t = ts.iter().find(|t| t.name == "vision_model.post_layernorm.bias").unwrap();
            let dup = Tensor {
                name: "post_layernorm.bias".into(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: t.data.clone(),
            };
            ts.push(dup);
        });
        let e = load_err(d.path(), &cfg);
        assert!(e.contains("was already loaded"), "{e}");
    }

    #[test]
    fn save_checks_the_weights() {
        let cfg = ModelConfig::tiny();
        let d = tempfile::tempdir().unwrap();
        let mut w = fake_weights(&cfg, 1);
        w.remove("llm.model.norm.weight");
        let e = format!("{:#}", save_model_dir(d.path(), &cfg, &w, SaveDtype::F32, None).unwrap_err());
        assert!(e.contains("weights have no parameter `llm.model.norm.weight` (expected shape [64])"), "{e}");
        assert!(!d.path().join("config.json").exists(), "nothing is written on error");
        let mut w = fake_weights(&cfg, 1);
        w.get_mut("mm_projector.layers.4.bias").unwrap().pop();
        let e = format!("{:#}", save_model_dir(d.path(), &cfg, &w, SaveDtype::F32, None).unwrap_err());
        assert!(e.contains("parameter `mm_projector.layers.4.bias` has 63 values; expected 64 (shape [64])"), "{e}");
        let mut w = fake_weights(&cfg, 1);
        w.insert("llm.extra".into(), vec![0.0]);
        let e = format!("{:#}", save_model_dir(d.path(), &cfg, &w, SaveDtype::F32, None).unwrap_err());
        assert!(e.contains("weights have parameter `llm.extra`, which is not in the model config"), "{e}");
    }

    #[test]
    fn tiny_fixture_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/model");
        if !dir.join("config.json").exists() {
            eprintln!("skipping: {} not generated", dir.display());
            return;
        }
        let cfg = read_model_config(&dir).unwrap();
        assert_eq!(cfg, ModelConfig::tiny());
        let w = load_weights(&dir, &cfg).unwrap();
        assert_eq!(w.len(), param_specs(&cfg).len());
        assert!(w.values().flatten().all(|x| x.is_finite()));
    }

    /// Writes a tiny model directory for tools/check_hf_config.py:
    /// `TESSERA_WRITE_MODEL_DIR=/tmp/m cargo test -p tessera-worker --lib write_model_dir_for_python -- --ignored`
    /// (`TESSERA_PRESET=small|vila-3b-s2`; `TESSERA_CONFIG_ONLY=1` writes the configs only).
    #[test]
    #[ignore]
    fn write_model_dir_for_python() {
        let Ok(out) = std::env::var("TESSERA_WRITE_MODEL_DIR") else { return };
        let preset = std::env::var("TESSERA_PRESET").unwrap_or_else(|_| "tiny".into());
        let cfg = ModelConfig::preset(&preset).unwrap();
        if std::env::var("TESSERA_CONFIG_ONLY").is_ok() {
            write_model_config(Path::new(&out), &cfg).unwrap();
            return;
        }
        let w = fake_weights(&cfg, 3);
        save_model_dir(Path::new(&out), &cfg, &w, SaveDtype::Bf16, Some(100_000)).unwrap();
    }
}
