//! Training: optimizer, schedule and the step loop.

pub mod checkpoint;
pub mod distributed;
pub mod grad_sync;
pub mod optimizer;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use optimizer::{OptimConfig, Optimizer, PerModule, StepInfo};
pub use trainer::{train_step, train_step_dp, DpStepReport, StepReport};
