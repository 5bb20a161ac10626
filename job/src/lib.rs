//! What Tessera's head node and its workers must agree on, in one crate that
//! links no compute: the job config and its validation ([`config`]), the
//! model's shape ([`model`], [`hf_config`]), the datasets as an index with
//! each sample's cost ([`data`], [`image`], [`cost`]), the checkpoint
//! manifest protocol ([`checkpoint`]) and the file-system helpers it needs
//! ([`fs`]). The coordinator plans and commits from these; the workers
//! train from the same definitions, so the two cannot drift apart.

pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod data;
pub mod fs;
pub mod hf_config;
pub mod image;
pub mod logging;
pub mod model;
