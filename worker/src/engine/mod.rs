//! Compute engine: the backend op trait and its implementations.

mod attention_scratch;
pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod parity;
mod s2_checks;
#[cfg(test)]
pub(crate) mod testing;

pub use attention_scratch::{attention_scratch_bytes, AttentionScratch, GPU_KEY_BLOCK};
pub use backend::{AdamW, AttnShape, Backend, GeluKind, Gemm, GridShape, ImageShape, RopeShape, TileGrid};
