//! `worker eval`: answer accuracy (exact match of the greedy answer) and mean
//! loss on an evaluation split.

use crate::data::loader::Dataset;
use crate::engine::Backend;
use crate::model::{Batch, Vlm};
use anyhow::Result;
use tessera_job::data::BadSample;
use tessera_job::model::IGNORE_INDEX;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalReport {
    pub samples: usize,
    pub correct: usize,
    /// Mean next-token loss over all answer tokens of the split.
    pub mean_loss: f64,
    pub bad: Vec<BadSample>,
}

impl EvalReport {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }
}

/// Greedy decoding of the first answer of each sample, compared token by
/// token with the reference answer (its `</s>` included), plus the loss.
pub fn evaluate<B: Backend>(be: &B, model: &mut Vlm<B>, ds: &Dataset, max_new_tokens: usize) -> Result<EvalReport> {
    let mut r = EvalReport::default();
    let (mut loss_sum, mut tokens) = (0.0, 0);
    for (part, index) in ds.indices() {
        let ex = match ds.example(part, index) {
            Ok(e) => e,
            Err(b) => {
                r.bad.push(b);
                continue;
            }
        };
        let batch = crate::data::loader::collate(std::slice::from_ref(&ex));
        let l = model.loss(be, &batch)?;
        loss_sum += l.sum;
        tokens += l.tokens;
        // The prompt ends where the first answer starts; its tokens (up to the
        // next ignored label) are what greedy decoding must reproduce.
        let labels = &ex.tokens.labels;
        let Some(start) = labels.iter().position(|&l| l != IGNORE_INDEX) else { continue };
        let end = labels[start..].iter().position(|&l| l == IGNORE_INDEX).map_or(labels.len(), |n| start + n);
        let want = &labels[start..end];
        let mut ids = ex.tokens.input_ids[..start].to_vec();
        let mut got = Vec::new();
        while got.len() < max_new_tokens.max(want.len()) {
            let b = Batch {
                batch: 1,
                seq: ids.len(),
                pixel_values: ex.pixels.clone().unwrap_or_default(),
                tile_grids: ex.grid.into_iter().collect(),
                has_image: vec![ex.pixels.is_some()],
                input_ids: ids.clone(),
                labels: vec![IGNORE_INDEX; ids.len()],
            };
            let logits = model.logits_at(be, &b, 0, ids.len() - 1)?;
            let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i) as i64;
            got.push(next);
            ids.push(next);
            if got.len() >= want.len() && got.last() == want.last() {
                break;
            }
        }
        r.samples += 1;
        if got == want {
            r.correct += 1;
        }
    }
    r.mean_loss = loss_sum / tokens.max(1) as f64;
    Ok(r)
}
