//! Reading an image file with the `image` crate's decoders: the header
//! alone ([`read_header`], [`header_tiles`]) with the limits checked before
//! anything is decoded, then the decode to RGB8 ([`decode_rgb8`]), refusing
//! the truncated JPEG and WebP files PIL refuses.

use super::rgb::to_rgb8_pil;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use std::io::{BufRead, Cursor, Seek};
use std::path::Path;
use tessera_job::image::ImageConfig;
use tessera_job::image::{check_dims, check_file, io_error, one_line, ImageError};

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
    check_dims(path, dims.0, dims.1, cfg)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::load_image;
    use crate::data::image::test_util::{fixtures, pad, S};
    use crate::engine::TileGrid;
    use tessera_job::image::{
        dynamic_s2_grid, header_tiles, read_header, resize_work_bytes, tiles_for, AspectMode, PillowOrder,
    };
    use tessera_job::model::S2Config;

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

    #[test]
    fn dynamic_grid_matches_nvila() {
        let m = crate::data::image::test_util::manifest();
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
}
