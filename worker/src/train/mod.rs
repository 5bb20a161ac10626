//! Training: the step, optimizer, schedule, gradient sync and checkpoint IO.

pub mod checkpoint;
pub mod grad_sync;
pub mod job_checkpoint;
pub mod optimizer;
pub mod schedule;
pub mod setup;
pub mod trainer;

pub use optimizer::{OptimConfig, Optimizer, PerModule, StepInfo};
pub use trainer::{train_step, train_step_dp, DpStepReport, StepReport};
