//! The S2 vision-language model: config, parameters, and the modules.

pub mod batch;
pub mod flops;
pub mod linear;
pub mod llama;
pub mod memory;
pub mod params;
pub mod projector;
pub mod s2;
pub mod store;
pub mod vit;
pub mod vlm;
pub mod weights;

pub use batch::Batch;
pub use params::{param_specs, Module, ParamSpec};
pub use store::{GradReady, ParamStore};
pub use tessera_job::model::ModelConfig;
pub use vlm::{LossSum, Recompute, Trainable, Vlm};
