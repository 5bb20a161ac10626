//! The whole pipeline, from a file to the vision tower's input: decode,
//! resize (static S2, `pad`, or the tiles of dynamic S2), normalize as the
//! SigLIP processor does; and the measure of how far an output is from PIL's.

use super::decode::decode_rgb8;
use super::resample::{resize_bicubic_pil_with, resize_rgb8};
use super::simd;
use crate::engine::TileGrid;
use rayon::prelude::*;
use std::path::Path;
use tessera_job::image::ImageConfig;
use tessera_job::image::ImageError;
use tessera_job::model::S2Config;

/// Loads an image file as the vision tower's input: `[3, size, size]` f32,
/// CHW, normalized, following every step in the [module docs](super).
/// Never panics.
pub fn load_image(path: &Path, cfg: &ImageConfig) -> Result<Vec<f32>, ImageError> {
    if cfg.size == 0 {
        return Err(ImageError::Config("image size must be > 0".into()));
    }
    let (rgb, w, h) = decode_rgb8(path, cfg)?;
    Ok(preprocess_rgb8(&rgb, w, h, cfg))
}

/// The steps after decoding, for an RGB8 (HWC) image already in memory: pad
/// (mode `pad`), resize to `cfg.size`, normalize. Returns `[3, size, size]`.
///
/// Panics if `rgb.len() != w * h * 3` or the image is empty.
pub fn preprocess_rgb8(rgb: &[u8], w: usize, h: usize, cfg: &ImageConfig) -> Vec<f32> {
    let resized = resize_rgb8(rgb, w, h, cfg);
    normalize_chw(&resized, cfg.size)
}

/// Dynamic S2 ([`AspectMode::DynamicS2`]): loads an image as NVILA's
/// `dynamic_s2_preprocess` and the SigLIP processor prepare it. Each scale is
/// its own PIL bicubic resize of the decoded image (not of the largest
/// scale, as with static S2): to `n * tile` square for a smaller scale, to
/// `cols * tile x rows * tile` for the largest ([`ImageConfig::dynamic_grid`]).
/// Each resize is cut into tiles row by row and every tile normalized.
/// Returns the tiles, `[T, 3, tile, tile]` scale after scale, and the largest
/// scale's grid. `s2` must be the model's S2 config that `cfg` was made for.
///
/// [`AspectMode::DynamicS2`]: super::AspectMode::DynamicS2
pub fn load_image_dynamic_s2(
    path: &Path,
    cfg: &ImageConfig,
    s2: &S2Config,
) -> Result<(Vec<f32>, TileGrid), ImageError> {
    if cfg.size == 0 || cfg.tile() == 0 || cfg.tile() != s2.max_split_size || cfg.size != s2.max_scale() {
        return Err(ImageError::Config(format!(
            "dynamic S2 tiles of {} px up to {} px do not match the model's S2 scales {:?} (max_split_size {})",
            cfg.tile(),
            cfg.size,
            s2.scales,
            s2.max_split_size
        )));
    }
    let (rgb, w, h) = decode_rgb8(path, cfg)?;
    Ok(preprocess_dynamic_s2(&rgb, w, h, cfg, s2))
}

/// The steps of [`load_image_dynamic_s2`] after decoding.
///
/// Panics if `rgb.len() != w * h * 3` or the image is empty.
pub fn preprocess_dynamic_s2(rgb: &[u8], w: usize, h: usize, cfg: &ImageConfig, s2: &S2Config) -> (Vec<f32>, TileGrid) {
    assert_eq!(rgb.len(), w * h * 3, "preprocess_dynamic_s2: buffer is not {w} x {h} x 3");
    let t = cfg.tile();
    let last = cfg.dynamic_grid(w as u32, h as u32);
    let grids = s2.dynamic_grids(last);
    let mut out = Vec::with_capacity(grids.iter().map(TileGrid::count).sum::<usize>() * 3 * t * t);
    let mut tile = vec![0u8; t * t * 3];
    for grid in grids {
        let ow = grid.cols * t;
        let resized = resize_bicubic_pil_with(rgb, w, h, 3, ow, grid.rows * t, cfg.pillow);
        for i in 0..grid.rows {
            for j in 0..grid.cols {
                for (y, dst) in tile.chunks_exact_mut(t * 3).enumerate() {
                    let from = ((i * t + y) * ow + j * t) * 3;
                    dst.copy_from_slice(&resized[from..from + t * 3]);
                }
                out.extend(normalize_chw(&tile, t));
            }
        }
    }
    (out, last)
}

/// uint8 HWC RGB -> `[3, size, size]` f32: `(f32(v * (1/255)) - 0.5) / 0.5`,
/// as transformers' `rescale` + `normalize` compute it. Rows in parallel,
/// written straight into the output's spare capacity (no zero fill of the
/// 7 MB it takes at 768).
fn normalize_chw(hwc: &[u8], size: usize) -> Vec<f32> {
    let plane = size * size;
    assert_eq!(hwc.len(), 3 * plane, "normalize_chw: buffer is not {size} x {size} x 3");
    let mut out = Vec::with_capacity(3 * plane);
    if plane == 0 {
        return out;
    }
    let (r, gb) = out.spare_capacity_mut()[..3 * plane].split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    hwc.par_chunks(3 * size)
        .zip(r.par_chunks_mut(size))
        .zip(g.par_chunks_mut(size))
        .zip(b.par_chunks_mut(size))
        .for_each(|(((p, r), g), b)| simd::normalize_rows(p, r, g, b));
    // SAFETY: the three planes are the first 3 * plane elements of the
    // spare capacity; their rows, zipped one for one with the `size` rows of
    // `hwc`, cover them all, and `normalize_rows` writes every element of
    // the rows it is given (a panic in there would never get here).
    unsafe { out.set_len(3 * plane) };
    out
}

/// How far normalized pixels `got` are from `want` (parity checks against
/// PIL): (max abs difference, mean abs difference, share of values off by at
/// least one 8-bit level, i.e. by more than half a level after the x/127.5
/// scaling).
pub fn compare_normalized(got: &[f32], want: &[f32]) -> (f32, f64, f64) {
    let mut max = 0f32;
    let mut sum = 0f64;
    let mut off = 0usize;
    for (g, w) in got.iter().zip(want) {
        let d = (g - w).abs();
        max = max.max(d);
        sum += d as f64;
        if d > 0.5 / 127.5 {
            off += 1;
        }
    }
    let n = got.len().min(want.len()).max(1) as f64;
    (max, sum / n, off as f64 / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::resize_bicubic_pil_with;
    use crate::data::image::test_util::{fixtures, manifest, manifest_pillow, pad, S};
    use tessera_job::image::{header_tiles, read_header, AspectMode, PillowOrder, PAD_BACKGROUND};

    fn read_f32(path: &Path) -> Vec<f32> {
        std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    #[test]
    fn matches_pil_and_siglip_processor() {
        let m = manifest();
        assert_eq!(m["size"].as_u64(), Some(S as u64));
        let pillow = manifest_pillow(&m);
        let one_level = 1.0 / 127.5 + 1e-6;
        let mut report = Vec::new();
        for case in m["cases"].as_array().unwrap() {
            let name = case["image"].as_str().unwrap();
            let mode = match case["mode"].as_str().unwrap() {
                "resize" => AspectMode::Resize,
                "pad" => AspectMode::Pad,
                other => panic!("mode {other}"),
            };
            let path = fixtures().join(name);
            let cfg = ImageConfig { mode, pillow, ..ImageConfig::new(S) };
            let dims = read_header(&path, &cfg).unwrap();
            assert_eq!(dims, (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32));
            let got = load_image(&path, &cfg).unwrap();
            let want = read_f32(&fixtures().join(case["expected"].as_str().unwrap()));
            assert_eq!(got.len(), want.len());
            let (max, mean, off) = compare_normalized(&got, &want);
            report.push(format!("{name} {mode:?}: max {max:.6} mean {mean:.6} off {:.2}%", off * 100.0));
            match case["format"].as_str().unwrap() {
                // Lossless formats: the decoded pixels are the same, and the
                // resampler and normalization are exact.
                "png" => assert_eq!(max, 0.0, "{name} {mode:?}: max abs error {max}"),
                "webp" if name.starts_with("lossless") => assert_eq!(max, 0.0, "{name} {mode:?}"),
                // zune-jpeg vs libjpeg-turbo decode a few pixel values
                // differently (IDCT, chroma upsampling and colour conversion
                // rounding); everything after decoding is exact. Measured
                // (resize / pad): max 4 / 3 levels, mean 0.43 / 0.28 level,
                // 36% / 24% of the values off by one level or more.
                "jpeg" => {
                    assert!(max <= 5.0 * one_level, "{name} {mode:?}: max {max}");
                    assert!(mean <= 0.75 * one_level as f64, "{name} {mode:?}: mean {mean}");
                }
                // image-webp vs libwebp (lossy VP8): measured bit-exact.
                "webp" => assert!(max <= one_level, "{name} {mode:?}: max {max}"),
                other => panic!("format {other}"),
            }
        }
        eprintln!("{}", report.join("\n"));
    }

    /// Dynamic S2 tiles against NVILA's `dynamic_s2_preprocess` + the SigLIP
    /// processor (PNG, so bit for bit), grid and tile order included; the
    /// header-only tile count agrees.
    #[test]
    fn dynamic_s2_tiles_match_nvila() {
        let m = manifest();
        let d = &m["dynamic_s2_tiles"];
        let scales: Vec<usize> = d["scales"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let tile = d["tile"].as_u64().unwrap() as usize;
        let s2 = S2Config { scales: scales.clone(), max_split_size: tile };
        let cfg = ImageConfig {
            mode: AspectMode::DynamicS2,
            max_tiles: d["max_tiles"].as_u64().unwrap() as usize,
            tile_size: tile,
            pillow: manifest_pillow(&m),
            ..ImageConfig::new(*scales.last().unwrap())
        };
        for case in d["cases"].as_array().unwrap() {
            let path = fixtures().join(case["image"].as_str().unwrap());
            let want_grid = TileGrid {
                rows: case["rows"].as_u64().unwrap() as usize,
                cols: case["cols"].as_u64().unwrap() as usize,
            };
            assert_ne!(want_grid.rows, want_grid.cols, "the fixtures are non-square grids");
            let (tiles, grid) = load_image_dynamic_s2(&path, &cfg, &s2).unwrap();
            assert_eq!(grid, want_grid, "{path:?}");
            let want = read_f32(&fixtures().join(case["expected"].as_str().unwrap()));
            assert_eq!(tiles.len(), case["tiles"].as_u64().unwrap() as usize * 3 * tile * tile);
            assert_eq!(tiles, want, "{path:?}: tiles differ from NVILA's");
            assert_eq!(header_tiles(&path, &cfg, &s2).unwrap(), case["tiles"].as_u64().unwrap() as usize);
        }
        // A config made for other scales is refused, not silently mis-tiled.
        let other = S2Config { scales: vec![10, 30], max_split_size: 10 };
        let err = load_image_dynamic_s2(&fixtures().join("rgb_37x23.png"), &cfg, &other).unwrap_err();
        assert!(matches!(err, ImageError::Config(_)), "{err}");
    }

    #[test]
    fn normalize_matches_the_formula() {
        // Sizes with and without a remainder after the kernel's blocks.
        for size in [1usize, 3, 16, 17, 40] {
            let hwc: Vec<u8> = (0..size * size * 3).map(|i| (i * 37 % 256) as u8).collect();
            let got = normalize_chw(&hwc, size);
            let plane = size * size;
            assert_eq!(got.len(), 3 * plane);
            for (i, px) in hwc.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    let want = ((px[c] as f64 * (1.0 / 255.0)) as f32 - 0.5) / 0.5;
                    assert_eq!(got[c * plane + i].to_bits(), want.to_bits(), "size {size} pixel {i} channel {c}");
                }
            }
        }
        assert_eq!(normalize_chw(&[], 0), Vec::<f32>::new());
    }

    #[test]
    fn pad_mode_on_extreme_shapes() {
        // 1 x 9 and 9 x 1: padding is most of the square; no panic, background
        // where no image pixel reaches.
        for (w, h) in [(1usize, 9usize), (9, 1), (3, 3)] {
            let rgb = vec![255u8; w * h * 3];
            let out = resize_rgb8(&rgb, w, h, &pad(12));
            assert_eq!(out.len(), 12 * 12 * 3);
            if w != h {
                assert_eq!(out[0], PAD_BACKGROUND, "{w}x{h}");
                assert_eq!(out[out.len() - 1], PAD_BACKGROUND, "{w}x{h}");
            } else {
                assert!(out.iter().all(|&v| v == 255));
            }
        }
        // The padded resample equals resizing the explicitly built square
        // (what expand2square + Image.resize do), down and up, wide and tall.
        for (w, h, size) in [(50usize, 7usize, 16usize), (7, 50, 16), (13, 40, 64), (40, 13, 9), (2, 3, 5)] {
            let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 97 + i / 7 * 31) % 256) as u8).collect();
            let side = w.max(h);
            let (left, top) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
            let mut square = vec![PAD_BACKGROUND; side * side * 3];
            for y in 0..h {
                let dst = ((top + y) * side + left) * 3;
                square[dst..dst + w * 3].copy_from_slice(&rgb[y * w * 3..(y + 1) * w * 3]);
            }
            for order in [PillowOrder::Pillow13, PillowOrder::Legacy] {
                let want = resize_bicubic_pil_with(&square, side, side, 3, size, size, order);
                let cfg = ImageConfig { pillow: order, ..pad(size) };
                assert_eq!(resize_rgb8(&rgb, w, h, &cfg), want, "{w}x{h} -> {size}");
            }
        }
        // A 1x1 image (0, 127, 255): three constant planes, normalized as
        // transformers does it.
        let norm = preprocess_rgb8(&[0, 127, 255], 1, 1, &ImageConfig::new(2));
        let mid = ((127.0f64 * (1.0 / 255.0)) as f32 - 0.5) / 0.5;
        assert_eq!(norm, [-1.0, -1.0, -1.0, -1.0, mid, mid, mid, mid, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn zero_size_is_a_config_error() {
        assert!(matches!(
            load_image(&fixtures().join("rgb_37x23.png"), &ImageConfig::new(0)),
            Err(ImageError::Config(_))
        ));
    }
}
