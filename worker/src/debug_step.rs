//! `worker debug-step` (docs/DESIGN.md section 4): one forward and backward pass
//! with every module trainable and no optimizer step, gradients written as
//! safetensors under their prefixed checkpoint names. This is how users and
//! our tests compare Tessera with the PyTorch/transformers implementation.

use crate::codec::decode;
use crate::engine::device::{DeviceSpec, Precision};
use crate::engine::{Backend, TileGrid};
use crate::model::weights::read_file;
use crate::model::{weights, Batch, ModelConfig, ParamStore, Recompute, Trainable, Vlm};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::Path;
use tessera_job::hf_config;

/// Reads a `debug-step` batch file: `pixel_values` f32 `[B,3,S,S]`,
/// `input_ids` and `labels` i64 `[B,T]`. Dynamic S2 (our extension of the
/// contract): with `tile_grids` i64 `[B,2]` (each image's largest-scale grid
/// as rows, cols), `pixel_values` holds the tiles, `[tiles,3,base,base]`, in
/// `Batch::pixel_values` order.
pub fn read_batch(path: &Path) -> Result<Batch> {
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: truncated or corrupt safetensors file", path.display()))?;
    let get = |name: &str| -> Result<TensorView<'_>> {
        st.tensor(name).map_err(|_| anyhow::anyhow!("{}: no tensor `{name}`", path.display()))
    };
    let px = get("pixel_values")?;
    if !matches!(px.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        bail!("{}: pixel_values has dtype {:?}; expected F32", path.display(), px.dtype());
    }
    if px.shape().len() != 4 {
        bail!("{}: pixel_values has shape {:?}; expected [B, 3, S, S]", path.display(), px.shape());
    }
    // An integer matrix; `shape` names the expected one in the error.
    let ints = |name: &str, shape: &str| -> Result<(Vec<usize>, Vec<i64>)> {
        let t = get(name)?;
        let v: Vec<i64> = match t.dtype() {
            Dtype::I64 => {
                t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
            }
            Dtype::I32 => {
                t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect()
            }
            d => bail!("{}: {name} has dtype {d:?}; expected I64", path.display()),
        };
        if t.shape().len() != 2 {
            bail!("{}: {name} has shape {:?}; expected {shape}", path.display(), t.shape());
        }
        Ok((t.shape().to_vec(), v))
    };
    let (ids_shape, input_ids) = ints("input_ids", "[B, T]")?;
    let (lab_shape, labels) = ints("labels", "[B, T]")?;
    if ids_shape != lab_shape {
        bail!("{}: input_ids {:?} and labels {:?} differ in shape", path.display(), ids_shape, lab_shape);
    }
    let tile_grids = if st.names().iter().any(|n| n.as_str() == "tile_grids") {
        let (shape, v) = ints("tile_grids", "[B, 2]")?;
        if shape != [ids_shape[0], 2] {
            bail!(
                "{}: tile_grids has shape {shape:?}; expected [{}, 2] (rows, cols per image)",
                path.display(),
                ids_shape[0]
            );
        }
        let mut grids = Vec::with_capacity(shape[0]);
        for (i, rc) in v.chunks_exact(2).enumerate() {
            if rc[0] < 1 || rc[1] < 1 {
                bail!("{}: tile_grids[{i}] is {} x {}; rows and cols must be at least 1", path.display(), rc[0], rc[1]);
            }
            grids.push(TileGrid { rows: rc[0] as usize, cols: rc[1] as usize });
        }
        grids
    } else {
        if px.shape()[0] != ids_shape[0] {
            bail!(
                "{}: pixel_values holds {} images but input_ids {} samples",
                path.display(),
                px.shape()[0],
                ids_shape[0]
            );
        }
        Vec::new()
    };
    Ok(Batch {
        batch: ids_shape[0],
        seq: ids_shape[1],
        pixel_values: decode(px.data(), px.dtype()),
        tile_grids,
        has_image: vec![true; ids_shape[0]],
        input_ids,
        labels,
    })
}

/// Runs the step on `be` and returns the model's config, the mean loss and
/// every parameter's gradient by prefixed name.
pub fn run<B: Backend>(be: &B, model_dir: &Path, batch: &Batch) -> Result<(ModelConfig, f32, weights::Weights)> {
    let cfg = hf_config::read_model_config(model_dir)?;
    let params = ParamStore::from_dir(be, &cfg, model_dir)?;
    let mut model = Vlm::new(&cfg, params, Recompute::None);
    model.trainable = Trainable::ALL;
    model.params.zero_grads(be);
    let loss = model.forward_backward(be, batch, None)?;
    Ok((cfg, loss.mean() as f32, model.params.grads_to_host(be)))
}

/// Writes `loss` and the gradients, each with its parameter's shape.
pub fn write_grads(path: &Path, cfg: &ModelConfig, loss: f32, grads: &weights::Weights) -> Result<()> {
    let specs = crate::model::param_specs(cfg);
    let loss_bytes = loss.to_le_bytes().to_vec();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone(), grads[&s.name].iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let mut views = vec![("loss".to_string(), TensorView::new(Dtype::F32, vec![], &loss_bytes)?)];
    for (name, shape, b) in &bytes {
        views.push((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?));
    }
    let data = safetensors::serialize(views, &None)?;
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

/// The `debug-step` command.
pub fn command(model_dir: &Path, batch_path: &Path, out: &Path, device: &str) -> Result<f32> {
    let batch = read_batch(batch_path)?;
    let device = DeviceSpec::parse(device)?.resolve(None)?;
    // Full f32 on a GPU too: this is the reference check, TF32 GEMMs would
    // blur it.
    let (cfg, loss, grads) = crate::on_device!(device, Precision::F32, |be| run(be, model_dir, &batch))?;
    write_grads(out, &cfg, loss, &grads)?;
    Ok(loss)
}

/// How a `debug-step` result compares with a reference file of the same
/// layout (the PyTorch fixtures of tools/make_fixtures.py).
#[derive(Debug)]
pub struct Comparison {
    /// Relative error of the loss.
    pub loss_error: f64,
    /// Per nonzero reference gradient: its name and relative norm error.
    pub grads: Vec<(String, f64)>,
    /// Reference gradients that are zero in exact arithmetic (unused ViT
    /// layers, SigLIP's k_proj bias) and whose result is not (near) zero.
    pub nonzero_where_zero: Vec<String>,
}

impl Comparison {
    pub fn worst_grad(&self) -> Option<&(String, f64)> {
        self.grads.iter().max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Loss within `loss_tol`, every gradient within `grad_tol` (relative
    /// norm error), every zero gradient zero.
    pub fn passes(&self, loss_tol: f64, grad_tol: f64) -> bool {
        self.loss_error < loss_tol
            && self.grads.iter().all(|(_, e)| *e < grad_tol)
            && self.nonzero_where_zero.is_empty()
    }
}

fn read_f64_tensors(path: &Path) -> Result<std::collections::HashMap<String, Vec<f64>>> {
    let bytes = read_file(path)?;
    let st =
        SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            if t.dtype() != Dtype::F32 {
                bail!("{}: {name} is {:?}, expected F32", path.display(), t.dtype());
            }
            Ok((name, decode(t.data(), Dtype::F32).into_iter().map(f64::from).collect()))
        })
        .collect()
}

/// Compares the gradients file `got` with the reference `expected`. A
/// reference gradient smaller than 1e-6 of the largest one counts as zero
/// (it holds the reference's rounding noise) and must be as small in `got`.
pub fn compare(got: &Path, expected: &Path) -> Result<Comparison> {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (got, want) = (read_f64_tensors(got)?, read_f64_tensors(expected)?);
    let loss = |m: &std::collections::HashMap<String, Vec<f64>>, which: &str| -> Result<f64> {
        m.get("loss").and_then(|l| l.first().copied()).with_context(|| format!("the {which} file has no loss"))
    };
    let (gl, wl) = (loss(&got, "result")?, loss(&want, "reference")?);
    let largest = want.iter().filter(|(k, _)| *k != "loss").map(|(_, v)| norm(v)).fold(0.0, f64::max);
    let mut c =
        Comparison { loss_error: (gl - wl).abs() / wl.abs(), grads: Vec::new(), nonzero_where_zero: Vec::new() };
    let mut names: Vec<&String> = want.keys().filter(|k| *k != "loss").collect();
    names.sort();
    for name in names {
        let w = &want[name];
        let g = got.get(name).with_context(|| format!("the result has no gradient for {name}"))?;
        if g.len() != w.len() {
            bail!("{name}: {} values, the reference has {}", g.len(), w.len());
        }
        if norm(w) > 1e-6 * largest {
            let diff: Vec<f64> = g.iter().zip(w).map(|(a, b)| a - b).collect();
            c.grads.push((name.clone(), norm(&diff) / norm(w)));
        } else if norm(g) >= 1e-6 * largest {
            c.nonzero_where_zero.push(name.clone());
        }
    }
    Ok(c)
}
