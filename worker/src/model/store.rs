//! Parameter values and gradients on a backend, addressed by index.

use super::params::{param_specs, Module, ParamSpec};
use crate::engine::Backend;
use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, HashMap};
use tessera_job::model::ModelConfig;

/// Told during backward which parameters' gradients are final (with all
/// gradients, to read them), so their all-reduce can start while backward
/// continues (`train::grad_sync`).
pub type GradReady<'a, B> = &'a mut dyn FnMut(&[<B as Backend>::Buf], &[usize]);

pub struct ParamStore<B: Backend> {
    pub specs: Vec<ParamSpec>,
    /// The weights the model's ops read: the f32 weights themselves, or,
    /// on a backend with a storage type of its own (a GPU with `precision
    /// = "bf16"`), their compute copies in it.
    pub values: Vec<B::Buf>,
    /// The f32 master weights the optimizer updates and checkpoints save,
    /// where `values` are compute copies; None where they are `values`.
    pub master: Option<Vec<B::Buf>>,
    /// Gradients, f32 state on every backend.
    pub grads: Vec<B::Buf>,
    index: HashMap<String, usize>,
}

impl<B: Backend> ParamStore<B> {
    /// Uploads host weights keyed by full parameter name.
    pub fn from_host(be: &B, cfg: &ModelConfig, host: &BTreeMap<String, Vec<f32>>) -> Result<Self> {
        let specs = param_specs(cfg);
        let mut values = Vec::with_capacity(specs.len());
        for s in &specs {
            let Some(v) = host.get(&s.name) else { bail!("weights have no tensor `{}`", s.name) };
            if v.len() != s.numel() {
                bail!("tensor `{}`: expected {} values (shape {:?}), found {}", s.name, s.numel(), s.shape, v.len());
            }
            values.push(be.upload_state(v));
        }
        Ok(Self::with_values(be, specs, values))
    }

    /// Weights read from a model directory in the VILA layout.
    pub fn from_dir(be: &B, cfg: &ModelConfig, dir: &std::path::Path) -> Result<Self> {
        Self::from_host(be, cfg, &super::weights::load_weights(dir, cfg)?)
    }

    /// Fresh weights, identical on every machine for a given seed: weights
    /// N(0, 0.02) (Hugging Face's initializer_range), biases 0, norm scales 1.
    pub fn init(be: &B, cfg: &ModelConfig, seed: u64) -> Self {
        Self::from_host(be, cfg, &init_host(cfg, seed)).expect("init_host covers every parameter")
    }

    /// From f32 master weights (state buffers), with compute copies where
    /// the backend keeps them.
    fn with_values(be: &B, specs: Vec<ParamSpec>, masters: Vec<B::Buf>) -> Self {
        let grads = specs.iter().map(|s| be.alloc_state(s.numel())).collect();
        let index = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let copies: Option<Vec<B::Buf>> = masters.iter().map(|m| be.compute_copy(m)).collect();
        let (values, master) = match copies {
            Some(copies) => (copies, Some(masters)),
            None => (masters, None),
        };
        ParamStore { specs, values, master, grads, index }
    }

    /// The f32 master weights.
    pub fn masters(&self) -> &[B::Buf] {
        self.master.as_deref().unwrap_or(&self.values)
    }

    /// Copies the master weights into the compute copies (after an update).
    pub fn refresh_compute_copies(&mut self, be: &B) {
        if let Some(master) = &self.master {
            for (m, v) in master.iter().zip(&mut self.values) {
                be.copy(m, 0, v, 0, be.buf_len(m));
            }
        }
    }

    /// Index of a parameter by full name. Names come from `param_specs`, so a
    /// miss is a programming error.
    pub fn idx(&self, name: &str) -> usize {
        match self.index.get(name) {
            Some(&i) => i,
            None => panic!("no parameter named `{name}`"),
        }
    }

    pub fn to_host(&self, be: &B) -> BTreeMap<String, Vec<f32>> {
        self.specs.iter().zip(self.masters()).map(|(s, v)| (s.name.clone(), be.download(v))).collect()
    }

    pub fn grads_to_host(&self, be: &B) -> BTreeMap<String, Vec<f32>> {
        self.specs.iter().zip(&self.grads).map(|(s, g)| (s.name.clone(), be.download(g))).collect()
    }

    pub fn zero_grads(&mut self, be: &B) {
        for g in &mut self.grads {
            be.fill(g, 0.0);
        }
    }

    pub fn numel(&self, module: Option<Module>) -> usize {
        self.specs.iter().filter(|s| module.is_none_or(|m| s.module == m)).map(|s| s.numel()).sum()
    }
}

pub fn init_host(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, Vec<f32>> {
    param_specs(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.numel();
            let is_norm = s.name.contains("norm") || s.name.starts_with("mm_projector.layers.1.");
            let data = if s.name.ends_with(".bias") {
                vec![0.0; n]
            } else if is_norm {
                vec![1.0; n]
            } else {
                let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
                let normal = Normal::new(0.0f32, 0.02).expect("valid std");
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            (s.name, data)
        })
        .collect()
}
