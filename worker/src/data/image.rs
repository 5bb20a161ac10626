//! Image decoding and preprocessing, exactly as VILA 1.5 prepares an image
//! for its S2 vision tower (docs/DESIGN.md, the model and S2).
//!
//! VILA opens the file with PIL, converts it to RGB, optionally pads it to a
//! square (`image_aspect_ratio = "pad"`), resizes it to the largest S2 scale
//! with PIL's bicubic filter and hands it to the SigLIP image processor, which
//! rescales by 1/255 and normalizes with mean = std = 0.5. This module does
//! the same steps:
//!
//! 1. Read the header only ([`tessera_job::image::read_header`]) and refuse an image with more
//!    than [`ImageConfig::max_pixels`] pixels before decoding anything (PIL's
//!    decompression-bomb limit by default). The S2 tile count, and so the
//!    sample's cost, is known at this point ([`tessera_job::image::tiles_for`], [`tessera_job::image::header_tiles`]).
//! 2. Decode JPEG, PNG or WebP (the format is sniffed from the content; the
//!    extension is only a fallback), with the decoder's own allocation limit
//!    set to [`ImageConfig::max_decode_bytes`]. A JPEG without its
//!    end-of-image marker or a WebP shorter than its RIFF header says is
//!    refused as truncated, as PIL refuses them (the `image` crate's decoders
//!    would fill in grey or decode what is there).
//! 3. Convert to RGB the way PIL's `.convert("RGB")` does: alpha is dropped,
//!    not composited; grayscale is replicated; a palette is expanded. 16-bit
//!    samples keep their high byte, as PIL does for 16-bit RGB(A) PNGs. (For a
//!    16-bit *grayscale* PNG PIL clips the 16-bit value to 255, which turns
//!    almost every pixel white; we keep the high byte there too, on purpose.)
//! 4. [`AspectMode::Pad`]: VILA's `expand2square`, the image pasted on a
//!    square of colour (127, 127, 127) at `(0, (w - h) / 2)` or
//!    `((h - w) / 2, 0)`. The square is never materialized: its rows are
//!    produced one at a time while resizing.
//! 5. Resize to `size x size` with [`resize_bicubic_pil`], a bit-exact port of
//!    Pillow's `ImagingResample` for 8-bit images (bicubic, a = -0.5,
//!    antialiased when downscaling, fixed-point, two passes each rounded to
//!    uint8). Pillow 13 changed the order of the passes for images whose
//!    height shrinks much more than their width; [`ImageConfig::pillow`]
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
//! outputs with PIL and transformers' SigLIP processor; the tests here compare
//! against them. PNG and lossless WebP match bit for bit. JPEG and lossy WebP
//! decoders differ slightly between libjpeg-turbo/libwebp (PIL) and the
//! `image` crate (zune-jpeg, image-webp); see the tests for the measured gap.
//!
//! EXIF orientation is ignored, as `PIL.Image.open` (and so VILA) ignores it.
//!
//! Dynamic S2 ([`AspectMode::DynamicS2`], NVILA's aspect-ratio-aware tile
//! grid at the largest scale) resizes the decoded image once per scale and
//! hands the model its tiles ([`load_image_dynamic_s2`]); the grid, and so
//! the tile count and the cost, also come from the header alone
//! ([`tessera_job::image::tiles_for`]).

use crate::engine::TileGrid;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use rayon::prelude::*;
use std::io::{BufRead, Cursor, Seek};
use std::ops::Range;
use std::path::Path;
use tessera_job::image::{
    check_file, check_pixels, io_error, one_line, resize_work_bytes, AspectMode, ImageConfig, ImageError, PillowOrder,
    PAD_BACKGROUND, SIGLIP_MEAN, SIGLIP_STD,
};
use tessera_job::model::S2Config;

/// Maps a decoder error; `dims` is the header size when known.
fn decode_error(path: &Path, dims: (u32, u32), e: image::ImageError) -> ImageError {
    let path = path.to_path_buf();
    match e {
        image::ImageError::IoError(e) => io_error(&path, &e),
        image::ImageError::Limits(l) => ImageError::TooLarge {
            path,
            width: dims.0,
            height: dims.1,
            reason: format!("decoder refused: {}", one_line(l)),
        },
        image::ImageError::Unsupported(u) => ImageError::Unsupported { path, reason: one_line(u) },
        other => ImageError::Corrupt { path, reason: one_line(other) },
    }
}

/// Opens a decoder: reads the header (and for PNG the chunks before the
/// image data) and checks the pixel limit. Nothing is decoded yet. The format
/// is sniffed from the content, with the extension as the fallback.
fn open_decoder<'a, R: BufRead + Seek + 'a>(
    mut reader: ImageReader<R>,
    path: &Path,
    cfg: &ImageConfig,
) -> Result<(impl ImageDecoder + 'a, (u32, u32), Option<ImageFormat>), ImageError> {
    if let Ok(f) = ImageFormat::from_path(path) {
        reader.set_format(f);
    }
    let reader = reader.with_guessed_format().map_err(|e| io_error(path, &e))?;
    let format = reader.format();
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_alloc = Some(cfg.max_decode_bytes);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| decode_error(path, (0, 0), e))?;
    let dims = decoder.dimensions();
    check_pixels(path, dims.0, dims.1, cfg.max_pixels)?;
    let work = resize_work_bytes(dims.0 as usize, dims.1 as usize, cfg);
    if work > cfg.max_decode_bytes {
        let (ow, oh) = cfg.resize_output(dims.0, dims.1);
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width: dims.0,
            height: dims.1,
            reason: format!(
                "resizing it to {ow} x {oh} ({:?}) needs about {work} bytes, over the limit of {} \
                 (max_decode_bytes); refused before decoding",
                cfg.mode, cfg.max_decode_bytes,
            ),
        });
    }
    Ok((decoder, dims, format))
}

/// Catches a panic inside a decoder (none is known; this keeps a malformed
/// file from taking down a loader thread if one ever appears).
fn no_panic<T>(path: &Path, f: impl FnOnce() -> Result<T, ImageError>) -> Result<T, ImageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(ImageError::Corrupt { path: path.to_path_buf(), reason: "the decoder panicked on this file".into() })
    })
}

/// Decodes an image file to RGB8 (HWC), with the header checks of
/// [`tessera_job::image::read_header`] first. Returns `(pixels, width, height)`.
pub fn decode_rgb8(path: &Path, cfg: &ImageConfig) -> Result<(Vec<u8>, usize, usize), ImageError> {
    no_panic(path, || {
        let len = check_file(path)?;
        if len > cfg.max_decode_bytes {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                width: 0,
                height: 0,
                reason: format!(
                    "the file is {len} bytes, over the limit of {} (max_decode_bytes)",
                    cfg.max_decode_bytes
                ),
            });
        }
        // The compressed file is small next to the decoded image: read it
        // whole, then decode from memory.
        let bytes = std::fs::read(path).map_err(|e| io_error(path, &e))?;
        let (decoder, (w, h), format) = open_decoder(ImageReader::new(Cursor::new(&bytes[..])), path, cfg)?;
        let need = decoder.total_bytes();
        if need > cfg.max_decode_bytes {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                width: w,
                height: h,
                reason: format!(
                    "decoding needs {need} bytes, over the limit of {} (max_decode_bytes)",
                    cfg.max_decode_bytes
                ),
            });
        }
        let complete = match format {
            Some(ImageFormat::Jpeg) => jpeg_is_complete(&bytes),
            Some(ImageFormat::WebP) => webp_is_complete(&bytes),
            _ => Ok(()),
        };
        complete.map_err(|reason| ImageError::Corrupt { path: path.to_path_buf(), reason })?;
        let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, (w, h), e))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        Ok((to_rgb8_pil(img), w, h))
    })
}

/// A WebP file must hold the whole RIFF chunk its header declares: libwebp
/// (and so PIL) refuses it otherwise, while image-webp decodes a file that
/// lacks its last bytes.
fn webp_is_complete(b: &[u8]) -> Result<(), String> {
    let Some(size) = b.get(4..8).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64) else {
        return Err("truncated WebP: no RIFF header".into());
    };
    if (b.len() as u64) < size + 8 {
        return Err(format!("truncated WebP: the RIFF header declares {} bytes, the file has {}", size + 8, b.len()));
    }
    Ok(())
}

/// Walks a JPEG's marker segments and entropy-coded data up to its
/// end-of-image marker. The `image` crate's JPEG decoder (zune-jpeg, not in
/// strict mode) fills a truncated image with grey and succeeds; PIL (and so
/// VILA) refuses it ("image file is truncated"), even when only the final
/// EOI marker is missing. This refuses the same files. Bytes after EOI are
/// ignored, as libjpeg ignores them.
fn jpeg_is_complete(b: &[u8]) -> Result<(), String> {
    let truncated = || Err("truncated JPEG: the file ends before its end-of-image marker".to_string());
    if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("no JPEG start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // Find the next marker (libjpeg skips stray bytes with a warning),
        // then skip fill bytes.
        match b[i.min(b.len())..].iter().position(|&v| v == 0xFF) {
            Some(off) => i += off,
            None => return truncated(),
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else { return truncated() };
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Standalone markers (and a stuffed zero outside a scan).
            0x00 | 0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(len) = b.get(i..i + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
            return truncated();
        };
        if len < 2 {
            return Err(format!("corrupt JPEG: segment length {len} at byte {i}"));
        }
        i += len;
        if i > b.len() {
            return truncated();
        }
        if marker == 0xDA {
            // Entropy-coded data: runs to the next marker that is not a
            // stuffed zero (FF 00) or a restart marker (FF D0..D7).
            loop {
                match b[i..].iter().position(|&v| v == 0xFF) {
                    Some(off) => i += off,
                    None => return truncated(),
                }
                match b.get(i + 1) {
                    None => return truncated(),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// RGB8 the way PIL's `convert("RGB")` makes it (see the module docs).
fn to_rgb8_pil(img: DynamicImage) -> Vec<u8> {
    fn map<T: Copy, const N: usize>(src: &[T], f: impl Fn(&[T]) -> [u8; 3]) -> Vec<u8> {
        let mut out = Vec::with_capacity(src.len() / N * 3);
        for p in src.chunks_exact(N) {
            out.extend_from_slice(&f(p));
        }
        out
    }
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => map::<u8, 4>(b.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(b) => map::<u8, 1>(b.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(b) => map::<u8, 2>(b.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageRgb16(b) => map::<u16, 3>(b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageRgba16(b) => map::<u16, 4>(b.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageLuma16(b) => map::<u16, 1>(b.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageLumaA16(b) => map::<u16, 2>(b.as_raw(), |p| [hi(p[0]); 3]),
        other => other.to_rgb8().into_raw(),
    }
}

/// Loads an image file as the vision tower's input: `[3, size, size]` f32,
/// CHW, normalized, following every step in the module docs. Never panics.
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

/// Pad (mode `pad`) and resize to `cfg.size` square, uint8 HWC: the image
/// PIL hands to the SigLIP processor. Mode `dynamic_s2` resizes as
/// `resize` does (the square static S2 would use).
///
/// Panics if `rgb.len() != w * h * 3` or the image is empty.
pub fn resize_rgb8(rgb: &[u8], w: usize, h: usize, cfg: &ImageConfig) -> Vec<u8> {
    assert_eq!(rgb.len(), w * h * 3, "resize_rgb8: buffer is not {w} x {h} x 3");
    let size = cfg.size;
    if cfg.mode != AspectMode::Pad || w == h {
        return resize_bicubic_pil_with(rgb, w, h, 3, size, size, cfg.pillow);
    }
    // expand2square, without building the square.
    let side = w.max(h);
    let (left, top) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    let source =
        Source { data: rgb, w, h, channels: 3, canvas_w: side, canvas_h: side, left, top, fill: PAD_BACKGROUND };
    resample(&source, size, size, cfg.pillow)
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

// ---------------------------------------------------------------------------
// Pillow's resampler (src/libImaging/Resample.c), 8 bits per channel.

/// Fixed-point bits of the coefficients: 32 - 8 (result) - 2 (headroom).
const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

/// PIL's bicubic kernel, a = -0.5, written as Pillow evaluates it.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One axis of the resample: for each output index the first input index
/// and the tap count, and `ksize` fixed-point coefficients.
///
/// The same taps also come as fixed-width windows for the fast kernels:
/// output `i` reads exactly `width` inputs from `start[i]` with the
/// coefficients `window[i * width..][..width]`, which are Pillow's taps
/// shifted into the window and zero elsewhere (`width` is the largest tap
/// count, so `start[i] + width <= in_size`). A zero coefficient adds an exact
/// zero to the integer sum: the result is Pillow's bit for bit.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
    width: usize,
    start: Vec<usize>,
    window: Vec<i32>,
}

impl Coeffs {
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (min, n) = self.bounds[i];
        (min, &self.k[i * self.ksize..i * self.ksize + n])
    }
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc`, for the box (0, in_size).
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    // Pillow's box corners are C floats: `(double)(in1 - in0) / outSize`.
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero; a negative start clamps to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut ww = 0.0;
        for (x, wx) in w[..n].iter_mut().enumerate() {
            *wx = bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        for (kx, &wx) in k[xx * ksize..xx * ksize + n].iter_mut().zip(&w[..n]) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            *kx = if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 };
        }
        bounds.push((xmin, n));
    }
    // Fixed-width windows (see `Coeffs`).
    let width = bounds.iter().map(|b| b.1).max().unwrap_or(0);
    let mut start = Vec::with_capacity(out_size);
    let mut window = vec![0i32; out_size * width];
    for (xx, &(xmin, n)) in bounds.iter().enumerate() {
        let s = xmin.min(in_size - width);
        let at = xx * width + (xmin - s);
        window[at..at + n].copy_from_slice(&k[xx * ksize..xx * ksize + n]);
        start.push(s);
    }
    Coeffs { ksize, bounds, k, width, start, window }
}

/// Pillow's `clip8`: drop the fraction (the sums start at one half, so this
/// rounds) and clamp to 0..=255.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass of one row, for the output columns `cols` (`out` holds
/// just those). `src` starts at the row and may go on past it.
fn horizontal_row<const C: usize>(src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8]) {
    for (xx, px) in cols.zip(out.chunks_exact_mut(C)) {
        let (xmin, k) = co.taps(xx);
        let mut ss = [HALF; C];
        for (s, &kv) in src[xmin * C..].chunks_exact(C).zip(k) {
            for c in 0..C {
                ss[c] += s[c] as i32 * kv;
            }
        }
        for c in 0..C {
            px[c] = clip8(ss[c]);
        }
    }
}

fn horizontal_row_dyn(src: &[u8], channels: usize, co: &Coeffs, cols: Range<usize>, out: &mut [u8]) {
    match channels {
        1 => horizontal_row::<1>(src, co, cols, out),
        2 => horizontal_row::<2>(src, co, cols, out),
        3 => simd::horizontal_rgb(src, co, cols, out),
        4 => horizontal_row::<4>(src, co, cols, out),
        _ => {
            for (xx, px) in cols.zip(out.chunks_exact_mut(channels)) {
                let (xmin, k) = co.taps(xx);
                for (c, p) in px.iter_mut().enumerate() {
                    let ss =
                        k.iter().enumerate().fold(HALF, |ss, (x, &kv)| ss + src[(xmin + x) * channels + c] as i32 * kv);
                    *p = clip8(ss);
                }
            }
        }
    }
}

/// What a resample reads: a `w x h` image of `channels` interleaved 8-bit
/// channels, placed at (`left`, `top`) on a `canvas_w x canvas_h` canvas of
/// colour `fill` (the whole canvas when there is no padding).
struct Source<'a> {
    data: &'a [u8],
    w: usize,
    h: usize,
    channels: usize,
    canvas_w: usize,
    canvas_h: usize,
    left: usize,
    top: usize,
    fill: u8,
}

/// Pillow's `ImagingResampleInner` with its 8-bit passes, on a [`Source`]
/// whose canvas is never built when the horizontal pass comes first (always
/// the case for `expand2square`'s square): a row or output pixel that reads
/// only the fill colour is computed once and copied (it is the same sum).
fn resample(src: &Source, out_w: usize, out_h: usize, order: PillowOrder) -> Vec<u8> {
    let (c, cw, ch) = (src.channels, src.canvas_w, src.canvas_h);
    if out_w == 0 || out_h == 0 || c == 0 {
        return Vec::new();
    }
    assert!(cw > 0 && ch > 0, "resample: empty source image ({cw} x {ch})");
    debug_assert!(src.left + src.w <= cw && src.top + src.h <= ch && src.data.len() == src.w * src.h * c);
    if !order.horizontal_first(cw, ch, out_w, out_h) {
        return resample_vertical_first(src, out_w, out_h);
    }
    let vert = precompute_coeffs(ch, out_h);
    // Canvas rows the vertical pass reads.
    let first = vert.bounds[0].0;
    let last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
    let stride = out_w * c;
    let horiz = (out_w != cw).then(|| precompute_coeffs(cw, out_w));
    // The horizontal pass of a row of fill.
    let fill_row = vec![src.fill; cw * c];
    let mut blank = vec![src.fill; stride];
    if let Some(horiz) = &horiz {
        horizontal_row_dyn(&fill_row, c, horiz, 0..out_w, &mut blank);
    }
    let full = src.left == 0 && src.w == cw;
    let mut tmp = vec![0u8; (last - first) * stride];
    tmp.par_chunks_mut(stride).enumerate().for_each_init(
        || if full { Vec::new() } else { fill_row.clone() },
        |buf, (i, out)| {
            let y = first + i;
            if y < src.top || y >= src.top + src.h {
                out.copy_from_slice(&blank);
                return;
            }
            // The image row, and (for the fast kernels' 4-byte reads) the
            // rest of the image after it.
            let r = &src.data[(y - src.top) * src.w * c..];
            // The canvas row: the image row itself, or the fill with the
            // image row pasted in (only that part of `buf` ever changes).
            let row: &[u8] = if full {
                r
            } else {
                buf[src.left * c..(src.left + src.w) * c].copy_from_slice(&r[..src.w * c]);
                buf
            };
            match &horiz {
                None => out.copy_from_slice(&row[..stride]),
                Some(horiz) if full => horizontal_row_dyn(row, c, horiz, 0..out_w, out),
                Some(horiz) => {
                    // Output pixels whose taps all fall on the fill are the
                    // blank row's; compute the others.
                    let lo = (0..out_w).find(|&x| horiz.bounds[x].0 + horiz.bounds[x].1 > src.left).unwrap_or(out_w);
                    let hi = (lo..out_w).find(|&x| horiz.bounds[x].0 >= src.left + src.w).unwrap_or(out_w);
                    out[..lo * c].copy_from_slice(&blank[..lo * c]);
                    out[hi * c..].copy_from_slice(&blank[hi * c..]);
                    horizontal_row_dyn(row, c, horiz, lo..hi, &mut out[lo * c..hi * c]);
                }
            }
        },
    );
    if out_h == ch {
        // Pillow skips the vertical pass; `first..last` is then every row.
        debug_assert_eq!((first, last), (0, ch));
        return tmp;
    }
    vertical_pass(&tmp, stride, first, &vert, out_h)
}

/// Pillow 13's other order: the vertical pass on the source, then the
/// horizontal pass on its `out_h` rows.
fn resample_vertical_first(src: &Source, out_w: usize, out_h: usize) -> Vec<u8> {
    let (c, cw, ch) = (src.channels, src.canvas_w, src.canvas_h);
    let canvas: std::borrow::Cow<[u8]> = if src.left == 0 && src.top == 0 && src.w == cw && src.h == ch {
        src.data.into()
    } else {
        // Not reached by expand2square (its square is always resized
        // horizontal pass first); build the canvas to stay general.
        let mut canvas = vec![src.fill; cw * ch * c];
        for y in 0..src.h {
            let at = ((src.top + y) * cw + src.left) * c;
            canvas[at..at + src.w * c].copy_from_slice(&src.data[y * src.w * c..(y + 1) * src.w * c]);
        }
        canvas.into()
    };
    let vert = precompute_coeffs(ch, out_h);
    let tmp = vertical_pass(&canvas, cw * c, 0, &vert, out_h);
    if out_w == cw {
        return tmp;
    }
    let horiz = precompute_coeffs(cw, out_w);
    let mut out = vec![0u8; out_h * out_w * c];
    out.par_chunks_mut(out_w * c)
        .enumerate()
        .for_each(|(y, o)| horizontal_row_dyn(&tmp[y * cw * c..], c, &horiz, 0..out_w, o));
    out
}

/// Pillow's vertical pass: output row `yy` sums rows `taps(yy)` of `src`
/// (rows of `stride` bytes, the first being source row `first`).
fn vertical_pass(src: &[u8], stride: usize, first: usize, vert: &Coeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_h * stride];
    out.par_chunks_mut(stride).enumerate().for_each(|(yy, out_row)| {
        let (ymin, k) = vert.taps(yy);
        simd::vertical_row(&src[(ymin - first) * stride..(ymin - first + k.len()) * stride], k, out_row);
    });
    out
}

/// The hot loops of the preprocessing, compiled twice on x86-64: for the
/// baseline and with AVX2 (picked at run time, once per row). The vertical
/// pass and the normalization are plain loops the compiler vectorizes; the
/// RGB horizontal pass uses SSE4.1 intrinsics (a 3-channel pixel does not
/// vectorize on its own). Every kernel computes exactly what the scalar code
/// computes: the same integer sums as Pillow (integer addition is
/// associative, so the order of the terms does not matter), the same f32
/// normalization.
mod simd {
    use super::{clip8, horizontal_row, Coeffs, HALF, SIGLIP_MEAN, SIGLIP_STD};
    use std::mem::MaybeUninit;
    use std::ops::Range;

    /// `pub(super) fn $name`: runs `$avx2` where the CPU has AVX2, else
    /// `$portable`.
    macro_rules! dispatch {
        ($name:ident, $avx2:ident, $portable:path, ($($arg:ident: $ty:ty),*)) => {
            pub(super) fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above),
                    // the only requirement of this `target_feature` function.
                    return unsafe { $avx2($($arg),*) };
                }
                $portable($($arg),*)
            }
        };
    }

    /// One output plane's rows, written by the normalization.
    type Plane<'a> = &'a mut [MaybeUninit<f32>];

    dispatch!(
        horizontal_rgb,
        horizontal_rgb_avx2,
        horizontal_row::<3>,
        (src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8])
    );
    dispatch!(vertical_row, vertical_row_avx2, vertical_row_kernel, (rows: &[u8], k: &[i32], out: &mut [u8]));
    dispatch!(normalize_rows, normalize_rows_avx2, normalize_rows_kernel, (hwc: &[u8], r: Plane, g: Plane, b: Plane));

    /// [`horizontal_row`] for 3 channels (`src` starts at the row and may
    /// go on past it), with the fixed-width windows (a kernel per window
    /// width up to 8, taps unrolled).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn horizontal_rgb_avx2(src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8]) {
        match co.width {
            1 => horizontal_rgb_w::<1>(src, co, cols, out),
            2 => horizontal_rgb_w::<2>(src, co, cols, out),
            3 => horizontal_rgb_w::<3>(src, co, cols, out),
            4 => horizontal_rgb_w::<4>(src, co, cols, out),
            5 => horizontal_rgb_w::<5>(src, co, cols, out),
            6 => horizontal_rgb_w::<6>(src, co, cols, out),
            7 => horizontal_rgb_w::<7>(src, co, cols, out),
            8 => horizontal_rgb_w::<8>(src, co, cols, out),
            _ => horizontal_rgb_w::<0>(src, co, cols, out),
        }
    }

    /// One output pixel per step: per tap, the pixel's 3 bytes and the byte
    /// after them widened to 4 i32 lanes (the 4th lane is ignored), times
    /// the tap's coefficient. `W` is the window width (0: `co.width`, not
    /// unrolled). A pixel whose window ends at the end of `src` (no byte
    /// after it) takes the scalar path. The result goes out as 4 bytes, the
    /// 4th overwritten by the next pixel, except for the last pixel of `out`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    fn horizontal_rgb_w<const W: usize>(src: &[u8], co: &Coeffs, cols: Range<usize>, out: &mut [u8]) {
        use std::arch::x86_64::*;
        let width = if W == 0 { co.width } else { W };
        debug_assert_eq!(width, co.width);
        debug_assert_eq!(out.len(), cols.len() * 3);
        for (i, xx) in cols.enumerate() {
            let base = co.start[xx] * 3;
            let o = 3 * i;
            if base + width * 3 >= src.len() {
                horizontal_row::<3>(src, co, xx..xx + 1, &mut out[o..o + 3]);
                continue;
            }
            let s = &src[base..base + width * 3 + 1];
            let k = &co.window[xx * width..(xx + 1) * width];
            let mut ss = _mm_set1_epi32(HALF);
            for j in 0..width {
                let p = i32::from_le_bytes(s[3 * j..3 * j + 4].try_into().expect("4 bytes"));
                let v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(p));
                ss = _mm_add_epi32(ss, _mm_mullo_epi32(v, _mm_set1_epi32(k[j])));
            }
            // clip8 on each lane: the shift, then i32 -> i16 -> u8 with
            // saturation, which clamps to 0..=255.
            let v = _mm_srai_epi32::<{ super::PRECISION_BITS as i32 }>(ss);
            let v = _mm_packs_epi32(v, v);
            let v = _mm_packus_epi16(v, v);
            let b = _mm_cvtsi128_si32(v).to_le_bytes();
            if o + 4 <= out.len() {
                out[o..o + 4].copy_from_slice(&b);
            } else {
                out[o..o + 3].copy_from_slice(&b[..3]);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn vertical_row_avx2(rows: &[u8], k: &[i32], out: &mut [u8]) {
        vertical_row_kernel(rows, k, out)
    }

    /// Vertical pass of one output row: `rows` holds the `k.len()` input
    /// rows it sums, each `out.len()` bytes. Blocks of `B` columns keep their
    /// sums in registers across the taps.
    #[inline(always)]
    fn vertical_row_kernel(rows: &[u8], k: &[i32], out: &mut [u8]) {
        const B: usize = 32;
        let stride = out.len();
        debug_assert_eq!(rows.len(), k.len() * stride);
        let mut x = 0;
        let mut blocks = out.chunks_exact_mut(B);
        for o in &mut blocks {
            let mut ss = [HALF; B];
            for (j, &kv) in k.iter().enumerate() {
                let r: &[u8; B] = rows[j * stride + x..j * stride + x + B].try_into().expect("a block of B bytes");
                for l in 0..B {
                    ss[l] += r[l] as i32 * kv;
                }
            }
            for l in 0..B {
                o[l] = clip8(ss[l]);
            }
            x += B;
        }
        let rest = blocks.into_remainder();
        let mut ss = [HALF; B];
        for (j, &kv) in k.iter().enumerate() {
            for (s, &v) in ss.iter_mut().zip(&rows[j * stride + x..(j + 1) * stride]) {
                *s += v as i32 * kv;
            }
        }
        for (o, &s) in rest.iter_mut().zip(&ss) {
            *o = clip8(s);
        }
    }

    /// transformers' rescale + normalize of one value: `f32(v * (1/255))`
    /// (the product in f64), then `(x - mean) / std` in f32.
    #[inline(always)]
    pub(super) fn normalize_value(v: u8) -> f32 {
        ((v as f64 * (1.0 / 255.0)) as f32 - SIGLIP_MEAN) / SIGLIP_STD
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn normalize_rows_avx2(hwc: &[u8], r: Plane, g: Plane, b: Plane) {
        normalize_rows_kernel(hwc, r, g, b)
    }

    /// HWC uint8 -> three planes of [`normalize_value`]s; writes every
    /// element of `r`, `g` and `b` (each `hwc.len() / 3` long).
    #[inline(always)]
    fn normalize_rows_kernel(hwc: &[u8], r: Plane, g: Plane, b: Plane) {
        const B: usize = 16;
        assert!(hwc.len() == 3 * r.len() && r.len() == g.len() && g.len() == b.len());
        let blocks =
            hwc.chunks_exact(3 * B).zip(r.chunks_exact_mut(B)).zip(g.chunks_exact_mut(B)).zip(b.chunks_exact_mut(B));
        for (((p, r), g), b) in blocks {
            for i in 0..B {
                r[i].write(normalize_value(p[3 * i]));
                g[i].write(normalize_value(p[3 * i + 1]));
                b[i].write(normalize_value(p[3 * i + 2]));
            }
        }
        let done = r.len() / B * B;
        for (((p, r), g), b) in
            hwc[3 * done..].chunks_exact(3).zip(&mut r[done..]).zip(&mut g[done..]).zip(&mut b[done..])
        {
            r.write(normalize_value(p[0]));
            g.write(normalize_value(p[1]));
            b.write(normalize_value(p[2]));
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The portable kernels (what a CPU without AVX2 runs) give what the
        /// dispatched ones give.
        #[test]
        fn portable_kernels_match() {
            let bytes: Vec<u8> = (0..5 * 77).map(|i| (i * 97 % 256) as u8).collect();
            let k = [-3_000_000, 1_500_000, 4_000_000, 2_000_000, -400_000];
            let (mut a, mut b) = (vec![0u8; 77], vec![0u8; 77]);
            vertical_row(&bytes, &k, &mut a);
            vertical_row_kernel(&bytes, &k, &mut b);
            assert_eq!(a, b);
            let hwc = &bytes[..3 * 37];
            let planes = |f: fn(&[u8], Plane, Plane, Plane)| {
                let mut v = vec![MaybeUninit::new(f32::NAN); 3 * 37];
                let (r, gb) = v.split_at_mut(37);
                let (g, b) = gb.split_at_mut(37);
                f(hwc, r, g, b);
                // SAFETY: every element was initialized (to NaN) above.
                v.iter().map(|x| unsafe { x.assume_init() }.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(planes(normalize_rows), planes(normalize_rows_kernel));
            // Up (window 4), down (windows 5 and 13) and the general kernel
            // (window 61), on a row that ends where the image ends.
            for (w, ow) in [(25, 40), (25, 17), (25, 6), (120, 4)] {
                let co = super::super::precompute_coeffs(w, ow);
                let row = &bytes[..3 * w];
                let (mut a, mut b) = (vec![0u8; 3 * ow], vec![0u8; 3 * ow]);
                horizontal_rgb(row, &co, 0..ow, &mut a);
                horizontal_row::<3>(row, &co, 0..ow, &mut b);
                assert_eq!(a, b, "{w} -> {ow}");
            }
        }
    }
}

/// Pillow's `Image.resize((out_w, out_h), Image.BICUBIC)` on an 8-bit image
/// of `channels` interleaved channels (HWC), bit for bit, as Pillow >= 13
/// does it (see [`PillowOrder`]; [`resize_bicubic_pil_with`] picks the
/// order). Pillow's coefficients (support 2, scaled by the downscale factor:
/// antialiasing) are rounded to 22-bit fixed point; one pass (horizontal,
/// except when Pillow 13 puts the vertical first) writes a uint8 image, the
/// other reads it, each rounding and clamping to uint8. A pass whose size
/// does not change is skipped, as in Pillow. Rows run in parallel (rayon).
///
/// Note that Pillow resizes RGBA/LA in premultiplied alpha; this function
/// does not (VILA converts to RGB first).
///
/// Panics if `src.len() != w * h * channels`, or if the source is empty and
/// the output is not.
pub fn resize_bicubic_pil(src: &[u8], w: usize, h: usize, channels: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resize_bicubic_pil_with(src, w, h, channels, out_w, out_h, PillowOrder::default())
}

/// [`resize_bicubic_pil`] with the pass order of a given Pillow version.
pub fn resize_bicubic_pil_with(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    order: PillowOrder,
) -> Vec<u8> {
    assert_eq!(src.len(), w * h * channels, "resize_bicubic_pil: buffer is not {w} x {h} x {channels}");
    let source = Source { data: src, w, h, channels, canvas_w: w, canvas_h: h, left: 0, top: 0, fill: 0 };
    resample(&source, out_w, out_h, order)
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
    use serde_json::Value;
    use tessera_job::image::{dynamic_s2_grid, header_tiles, read_header, tiles_for};

    const S: usize = 40;

    fn fixtures() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
    }

    fn manifest() -> Value {
        let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn read_f32(path: &Path) -> Vec<f32> {
        std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// The pass order of the Pillow that made the fixtures.
    fn manifest_pillow(m: &Value) -> PillowOrder {
        let major: u32 = m["pillow"].as_str().unwrap().split('.').next().unwrap().parse().unwrap();
        if major >= 13 {
            PillowOrder::Pillow13
        } else {
            PillowOrder::Legacy
        }
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
    fn resampler_matches_pil_bit_for_bit() {
        let m = manifest();
        let installed = manifest_pillow(&m);
        for case in m["resample"].as_array().unwrap() {
            let img = image::open(fixtures().join(case["input"].as_str().unwrap())).unwrap();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let channels = case["channels"].as_u64().unwrap() as usize;
            let src = if channels == 1 { img.to_luma8().into_raw() } else { img.to_rgb8().into_raw() };
            let (ow, oh) =
                (case["out_width"].as_u64().unwrap() as usize, case["out_height"].as_u64().unwrap() as usize);
            let h_first = std::fs::read(fixtures().join(case["horizontal_first"].as_str().unwrap())).unwrap();
            let v_first = std::fs::read(fixtures().join(case["vertical_first"].as_str().unwrap())).unwrap();
            // The installed Pillow's own resize is one of the two (checked by
            // the script); our rule must pick the same one.
            let rule = installed.horizontal_first(w, h, ow, oh);
            assert_eq!(rule, case["installed_pillow_horizontal_first"].as_bool().unwrap(), "{w}x{h} -> {ow}x{oh}");
            let p13 = PillowOrder::Pillow13.horizontal_first(w, h, ow, oh);
            for (order, want) in
                [(PillowOrder::Legacy, &h_first), (PillowOrder::Pillow13, if p13 { &h_first } else { &v_first })]
            {
                let got = resize_bicubic_pil_with(&src, w, h, channels, ow, oh, order);
                assert_eq!(got.len(), want.len());
                let diff = got.iter().zip(want.iter()).filter(|(a, b)| a != b).count();
                assert_eq!(diff, 0, "{w}x{h}x{channels} -> {ow}x{oh} {order:?}: {diff} bytes differ");
            }
            assert_eq!(resize_bicubic_pil(&src, w, h, channels, ow, oh), if p13 { h_first } else { v_first });
        }
    }

    #[test]
    fn resampler_edge_sizes() {
        // Same size: a copy, as in Pillow.
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_bicubic_pil(&src, 5, 4, 3, 5, 4), src);
        // A constant image stays constant, up and down.
        let flat = vec![200u8; 9 * 7 * 3];
        assert!(resize_bicubic_pil(&flat, 9, 7, 3, 31, 2).iter().all(|&v| v == 200));
        // 1x1 up, and down to 1x1.
        assert_eq!(resize_bicubic_pil(&[10, 20, 30], 1, 1, 3, 3, 2), [10, 20, 30].repeat(6));
        assert_eq!(resize_bicubic_pil(&flat, 9, 7, 3, 1, 1), vec![200; 3]);
        assert!(resize_bicubic_pil(&flat, 9, 7, 3, 0, 5).is_empty());
        // Five channels take the generic path.
        let five: Vec<u8> = (0..6 * 5 * 5).map(|i| (i * 13 % 256) as u8).collect();
        let got = resize_bicubic_pil(&five, 6, 5, 5, 4, 3);
        for c in 0..5 {
            let plane: Vec<u8> = five.iter().skip(c).step_by(5).copied().collect();
            let want = resize_bicubic_pil(&plane, 6, 5, 1, 4, 3);
            let got_c: Vec<u8> = got.iter().skip(c).step_by(5).copied().collect();
            assert_eq!(got_c, want);
        }
    }

    /// Pillow's two passes written out plainly from the coefficients
    /// (`Coeffs::taps`), pixel by pixel: the reference for the fast kernels
    /// (fixed-width windows, SIMD, row blocks, the padded canvas).
    fn reference_resize(src: &[u8], w: usize, h: usize, c: usize, ow: usize, oh: usize, h_first: bool) -> Vec<u8> {
        let hpass = |img: &[u8], iw: usize, ih: usize| -> Vec<u8> {
            if iw == ow {
                return img.to_vec();
            }
            let co = precompute_coeffs(iw, ow);
            let mut out = vec![0u8; ih * ow * c];
            for y in 0..ih {
                for x in 0..ow {
                    let (xmin, k) = co.taps(x);
                    for ch in 0..c {
                        let ss: i32 =
                            k.iter().enumerate().map(|(j, &kv)| img[(y * iw + xmin + j) * c + ch] as i32 * kv).sum();
                        out[(y * ow + x) * c + ch] = clip8(HALF + ss);
                    }
                }
            }
            out
        };
        let vpass = |img: &[u8], iw: usize, ih: usize| -> Vec<u8> {
            if ih == oh {
                return img.to_vec();
            }
            let co = precompute_coeffs(ih, oh);
            let mut out = vec![0u8; oh * iw * c];
            for y in 0..oh {
                let (ymin, k) = co.taps(y);
                for i in 0..iw * c {
                    let ss: i32 = k.iter().enumerate().map(|(j, &kv)| img[(ymin + j) * iw * c + i] as i32 * kv).sum();
                    out[y * iw * c + i] = clip8(HALF + ss);
                }
            }
            out
        };
        if h_first {
            vpass(&hpass(src, w, h), ow, h)
        } else {
            hpass(&vpass(src, w, h), w, oh)
        }
    }

    #[test]
    fn fast_resampler_matches_the_plain_one() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        // Shapes that give every window width from 1 to past 8 (the
        // unrolled kernels, then the general one), up and down, and rows
        // that are not a multiple of the vertical kernel's block.
        let mut shapes = vec![(640, 480, 96, 96), (33, 17, 300, 5), (7, 300, 7, 11), (1, 1, 4, 4), (200, 3, 9, 40)];
        for _ in 0..40 {
            shapes.push((1 + next(220), 1 + next(220), 1 + next(120), 1 + next(120)));
        }
        for (i, &(w, h, ow, oh)) in shapes.iter().enumerate() {
            for c in [3, 1, 4] {
                let src: Vec<u8> = (0..w * h * c).map(|_| next(256) as u8).collect();
                for order in [PillowOrder::Pillow13, PillowOrder::Legacy] {
                    let want = reference_resize(&src, w, h, c, ow, oh, order.horizontal_first(w, h, ow, oh));
                    let got = resize_bicubic_pil_with(&src, w, h, c, ow, oh, order);
                    assert!(got == want, "case {i}: {w}x{h}x{c} -> {ow}x{oh} {order:?}");
                }
            }
            // Mode pad on the same image: the explicit square, resized.
            let rgb: Vec<u8> = (0..w * h * 3).map(|_| next(256) as u8).collect();
            let side = w.max(h);
            let (left, top) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
            let mut square = vec![PAD_BACKGROUND; side * side * 3];
            for y in 0..h {
                let at = ((top + y) * side + left) * 3;
                square[at..at + w * 3].copy_from_slice(&rgb[y * w * 3..(y + 1) * w * 3]);
            }
            let size = ow;
            let want = reference_resize(&square, side, side, 3, size, size, true);
            assert!(resize_rgb8(&rgb, w, h, &pad(size)) == want, "case {i}: pad {w}x{h} -> {size}");
        }
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

    fn pad(size: usize) -> ImageConfig {
        ImageConfig { mode: AspectMode::Pad, ..ImageConfig::new(size) }
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

    // --- bad input ---------------------------------------------------------

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

    /// A PNG whose IHDR declares `w x h` RGB8, with one tiny IDAT (a zlib
    /// stream of one zero byte) and IEND: a valid header, hopeless data.
    fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
        png_chunk(&mut out, b"IHDR", &ihdr);
        png_chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
        png_chunk(&mut out, b"IEND", &[]);
        out
    }

    fn expect_err(path: &Path, cfg: &ImageConfig) -> ImageError {
        let err = match load_image(path, cfg) {
            Ok(v) => panic!("{}: loaded ({} values), expected an error", path.display(), v.len()),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        err
    }

    #[test]
    fn crc32_is_the_png_one() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.jpg");
        let cfg = ImageConfig::new(S);
        assert!(matches!(expect_err(&path, &cfg), ImageError::Missing { .. }));
        assert!(matches!(read_header(&path, &cfg), Err(ImageError::Missing { .. })));
        assert!(expect_err(&path, &cfg).to_string().contains("not found"));
        // A directory is not an image either.
        assert!(matches!(load_image(dir.path(), &cfg), Err(ImageError::Io { .. })));
    }

    #[test]
    fn zero_byte_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        std::fs::write(&path, b"").unwrap();
        let err = expect_err(&path, &ImageConfig::new(S));
        assert!(matches!(err, ImageError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("0 bytes"));
    }

    #[test]
    fn truncated_files_are_refused_as_pil_refuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ImageConfig::new(S);
        // PIL refuses every cut below ("image file is truncated", "could not
        // create decoder object", "cannot identify image file"), except a PNG
        // that lacks only the tail of its IEND chunk, which both load.
        for name in ["q90_50x33.jpg", "rgb_37x23.png", "lossless_20x28.webp", "lossy_20x28.webp"] {
            let bytes = std::fs::read(fixtures().join(name)).unwrap();
            for cut in [bytes.len() / 2, bytes.len() - 3, bytes.len() - 1, 20, 3] {
                let path = dir.path().join(format!("cut{cut}_{name}"));
                std::fs::write(&path, &bytes[..cut]).unwrap();
                if name.ends_with(".png") && cut >= bytes.len() - 3 {
                    assert_eq!(load_image(&path, &cfg).unwrap(), load_image(&fixtures().join(name), &cfg).unwrap());
                    continue;
                }
                let err = expect_err(&path, &cfg);
                assert!(
                    matches!(err, ImageError::Corrupt { .. } | ImageError::Unsupported { .. }),
                    "{name} cut at {cut}: {err}"
                );
            }
        }
        // Half a JPEG: the header is intact, the decode is refused.
        let bytes = std::fs::read(fixtures().join("q90_50x33.jpg")).unwrap();
        let path = dir.path().join("half.jpg");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(read_header(&path, &cfg).unwrap(), (50, 33));
        let err = expect_err(&path, &cfg);
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        // Bytes after EOI are ignored, as libjpeg ignores them.
        let mut padded = bytes.clone();
        padded.extend_from_slice(b"trailing junk \xFF\xD8");
        let path = dir.path().join("trailing.jpg");
        std::fs::write(&path, &padded).unwrap();
        assert_eq!(load_image(&path, &cfg).unwrap(), load_image(&fixtures().join("q90_50x33.jpg"), &cfg).unwrap());
    }

    #[test]
    fn corrupt_bytes_named_jpg() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ImageConfig::new(S);
        let path = dir.path().join("garbage.jpg");
        let garbage: Vec<u8> = (0..4000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = expect_err(&path, &cfg);
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        // A JPEG marker followed by garbage.
        let mut fake = vec![0xFF, 0xD8, 0xFF, 0xE0];
        fake.extend_from_slice(&garbage);
        std::fs::write(&path, &fake).unwrap();
        assert!(matches!(expect_err(&path, &cfg), ImageError::Corrupt { .. }));
        // Text with an unknown extension: no format to try.
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, b"not an image").unwrap();
        assert!(matches!(expect_err(&txt, &cfg), ImageError::Unsupported { .. }));
    }

    #[test]
    fn format_comes_from_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("really_a_jpeg.png");
        std::fs::copy(fixtures().join("q90_50x33.jpg"), &path).unwrap();
        let cfg = ImageConfig::new(S);
        assert_eq!(load_image(&path, &cfg).unwrap(), load_image(&fixtures().join("q90_50x33.jpg"), &cfg).unwrap());
    }

    #[test]
    fn huge_header_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.png");
        std::fs::write(&path, png_declaring(100_000, 100_000)).unwrap();
        let cfg = ImageConfig::new(S);
        let err = read_header(&path, &cfg).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::TooLarge { width: 100_000, height: 100_000, .. }), "{msg}");
        assert!(msg.contains("bomb.png") && msg.contains("10000000000") && msg.contains("178956970"), "{msg}");
        assert!(matches!(expect_err(&path, &cfg), ImageError::TooLarge { .. }));
        // The limit is configurable: a lower one refuses a real image...
        let small = ImageConfig { max_pixels: 1000, ..ImageConfig::new(S) };
        let err = read_header(&fixtures().join("q90_50x33.jpg"), &small).unwrap_err();
        assert!(err.to_string().contains("1650 pixels is over the limit of 1000"), "{err}");
        // ...and a higher one lets the bomb through the header check, but the
        // decoder's allocation limit still refuses it before allocating.
        let lax = ImageConfig { max_pixels: u64::MAX, ..ImageConfig::new(S) };
        assert_eq!(read_header(&path, &lax).unwrap(), (100_000, 100_000));
        let err = expect_err(&path, &lax);
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("max_decode_bytes"), "{err}");
        // With both limits lifted it is the missing data that fails, cleanly
        // (the buffer is never touched).
        let small_bomb = dir.path().join("small_bomb.png");
        std::fs::write(&small_bomb, png_declaring(3000, 2000)).unwrap();
        assert!(matches!(expect_err(&small_bomb, &lax), ImageError::Corrupt { .. }));
    }

    #[test]
    fn extreme_aspect_ratio_is_refused_before_decoding() {
        // 1 x 1,000,000 is under the pixel limit, but padding it to a square
        // (or, in Pillow <= 12's order, resizing it horizontal pass first)
        // needs a 1,000,000-row intermediate image: refused from the header.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("thread.png");
        std::fs::write(&path, png_declaring(1, 1_000_000)).unwrap();
        let resize = ImageConfig::new(768);
        let legacy = ImageConfig { pillow: PillowOrder::Legacy, ..ImageConfig::new(768) };
        for cfg in [pad(768), legacy] {
            let err = read_header(&path, &cfg).unwrap_err();
            assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
            assert!(err.to_string().contains("resizing it to 768 x 768"), "{err}");
            assert!(matches!(expect_err(&path, &cfg), ImageError::TooLarge { .. }));
        }
        // Pillow 13 resizes it vertical pass first: a small intermediate.
        assert_eq!(read_header(&path, &resize).unwrap(), (1, 1_000_000));
        assert!(matches!(expect_err(&path, &resize), ImageError::Corrupt { .. }));
        // Ordinary photos need a few MB.
        assert!(resize_work_bytes(4000, 3000, &pad(768)) < 20_000_000);
        assert!(resize_work_bytes(3000, 4000, &resize) < 20_000_000);
    }

    #[test]
    fn mutated_files_never_panic() {
        // Flip bytes all over the fixtures: every result is Ok or a clean Err.
        let dir = tempfile::tempdir().unwrap();
        let cfg = ImageConfig::new(8);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for name in ["q90_50x33.jpg", "rgb_37x23.png", "rgba_64x40.png", "lossless_20x28.webp", "lossy_20x28.webp"] {
            let bytes = std::fs::read(fixtures().join(name)).unwrap();
            for i in 0..60 {
                let mut b = bytes.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] = next() as u8;
                }
                let path = dir.path().join(format!("m{i}_{name}"));
                std::fs::write(&path, &b).unwrap();
                if let Ok(out) = load_image(&path, &cfg) {
                    assert_eq!(out.len(), 3 * 8 * 8);
                }
            }
        }
    }

    #[test]
    fn rgba_and_gray_load_as_rgb() {
        let cfg = ImageConfig::new(S);
        let (rgba, w, h) = decode_rgb8(&fixtures().join("rgba_64x40.png"), &cfg).unwrap();
        assert_eq!((rgba.len(), w, h), (64 * 40 * 3, 64, 40));
        // The alpha-0 column keeps its colour (PIL drops alpha, no compositing).
        let raw = image::open(fixtures().join("rgba_64x40.png")).unwrap().to_rgba8();
        assert_eq!(raw.get_pixel(0, 0)[3], 0);
        assert_eq!(&rgba[..3], &raw.get_pixel(0, 0).0[..3]);
        let (gray, ..) = decode_rgb8(&fixtures().join("gray_30x30.png"), &cfg).unwrap();
        assert!(gray.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    // --- config and tiles --------------------------------------------------

    #[test]
    fn config_serde_defaults() {
        let c: ImageConfig = serde_json::from_str(r#"{"size": 768}"#).unwrap();
        assert_eq!(c, ImageConfig::new(768));
        assert_eq!(c.max_pixels, 178_956_970);
        let c: ImageConfig = serde_json::from_str(
            r#"{"size": 768, "mode": "dynamic_s2", "max_pixels": 5, "max_tiles": 6, "tile_size": 384}"#,
        )
        .unwrap();
        assert_eq!(c.mode, AspectMode::DynamicS2);
        assert_eq!((c.max_tiles, c.tile()), (6, 384));
        assert_eq!(ImageConfig::new(768).tile(), 768, "tile_size 0 means one tile of `size`");
        assert_eq!(c.pillow, PillowOrder::Pillow13);
        let legacy: ImageConfig = serde_json::from_str(r#"{"size": 8, "pillow": "legacy"}"#).unwrap();
        assert_eq!(legacy.pillow, PillowOrder::Legacy);
        assert!(serde_json::from_str::<ImageConfig>(r#"{"size": 8, "mode": "crop"}"#).is_err());
        assert!(serde_json::from_str::<ImageConfig>(r#"{"size": 8, "colour": 1}"#).is_err());
        let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(matches!(
            load_image(&fixtures().join("rgb_37x23.png"), &ImageConfig::new(0)),
            Err(ImageError::Config(_))
        ));
    }

    #[test]
    fn dynamic_grid_matches_nvila() {
        let m = manifest();
        let d = &m["dynamic_s2"];
        let base = d["base"].as_u64().unwrap() as usize;
        let max_tiles = d["max_tiles"].as_u64().unwrap() as usize;
        for g in d["grids"].as_array().unwrap() {
            let (w, h) = (g["width"].as_u64().unwrap() as u32, g["height"].as_u64().unwrap() as u32);
            let want = (g["cols"].as_u64().unwrap() as usize, g["rows"].as_u64().unwrap() as usize);
            assert_eq!(dynamic_s2_grid(w, h, base, 4, max_tiles), want, "{w}x{h}");
        }
        // Wide, tall and square images by hand.
        assert_eq!(dynamic_s2_grid(2000, 1000, 384, 4, 12), (4, 2));
        assert_eq!(dynamic_s2_grid(1000, 3000, 384, 4, 12), (2, 6));
        assert_eq!(dynamic_s2_grid(5000, 100, 384, 4, 12), (12, 1));
        // A tie between 2x2 and 3x3 (both exactly square): 3x3 only when the
        // image has more than half its pixels.
        assert_eq!(dynamic_s2_grid(800, 800, 384, 4, 12), (2, 2));
        assert_eq!(dynamic_s2_grid(900, 900, 384, 4, 12), (3, 3));
        assert_eq!(dynamic_s2_grid(10, 10, 384, 13, 12), (1, 1));
    }

    #[test]
    fn tiles_from_the_header() {
        let s2 = S2Config { scales: vec![384, 768], max_split_size: 384 };
        let stat = ImageConfig::new(768);
        assert_eq!(tiles_for(&stat, &s2, 1000, 500), 5);
        let dynamic = ImageConfig { mode: AspectMode::DynamicS2, tile_size: 384, ..ImageConfig::new(768) };
        assert_eq!(tiles_for(&dynamic, &s2, 1000, 500), 1 + 8);
        assert_eq!(tiles_for(&dynamic, &s2, 384, 384), 1 + 4);
        let three = S2Config { scales: vec![384, 768, 1152], max_split_size: 384 };
        assert_eq!(tiles_for(&stat, &three, 10, 10), 1 + 4 + 9);
        let dynamic3 = ImageConfig { size: 1152, ..dynamic.clone() };
        assert_eq!(tiles_for(&dynamic3, &three, 4000, 300), 1 + 4 + 12);
        // The largest scale's grid never has fewer tiles than the static one.
        assert_eq!(dynamic3.dynamic_grid(4000, 300), TileGrid { rows: 1, cols: 12 });
        assert_eq!(dynamic3.dynamic_grid(10, 10), TileGrid { rows: 3, cols: 3 });
        // From a file: the 50x33 JPEG is wider than tall.
        let jpg = fixtures().join("q90_50x33.jpg");
        assert_eq!(header_tiles(&jpg, &stat, &s2).unwrap(), 5);
        assert_eq!(dynamic_s2_grid(50, 33, 384, 4, 12), (3, 2));
        assert_eq!(header_tiles(&jpg, &dynamic, &s2).unwrap(), 1 + 6);
        let bad = ImageError::Missing { path: "x.jpg".into() }.to_bad_sample("7");
        assert_eq!(bad.to_string(), "sample `7`: image x.jpg: file not found");
    }
}
