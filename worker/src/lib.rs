//! Tessera worker library: the compute engine, the S2 vision-language model,
//! training, the worker process that runs it (`node`) and the command-line
//! tools built on them.

pub mod codec;
pub mod collective;
pub mod data;
pub mod debug_step;
pub mod engine;
pub mod eval;
pub mod launch;
pub mod model;
pub mod node;
pub mod train;
