//! AdamW over the model's parameters with per-module learning rates and
//! freeze switches, global gradient-norm clipping and the LR schedule.

use super::schedule::cosine_with_warmup;
use crate::engine::{AdamW, Backend};
use crate::model::ParamStore;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
pub use tessera_job::config::{OptimConfig, PerModule};

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    pub step: u64,
    /// Global norm of the trainable gradients before clipping.
    pub grad_norm: f64,
    /// Learning-rate multiplier from the schedule.
    pub lr_scale: f64,
}

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// Completed steps.
    pub step: u64,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, cfg: OptimConfig, params: &ParamStore<B>) -> Self {
        let trainable = cfg.trainable();
        // Frozen parameters get no optimizer state at all.
        let state = |be: &B| -> Vec<B::Buf> {
            params.specs.iter().map(|s| be.alloc_state(if trainable.get(s.module) { s.numel() } else { 0 })).collect()
        };
        Optimizer { m: state(be), v: state(be), cfg, step: 0 }
    }

    /// AdamW's moments (m, v) of the trainable parameters by name, for a
    /// checkpoint.
    pub fn moments_to_host(
        &self,
        be: &B,
        params: &ParamStore<B>,
    ) -> (BTreeMap<String, Vec<f32>>, BTreeMap<String, Vec<f32>>) {
        let t = self.cfg.trainable();
        let (mut m, mut v) = (BTreeMap::new(), BTreeMap::new());
        for (i, spec) in params.specs.iter().enumerate().filter(|(_, s)| t.get(s.module)) {
            m.insert(spec.name.clone(), be.download(&self.m[i]));
            v.insert(spec.name.clone(), be.download(&self.v[i]));
        }
        (m, v)
    }

    /// Restores the step count and the moments a checkpoint holds. The
    /// checkpoint must cover exactly the trainable parameters, at their sizes.
    pub fn restore(
        &mut self,
        be: &B,
        params: &ParamStore<B>,
        step: u64,
        m: &BTreeMap<String, Vec<f32>>,
        v: &BTreeMap<String, Vec<f32>>,
    ) -> Result<()> {
        let t = self.cfg.trainable();
        let trainable = params.specs.iter().filter(|s| t.get(s.module)).count();
        if m.len() != trainable || v.len() != trainable {
            bail!(
                "the checkpoint holds optimizer state for {} parameters, the job trains {trainable} (were modules frozen or unfrozen?)",
                m.len()
            );
        }
        for (i, spec) in params.specs.iter().enumerate().filter(|(_, s)| t.get(s.module)) {
            for (which, saved, buf) in [("m", m, &mut self.m[i]), ("v", v, &mut self.v[i])] {
                let Some(x) = saved.get(&spec.name) else {
                    bail!("the checkpoint has no optimizer state {which} for {}", spec.name)
                };
                if x.len() != spec.numel() {
                    bail!(
                        "optimizer state {which} of {}: {} values, the parameter has {}",
                        spec.name,
                        x.len(),
                        spec.numel()
                    );
                }
                *buf = be.upload_state(x);
            }
        }
        self.step = step;
        Ok(())
    }

    /// Global L2 norm of the gradients of trainable parameters.
    pub fn grad_norm(&self, be: &B, params: &ParamStore<B>) -> f64 {
        let t = self.cfg.trainable();
        let grads: Vec<&B::Buf> =
            params.specs.iter().zip(&params.grads).filter(|(s, _)| t.get(s.module)).map(|(_, g)| g).collect();
        be.sum_squares(&grads).sqrt()
    }

    /// Applies one AdamW step to every trainable parameter from `params.grads`.
    pub fn step(&mut self, be: &B, params: &mut ParamStore<B>) -> StepInfo {
        let grad_norm = self.grad_norm(be, params);
        let clip = if self.cfg.max_grad_norm > 0.0 && grad_norm > self.cfg.max_grad_norm as f64 {
            self.cfg.max_grad_norm as f64 / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr_scale = cosine_with_warmup(self.step, self.cfg.warmup_steps, self.cfg.total_steps);
        self.step += 1;
        let t = self.cfg.trainable();
        // The f32 masters: the weights themselves, or behind compute copies.
        let masters = params.master.as_mut().unwrap_or(&mut params.values);
        for (i, spec) in params.specs.iter().enumerate() {
            if !t.get(spec.module) {
                continue;
            }
            let h = AdamW {
                lr: (self.cfg.lr.get(spec.module) as f64 * lr_scale) as f32,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: self.cfg.weight_decay,
                step: self.step,
                grad_scale: clip as f32,
            };
            be.adamw(&mut masters[i], &params.grads[i], &mut self.m[i], &mut self.v[i], h);
        }
        params.refresh_compute_copies(be);
        StepInfo { step: self.step, grad_norm, lr_scale }
    }
}
