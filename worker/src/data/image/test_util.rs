//! Shared by the image tests: the PIL reference fixtures that
//! `tools/make_image_fixtures.py` writes, and the configs several use.

use serde_json::Value;
use std::path::PathBuf;
use tessera_job::image::{AspectMode, ImageConfig, PillowOrder};

/// The output side of the fixtures' reference outputs.
pub(super) const S: usize = 40;

pub(super) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

pub(super) fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The pass order of the Pillow that made the fixtures.
pub(super) fn manifest_pillow(m: &Value) -> PillowOrder {
    let major: u32 = m["pillow"].as_str().unwrap().split('.').next().unwrap().parse().unwrap();
    if major >= 13 {
        PillowOrder::Pillow13
    } else {
        PillowOrder::Legacy
    }
}

pub(super) fn pad(size: usize) -> ImageConfig {
    ImageConfig { mode: AspectMode::Pad, ..ImageConfig::new(size) }
}
