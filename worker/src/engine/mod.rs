//! Compute engine: the backend op trait and its implementations.

pub mod attention_scratch;
pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod parity;
mod s2_checks;
#[cfg(test)]
pub(crate) mod testing;

pub use backend::{AdamW, AttnShape, Backend, GeluKind, Gemm, GridShape, ImageShape, RopeShape, TileGrid};
