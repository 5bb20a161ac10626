//! The memory planner: what one rank holds while it trains, part by part,
//! and the largest micro-batch that fits a device.
//!
//! Every figure comes from the size functions that sit beside each module's
//! allocations (`vit::workspace_values`, `llama::workspace_values`, ...),
//! which unit tests hold equal to what the modules really allocate. The
//! peak is the sum of the parts: workspaces stay allocated from step to
//! step, so at the end of backward the parameters, gradients, optimizer
//! state, gradient buckets, every module's saved activations and backward
//! scratch, and the largest op scratch are all alive at once.

use super::params::param_specs;
use super::{llama, projector, s2, vit};
use crate::engine::attention_scratch::attention_peak_scratch_bytes;
use crate::engine::AttnShape;
use anyhow::Result;
use std::ops::{Add, Mul};
use tessera_job::config::{model_config, Precision, Recompute, TrainJob};
use tessera_job::model::{ModelConfig, Trainable};

/// What a GPU process holds besides its buffers and the planner does not
/// size: the CUDA context, cuBLAS's workspace, NCCL's buffers and the
/// memory pool's slack. An assumption, not a measurement (no GPU has run
/// Tessera yet): a CUDA 12 context is about 0.5 GiB on an H100.
pub const GPU_RESERVE_BYTES: u64 = 2 << 30;

/// Buffer values by storage: activations (the backend's storage type: f32,
/// or bf16 in mixed precision) and state (always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Values {
    pub act: usize,
    pub state: usize,
}

impl Values {
    pub fn act(n: usize) -> Values {
        Values { act: n, state: 0 }
    }
    pub fn state(n: usize) -> Values {
        Values { act: 0, state: n }
    }
    pub fn total(&self) -> usize {
        self.act + self.state
    }
    pub fn bytes(&self, act_bytes: usize) -> u64 {
        (self.act * act_bytes + self.state * 4) as u64
    }
}

impl Add for Values {
    type Output = Values;
    fn add(self, o: Values) -> Values {
        Values { act: self.act + o.act, state: self.state + o.state }
    }
}

impl Mul<usize> for Values {
    type Output = Values;
    fn mul(self, k: usize) -> Values {
        Values { act: self.act * k, state: self.state * k }
    }
}

/// One module's workspace: what forward keeps for backward, and backward's
/// own scratch. Both stay allocated between steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleValues {
    pub saved: Values,
    pub scratch: Values,
}

impl ModuleValues {
    pub fn total(&self) -> Values {
        self.saved + self.scratch
    }
}

/// What a job asks of one rank.
#[derive(Clone, Debug)]
pub struct MemoryJob {
    pub model: ModelConfig,
    /// Samples per micro-batch, each with one image.
    pub micro_batch: usize,
    /// Text tokens per sample, the image placeholder included.
    pub text_tokens: usize,
    /// Bytes per activation value: 4 (f32, tf32) or 2 (bf16).
    pub act_bytes: usize,
    /// The weights have compute copies beside their f32 masters (bf16).
    pub compute_copies: bool,
    pub recompute: Recompute,
    pub trainable: Trainable,
    pub world_size: usize,
    /// Scratch of the largest attention call beyond its inputs and outputs
    /// (a backend's own figure: see `attention_scratch`).
    pub attention_scratch: fn(&AttnShape, usize) -> u64,
    /// Memory the device uses besides the backend's buffers (a GPU's
    /// context, cuBLAS's workspace, the pool's slack).
    pub reserve_bytes: u64,
}

/// One line of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub group: &'static str,
    pub name: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub parts: Vec<Part>,
}

impl MemoryPlan {
    pub fn peak_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// Bytes of the parts of `group`.
    pub fn group_bytes(&self, group: &str) -> u64 {
        self.parts.iter().filter(|p| p.group == group).map(|p| p.bytes).sum()
    }
}

impl MemoryJob {
    /// A job config's demand on one GPU of a `world_size`-rank job: its
    /// micro-batch (a rank's share of `train.batch_size`, which the job
    /// splits among its ranks; the coordinator balances by cost, so a rank
    /// may get a sample more or less), text tokens (`data.max_length`
    /// with real data, else `train.text_tokens`), precision, recomputation
    /// and frozen modules.
    pub fn from_job(job: &TrainJob, world_size: usize) -> Result<MemoryJob> {
        let model = model_config(job)?;
        // The loader's cut: `data.max_length`, at most what the LLM's positions hold.
        let text_tokens = match &job.data {
            Some(d) => d.max_length.unwrap_or(model.max_text_tokens()).min(model.max_text_tokens()),
            None => job.train.text_tokens,
        };
        let bf16 = job.train.precision == Precision::Bf16;
        Ok(MemoryJob {
            model,
            micro_batch: job.train.batch_size.div_ceil(world_size.max(1)),
            text_tokens,
            act_bytes: if bf16 { 2 } else { 4 },
            compute_copies: bf16,
            recompute: job.model.recompute,
            trainable: job.optim.trainable(),
            world_size: world_size.max(1),
            attention_scratch: attention_peak_scratch_bytes,
            reserve_bytes: GPU_RESERVE_BYTES,
        })
    }

    /// The plan as a table, then the largest micro-batch for `budget` bytes,
    /// then one JSON line `{"fits", "max_micro_batch", "peak_gib"}`.
    pub fn report(&self, budget: u64) -> String {
        let plan = self.plan();
        let m = &self.model;
        let mut out = format!(
            "memory per rank: micro-batch {}, {} text tokens (LLM sequence {}), {}-byte activations{}, recompute {:?}, {} rank(s), device {:.1} GiB\n",
            self.micro_batch,
            self.text_tokens,
            m.spliced_len(self.text_tokens),
            self.act_bytes,
            if self.compute_copies { " and weight copies" } else { "" },
            self.recompute,
            self.world_size,
            gib(budget),
        );
        out += &format!("{:<12} {:<52} {:>10}\n", "group", "part", "GiB");
        for p in &plan.parts {
            out += &format!("{:<12} {:<52} {:>10.3}\n", p.group, p.name, gib(p.bytes));
        }
        let peak = plan.peak_bytes();
        out += &format!("{:<65} {:>10.3}\n", "peak (every part at once, end of backward)", gib(peak));
        let max = self.max_micro_batch(budget, 1 << 16);
        out += &format!("largest micro-batch that fits {:.1} GiB: {max}\n", gib(budget));
        out +=
            &serde_json::json!({ "fits": peak <= budget, "max_micro_batch": max, "peak_gib": gib(peak) }).to_string();
        out
    }

    /// Refuses a job whose plan does not fit `capacity` bytes, with the numbers.
    pub fn check_fits(&self, capacity: u64) -> Result<()> {
        let plan = self.plan();
        let peak = plan.peak_bytes();
        if peak <= capacity {
            return Ok(());
        }
        let max = self.max_micro_batch(capacity, self.micro_batch);
        let parts: Vec<String> = ["parameters", "activations", "workspaces", "device"]
            .iter()
            .filter(|g| plan.group_bytes(g) > 0)
            .map(|g| format!("{g} {}", size(plan.group_bytes(g))))
            .collect();
        anyhow::bail!(
            "a micro-batch of {} samples per rank (train.batch_size over {} rank(s)) needs {} per GPU ({}), \
             the device has {} for buffers: the largest micro-batch that fits is {max}{}; \
             `worker plan-memory --config JOB.toml` prints the whole plan",
            self.micro_batch,
            self.world_size,
            size(peak),
            parts.join(", "),
            size(capacity),
            if self.recompute == Recompute::All {
                String::new()
            } else {
                " (model.recompute = \"all\" keeps less)".into()
            },
        )
    }

    pub fn plan(&self) -> MemoryPlan {
        let m = &self.model;
        let (b, ab) = (self.micro_batch, self.act_bytes);
        let mut parts = Vec::new();
        let mut add = |group: &'static str, name: String, bytes: u64| parts.push(Part { group, name, bytes });

        let specs = param_specs(m);
        let all: usize = specs.iter().map(|s| s.numel()).sum();
        let trainable: usize = specs.iter().filter(|s| self.trainable.get(s.module)).map(|s| s.numel()).sum();
        add("parameters", "weights, f32 masters".into(), 4 * all as u64);
        if self.compute_copies {
            add("parameters", format!("compute copies, {}-byte", ab), (ab * all) as u64);
        }
        add("parameters", "gradients, f32 (every parameter)".into(), 4 * all as u64);
        add("parameters", "AdamW m and v, f32 (trainable)".into(), 8 * trainable as u64);
        if self.world_size > 1 {
            add("parameters", "all-reduce buckets, f32 (trainable)".into(), 4 * trainable as u64);
        }

        let tiles = b * m.s2.tiles_per_image();
        let seq = m.spliced_len(self.text_tokens);
        let modules = [
            (format!("ViT, {tiles} tiles"), vit::workspace_values(&m.vision, tiles, self.recompute.vit())),
            ("S2 resize, tiles, merge".into(), s2::workspace_values(m, b)),
            ("projector".into(), projector::workspace_values(m, b)),
            (format!("LLM, {b} x {seq} tokens"), llama::workspace_values(&m.llm, b, seq, self.recompute.llm())),
        ];
        for (name, v) in &modules {
            add("activations", name.clone(), v.saved.bytes(ab));
        }
        let inputs =
            Values::act(b * m.vision.num_channels * m.s2.max_scale().pow(2) + b * m.image_tokens() * m.llm.hidden_size);
        add("activations", "pixels and image-token gradient".into(), inputs.bytes(ab));
        for (name, v) in &modules {
            add("workspaces", format!("{name}: backward"), v.scratch.bytes(ab));
        }
        // The shapes the modules themselves run attention at.
        let (vit_attn, (llm_attn, _)) = (vit::attn_shape(&m.vision, tiles), llama::shapes(&m.llm, b, seq));
        let attn = (self.attention_scratch)(&vit_attn, ab).max((self.attention_scratch)(&llm_attn, ab));
        add("workspaces", "attention scratch (largest call)".into(), attn);
        if self.reserve_bytes > 0 {
            add("device", "context, GEMM workspace, pool slack".into(), self.reserve_bytes);
        }
        MemoryPlan { parts }
    }

    /// The largest micro-batch whose plan fits `budget` bytes (0 when not even
    /// one sample does), searched up to `limit`.
    pub fn max_micro_batch(&self, budget: u64, limit: usize) -> usize {
        let fits = |b: usize| MemoryJob { micro_batch: b, ..self.clone() }.plan().peak_bytes() <= budget;
        let (mut lo, mut hi) = (0, limit);
        // Invariant: lo fits (or is 0), everything above hi does not.
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// GiB, for printing.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// A size for a message: GiB from 1 GiB on, MiB below.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", gib(bytes))
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;
    use crate::model::{Batch, Module, ParamStore, Vlm};

    fn no_scratch(_: &AttnShape, _: usize) -> u64 {
        0
    }

    /// Each module's size function equals what its forward and backward
    /// allocate through the backend (counted by the CPU backend), for every
    /// recompute choice and a few shapes.
    #[test]
    fn module_sizes_equal_what_the_modules_allocate() {
        let cfg = ModelConfig::tiny();
        for recompute in [Recompute::None, Recompute::Vit, Recompute::Llm, Recompute::All] {
            for (batch, text) in [(1, 5), (3, 9)] {
                let be = Cpu::<f32>::new();
                let params = ParamStore::init(&be, &cfg, 1);
                let mut vlm = Vlm::new(&cfg, params, recompute);
                let data = Batch::synthetic(&cfg, batch, text, 2);
                let before = be.allocated_values();
                vlm.forward_backward(&be, &data, None).unwrap();
                let got = be.allocated_values() - before;
                let seq = cfg.spliced_len(text);
                let want = vit::workspace_values(&cfg.vision, batch * cfg.s2.tiles_per_image(), recompute.vit()).total()
                    + s2::workspace_values(&cfg, batch).total()
                    + projector::workspace_values(&cfg, batch).total()
                    + llama::workspace_values(&cfg.llm, batch, seq, recompute.llm()).total()
                    // Vlm's image-token gradient.
                    + Values::act(batch * cfg.image_tokens() * cfg.llm.hidden_size);
                assert_eq!(got, want.total(), "{recompute:?}, batch {batch}, {text} text tokens");
            }
        }
    }

    fn job(model: ModelConfig, b: usize) -> MemoryJob {
        MemoryJob {
            model,
            micro_batch: b,
            text_tokens: 16,
            act_bytes: 2,
            compute_copies: true,
            recompute: Recompute::All,
            trainable: Trainable::ALL,
            world_size: 8,
            attention_scratch: no_scratch,
            reserve_bytes: 1 << 30,
        }
    }

    /// A job that does not fit is refused with its numbers and the batch
    /// that would fit; one that fits passes.
    #[test]
    fn a_micro_batch_too_large_is_refused_with_the_numbers() {
        let j = job(ModelConfig::small(), 64);
        let need = j.plan().peak_bytes();
        assert!(j.check_fits(need).is_ok());
        let capacity = MemoryJob { micro_batch: 20, ..j.clone() }.plan().peak_bytes();
        let e = j.check_fits(capacity).unwrap_err().to_string();
        assert!(e.contains("micro-batch of 64 samples") && e.contains("largest micro-batch that fits is 20"), "{e}");
        assert!(e.contains(&format!("{} per GPU", size(need))), "{e}");
    }

    /// A job config's plan: the rank's share of the batch, the precision's
    /// storage, the config's recomputation and frozen modules.
    #[test]
    fn a_job_config_becomes_a_rank_s_demand() {
        let toml = "[model]\npreset = \"small\"\nrecompute = \"llm\"\n[train]\nsteps = 1\nbatch_size = 10\ntext_tokens = 40\nprecision = \"bf16\"\n[optim.freeze]\nvision_tower = true\nprojector = false\nllm = false\n";
        let j = MemoryJob::from_job(&TrainJob::parse(toml).unwrap(), 4).unwrap();
        assert_eq!((j.micro_batch, j.text_tokens, j.act_bytes, j.compute_copies), (3, 40, 2, true));
        assert_eq!((j.recompute, j.trainable.vision_tower, j.trainable.llm), (Recompute::Llm, false, true));
        let plan = j.plan();
        let opt = plan.parts.iter().find(|p| p.name.starts_with("AdamW")).unwrap().bytes;
        let vit: usize =
            param_specs(&j.model).iter().filter(|s| s.module == Module::VisionTower).map(|s| s.numel()).sum();
        let all: usize = param_specs(&j.model).iter().map(|s| s.numel()).sum();
        assert_eq!(opt, 8 * (all - vit) as u64, "frozen modules have no optimizer state");
    }

    #[test]
    fn max_micro_batch_is_the_largest_that_fits() {
        let j = job(ModelConfig::small(), 1);
        let at = |b| MemoryJob { micro_batch: b, ..j.clone() }.plan().peak_bytes();
        let budget = at(37) + 1;
        assert_eq!(j.max_micro_batch(budget, 1000), 37);
        assert_eq!(j.max_micro_batch(at(1) - 1, 1000), 0);
        assert_eq!(j.max_micro_batch(u64::MAX, 64), 64);
    }

    #[test]
    fn recomputation_and_bf16_shrink_the_plan_and_parameters_do_not_scale_with_the_batch() {
        let base = job(ModelConfig::small(), 4);
        let none = MemoryJob { recompute: Recompute::None, ..base.clone() }.plan();
        let all = base.plan();
        assert!(all.group_bytes("activations") < none.group_bytes("activations"));
        assert_eq!(all.group_bytes("parameters"), none.group_bytes("parameters"));
        let f32_plan = MemoryJob { act_bytes: 4, compute_copies: false, ..base.clone() }.plan();
        assert!(f32_plan.group_bytes("activations") > all.group_bytes("activations"));
        let bigger = MemoryJob { micro_batch: 8, ..base }.plan();
        assert_eq!(bigger.group_bytes("parameters"), all.group_bytes("parameters"));
        assert!(bigger.group_bytes("activations") > all.group_bytes("activations"));
    }
}
