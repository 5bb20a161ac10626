//! Step reports from every rank, folded into one line per step: the loss of
//! the global batch, throughput, and how evenly the ranks were loaded.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tessera_proto::v1::StepReport;

/// One finished step, over all ranks (a line of metrics.jsonl).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepSummary {
    pub step: u64,
    /// Mean loss over the global batch's target tokens.
    pub loss: f64,
    pub grad_norm: f64,
    pub lr_scale: f64,
    pub samples: u64,
    pub target_tokens: u64,
    pub llm_tokens: u64,
    pub tiles: u64,
    pub bad_samples: u64,
    pub truncated: u64,
    /// Wall time of the slowest rank.
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub tiles_per_s: f64,
    /// Planned cost: most loaded rank over the mean, less one.
    pub plan_imbalance: f64,
    /// Measured compute time: slowest rank over the mean, less one.
    pub compute_imbalance: f64,
    /// The longest any rank waited on the gradient all-reduce after backward.
    pub comm_wait_s: f64,
    /// Per rank: compute seconds and samples trained.
    pub compute_s: Vec<f64>,
    /// Per rank: wall seconds of the step (absent from older metrics files).
    #[serde(default)]
    pub step_s: Vec<f64>,
    pub rank_samples: Vec<u64>,
    /// Ranks whose compute time exceeds the median over ranks by the
    /// straggler factor (`cluster.straggler_factor`).
    pub stragglers: Vec<u32>,
}

/// The ranks slower than `factor` times the median compute time (the
/// median of an even count is the mean of the middle two). None when the
/// median is zero.
pub fn stragglers(compute_s: &[f64], factor: f64) -> Vec<u32> {
    let mut sorted = compute_s.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let median = if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) };
    if median <= 0.0 {
        return Vec::new();
    }
    compute_s.iter().enumerate().filter(|(_, &t)| t > factor * median).map(|(r, _)| r as u32).collect()
}

/// Collects reports until every rank has reported a step.
pub struct StepBook {
    world_size: usize,
    pending: BTreeMap<u64, Vec<Option<StepReport>>>,
    /// A rank slower than this times the median is flagged.
    pub straggler_factor: f64,
}

impl StepBook {
    pub fn new(world_size: usize) -> Self {
        StepBook { world_size, pending: BTreeMap::new(), straggler_factor: 1.5 }
    }

    /// Files a report; returns the step's summary once the last rank is in.
    /// A repeated report for the same (step, rank) replaces the first.
    pub fn record(&mut self, r: StepReport, plan_imbalance: f64) -> Option<StepSummary> {
        let rank = r.rank as usize;
        if rank >= self.world_size {
            return None;
        }
        let step = r.step;
        let slot = self.pending.entry(step).or_insert_with(|| vec![None; self.world_size]);
        slot[rank] = Some(r);
        if slot.iter().any(|s| s.is_none()) {
            return None;
        }
        let reports: Vec<StepReport> = self.pending.remove(&step)?.into_iter().flatten().collect();
        Some(summarize(step, &reports, plan_imbalance, self.straggler_factor))
    }
}

fn summarize(step: u64, r: &[StepReport], plan_imbalance: f64, straggler_factor: f64) -> StepSummary {
    let sum = |f: fn(&StepReport) -> u64| r.iter().map(f).sum::<u64>();
    let target_tokens = sum(|x| x.target_tokens);
    let loss_sum: f64 = r.iter().map(|x| x.loss_sum).sum();
    let timing = |f: fn(&tessera_proto::v1::Timings) -> f64| -> Vec<f64> {
        r.iter().map(|x| x.timings.as_ref().map(f).unwrap_or(0.0)).collect()
    };
    let step_s = timing(|t| t.step_s);
    let compute_s = timing(|t| t.compute_s);
    let seconds = step_s.iter().cloned().fold(0.0, f64::max);
    let mean_compute = compute_s.iter().sum::<f64>() / compute_s.len().max(1) as f64;
    let max_compute = compute_s.iter().cloned().fold(0.0, f64::max);
    let llm_tokens = sum(|x| x.llm_tokens);
    let tiles = sum(|x| x.tiles as u64);
    // Every rank applies the same all-reduced update: rank 0 speaks for all.
    let first = &r[0];
    StepSummary {
        step,
        loss: if target_tokens > 0 { loss_sum / target_tokens as f64 } else { 0.0 },
        grad_norm: first.grad_norm,
        lr_scale: first.lr_scale,
        samples: sum(|x| x.samples as u64),
        target_tokens,
        llm_tokens,
        tiles,
        bad_samples: sum(|x| x.bad_samples as u64),
        truncated: sum(|x| x.truncated as u64),
        seconds,
        tokens_per_s: if seconds > 0.0 { llm_tokens as f64 / seconds } else { 0.0 },
        tiles_per_s: if seconds > 0.0 { tiles as f64 / seconds } else { 0.0 },
        plan_imbalance,
        compute_imbalance: if mean_compute > 0.0 { max_compute / mean_compute - 1.0 } else { 0.0 },
        comm_wait_s: timing(|t| t.comm_wait_s).into_iter().fold(0.0, f64::max),
        stragglers: stragglers(&compute_s, straggler_factor),
        compute_s,
        step_s,
        rank_samples: r.iter().map(|x| x.samples as u64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::v1::Timings;

    fn report(rank: u32, step: u64, loss_sum: f64, tokens: u64, compute: f64) -> StepReport {
        StepReport {
            rank,
            step,
            loss_sum,
            target_tokens: tokens,
            samples: 2,
            tiles: 10,
            llm_tokens: 100,
            timings: Some(Timings { compute_s: compute, step_s: compute + 0.5, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_step_is_summarized_when_the_last_rank_reports() {
        let mut b = StepBook::new(2);
        assert_eq!(b.record(report(1, 0, 30.0, 10, 3.0), 0.1), None);
        assert_eq!(b.record(report(0, 1, 1.0, 1, 1.0), 0.0), None, "another step does not complete step 0");
        let s = b.record(report(0, 0, 10.0, 30, 1.0), 0.1).unwrap();
        // The loss of the global batch weighs each rank by its tokens.
        assert_eq!(s.loss, 40.0 / 40.0);
        assert_eq!((s.samples, s.target_tokens, s.tiles, s.llm_tokens), (4, 40, 20, 200));
        assert_eq!(s.seconds, 3.5);
        assert!((s.compute_imbalance - 0.5).abs() < 1e-12, "3 s against a mean of 2 s");
        assert!((s.tokens_per_s - 200.0 / 3.5).abs() < 1e-9);
        assert_eq!(s.compute_s, vec![1.0, 3.0]);
        assert_eq!(s.step_s, vec![1.5, 3.5]);
        assert_eq!(s.rank_samples, vec![2, 2]);
        assert_eq!(s.stragglers, Vec::<u32>::new(), "3 s is 1.5 x the median of 2 s, not more");
        assert_eq!(b.record(report(5, 1, 1.0, 1, 1.0), 0.0), None, "an out-of-range rank is ignored");
    }

    /// A summary names the slow rank, at the book's factor.
    #[test]
    fn a_summary_flags_the_straggler() {
        let mut b = StepBook::new(3);
        b.record(report(0, 4, 1.0, 1, 1.0), 0.0);
        b.record(report(1, 4, 1.0, 1, 1.2), 0.0);
        let s = b.record(report(2, 4, 1.0, 1, 2.0), 0.0).unwrap();
        assert_eq!(s.stragglers, vec![2], "2.0 s against a median of 1.2 s");
        b.straggler_factor = 2.0;
        b.record(report(0, 5, 1.0, 1, 1.0), 0.0);
        b.record(report(1, 5, 1.0, 1, 1.2), 0.0);
        assert!(b.record(report(2, 5, 1.0, 1, 2.0), 0.0).unwrap().stragglers.is_empty());
    }

    #[test]
    fn stragglers_are_slower_than_the_median_by_the_factor() {
        assert_eq!(stragglers(&[1.0, 1.1, 0.9, 1.6], 1.5), vec![3], "median 1.05: 1.6 > 1.575");
        assert_eq!(stragglers(&[1.0, 1.1, 0.9, 1.5], 1.5), Vec::<u32>::new());
        assert_eq!(stragglers(&[2.0, 9.0, 2.1], 2.0), vec![1]);
        assert_eq!(stragglers(&[5.0], 1.5), Vec::<u32>::new(), "one rank is its own median");
        assert_eq!(stragglers(&[0.0, 0.0], 1.5), Vec::<u32>::new());
        assert_eq!(stragglers(&[], 1.5), Vec::<u32>::new());
    }
}
