//! Tessera worker library: the compute engine, the S2 vision-language model,
//! training and the command-line tools built on them.

pub mod codec;
pub mod collective;
pub mod data;
pub mod debug_step;
pub mod engine;
pub mod eval;
pub mod launch;
pub mod model;
pub mod train;
