//! The per-step plan: which rank trains which samples. A pure function of
//! (the step's samples in stream order, their costs, world size), so any
//! coordinator, restarted or not, plans the same step the same way.
//!
//! Cost = tiles x (ViT cost of a tile) + tokens x (LLM cost of a token), in
//! forward FLOPs. Planning is greedy longest-first onto the lightest rank
//! (VILA's `split_to_even_chunks` does this by length alone).

/// One rank's share of a step: positions into the step's sample list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shard {
    pub samples: Vec<usize>,
    pub cost: f64,
}

/// Every rank's shard of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub shards: Vec<Shard>,
}

impl Plan {
    /// The most loaded rank's cost over the mean, less one (0 = perfect).
    pub fn imbalance(&self) -> f64 {
        let total: f64 = self.shards.iter().map(|s| s.cost).sum();
        if total <= 0.0 {
            return 0.0;
        }
        let max = self.shards.iter().map(|s| s.cost).fold(0.0, f64::max);
        max / (total / self.shards.len() as f64) - 1.0
    }

    pub fn max_cost(&self) -> f64 {
        self.shards.iter().map(|s| s.cost).fold(0.0, f64::max)
    }
}

/// Greedy longest-processing-time-first: samples by falling cost (ties by
/// position), each onto the rank with the least cost so far (ties by rank).
/// Each rank's samples are then listed in stream order.
pub fn plan(costs: &[f64], world_size: usize) -> Plan {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut shards = vec![Shard::default(); world_size.max(1)];
    for i in order {
        let lightest =
            (0..shards.len()).min_by(|&a, &b| shards[a].cost.total_cmp(&shards[b].cost).then(a.cmp(&b))).unwrap_or(0);
        shards[lightest].samples.push(i);
        shards[lightest].cost += costs[i];
    }
    for s in &mut shards {
        s.samples.sort_unstable();
    }
    Plan { shards }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_lands_on_exactly_one_rank() {
        let costs: Vec<f64> = (0..37).map(|i| ((i * 7919) % 13) as f64 + 1.0).collect();
        for world in 1..6 {
            let p = plan(&costs, world);
            assert_eq!(p.shards.len(), world);
            let mut all: Vec<usize> = p.shards.iter().flat_map(|s| s.samples.clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..37).collect::<Vec<_>>());
            for s in &p.shards {
                let sum: f64 = s.samples.iter().map(|&i| costs[i]).sum();
                assert_eq!(s.cost, sum);
                assert!(s.samples.windows(2).all(|w| w[0] < w[1]), "a shard is listed in stream order");
            }
        }
    }

    #[test]
    fn balances_by_cost_not_by_count() {
        // One image sample worth five text samples: 2 ranks get 1 vs 5 samples.
        let costs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let p = plan(&costs, 2);
        assert_eq!(p.shards[0].samples, vec![0]);
        assert_eq!(p.shards[1].samples, vec![1, 2, 3, 4, 5]);
        assert_eq!(p.imbalance(), 0.0);
        // Splitting by count (3 + 3) would give 7 vs 3: imbalance 0.4.
        let q = plan(&[4.0, 3.0, 3.0, 2.0, 2.0, 2.0], 2);
        assert!(q.imbalance() < 0.0001, "LPT finds 8/8 here: {:?}", q);
    }

    #[test]
    fn lpt_stays_within_its_bound() {
        // Graham: LPT's makespan is at most (4/3 - 1/(3m)) of the optimum,
        // and the optimum is at least the mean.
        let costs: Vec<f64> = (0..200).map(|i| 1.0 + ((i * 2654435761u64) % 1000) as f64 / 100.0).collect();
        let mean = costs.iter().sum::<f64>() / 8.0;
        let p = plan(&costs, 8);
        assert!(p.max_cost() <= mean * (4.0 / 3.0), "{} vs mean {}", p.max_cost(), mean);
        assert!(p.imbalance() < 0.02, "200 samples on 8 ranks balance well: {}", p.imbalance());
    }

    #[test]
    fn is_deterministic_and_handles_more_ranks_than_samples() {
        let costs = [3.0, 3.0, 3.0];
        assert_eq!(plan(&costs, 5), plan(&costs, 5));
        let p = plan(&costs, 5);
        assert_eq!(p.shards.iter().filter(|s| s.samples.is_empty()).count(), 2);
        assert_eq!(plan(&[], 2).shards, vec![Shard::default(); 2]);
    }
}
