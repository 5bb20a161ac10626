//! One training step: gradient accumulation over micro-batches, then AdamW.

use super::grad_sync::{BucketSizes, CommThread, GradSync};
use super::optimizer::{Optimizer, StepInfo};
use crate::engine::Backend;
use crate::model::params::is_used;
use crate::model::{Batch, LossSum, Vlm};
use anyhow::Result;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub loss: LossSum,
    pub info: StepInfo,
}

/// Runs forward and backward on every micro-batch, accumulating gradients
/// normalized by the step's total target count (so accumulation equals one
/// big batch), then one optimizer step.
pub fn train_step<B: Backend>(
    be: &B,
    model: &mut Vlm<B>,
    opt: &mut Optimizer<B>,
    micro_batches: &[Batch],
) -> Result<StepReport> {
    let mut tokens = 0;
    for b in micro_batches {
        tokens += b.prepare(&model.cfg)?.n_targets;
    }
    model.trainable = opt.cfg.trainable();
    model.params.zero_grads(be);
    let mut loss = LossSum { sum: 0.0, tokens: 0 };
    for b in micro_batches {
        let l = model.forward_backward(be, b, Some(tokens))?;
        loss.sum += l.sum;
        loss.tokens += l.tokens;
    }
    let info = opt.step(be, &mut model.params);
    be.check()?;
    Ok(StepReport { loss, info })
}

/// A data-parallel step's report.
#[derive(Clone, Copy, Debug)]
pub struct DpStepReport {
    /// This rank's loss sum and target count.
    pub loss: LossSum,
    /// Target tokens over all ranks: the divisor of every gradient.
    pub global_targets: u64,
    pub info: StepInfo,
    /// Time blocked on the all-reduce after backward ended.
    pub comm_wait: Duration,
    /// This rank's ViT passes (S2 tiles) and LLM positions (padding included).
    pub tiles: usize,
    pub llm_tokens: usize,
}

/// Which gradients take part in the all-reduce: trainable parameters that
/// backward reaches (not the ViT layers after the selected one).
pub fn synced_params<B: Backend>(model: &Vlm<B>, opt: &Optimizer<B>) -> Vec<bool> {
    let t = opt.cfg.trainable();
    model.params.specs.iter().map(|s| t.get(s.module) && is_used(&model.cfg, s)).collect()
}

/// One data-parallel step: this rank's micro-batches (maybe none), the
/// gradient of the *global* mean loss (each rank divides by the target
/// count summed over all ranks), all-reduced in buckets while the last
/// micro-batch's backward runs, then the same AdamW update on every rank.
///
/// `stop` is this rank's wish to stop (a signal arrived). It travels in the
/// step's first all-reduce, so every rank learns at the same step whether
/// any rank wants to stop; then no rank trains the step and all return None.
#[allow(clippy::too_many_arguments)]
pub fn train_step_dp<B: Backend>(
    be: &B,
    model: &mut Vlm<B>,
    opt: &mut Optimizer<B>,
    micro_batches: &[Batch],
    comm: &CommThread<B::Buf>,
    sizes: BucketSizes,
    synced: &[bool],
    stop: bool,
) -> Result<Option<DpStepReport>>
where
    B::Buf: Send + 'static,
{
    let (mut local, mut tiles, mut llm_tokens) = (0, 0, 0);
    for b in micro_batches {
        let prep = b.prepare(&model.cfg)?;
        local += prep.n_targets;
        tiles += prep.tiles;
        llm_tokens += prep.batch * prep.seq;
    }
    let counts = comm.sum_counts(vec![local as u64, u64::from(stop)])?;
    if counts[1] > 0 {
        return Ok(None);
    }
    let global = counts[0];
    model.trainable = opt.cfg.trainable();
    model.params.zero_grads(be);
    let mut loss = LossSum { sum: 0.0, tokens: 0 };
    let mut sync = GradSync::new(be, comm, sizes, synced, &model.params.grads);
    let denom = Some(global as usize);
    for (k, b) in micro_batches.iter().enumerate() {
        // Only the last micro-batch's backward finishes gradients (DDP's no_sync).
        let l = if k + 1 == micro_batches.len() {
            model.forward_backward_with(be, b, denom, &mut |g, ids| sync.ready(g, ids))?
        } else {
            model.forward_backward(be, b, denom)?
        };
        loss.sum += l.sum;
        loss.tokens += l.tokens;
    }
    let comm_wait = sync.finish(&mut model.params.grads)?;
    let info = opt.step(be, &mut model.params);
    be.check()?;
    Ok(Some(DpStepReport { loss, global_targets: global, info, comm_wait, tiles, llm_tokens }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;
    use crate::model::{ModelConfig, Module, ParamStore, Recompute};
    use crate::train::optimizer::{OptimConfig, PerModule};

    fn setup(freeze_vit: bool) -> (Cpu, Vlm<Cpu>, Optimizer<Cpu>) {
        let be = Cpu::<f32>::new();
        let cfg = ModelConfig::tiny();
        let model = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 7), Recompute::None);
        let oc = OptimConfig {
            lr: PerModule::all(3e-3),
            warmup_steps: 5,
            total_steps: 1000,
            freeze: PerModule { vision_tower: freeze_vit, projector: false, llm: false },
            ..OptimConfig::default()
        };
        let opt = Optimizer::new(&be, oc, &model.params);
        (be, model, opt)
    }

    #[test]
    fn training_on_a_fixed_batch_drives_the_loss_down_90_percent() {
        let (be, mut model, mut opt) = setup(false);
        let batch = Batch::synthetic(&model.cfg, 4, 12, 11);
        let first = train_step(&be, &mut model, &mut opt, std::slice::from_ref(&batch)).unwrap().loss.mean();
        let mut last = first;
        for _ in 0..150 {
            last = train_step(&be, &mut model, &mut opt, std::slice::from_ref(&batch)).unwrap().loss.mean();
        }
        assert!(last < 0.1 * first, "loss went from {first} to {last}, less than a 90% drop");
    }

    /// A backend with compute copies of the weights (a GPU storing bf16)
    /// trains on the masters: the optimizer updates them and refreshes the
    /// copies the model reads, and checkpoints read the masters. With exact
    /// copies, training is bitwise the same as without; a missed refresh
    /// would leave the model reading the first step's weights.
    #[test]
    fn compute_copies_of_the_weights_follow_the_masters() {
        let cfg = ModelConfig::tiny();
        let batch = Batch::synthetic(&cfg, 2, 10, 21);
        let mut runs = Vec::new();
        for be in [Cpu::<f32>::new(), Cpu::<f32>::with_compute_copies()] {
            let mut model = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 9), Recompute::None);
            assert_eq!(model.params.master.is_some(), be.compute_copy(&vec![0.0]).is_some());
            let mut opt = Optimizer::new(&be, OptimConfig { total_steps: 10, ..OptimConfig::default() }, &model.params);
            let losses: Vec<f64> = (0..4)
                .map(|_| train_step(&be, &mut model, &mut opt, std::slice::from_ref(&batch)).unwrap().loss.mean())
                .collect();
            if let Some(master) = &model.params.master {
                for (m, v) in master.iter().zip(&model.params.values) {
                    assert!(m == v, "a compute copy differs from its master after a step");
                }
            }
            runs.push((losses, model.params.to_host(&be)));
        }
        assert_eq!(runs[0].0, runs[1].0, "losses differ with compute copies");
        assert!(runs[0].0[3] < runs[0].0[0], "{:?}", runs[0].0);
        assert!(runs[0].1 == runs[1].1, "final weights differ with compute copies");
    }

    #[test]
    fn frozen_vit_stays_bit_identical_while_projector_and_llm_move() {
        let (be, mut model, mut opt) = setup(true);
        let before = model.params.to_host(&be);
        let batch = Batch::synthetic(&model.cfg, 2, 10, 12);
        for _ in 0..8 {
            train_step(&be, &mut model, &mut opt, std::slice::from_ref(&batch)).unwrap();
        }
        let after = model.params.to_host(&be);
        for spec in &model.params.specs {
            let same = before[&spec.name] == after[&spec.name];
            match spec.module {
                Module::VisionTower => assert!(same, "{} changed while frozen", spec.name),
                _ => assert!(!same, "{} did not change", spec.name),
            }
        }
    }

    #[test]
    fn accumulating_two_halves_equals_one_full_batch() {
        let be = Cpu::<f64>::new();
        let cfg = ModelConfig::tiny();
        let full = Batch::synthetic(&cfg, 4, 10, 13);
        let half = |lo: usize| {
            let (s, px) = (full.seq, full.pixel_values.len() / 4);
            Batch {
                batch: 2,
                seq: s,
                pixel_values: full.pixel_values[lo * px..(lo + 2) * px].to_vec(),
                tile_grids: Vec::new(),
                has_image: vec![true; 2],
                input_ids: full.input_ids[lo * s..(lo + 2) * s].to_vec(),
                labels: full.labels[lo * s..(lo + 2) * s].to_vec(),
            }
        };
        let mut results = Vec::new();
        for parts in [vec![full.clone()], vec![half(0), half(2)]] {
            let mut model = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 3), Recompute::None);
            let mut opt = Optimizer::new(&be, OptimConfig { total_steps: 10, ..OptimConfig::default() }, &model.params);
            let r = train_step(&be, &mut model, &mut opt, &parts).unwrap();
            results.push((r.loss.mean(), r.info.grad_norm, model.params.to_host(&be)));
        }
        assert!((results[0].0 - results[1].0).abs() < 1e-12);
        assert!((results[0].1 - results[1].1).abs() < 1e-9 * results[0].1);
        for (k, v) in &results[0].2 {
            let w = &results[1].2[k];
            let err = v.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-6, "{k}: max difference {err}");
        }
    }

    #[test]
    fn clipping_bounds_the_update_of_a_gradient_sized_step() {
        // With lr = eps = 100, AdamW's first step is 100 g / (|g| + 100) ~ g
        // while |g| << 100, so the update's norm shows the gradient's norm.
        let be = Cpu::<f64>::new();
        let cfg = ModelConfig::tiny();
        let batch = Batch::synthetic(&cfg, 2, 10, 21);
        let mut norms = Vec::new();
        for clip in [0.0, 1e-3] {
            let mut model = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 5), Recompute::None);
            let oc = OptimConfig {
                lr: PerModule::all(100.0),
                eps: 100.0,
                max_grad_norm: clip,
                total_steps: 10,
                ..OptimConfig::default()
            };
            let mut opt = Optimizer::new(&be, oc, &model.params);
            let before = model.params.to_host(&be);
            let r = train_step(&be, &mut model, &mut opt, std::slice::from_ref(&batch)).unwrap();
            let after = model.params.to_host(&be);
            let moved: f64 = before
                .iter()
                .flat_map(|(k, v)| v.iter().zip(&after[k]).map(|(a, b)| ((a - b) as f64).powi(2)))
                .sum::<f64>()
                .sqrt();
            norms.push((r.info.grad_norm, moved));
        }
        let (grad_norm, unclipped_move) = norms[0];
        let (_, clipped_move) = norms[1];
        assert!(grad_norm > 0.05, "test needs a gradient well above the clip, got {grad_norm}");
        assert!(
            (unclipped_move - grad_norm).abs() < 0.02 * grad_norm,
            "unclipped step {unclipped_move} vs |g| {grad_norm}"
        );
        assert!((clipped_move - 1e-3).abs() < 1e-6, "clipped step moved {clipped_move}, expected ~1e-3");
    }

    #[test]
    fn per_module_learning_rates_apply() {
        let be = Cpu::<f64>::new();
        let cfg = ModelConfig::tiny();
        let batch = Batch::synthetic(&cfg, 2, 10, 21);
        let mut model = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 5), Recompute::None);
        let oc = OptimConfig {
            lr: PerModule { vision_tower: 0.0, projector: 1e-3, llm: 1e-2 },
            total_steps: 10,
            ..OptimConfig::default()
        };
        let mut opt = Optimizer::new(&be, oc, &model.params);
        let before = model.params.to_host(&be);
        train_step(&be, &mut model, &mut opt, std::slice::from_ref(&batch)).unwrap();
        let after = model.params.to_host(&be);
        let max_move = |m: Module| {
            model
                .params
                .specs
                .iter()
                .filter(|s| s.module == m)
                .flat_map(|s| before[&s.name].iter().zip(&after[&s.name]).map(|(a, b)| (a - b).abs()))
                .fold(0.0f32, f32::max)
        };
        assert_eq!(max_move(Module::VisionTower), 0.0, "lr 0 must leave the ViT unchanged");
        // Adam's first step moves each weight by at most lr.
        let (p, l) = (max_move(Module::Projector), max_move(Module::Llm));
        assert!(p > 0.5e-3 && p <= 1.0001e-3, "projector moved {p}");
        assert!(l > 0.5e-2 && l <= 1.0001e-2, "llm moved {l}");
    }
}
