//! `worker make-demo-data`: a small synthetic dataset on which S2 matters.
//!
//! Each image holds one small square patch at a random place on a noisy
//! background. The patch has a colour and a 1-pixel pattern: horizontal
//! stripes, vertical stripes, a checkerboard, or plain. At the base scale
//! (the image halved by the S2 resize) each pair of pixels is averaged, so
//! every pattern turns into the same flat, dimmer colour: the colour
//! survives, the pattern does not. Only the larger S2 scale sees it. Half of
//! the questions ask the colour (both scales can answer), half the pattern
//! (only S2 can: a one-scale model is at chance, 1 in 4).
//!
//! Generation is a pure function of the seed (ChaCha8, integer pixel
//! arithmetic, lossless PNG), so every machine writes identical files.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::Path;
use tessera_job::data::template::{build_word_tokenizer, template_words};

pub const COLORS: [(&str, [u8; 3]); 4] =
    [("red", [230, 40, 40]), ("green", [40, 200, 60]), ("blue", [50, 80, 235]), ("yellow", [235, 220, 40])];
pub const PATTERNS: [&str; 4] = ["horizontal", "vertical", "checker", "plain"];
pub const COLOR_QUESTION: &str = "what color is the patch ?";
pub const PATTERN_QUESTION: &str = "what pattern does the patch have ?";

/// Sizes of a demo dataset.
#[derive(Clone, Copy, Debug)]
pub struct DemoSpec {
    /// Image side in pixels (the model's largest S2 scale).
    pub size: usize,
    pub train: usize,
    pub eval: usize,
    pub seed: u64,
}

impl DemoSpec {
    pub fn for_size(size: usize) -> Self {
        DemoSpec { size, train: 2000, eval: 200, seed: 0 }
    }
}

/// Every word a demo conversation uses, for the word-level tokenizer.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words = template_words();
    for q in [COLOR_QUESTION, PATTERN_QUESTION] {
        words.extend(q.split_whitespace());
    }
    words.extend(COLORS.iter().map(|c| c.0));
    words.extend(PATTERNS);
    let mut seen = std::collections::HashSet::new();
    words.retain(|w| seen.insert(*w));
    words
}

/// Draws one image `[size, size, 3]` (RGB8) and returns it with its colour
/// and pattern indices.
pub fn draw(rng: &mut ChaCha8Rng, size: usize) -> (Vec<u8>, usize, usize) {
    let color = rng.gen_range(0..COLORS.len());
    let pattern = rng.gen_range(0..PATTERNS.len());
    (paint(rng, size, color, pattern), color, pattern)
}

/// The noisy background and the patch at a random place.
fn paint(rng: &mut ChaCha8Rng, size: usize, color: usize, pattern: usize) -> Vec<u8> {
    let base: i32 = rng.gen_range(70..150);
    let mut img: Vec<u8> = (0..size * size * 3).map(|_| (base + rng.gen_range(-6..=6)).clamp(0, 255) as u8).collect();
    // Patch side: 30% of the image, even, at least 4 pixels.
    let side = ((size * 3 / 10) & !1).clamp(4, size);
    let (x0, y0) = (rng.gen_range(0..=size - side), rng.gen_range(0..=size - side));
    let rgb = COLORS[color].1;
    for y in 0..side {
        for x in 0..side {
            let on = match PATTERNS[pattern] {
                "horizontal" => y % 2 == 0,
                "vertical" => x % 2 == 0,
                "checker" => (x + y) % 2 == 0,
                _ => true,
            };
            let px = &mut img[((y0 + y) * size + x0 + x) * 3..][..3];
            for c in 0..3 {
                // Plain patches are the mean of their striped siblings.
                px[c] = match (PATTERNS[pattern], on) {
                    ("plain", _) => rgb[c] / 2,
                    (_, true) => rgb[c],
                    (_, false) => 0,
                };
            }
        }
    }
    img
}

fn write_split(dir: &Path, name: &str, n: usize, spec: &DemoSpec, rng: &mut ChaCha8Rng) -> Result<()> {
    let path = dir.join(format!("{name}.jsonl"));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for i in 0..n {
        let (img, color, pattern) = draw(rng, spec.size);
        let file = format!("{name}_{i:05}.png");
        let img_path = dir.join("images").join(&file);
        image::save_buffer(&img_path, &img, spec.size as u32, spec.size as u32, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("cannot write {}", img_path.display()))?;
        let (question, answer) =
            if rng.gen_bool(0.5) { (COLOR_QUESTION, COLORS[color].0) } else { (PATTERN_QUESTION, PATTERNS[pattern]) };
        let record = serde_json::json!({
            "id": format!("{name}-{i}"),
            "image": file,
            "conversations": [
                {"from": "human", "value": format!("<image>\n{question}")},
                {"from": "gpt", "value": answer},
            ],
        });
        writeln!(out, "{record}").with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.flush().with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `train.jsonl`, `eval.jsonl`, `images/` and `tokenizer.json` into `dir`.
pub fn make_demo_data(dir: &Path, spec: &DemoSpec) -> Result<()> {
    std::fs::create_dir_all(dir.join("images")).with_context(|| format!("cannot create {}", dir.display()))?;
    let tok = build_word_tokenizer(&vocabulary());
    let tok_path = dir.join("tokenizer.json");
    tok.save(&tok_path, true).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tok_path.display()))?;
    // Separate streams, so the eval split does not depend on the train size.
    let mut train_rng = ChaCha8Rng::seed_from_u64(spec.seed.wrapping_mul(2));
    let mut eval_rng = ChaCha8Rng::seed_from_u64(spec.seed.wrapping_mul(2) + 1);
    write_split(dir, "train", spec.train, spec, &mut train_rng)?;
    write_split(dir, "eval", spec.eval, spec, &mut eval_rng)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The premise of the demo, checked with the model's own S2 resize: at
    /// the base scale the four patterns of one colour look the same (inside
    /// the patch), at the full scale they differ by the whole colour.
    #[test]
    fn base_scale_erases_the_pattern_but_full_scale_keeps_it() {
        use crate::engine::{cpu::Cpu, Backend, ImageShape};
        let (size, be) = (40, Cpu::<f64>::new());
        let planar = |img: &[u8]| -> Vec<f64> {
            (0..3).flat_map(|c| (0..size * size).map(move |p| img[p * 3 + c] as f64)).collect()
        };
        for (color, (name, rgb)) in COLORS.iter().enumerate() {
            let imgs: Vec<Vec<u8>> =
                (0..PATTERNS.len()).map(|p| paint(&mut ChaCha8Rng::seed_from_u64(5), size, color, p)).collect();
            let full = planar(&imgs[3]);
            let halves: Vec<Vec<f64>> = imgs
                .iter()
                .map(|img| {
                    let mut out = vec![0.0; 3 * 20 * 20];
                    be.resize_bicubic(&planar(img), ImageShape { batch: 1, channels: 3, size }, &mut out, 20);
                    out
                })
                .collect();
            let (full_diff, half_diff) = (0..PATTERNS.len()).fold((0f64, 0f64), |(f, h), p| {
                let fd = planar(&imgs[p]).iter().zip(planar(&imgs[3])).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                // Inside the patch only: its border mixes with the background.
                let hd = halves[p]
                    .iter()
                    .zip(&halves[3])
                    .enumerate()
                    .filter(|(i, _)| {
                        let (x, y) = (i % 20, (i / 20) % 20);
                        // A half-scale pixel is interior if its 4x4 source taps are all
                        // patch pixels, none of them clamped at the image border.
                        let inside = |v: usize| v >= 1 && 2 * v + 2 < size;
                        inside(x)
                            && inside(y)
                            && (0..4).all(|k| {
                                (0..4).all(|l| {
                                    let (sx, sy) = (2 * x + k - 1, 2 * y + l - 1);
                                    let v = full[sy * size + sx];
                                    v == (rgb[0] / 2) as f64
                                })
                            })
                    })
                    .map(|(_, (a, b))| (a - b).abs())
                    .fold(0.0, f64::max);
                (f.max(fd), h.max(hd))
            });
            assert!(full_diff >= 40.0, "{name}: patterns differ by only {full_diff} at full scale");
            assert!(half_diff <= 1.0, "{name}: patterns still differ by {half_diff} at the base scale");
        }
    }

    #[test]
    fn same_seed_same_files_and_eval_is_separate() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let spec = DemoSpec { size: 40, train: 12, eval: 5, seed: 9 };
        make_demo_data(a.path(), &spec).unwrap();
        make_demo_data(b.path(), &DemoSpec { train: 3, ..spec }).unwrap();
        let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
        // eval does not depend on the train size
        assert_eq!(read(a.path(), "eval.jsonl"), read(b.path(), "eval.jsonl"));
        assert_eq!(read(a.path(), "images/eval_00004.png"), read(b.path(), "images/eval_00004.png"));
        assert_eq!(read(a.path(), "tokenizer.json"), read(b.path(), "tokenizer.json"));
        let lines = String::from_utf8(read(a.path(), "train.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 12);
        let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        let answer = first["conversations"][1]["value"].as_str().unwrap();
        assert!(COLORS.iter().any(|c| c.0 == answer) || PATTERNS.contains(&answer));
        let tok = tokenizers::Tokenizer::from_file(a.path().join("tokenizer.json")).unwrap();
        for w in vocabulary() {
            assert!(tok.token_to_id(w).is_some(), "tokenizer lacks `{w}`");
        }
        assert!(tok.get_vocab_size(true) <= 256, "the tiny model's vocabulary is 256");
    }
}
