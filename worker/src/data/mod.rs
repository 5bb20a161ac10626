//! The worker's data pipeline: image decoding and S2 preprocessing, the
//! prefetching loader that turns indexed samples into batches, and the
//! synthetic demo dataset. Records, templates, tokenization and sample costs
//! are indexed by `tessera_job::data`, which the coordinator shares.

pub mod demo;
pub mod image;
pub mod loader;
