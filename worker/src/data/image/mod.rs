//! Image decoding and preprocessing, exactly as VILA 1.5 prepares an image
//! for its S2 vision tower (docs/DESIGN.md sections 1-2).
//!
//! VILA opens the file with PIL, converts it to RGB, optionally pads it to a
//! square (`image_aspect_ratio = "pad"`), resizes it to the largest S2 scale
//! with PIL's bicubic filter and hands it to the SigLIP image processor, which
//! rescales by 1/255 and normalizes with mean = std = 0.5. This module does
//! the same steps:
//!
//! 1. Read the header only and refuse an image with more than
//!    `ImageConfig::max_pixels` pixels before decoding anything (PIL's
//!    decompression-bomb limit by default). The settings, the header reader
//!    and the S2 tile count, and so the sample's cost, are
//!    `tessera_job::image`'s, which the coordinator shares.
//! 2. Decode JPEG, PNG or WebP (the format is sniffed from the content; the
//!    extension is only a fallback), with the decoder's own allocation limit
//!    set to `ImageConfig::max_decode_bytes`. A JPEG without its
//!    end-of-image marker or a WebP shorter than its RIFF header says is
//!    refused as truncated, as PIL refuses them (the `image` crate's decoders
//!    would fill in grey or decode what is there).
//! 3. Convert to RGB the way PIL's `.convert("RGB")` does: alpha is dropped,
//!    not composited; grayscale is replicated; a palette is expanded. 16-bit
//!    samples keep their high byte, as PIL does for 16-bit RGB(A) PNGs. (For a
//!    16-bit *grayscale* PNG PIL clips the 16-bit value to 255, which turns
//!    almost every pixel white; we keep the high byte there too, on purpose.)
//! 4. `AspectMode::Pad`: VILA's `expand2square`, the image pasted on a
//!    square of colour (127, 127, 127) at `(0, (w - h) / 2)` or
//!    `((h - w) / 2, 0)`. The square is never materialized: its rows are
//!    produced one at a time while resizing.
//! 5. Resize to `size x size` with [`resize_bicubic_pil`], a bit-exact port of
//!    Pillow's `ImagingResample` for 8-bit images (bicubic, a = -0.5,
//!    antialiased when downscaling, fixed-point, two passes each rounded to
//!    uint8). Pillow 13 changed the order of the passes for images whose
//!    height shrinks much more than their width; `ImageConfig::pillow`
//!    picks the release to match (13 by default, `legacy` for <= 12, which
//!    VILA 1.5 used). The two differ by a level or a few on some pixels.
//!    The hot loops are vectorized (AVX2 where the CPU has it, chosen at run
//!    time) and compute exactly Pillow's integer sums; the tests compare them
//!    with a plain pixel-by-pixel transcription.
//! 6. Normalize: `f32(v * (1/255))`, then `(x - 0.5) / 0.5` in f32, as
//!    transformers' `rescale` + `normalize` compute it; output `[3, size,
//!    size]` planar (CHW).
//!
//! `worker/examples/bench_image_pipeline.rs` measures these steps against
//! PIL + numpy (docs/BENCHMARKS.md).
//!
//! The fixture script `tools/make_image_fixtures.py` computes the reference
//! outputs with PIL and transformers' SigLIP processor; the tests compare
//! against them. PNG and lossless WebP match bit for bit. JPEG and lossy WebP
//! decoders differ slightly between libjpeg-turbo/libwebp (PIL) and the
//! `image` crate (zune-jpeg, image-webp); see the tests for the measured gap.
//!
//! EXIF orientation is ignored, as `PIL.Image.open` (and so VILA) ignores it.
//!
//! Dynamic S2 (`AspectMode::DynamicS2`, NVILA's aspect-ratio-aware tile
//! grid at the largest scale) resizes the decoded image once per scale and
//! hands the model its tiles ([`load_image_dynamic_s2`]); the grid, and so
//! the tile count and the cost, also come from the header alone
//! (`tessera_job::image::tiles_for`).
//!
//! One concern a file: decoding a file with the truncation checks
//! (`decode.rs`), PIL's RGB conversion (`rgb.rs`), Pillow's resampler
//! (`resample.rs`) and its vectorized kernels (`simd.rs`), and the whole
//! pipeline with the normalization (`preprocess.rs`).

mod decode;
mod preprocess;
mod resample;
mod rgb;
mod simd;
#[cfg(test)]
mod test_util;

pub use decode::decode_rgb8;
pub use preprocess::{compare_normalized, load_image, load_image_dynamic_s2, preprocess_dynamic_s2, preprocess_rgb8};
pub use resample::{resize_bicubic_pil, resize_bicubic_pil_with, resize_rgb8};
