//! Turns step numbers into per-rank sample lists: the step's samples come
//! from the data stream (a pure function of seed and position), their costs
//! from the dataset index (image headers and token counts, no decoding), and
//! the split from `plan`. Plans are cached for the few steps in flight.

use crate::plan::{plan, Plan};
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tessera_job::cost::CostModel;
use tessera_job::data::DatasetIndex;
use tessera_job::model::ModelConfig;

/// One step's samples (stream order) and their split.
#[derive(Clone, Debug)]
pub struct StepPlan {
    pub samples: Vec<(usize, usize)>,
    pub plan: Plan,
}

pub struct Planner {
    dataset: Arc<DatasetIndex>,
    model: ModelConfig,
    costs: CostModel,
    seed: u64,
    global_batch: usize,
    cache: Mutex<BTreeMap<(u64, usize), Arc<StepPlan>>>,
    /// Held while a plan is computed, so the ranks that all ask for a new
    /// step at once get one plan computed once (at 1024 ranks, computing it
    /// per request cost 3.7 ms of CPU each and stalled the coordinator).
    planning: Mutex<()>,
}

/// Plans kept; workers ask a few steps ahead and ranks drift a little.
const CACHED_PLANS: usize = 256;

impl Planner {
    pub fn new(dataset: Arc<DatasetIndex>, model: ModelConfig, seed: u64, global_batch: usize) -> Self {
        let costs = CostModel::of(&model);
        Planner {
            dataset,
            model,
            costs,
            seed,
            global_batch,
            cache: Mutex::new(BTreeMap::new()),
            planning: Mutex::new(()),
        }
    }

    pub fn cost_model(&self) -> CostModel {
        self.costs
    }

    /// The plan of `step` for `world_size` ranks.
    pub fn step(&self, step: u64, world_size: usize) -> Result<Arc<StepPlan>> {
        let key = (step, world_size);
        if let Some(p) = self.lock().get(&key) {
            return Ok(p.clone());
        }
        let _planning = self.planning.lock().unwrap_or_else(|e| e.into_inner());
        // Another request may have planned it while this one waited.
        if let Some(p) = self.lock().get(&key) {
            return Ok(p.clone());
        }
        let samples = self.dataset.samples_at(self.seed, step * self.global_batch as u64, self.global_batch)?;
        let costs: Vec<f64> = samples
            .iter()
            .map(|&(part, index)| match self.dataset.cost(&self.model, part, index) {
                Ok(c) => self.costs.cost(c),
                // The worker meets the same problem and skips or fails as
                // `on_bad_sample` says; here it only weighs nothing.
                Err(_) => 0.0,
            })
            .collect();
        let p = Arc::new(StepPlan { samples, plan: plan(&costs, world_size) });
        let mut cache = self.lock();
        cache.insert(key, p.clone());
        while cache.len() > CACHED_PLANS {
            cache.pop_first();
        }
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u64, usize), Arc<StepPlan>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}
