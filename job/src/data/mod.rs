//! Datasets as the coordinator and the workers both index them: records of
//! LLaVA/VILA-format files, their mixing into a deterministic stream, the
//! conversation template and tokenizer, and each sample's cost. Decoding
//! images and collating batches is the worker's (`tessera_worker::data`).

pub mod dataset;
pub mod index;
pub mod template;

pub use index::{DataConfig, DatasetIndex};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Who speaks a turn. LLaVA files say "human"/"gpt" (some use "user"/"assistant").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Human,
    Gpt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub value: String,
}

/// One record of a dataset, before tokenization and image loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    /// Image path, already joined with the dataset's image folder.
    pub image: Option<PathBuf>,
    pub conversations: Vec<Turn>,
}

/// What to do with a sample that cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadSample {
    /// Skip it, log it once with its id and reason, and count it.
    #[default]
    Skip,
    /// Stop the job with an error naming it.
    Fail,
}

/// A sample that was refused, and why (reported, never dropped silently).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sample `{id}`: {reason}")]
pub struct BadSample {
    pub id: String,
    pub reason: String,
}

impl BadSample {
    pub fn new(id: impl Into<String>, reason: impl Into<String>) -> Self {
        BadSample { id: id.into(), reason: reason.into() }
    }
}
