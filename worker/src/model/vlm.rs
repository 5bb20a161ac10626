//! The whole vision-language model: S2 + ViT -> projector -> image tokens
//! spliced into the LLM's input -> next-token loss, and the backward pass
//! through all of it, the ViT included.

use super::batch::{Batch, Prepared};
use super::llama::Llama;
use super::params::Module;
use super::projector::Projector;
use super::s2::S2;
use super::store::{GradReady, ParamStore};
use crate::engine::Backend;
use anyhow::Result;
use tessera_job::model::{ModelConfig, IMAGE_TOKEN_INDEX};

pub use tessera_job::config::Recompute;

pub use tessera_job::model::Trainable;

/// Loss of one forward pass: the sum over target tokens and their count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub tokens: usize,
}

impl LossSum {
    pub fn mean(&self) -> f64 {
        self.sum / self.tokens.max(1) as f64
    }
}

pub struct Vlm<B: Backend> {
    pub cfg: ModelConfig,
    pub params: ParamStore<B>,
    pub trainable: Trainable,
    s2: S2<B>,
    projector: Projector<B>,
    llm: Llama<B>,
    dimage: Option<B::Buf>,
    /// The projector's parameters, reported ready together.
    projector_ids: Vec<usize>,
}

impl<B: Backend> Vlm<B> {
    pub fn new(cfg: &ModelConfig, params: ParamStore<B>, recompute: Recompute) -> Self {
        Vlm {
            cfg: cfg.clone(),
            s2: S2::new(cfg, &params, recompute.vit()),
            projector: Projector::new(cfg, &params),
            llm: Llama::new(&cfg.llm, &params, recompute.llm()),
            projector_ids: (0..params.specs.len()).filter(|&i| params.specs[i].module == Module::Projector).collect(),
            params,
            trainable: Trainable::ALL,
            dimage: None,
        }
    }

    fn forward(&mut self, be: &B, batch: &Batch, need_targets: bool) -> Result<(Prepared, B::Idx, B::Idx)> {
        let prep = batch.prepare_with(&self.cfg, need_targets)?;
        let ids = be.upload_idx(&prep.token_ids);
        let rows = be.upload_idx(&prep.image_rows);
        let h = self.cfg.llm.hidden_size;
        let embed = self.llm.embed;
        if prep.images > 0 {
            let pixels = be.upload(&batch.pixel_values);
            let features = if batch.tile_grids.is_empty() {
                self.s2.forward(be, &self.params, &pixels, prep.images)
            } else {
                self.s2.forward_dynamic(be, &self.params, &pixels, &batch.tile_grids)
            };
            self.projector.forward(be, &self.params, features, prep.images);
        }
        let input = self.llm.input(be, prep.batch, prep.seq);
        be.embedding_fwd(&self.params.values[embed], &ids, input, prep.batch * prep.seq, h);
        if prep.images > 0 {
            be.scatter_rows(self.projector.output(), &rows, input, prep.image_rows.len(), h);
        }
        self.llm.forward(be, &self.params);
        Ok((prep, ids, rows))
    }

    /// Forward only: the logits `[vocab]` at position `pos` of sample `sample`
    /// (text positions, before the image tokens are spliced in; generation).
    pub fn logits_at(&mut self, be: &B, batch: &Batch, sample: usize, pos: usize) -> Result<Vec<f32>> {
        let (prep, _, _) = self.forward(be, batch, false)?;
        let t = batch.seq;
        let has_image_before = batch.input_ids[sample * t..sample * t + pos].contains(&IMAGE_TOKEN_INDEX);
        let row = sample * prep.seq + pos + if has_image_before { self.cfg.image_tokens() - 1 } else { 0 };
        Ok(self.llm.logits_row(be, &self.params, row))
    }

    /// Forward only: the loss sum and target count (evaluation).
    pub fn loss(&mut self, be: &B, batch: &Batch) -> Result<LossSum> {
        let (prep, _, _) = self.forward(be, batch, true)?;
        let sum = self.llm.loss(be, &mut self.params, &prep.targets, None, false);
        Ok(LossSum { sum, tokens: prep.n_targets })
    }

    /// Forward and backward. Gradients of trainable parameters are *added*
    /// into `params.grads`, scaled by `1 / denominator` (the global target
    /// count of the step, so accumulation and data parallelism sum up to the
    /// gradient of the mean loss). `None` uses this batch's own count.
    pub fn forward_backward(&mut self, be: &B, batch: &Batch, denominator: Option<usize>) -> Result<LossSum> {
        self.forward_backward_with(be, batch, denominator, &mut |_, _| {})
    }

    /// `forward_backward` that tells `ready` which gradients are final as
    /// backward goes (LLM layers from the last, the embedding, the projector,
    /// ViT layers from the last), so data-parallel training can all-reduce
    /// them while backward continues.
    pub fn forward_backward_with(
        &mut self,
        be: &B,
        batch: &Batch,
        denominator: Option<usize>,
        ready: GradReady<B>,
    ) -> Result<LossSum> {
        let (prep, ids, rows) = self.forward(be, batch, true)?;
        let denom = denominator.unwrap_or(prep.n_targets).max(1);
        let t = self.trainable;
        let sum = self.llm.loss(be, &mut self.params, &prep.targets, Some(1.0 / denom as f32), t.llm);
        let n_rows = prep.batch * prep.seq;
        let h = self.cfg.llm.hidden_size;
        let embed = self.llm.embed;
        let dembeds = self.llm.backward(be, &mut self.params, t.llm, &mut *ready);
        if t.llm {
            be.embedding_bwd(dembeds, &ids, &mut self.params.grads[embed], n_rows, h);
        }
        ready(&self.params.grads, &[embed]);
        if (t.projector || t.vision_tower) && prep.images > 0 {
            let n_img = prep.image_rows.len();
            let dimage = self.dimage.get_or_insert_with(|| be.alloc(0));
            if be.buf_len(dimage) != n_img * h {
                *dimage = be.alloc(n_img * h);
            }
            be.fill(dimage, 0.0);
            be.scatter_rows_bwd(dembeds, &rows, dimage, n_img, h);
            let dfeatures = self.projector.backward(be, &mut self.params, dimage, t.projector);
            ready(&self.params.grads, &self.projector_ids);
            if t.vision_tower {
                self.s2.backward(be, &mut self.params, dfeatures, ready);
            }
        }
        Ok(LossSum { sum, tokens: prep.n_targets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;
    use crate::engine::testing::rand_vec;
    use crate::model::params::{is_used, param_specs};
    use std::collections::BTreeMap;

    /// Weights large enough that every path carries signal (N(0, 1/fan_in)
    /// for matrices, norm scales around 1, small random biases).
    pub(crate) fn lively_weights(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, Vec<f32>> {
        param_specs(cfg)
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = rand_vec(seed * 1000 + i as u64, s.numel());
                let fan_in = if s.shape.len() >= 2 { s.shape[1..].iter().product::<usize>() } else { 1 };
                let is_norm = s.name.contains("norm") || s.name.contains("projector.layers.1.");
                let v: Vec<f32> = r
                    .iter()
                    .map(|&x| {
                        if is_norm && s.name.ends_with("weight") {
                            1.0 + 0.2 * x
                        } else if s.shape.len() == 1 {
                            0.1 * x
                        } else {
                            x * (3.0 / fan_in as f64).sqrt() // uniform with variance 1/fan_in
                        }
                    } as f32)
                    .collect();
                (s.name.clone(), v)
            })
            .collect()
    }

    fn model(cfg: &ModelConfig, host: &BTreeMap<String, Vec<f32>>, recompute: Recompute) -> Vlm<Cpu<f64>> {
        let be = Cpu::<f64>::new();
        Vlm::new(cfg, ParamStore::from_host(&be, cfg, host).unwrap(), recompute)
    }

    /// Every parameter tensor of the tiny model, ViT included (through the S2
    /// merge), against central differences in f64: one random direction over
    /// the whole tensor plus two single entries. Tolerance 1e-6 relative
    /// (h = 1e-5; measured errors are around 1e-9).
    #[test]
    fn whole_model_gradients_match_finite_differences() {
        let cfg = ModelConfig::tiny();
        let be = Cpu::<f64>::new();
        let host = lively_weights(&cfg, 1);
        let batch = Batch::synthetic(&cfg, 2, 8, 3);
        let mut m = model(&cfg, &host, Recompute::None);
        m.params.zero_grads(&be);
        let base = m.forward_backward(&be, &batch, None).unwrap();
        let grads: Vec<Vec<f64>> = m.params.grads.iter().map(|g| be.download_f64(g)).collect();
        let specs = m.params.specs.clone();
        let mut checked_vit = 0;
        for (pi, spec) in specs.iter().enumerate() {
            let g = &grads[pi];
            if !is_used(&cfg, spec) {
                assert!(g.iter().all(|&x| x == 0.0), "{} is unused but got a gradient", spec.name);
                continue;
            }
            let orig = be.download_f64(&m.params.values[pi]);
            let mut loss_at = |vals: &[f64]| {
                m.params.values[pi] = be.upload_f64(vals);
                m.loss(&be, &batch).unwrap().mean()
            };
            let h = 1e-5;
            let dir = rand_vec(pi as u64 + 77, orig.len());
            let shifted = |s: f64| orig.iter().zip(&dir).map(|(o, d)| o + s * d).collect::<Vec<_>>();
            let fd = (loss_at(&shifted(h)) - loss_at(&shifted(-h))) / (2.0 * h);
            let an: f64 = g.iter().zip(&dir).map(|(a, b)| a * b).sum();
            let scale = an.abs().max(fd.abs()).max(1e-6);
            // Absolute floor: the loss is O(1), so FD rounding noise is ~1e-11
            // (SigLIP's k_proj bias has an exactly zero gradient).
            assert!(
                (fd - an).abs() / scale < 1e-6 || (fd - an).abs() < 1e-9,
                "{}: directional derivative {an:.9e} vs finite difference {fd:.9e}",
                spec.name
            );
            for &j in &[0, orig.len() / 2 + 1] {
                let j = j.min(orig.len() - 1);
                let mut v = orig.clone();
                v[j] += h;
                let lp = loss_at(&v);
                v[j] -= 2.0 * h;
                let lm = loss_at(&v);
                let fd = (lp - lm) / (2.0 * h);
                let scale = g[j].abs().max(fd.abs()).max(1e-7);
                assert!(
                    (fd - g[j]).abs() / scale < 1e-5 || (fd - g[j]).abs() < 1e-9,
                    "{}[{j}]: analytic {:.9e} vs finite difference {fd:.9e}",
                    spec.name,
                    g[j]
                );
            }
            m.params.values[pi] = be.upload_f64(&orig);
            if spec.module == Module::VisionTower {
                checked_vit += 1;
            }
        }
        assert_eq!(checked_vit, 3 + 16 * cfg.vision.layers_used());
        assert!(base.sum.is_finite());
    }

    /// Every recomputation choice gives the same loss and the same gradient
    /// bits as keeping every activation, the LM head in one chunk or in
    /// chunks of 7 rows (a partial last chunk) aside: chunks sum the head's
    /// weight gradient in another order, so there only 1e-12 holds.
    #[test]
    fn recomputation_and_head_chunks_leave_gradients_unchanged() {
        let cfg = ModelConfig::tiny();
        let be = Cpu::<f64>::new();
        let host = lively_weights(&cfg, 2);
        let batch = Batch::synthetic(&cfg, 2, 8, 4);
        let run = |recompute: Recompute, chunk: Option<usize>| {
            let mut m = model(&cfg, &host, recompute);
            if let Some(rows) = chunk {
                m.llm.set_head_chunk_rows(rows);
            }
            m.params.zero_grads(&be);
            let loss = m.forward_backward(&be, &batch, None).unwrap();
            (loss.sum, m.params.grads.iter().map(|g| be.download_f64(g)).collect::<Vec<_>>())
        };
        let (loss, grads) = run(Recompute::None, None);
        for recompute in [Recompute::Vit, Recompute::Llm, Recompute::All] {
            let (l, g) = run(recompute, None);
            assert_eq!(l.to_bits(), loss.to_bits(), "{recompute:?}: loss");
            assert!(g == grads, "{recompute:?}: gradients differ");
        }
        let rows = batch.batch * cfg.spliced_len(batch.seq);
        assert!(rows > 7 && !rows.is_multiple_of(7), "{rows} rows: the chunks must include a partial one");
        for recompute in [Recompute::None, Recompute::All] {
            let (l, g) = run(recompute, Some(7));
            assert!((l - loss).abs() < 1e-12 * loss.abs(), "{recompute:?}, head chunks of 7: loss {l} vs {loss}");
            for (k, (a, b)) in g.iter().zip(&grads).enumerate() {
                let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                assert!(err < 1e-12, "{recompute:?}, head chunks of 7: parameter {k} differs by {err:e}");
            }
        }
    }

    /// A text-only sample padded next to an image sample contributes exactly
    /// what it contributes alone: losses and gradients of the mixed batch are
    /// the sums over the samples run one by one.
    #[test]
    fn mixed_text_only_and_image_batch_equals_samples_run_alone() {
        let cfg = ModelConfig::tiny();
        let be = Cpu::<f64>::new();
        let host = lively_weights(&cfg, 3);
        let img = Batch::synthetic(&cfg, 1, 8, 5);
        let text = Batch {
            batch: 1,
            seq: 8,
            pixel_values: vec![],
            tile_grids: Vec::new(),
            has_image: vec![false],
            input_ids: vec![3, 9, 27, 81, 243, 17, 51, 153],
            labels: vec![-100, -100, -100, 81, 243, 17, 51, 153],
        };
        let mixed = Batch {
            batch: 2,
            seq: 8,
            pixel_values: img.pixel_values.clone(),
            tile_grids: Vec::new(),
            has_image: vec![false, true],
            input_ids: [text.input_ids.clone(), img.input_ids.clone()].concat(),
            labels: [text.labels.clone(), img.labels.clone()].concat(),
        };
        let run = |b: &Batch| {
            let mut m = model(&cfg, &host, Recompute::None);
            m.params.zero_grads(&be);
            // One denominator for all three runs, so gradients add up.
            let l = m.forward_backward(&be, b, Some(10)).unwrap();
            (l, m.params.grads.iter().map(|g| be.download_f64(g)).collect::<Vec<_>>())
        };
        let (lm, gm) = run(&mixed);
        let (lt, gt) = run(&text);
        let (li, gi) = run(&img);
        assert_eq!(lm.tokens, lt.tokens + li.tokens);
        assert!((lm.sum - (lt.sum + li.sum)).abs() < 1e-10, "{} vs {}", lm.sum, lt.sum + li.sum);
        for (k, g) in gm.iter().enumerate() {
            let want: Vec<f64> = gt[k].iter().zip(&gi[k]).map(|(a, b)| a + b).collect();
            let err = g.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-12, "parameter {k}: max difference {err}");
        }
    }

    /// `logits_at` picks the right row: at text positions before and after
    /// the image of the third sample of a batch, the loss of a batch whose
    /// only target is the next token equals -log softmax(logits_at(...))
    /// [that token]. The loss finds its row through `Batch::prepare`,
    /// independently of `logits_at`'s arithmetic.
    #[test]
    fn logits_at_reads_the_row_of_the_asked_text_position() {
        let cfg = ModelConfig::tiny();
        let be = Cpu::<f64>::new();
        let host = lively_weights(&cfg, 4);
        let (n, t, sample) = (3, 9, 2);
        let base = Batch::synthetic(&cfg, n, t, 6);
        assert_eq!(base.input_ids[sample * t + 2], IMAGE_TOKEN_INDEX, "the image sits at text position 2");
        let mut m = model(&cfg, &host, Recompute::None);
        for pos in [0usize, 3, 5, 7] {
            let mut b = base.clone();
            b.labels = vec![-100; n * t];
            let next = b.input_ids[sample * t + pos + 1];
            b.labels[sample * t + pos + 1] = next;
            let loss = m.loss(&be, &b).unwrap();
            assert_eq!(loss.tokens, 1);
            let logits = m.logits_at(&be, &b, sample, pos).unwrap();
            let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let want = lse - logits[next as usize] as f64;
            assert!((loss.sum - want).abs() < 1e-5 * want.abs().max(1.0), "pos {pos}: {} vs {want}", loss.sum);
        }
    }
}
