//! What is known of an image without decoding it: the preprocessing
//! settings ([`ImageConfig`]), the header's dimensions ([`read_header`]),
//! the limits checked on them before anything is decoded, and the S2 tile
//! count, and so a sample's cost ([`tiles_for`], [`header_tiles`]). The
//! coordinator plans from this alone; the worker decodes and resizes
//! (`tessera_worker::data::image`), with the same settings and limits.
//!
//! [`read_header`] reads the first bytes of a JPEG, PNG or WebP file (the
//! format sniffed from the content, the extension as the fallback, as the
//! worker's decoder does) and nothing else. A file whose header is intact
//! but whose image data is damaged passes here and is refused by the
//! worker's decoder, which then skips it as a bad sample.

use crate::data::BadSample;
use crate::model::{S2Config, TileGrid};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// PIL's decompression-bomb error threshold (`2 * Image.MAX_IMAGE_PIXELS`).
pub const PIL_MAX_PIXELS: u64 = 178_956_970;
/// Default decoder allocation limit: enough for a 16-bit RGBA image at
/// [`PIL_MAX_PIXELS`] (8 bytes a pixel).
pub const DEFAULT_MAX_DECODE_BYTES: u64 = 1_500_000_000;
/// SigLIP's image mean and std (the same for every channel).
pub const SIGLIP_MEAN: f32 = 0.5;
pub const SIGLIP_STD: f32 = 0.5;
/// `expand2square`'s background: `int(0.5 * 255)` per channel.
pub const PAD_BACKGROUND: u8 = 127;

/// How a non-square image becomes square (VILA's `image_aspect_ratio`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AspectMode {
    /// Stretch to `size x size` (VILA 1.5 S2 models use this).
    #[default]
    Resize,
    /// Pad to a square with the mean colour, then resize (`expand2square`).
    Pad,
    /// NVILA's dynamic S2: every smaller scale is a square cut into `n x n`
    /// tiles, and the largest is resized to the `rows x cols` tile grid whose
    /// aspect ratio is closest to the image's ([`dynamic_s2_grid`], between
    /// `(largest / tile)^2` and [`ImageConfig::max_tiles`] tiles). The tiles
    /// go to the model as they are ([`load_image_dynamic_s2`]).
    DynamicS2,
}

/// Which Pillow release's bicubic resize to reproduce. 8-bit bicubic output
/// differs between them only in the order of the two passes (the uint8
/// intermediate rounds differently), by a level or a few on some pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PillowOrder {
    /// Pillow 13 and later: the vertical pass first when the height shrinks
    /// by more than twice as many pixels as the width (`h - out_h > 0` and
    /// `h - out_h > 2 * (w - out_w)`, e.g. a portrait photo resized to a
    /// square), otherwise the horizontal pass first.
    #[default]
    Pillow13,
    /// Pillow 12 and earlier (what VILA 1.5 was trained with): always the
    /// horizontal pass first.
    Legacy,
}

impl PillowOrder {
    /// Whether Pillow runs the horizontal pass first for this resize.
    pub fn horizontal_first(self, w: usize, h: usize, out_w: usize, out_h: usize) -> bool {
        match self {
            PillowOrder::Legacy => true,
            PillowOrder::Pillow13 => {
                let dy = h as i64 - out_h as i64;
                let dx = w as i64 - out_w as i64;
                !(dy > 0 && dy > dx * 2)
            }
        }
    }
}

/// Image preprocessing settings of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Output side: the largest S2 scale (768 for VILA-3B-S2).
    pub size: usize,
    #[serde(default)]
    pub mode: AspectMode,
    /// Images with more pixels (per the header) are refused before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// The most the decoder, and separately the resize, may allocate for one
    /// image; both are checked against what the header implies, before
    /// anything is allocated.
    #[serde(default = "default_max_decode_bytes")]
    pub max_decode_bytes: u64,
    /// Dynamic S2: the most tiles the largest scale may be cut into (NVILA: 12).
    #[serde(default = "default_max_tiles")]
    pub max_tiles: usize,
    /// Dynamic S2: the tile side (the first S2 scale, `max_split_size`); 0
    /// means `size`.
    #[serde(default)]
    pub tile_size: usize,
    /// The Pillow release whose resize is reproduced bit for bit.
    #[serde(default)]
    pub pillow: PillowOrder,
}

fn default_max_pixels() -> u64 {
    PIL_MAX_PIXELS
}

fn default_max_decode_bytes() -> u64 {
    DEFAULT_MAX_DECODE_BYTES
}

fn default_max_tiles() -> usize {
    12
}

impl ImageConfig {
    /// Mode `resize`, static S2 and the default limits.
    pub fn new(size: usize) -> Self {
        ImageConfig {
            size,
            mode: AspectMode::Resize,
            max_pixels: PIL_MAX_PIXELS,
            max_decode_bytes: DEFAULT_MAX_DECODE_BYTES,
            max_tiles: default_max_tiles(),
            tile_size: 0,
            pillow: PillowOrder::Pillow13,
        }
    }

    /// Dynamic S2's tile side.
    pub fn tile(&self) -> usize {
        if self.tile_size == 0 {
            self.size
        } else {
            self.tile_size
        }
    }

    /// Dynamic S2: the largest scale's tile grid for a `w x h` image, with at
    /// least the `(size / tile)^2` tiles of the static grid.
    pub fn dynamic_grid(&self, w: u32, h: u32) -> TileGrid {
        let n = self.size / self.tile().max(1);
        let (cols, rows) = dynamic_s2_grid(w, h, self.tile(), n * n, self.max_tiles);
        TileGrid { rows, cols }
    }

    /// `(width, height)` of the largest resize of a `w x h` image: the square
    /// `size x size`, or the dynamic S2 grid's `cols * tile x rows * tile`.
    pub fn resize_output(&self, w: u32, h: u32) -> (usize, usize) {
        match self.mode {
            AspectMode::Resize | AspectMode::Pad => (self.size, self.size),
            AspectMode::DynamicS2 => {
                let g = self.dynamic_grid(w, h);
                (g.cols * self.tile(), g.rows * self.tile())
            }
        }
    }
}

/// Why an image could not be used. Every message is one line that names the
/// file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {}: file not found", path.display())]
    Missing { path: PathBuf },
    #[error("image {}: empty file (0 bytes)", path.display())]
    Empty { path: PathBuf },
    #[error("image {}: {width} x {height} pixels: {reason}", path.display())]
    TooLarge { path: PathBuf, width: u32, height: u32, reason: String },
    #[error("image {}: corrupt or truncated: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("image {}: unsupported: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("image {}: cannot read: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("image config: {0}")]
    Config(String),
}

impl ImageError {
    /// The sample-level report for the loader's skip/fail policy.
    pub fn to_bad_sample(&self, id: &str) -> BadSample {
        BadSample::new(id, self.to_string())
    }
}

pub fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().replace(['\n', '\r'], " ")
}

pub fn io_error(path: &Path, e: &std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::Missing { path },
        std::io::ErrorKind::UnexpectedEof => ImageError::Corrupt { path, reason: one_line(e) },
        _ => ImageError::Io { path, reason: one_line(e) },
    }
}

fn check_pixels(path: &Path, width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            reason: format!("{pixels} pixels is over the limit of {max_pixels} (max_pixels); refused before decoding"),
        });
    }
    if pixels == 0 {
        return Err(ImageError::Corrupt { path: path.to_path_buf(), reason: format!("{width} x {height} image") });
    }
    Ok(())
}

/// The checks on a header's `width x height` before anything is decoded:
/// the pixel limit, and the bytes the resize would need ([`resize_work_bytes`]
/// against `cfg.max_decode_bytes`). The header reader here and the worker's
/// decoder both apply them.
pub fn check_dims(path: &Path, width: u32, height: u32, cfg: &ImageConfig) -> Result<(), ImageError> {
    check_pixels(path, width, height, cfg.max_pixels)?;
    let work = resize_work_bytes(width as usize, height as usize, cfg);
    if work > cfg.max_decode_bytes {
        let (ow, oh) = cfg.resize_output(width, height);
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            reason: format!(
                "resizing it to {ow} x {oh} ({:?}) needs about {work} bytes, over the limit of {} \
                 (max_decode_bytes); refused before decoding",
                cfg.mode, cfg.max_decode_bytes,
            ),
        });
    }
    Ok(())
}

/// Checks the file before any reading: it exists, is a file, is not empty.
/// Returns its size.
pub fn check_file(path: &Path) -> Result<u64, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, &e))?;
    if meta.is_dir() {
        return Err(ImageError::Io { path: path.to_path_buf(), reason: "is a directory".into() });
    }
    if meta.len() == 0 {
        return Err(ImageError::Empty { path: path.to_path_buf() });
    }
    Ok(meta.len())
}

/// About how many bytes the worker's resize allocates for a `w x h` image: the
/// intermediate image of the first pass, the output and the fixed-point
/// coefficient tables (Pillow's and the fast kernels' fixed-width copy: up to
/// `8 * (4 * in + out)` bytes an axis when shrinking).
/// Ordinary photos need a few MB; an extreme aspect ratio needs far more
/// (mode `pad` on a 1 x 1,000,000 image: a 1,000,000-row intermediate),
/// which is why [`read_header`] refuses images over
/// [`ImageConfig::max_decode_bytes`] by this measure too. (Pillow would build
/// a 10^12-pixel square there.)
pub fn resize_work_bytes(w: usize, h: usize, cfg: &ImageConfig) -> u64 {
    if cfg.size == 0 || w == 0 || h == 0 {
        return 0;
    }
    let (ow, oh) = cfg.resize_output(w.min(u32::MAX as usize) as u32, h.min(u32::MAX as usize) as u32);
    let (w, h, ow, oh, c) = (w as u64, h as u64, ow as u64, oh as u64, 3u64);
    let (cw, ch) = match cfg.mode {
        AspectMode::Pad => (w.max(h), w.max(h)),
        AspectMode::Resize | AspectMode::DynamicS2 => (w, h),
    };
    let coeffs = |n: u64, out: u64| {
        let support = 2.0 * (n as f64 / out.max(1) as f64).max(1.0);
        let ksize = support.ceil() as u64 * 2 + 1;
        out.saturating_mul(ksize).saturating_mul(8)
    };
    let horizontal_first = cfg.pillow.horizontal_first(cw as usize, ch as usize, ow as usize, oh as usize);
    let tmp = if horizontal_first { ch.saturating_mul(ow) } else { cw.saturating_mul(oh) }.saturating_mul(c);
    tmp.saturating_add(ow.saturating_mul(oh).saturating_mul(c))
        .saturating_add(coeffs(cw, ow))
        .saturating_add(coeffs(ch, oh))
}

/// The image's `(width, height)` from its header, without decoding it (only
/// the first bytes of the file are read). Refuses with
/// [`ImageError::TooLarge`] an image over `cfg.max_pixels`, or one whose
/// resize to `cfg.size` would need more than `cfg.max_decode_bytes`
/// ([`resize_work_bytes`]).
pub fn read_header(path: &Path, cfg: &ImageConfig) -> Result<(u32, u32), ImageError> {
    check_file(path)?;
    let (w, h) = read_dims(path)?;
    check_dims(path, w, h, cfg)?;
    Ok((w, h))
}

/// `(width, height)` from the first bytes of the file. Reads
/// [`HEADER_FIRST_READ`] bytes, and more (four times as many each time, up to
/// [`HEADER_MAX_READ`]) only while the header is cut short: a JPEG's frame
/// header can sit behind large metadata segments, but most headers are in
/// the first few bytes, and the planner reads one per sample. The parsers
/// read a prefix only, so the answer is that of the longest read.
fn read_dims(path: &Path) -> Result<(u32, u32), ImageError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, &e))?;
    let mut head = Vec::new();
    let mut want = HEADER_FIRST_READ;
    loop {
        (&mut file).take((want - head.len()) as u64).read_to_end(&mut head).map_err(|e| io_error(path, &e))?;
        let Some(format) = sniff_format(&head).or_else(|| format_from_extension(path)) else {
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                reason: "the image format could not be determined (Tessera reads JPEG, PNG and WebP)".into(),
            });
        };
        match header_dims(&head, format) {
            Ok(dims) => return Ok(dims),
            // The whole file, or as much as a header may take, was read.
            Err(reason) if head.len() < want || want >= HEADER_MAX_READ => {
                return Err(ImageError::Corrupt { path: path.to_path_buf(), reason })
            }
            Err(_) => want = (want * 4).min(HEADER_MAX_READ),
        }
    }
}

/// [`tiles_for`] from the file's header, without decoding it.
pub fn header_tiles(path: &Path, cfg: &ImageConfig, s2: &S2Config) -> Result<usize, ImageError> {
    let (w, h) = read_header(path, cfg)?;
    Ok(tiles_for(cfg, s2, w, h))
}

/// What [`read_header`] reads first: PNG and WebP sizes are in the first 30
/// bytes, a plain JPEG's within its first segments.
const HEADER_FIRST_READ: usize = 4 << 10;
/// The most [`read_header`] reads: a JPEG's frame header comes after its
/// metadata segments (EXIF thumbnails, ICC profiles), which can be large.
const HEADER_MAX_READ: usize = 1 << 20;

/// The formats the worker decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderFormat {
    Jpeg,
    Png,
    WebP,
}

/// The format from the file's first bytes, as the decoder sniffs it.
pub fn sniff_format(b: &[u8]) -> Option<HeaderFormat> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(HeaderFormat::Png)
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(HeaderFormat::Jpeg)
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some(HeaderFormat::WebP)
    } else {
        None
    }
}

/// The fallback when the content is not recognized: the extension.
fn format_from_extension(path: &Path) -> Option<HeaderFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "jpg" | "jpeg" | "jfif" | "jpe" => Some(HeaderFormat::Jpeg),
        "png" => Some(HeaderFormat::Png),
        "webp" => Some(HeaderFormat::WebP),
        _ => None,
    }
}

/// `(width, height)` from the first bytes of a file of `format`, or why not.
pub fn header_dims(b: &[u8], format: HeaderFormat) -> Result<(u32, u32), String> {
    match format {
        HeaderFormat::Png => png_dims(b),
        HeaderFormat::Jpeg => jpeg_dims(b),
        HeaderFormat::WebP => webp_dims(b),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u32> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?) as u32)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u32> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as u32)
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let x = b.get(at..at + 3)?;
    Some(x[0] as u32 | (x[1] as u32) << 8 | (x[2] as u32) << 16)
}

/// PNG: the IHDR chunk, which must come first.
fn png_dims(b: &[u8]) -> Result<(u32, u32), String> {
    if !b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err("not a PNG signature".into());
    }
    let (len, kind) = (be32(b, 8), b.get(12..16));
    if kind != Some(b"IHDR".as_slice()) || len != Some(13) {
        return Err("the file does not start with an IHDR chunk (truncated or damaged)".into());
    }
    match (be32(b, 16), be32(b, 20)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err("the IHDR chunk is cut short".into()),
    }
}

/// JPEG: the first start-of-frame segment (SOF0-SOF15 but DHT, JPG and DAC).
fn jpeg_dims(b: &[u8]) -> Result<(u32, u32), String> {
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err("no JPEG start-of-image marker".into());
    }
    let mut at = 2;
    loop {
        // Fill bytes (0xFF) may precede a marker.
        while b.get(at) == Some(&0xFF) && b.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (b.get(at), b.get(at + 1)) else {
            return Err(if at + 1 >= b.len() {
                "the header ends before the frame size (truncated)".into()
            } else {
                format!("no JPEG marker at byte {at}")
            });
        };
        at += 2;
        match marker {
            0x01 | 0xD0..=0xD7 => continue,
            0xD9 | 0xDA => return Err("no frame header before the image data".into()),
            _ => {}
        }
        let len = be16(b, at).ok_or("the header ends inside a segment (truncated)")? as usize;
        if len < 2 {
            return Err(format!("a segment of length {len} at byte {at}"));
        }
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            // Length, precision, height, width.
            return match (be16(b, at + 3), be16(b, at + 5)) {
                (Some(h), Some(w)) => Ok((w, h)),
                _ => Err("the frame header is cut short (truncated)".into()),
            };
        }
        at += len;
    }
}

/// WebP: the first chunk, VP8 (lossy), VP8L (lossless) or VP8X (extended).
fn webp_dims(b: &[u8]) -> Result<(u32, u32), String> {
    if b.len() < 12 || &b[..4] != b"RIFF" || &b[8..12] != b"WEBP" {
        return Err("not a RIFF WEBP header (truncated or damaged)".into());
    }
    let short = || "the first chunk is cut short (truncated)".to_string();
    match b.get(12..16) {
        Some(b"VP8 ") => {
            if b.get(23..26) != Some(&[0x9D, 0x01, 0x2A]) {
                return Err(if b.len() < 26 { short() } else { "a VP8 chunk without its start code".into() });
            }
            let (w, h) = (le16(b, 26).ok_or_else(short)?, le16(b, 28).ok_or_else(short)?);
            Ok((w & 0x3FFF, h & 0x3FFF))
        }
        Some(b"VP8L") => {
            if b.get(20) != Some(&0x2F) {
                return Err(if b.len() < 21 { short() } else { "a VP8L chunk without its signature".into() });
            }
            let bits = b.get(21..25).ok_or_else(short)?;
            let bits = u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]]);
            Ok(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        Some(b"VP8X") => Ok((le24(b, 24).ok_or_else(short)? + 1, le24(b, 27).ok_or_else(short)? + 1)),
        Some(other) => Err(format!("unknown first chunk {:?}", String::from_utf8_lossy(other))),
        None => Err(short()),
    }
}

// S2 tiles, and so the cost, from the header.

/// NVILA's dynamic S2 grid `(cols, rows)` for a `w x h` image: among the
/// grids with `min_tiles <= cols * rows <= max_tiles`, the one whose aspect
/// ratio `cols / rows` is closest to `w / h`. On a tie the grid with more
/// tiles wins if the image has more than half their pixels (`w * h > 0.5 *
/// base^2 * cols * rows`), as InternVL's `find_closest_aspect_ratio` does
/// (candidates in increasing tile count; between two grids of the same count,
/// which Python visits in set order, the one with fewer columns comes first
/// here). `(1, 1)` when no grid qualifies. NVILA uses `min_tiles = (last
/// scale / first scale)^2` and `max_tiles = 12`.
pub fn dynamic_s2_grid(w: u32, h: u32, base: usize, min_tiles: usize, max_tiles: usize) -> (usize, usize) {
    let mut cands: Vec<(usize, usize)> = (1..=max_tiles)
        .flat_map(|i| (1..=max_tiles).map(move |j| (i, j)))
        .filter(|&(i, j)| i * j >= min_tiles && i * j <= max_tiles)
        .collect();
    cands.sort_by_key(|&(i, j)| (i * j, i));
    let aspect = w as f64 / h.max(1) as f64;
    let area = w as f64 * h as f64;
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for (i, j) in cands {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff && area > 0.5 * (base * base) as f64 * (i * j) as f64 {
            best = (i, j);
        }
    }
    best
}

/// ViT tiles (passes at `max_split_size`) one image costs. Static S2:
/// `sum over scales of (scale / split)^2` (5 for VILA-3B-S2). Dynamic S2:
/// the square grids of every scale but the last, plus the dynamic grid of the
/// last (1 + cols * rows for two scales).
pub fn tiles_for(cfg: &ImageConfig, s2: &S2Config, w: u32, h: u32) -> usize {
    match cfg.mode {
        AspectMode::Resize | AspectMode::Pad => s2.tiles_per_image(),
        AspectMode::DynamicS2 => s2.dynamic_tiles(cfg.dynamic_grid(w, h)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        b
    }

    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xFF, 0xC2, 0, 11, 8];
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&[1, 1, 0x11, 0]);
        b
    }

    #[test]
    fn dimensions_of_each_format_from_the_first_bytes() {
        assert_eq!(header_dims(&png(37, 23), HeaderFormat::Png), Ok((37, 23)));
        assert_eq!(header_dims(&jpeg(50, 33), HeaderFormat::Jpeg), Ok((50, 33)));
        let mut lossless = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        lossless.extend_from_slice(&((19u32) | (27u32 << 14)).to_le_bytes());
        assert_eq!(header_dims(&lossless, HeaderFormat::WebP), Ok((20, 28)));
        let mut extended = b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0\0\0\0\0".to_vec();
        extended.extend_from_slice(&[99, 0, 0, 0x0F, 0x27, 0]);
        assert_eq!(header_dims(&extended, HeaderFormat::WebP), Ok((100, 10000)));
        let mut lossy = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x9d\x01\x2a".to_vec();
        lossy.extend_from_slice(&[20, 0x40, 28, 0]); // scale bits above the 14-bit size
        assert_eq!(header_dims(&lossy, HeaderFormat::WebP), Ok((20, 28)));
        for (b, f) in [(&b"\xff\xd8\xff"[..], HeaderFormat::Jpeg), (&png(1, 1)[..8], HeaderFormat::Png)] {
            assert_eq!(sniff_format(b), Some(f));
        }
        assert_eq!(sniff_format(b"GIF89a"), None);
    }

    /// Every prefix and every byte flip of a header gives dimensions or a
    /// reason, never a panic.
    #[test]
    fn cut_or_damaged_headers_give_a_reason() {
        // The dimensions end at byte 24 of a PNG and 18 of this JPEG.
        for (b, f, needed, dims) in
            [(png(3, 4), HeaderFormat::Png, 24, (3, 4)), (jpeg(5, 6), HeaderFormat::Jpeg, 18, (5, 6))]
        {
            assert_eq!(header_dims(&b[..needed], f), Ok(dims));
            for cut in 0..needed {
                assert!(header_dims(&b[..cut], f).is_err(), "{f:?} cut at {cut}");
            }
            for at in 0..b.len() {
                for x in [0u8, 0xFF, 0x13] {
                    let mut m = b.clone();
                    m[at] = x;
                    let _ = header_dims(&m, f);
                }
            }
        }
    }

    #[test]
    fn read_header_names_the_file_and_checks_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ImageConfig::new(384);
        let path = dir.path().join("photo.png");
        std::fs::write(&path, png(640, 480)).unwrap();
        assert_eq!(read_header(&path, &cfg).unwrap(), (640, 480));
        // The content decides, not the extension.
        let renamed = dir.path().join("photo.jpg");
        std::fs::write(&renamed, png(64, 48)).unwrap();
        assert_eq!(read_header(&renamed, &cfg).unwrap(), (64, 48));
        std::fs::write(&path, png(100_000, 100_000)).unwrap();
        let e = read_header(&path, &cfg).unwrap_err();
        assert!(matches!(e, ImageError::TooLarge { .. }) && e.to_string().contains("photo.png"), "{e}");
        std::fs::write(&path, &png(5, 5)[..20]).unwrap();
        let e = read_header(&path, &cfg).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, b"not an image").unwrap();
        assert!(matches!(read_header(&txt, &cfg), Err(ImageError::Unsupported { .. })));
        assert!(matches!(read_header(&dir.path().join("none.png"), &cfg), Err(ImageError::Missing { .. })));
    }

    /// A JPEG frame header behind large metadata segments is found by
    /// reading on past the first bytes, up to the most a header may take.
    #[test]
    fn a_frame_header_behind_large_metadata_is_read_on_to() {
        let jpeg_behind = |segments: usize| {
            let mut b = vec![0xFF, 0xD8];
            for _ in 0..segments {
                b.extend_from_slice(&[0xFF, 0xE1, 0xEA, 0x60]); // APP1, 60000 bytes with its length
                b.resize(b.len() + 59_998, 0x2A);
            }
            b.extend_from_slice(&jpeg(50, 33)[2..]);
            b
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exif.jpg");
        std::fs::write(&path, jpeg_behind(5)).unwrap();
        assert_eq!(read_header(&path, &ImageConfig::new(384)).unwrap(), (50, 33), "300 kB in");
        std::fs::write(&path, jpeg_behind(20)).unwrap();
        let e = read_header(&path, &ImageConfig::new(384)).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { .. }) && e.to_string().contains("truncated"), "1.2 MB in: {e}");
    }

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
    }
}
