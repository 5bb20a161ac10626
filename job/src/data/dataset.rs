//! LLaVA/VILA-format dataset files, and mixing several datasets by weight.
//!
//! A dataset is a JSON array (`.json`) or JSON Lines (`.jsonl`) of records:
//!
//! ```json
//! {"id": "000001", "image": "coco/000001.jpg",
//!  "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
//!                    {"from": "gpt", "value": "A dog."}]}
//! ```
//!
//! - `id`: string or number; when missing, `"<file>:<line>"` (JSONL) or
//!   `"<file>#<index>"` (JSON array, 0-based) is used.
//! - `image`: optional path relative to the dataset's `image_folder`. A list
//!   of one path is accepted as that path, an empty list as no image; a list
//!   of several is a bad sample (one image per sample only). Image files are
//!   not opened here; a missing file is reported when the image is loaded.
//! - `conversations`: turns with `from` = `human`/`user` or `gpt`/`assistant`
//!   (any case) and a string `value`. The rules of
//!   [`super::template::prepare_turns`] apply (alternation starting with
//!   human, a gpt turn, `<image>` tags); `"<image>\n"` is prepended to the
//!   first human turn of an image sample that has no tag.
//! - Other fields are ignored.
//!
//! A record that breaks a rule is a [`BadSample`]. With
//! [`OnBadSample::Skip`] it is logged once (`tracing::warn!` with its id and
//! reason), kept in [`DatasetRead::bad`] and the rest is read; with
//! [`OnBadSample::Fail`] reading stops with an error naming the file, the
//! place and the reason. A malformed JSONL line is a bad sample with id
//! `"<file>:<line>"`; a JSON array file that does not parse is an error
//! whatever the policy (its records cannot be told apart).

use super::template::prepare_turns;
use super::{BadSample, OnBadSample, Role, Sample, Turn};
use anyhow::{bail, Context};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One dataset of a job's mixture.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// A `.json` file (JSON array) or a `.jsonl` file (one record per line).
    pub path: PathBuf,
    /// The folder that `image` paths are relative to.
    pub image_folder: PathBuf,
    /// Share of the epoch, relative to the dataset's size: each epoch takes
    /// `round(weight * len)` samples from it (see [`mix`]). Default 1.0.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

impl DatasetSpec {
    /// Checks the fields that do not need the file: the weight must be finite and >= 0.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.weight.is_finite() || self.weight < 0.0 {
            bail!("dataset {}: weight must be a finite number >= 0, got {}", self.path.display(), self.weight);
        }
        Ok(())
    }
}

/// What [`read_dataset`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatasetRead {
    /// The usable samples, in file order.
    pub samples: Vec<Sample>,
    /// The refused records, in file order (empty with [`OnBadSample::Fail`]).
    pub bad: Vec<BadSample>,
}

/// Reads a dataset file. See the module documentation for the format and the
/// bad-sample rules.
///
/// Errors: the file cannot be read, is neither a JSON array nor JSONL, is a
/// JSON array that does not parse, or (with [`OnBadSample::Fail`]) holds a
/// bad record. The messages name the file.
pub fn read_dataset(spec: &DatasetSpec, policy: OnBadSample) -> anyhow::Result<DatasetRead> {
    spec.validate()?;
    let file = spec.path.display().to_string();
    let bytes = std::fs::read(&spec.path).with_context(|| format!("reading dataset {file}"))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes[..]);
    let is_jsonl_ext = spec.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
    let mut out = DatasetRead::default();
    let report = |bad: BadSample, place: &str, out: &mut DatasetRead| -> anyhow::Result<()> {
        match policy {
            OnBadSample::Fail => bail!("dataset {file}, {place}: {bad} (on_bad_sample = fail)"),
            OnBadSample::Skip => {
                tracing::warn!(id = %bad.id, reason = %bad.reason, file = %file, at = %place, "skipping bad sample");
                out.bad.push(bad);
                Ok(())
            }
        }
    };
    match first {
        None => tracing::warn!(file = %file, "dataset file is empty"),
        Some(b'[') if !is_jsonl_ext => {
            let records: Vec<Value> = serde_json::from_slice(bytes)
                .with_context(|| format!("dataset {file}: not a valid JSON array of records"))?;
            for (index, record) in records.into_iter().enumerate() {
                let fallback = format!("{file}#{index}");
                match parse_record(record, &fallback, &spec.image_folder) {
                    Ok(sample) => out.samples.push(sample),
                    Err(bad) => report(bad, &format!("record {index}"), &mut out)?,
                }
            }
        }
        Some(c) if is_jsonl_ext || c == b'{' => {
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line_no = i + 1;
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let fallback = format!("{file}:{line_no}");
                let place = format!("line {line_no}");
                let parsed = serde_json::from_slice::<Value>(line)
                    .map_err(|e| BadSample::new(fallback.clone(), format!("malformed JSON: {e}")))
                    .and_then(|record| parse_record(record, &fallback, &spec.image_folder));
                match parsed {
                    Ok(sample) => out.samples.push(sample),
                    Err(bad) => report(bad, &place, &mut out)?,
                }
            }
        }
        Some(_) => bail!("dataset {file}: neither a JSON array nor JSON Lines (a .jsonl file)"),
    }
    tracing::info!(file = %file, samples = out.samples.len(), bad = out.bad.len(), "read dataset");
    Ok(out)
}

/// Turns one JSON record into a checked sample.
fn parse_record(record: Value, fallback_id: &str, image_folder: &Path) -> Result<Sample, BadSample> {
    let Value::Object(mut map) = record else {
        return Err(BadSample::new(fallback_id, "record is not a JSON object"));
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => fallback_id.to_string(),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(BadSample::new(fallback_id, format!("`id` must be a string or a number, got {other}")))
        }
    };
    let bad = |reason: String| BadSample::new(id.clone(), reason);
    let image = match map.remove("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Array(list)) => match <[Value; 1]>::try_from(list) {
            Ok([Value::String(s)]) => Some(s),
            Ok([other]) => return Err(bad(format!("`image` must be a path string, got {other}"))),
            Err(list) if list.is_empty() => None,
            Err(list) => {
                return Err(bad(format!("multiple images per sample are not supported ({} images)", list.len())))
            }
        },
        Some(other) => return Err(bad(format!("`image` must be a path string, got {other}"))),
    };
    if image.as_deref().is_some_and(|s| s.trim().is_empty()) {
        return Err(bad("`image` is an empty path".into()));
    }
    let turns = match map.remove("conversations") {
        Some(Value::Array(turns)) => turns,
        None | Some(Value::Null) => return Err(bad("no `conversations`".into())),
        Some(_) => return Err(bad("`conversations` must be a list of turns".into())),
    };
    let mut conversations = Vec::with_capacity(turns.len());
    for (i, turn) in turns.into_iter().enumerate() {
        let Value::Object(mut turn) = turn else {
            return Err(bad(format!("turn {i} is not a JSON object")));
        };
        let role = match turn.remove("from") {
            Some(Value::String(from)) => match from.to_ascii_lowercase().as_str() {
                "human" | "user" => Role::Human,
                "gpt" | "assistant" => Role::Gpt,
                _ => {
                    return Err(bad(format!("turn {i}: unknown role `{from}` (expected human/user or gpt/assistant)")))
                }
            },
            _ => return Err(bad(format!("turn {i}: `from` missing or not a string"))),
        };
        let value = match turn.remove("value") {
            Some(Value::String(v)) => v,
            _ => return Err(bad(format!("turn {i}: `value` missing or not a string"))),
        };
        conversations.push(Turn { role, value });
    }
    let mut sample = Sample { id, image: image.map(|p| image_folder.join(p)), conversations };
    sample.conversations = prepare_turns(&sample)?;
    Ok(sample)
}

/// How many samples a dataset of `len` samples contributes to each epoch:
/// `round(weight * len)` (half away from zero); 0 for a weight that is not
/// finite or not positive.
pub fn contribution(weight: f64, len: usize) -> usize {
    if len == 0 || !weight.is_finite() || weight <= 0.0 {
        return 0;
    }
    (weight * len as f64).round() as usize
}

/// The sample order of one epoch over several datasets, as
/// `(dataset index, sample index)` pairs.
///
/// Dataset `d` with `n` samples contributes `c = round(weight * n)` entries
/// ([`contribution`]): every sample `c / n` times, plus `c % n` distinct
/// samples drawn without replacement. So weight 1.0 takes each sample once,
/// 2.0 each twice, 0.5 a seeded half (a different half each epoch, so all
/// samples are seen over the epochs), 0 none. All entries are then shuffled
/// together.
///
/// The result is a pure function of the inputs (the datasets only through
/// their lengths and weights): randomness comes from one `ChaCha8Rng` whose
/// 32-byte seed is `seed` (little endian), `epoch` (little endian) and the tag
/// `"tessera/data/mix"`. The draws happen in dataset order (partial
/// shuffles for the remainders), then one shuffle of the whole list
/// (`rand` 0.8 `SliceRandom`).
pub fn mix(datasets: &[(DatasetSpec, Vec<Sample>)], seed: u64, epoch: u64) -> Vec<(usize, usize)> {
    let mut rng = mix_rng(seed, epoch);
    let mut order = Vec::new();
    for (d, (spec, samples)) in datasets.iter().enumerate() {
        let n = samples.len();
        let count = contribution(spec.weight, n);
        if count == 0 {
            continue;
        }
        for _ in 0..count / n {
            order.extend((0..n).map(|i| (d, i)));
        }
        let rest = count % n;
        if rest > 0 {
            let mut indices: Vec<usize> = (0..n).collect();
            let (chosen, _) = indices.partial_shuffle(&mut rng, rest);
            order.extend(chosen.iter().map(|&i| (d, i)));
        }
    }
    order.shuffle(&mut rng);
    order
}

fn mix_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(b"tessera/data/mix");
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
    }

    fn spec(path: PathBuf) -> DatasetSpec {
        DatasetSpec { path, image_folder: PathBuf::from("/data/images"), weight: 1.0 }
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> DatasetSpec {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        spec(path)
    }

    #[test]
    fn reads_json_array() {
        let read = read_dataset(&spec(fixture("tiny.json")), OnBadSample::Fail).unwrap();
        assert!(read.bad.is_empty());
        let ids: Vec<&str> = read.samples.iter().map(|s| s.id.as_str()).collect();
        let file = fixture("tiny.json").display().to_string();
        assert_eq!(ids, ["img-1", "text-1", "42", &format!("{file}#3"), "multi-1"]);
        let s = &read.samples[0];
        assert_eq!(s.image.as_deref(), Some(Path::new("/data/images/coco/000001.jpg")));
        assert_eq!(s.conversations[0], Turn { role: Role::Human, value: "<image>\nWhat is in the picture?".into() });
        assert_eq!(s.conversations[1], Turn { role: Role::Gpt, value: "A dog.".into() });
        // Text-only: no image, no tag added.
        assert_eq!(read.samples[1].image, None);
        assert_eq!(read.samples[1].conversations[0].value, "Hello!");
        // "user"/"assistant" roles, missing tag prepended.
        assert_eq!(read.samples[2].conversations[0], Turn { role: Role::Human, value: "<image>\nDescribe it.".into() });
        assert_eq!(read.samples[2].conversations[1].role, Role::Gpt);
        // Multi-turn.
        assert_eq!(read.samples[4].conversations.len(), 4);
    }

    #[test]
    fn reads_jsonl_and_skips_bad_lines() {
        let path = fixture("tiny.jsonl");
        let file = path.display().to_string();
        let read = read_dataset(&spec(path), OnBadSample::Skip).unwrap();
        let ids: Vec<&str> = read.samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["l-1", &format!("{file}:2"), "l-5"]);
        let bad: Vec<(&str, &str)> = read.bad.iter().map(|b| (b.id.as_str(), b.reason.as_str())).collect();
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert_eq!(bad[0].0, format!("{file}:3"));
        assert!(bad[0].1.starts_with("malformed JSON: "), "{bad:?}");
        assert_eq!(bad[1], ("l-4", "no assistant (gpt) turn"));
        assert_eq!(bad[2].0, "l-6");
        assert!(bad[2].1.contains("multiple images per sample are not supported"), "{bad:?}");
        assert_eq!(bad[3].0, "l-7");
        assert!(bad[3].1.contains("unknown role `system`"), "{bad:?}");
    }

    #[test]
    fn malformed_jsonl_line_with_fail_is_an_error() {
        let path = fixture("tiny.jsonl");
        let err = read_dataset(&spec(path.clone()), OnBadSample::Fail).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("malformed JSON: "), "{err}");
        // The serde message (with its column) is in it.
        assert!(err.contains("column"), "{err}");
    }

    #[test]
    fn format_detection_and_whole_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let line =
            r#"{"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#;
        // JSONL content in a .json file: detected by the first character.
        let read =
            read_dataset(&write(&dir, "a.json", &format!("\n  {line}\r\n\n{line}\n")), OnBadSample::Fail).unwrap();
        assert_eq!(read.samples.len(), 2);
        assert_eq!(read.samples[0].id, "7");
        // A .jsonl extension wins over the first character: a line that is an array is a bad sample.
        let read = read_dataset(&write(&dir, "b.jsonl", &format!("[1]\n{line}\n")), OnBadSample::Skip).unwrap();
        assert_eq!((read.samples.len(), read.bad.len()), (1, 1));
        assert!(read.bad[0].reason.contains("not a JSON object"));
        // A broken JSON array is an error naming the file, even with skip.
        let s = write(&dir, "c.json", &format!("[{line}, {{\"id\": "));
        let err = format!("{:#}", read_dataset(&s, OnBadSample::Skip).unwrap_err());
        assert!(err.contains("c.json") && err.contains("not a valid JSON array"), "{err}");
        // Not JSON at all.
        let err = read_dataset(&write(&dir, "d.json", "hello"), OnBadSample::Skip).unwrap_err().to_string();
        assert!(err.contains("d.json"), "{err}");
        // Missing file.
        let err = read_dataset(&spec(dir.path().join("none.json")), OnBadSample::Skip).unwrap_err().to_string();
        assert!(err.contains("none.json"), "{err}");
        // Empty file: no samples, no error.
        let read = read_dataset(&write(&dir, "e.jsonl", "\n \n"), OnBadSample::Fail).unwrap();
        assert_eq!(read, DatasetRead::default());
        // A bad weight is refused.
        let mut s = write(&dir, "f.jsonl", line);
        s.weight = -1.0;
        assert!(read_dataset(&s, OnBadSample::Skip).is_err());
    }

    #[test]
    fn bad_records_in_a_json_array() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"[
            {"id": "ok", "image": ["one.png"], "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
            {"id": "no-gpt", "conversations": [{"from": "human", "value": "Hi"}]},
            {"id": "order", "conversations": [{"from": "gpt", "value": "Yo"}, {"from": "human", "value": "Hi"}]},
            {"id": "tag-no-image", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
            {"id": "two-tags", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "Yo"}]},
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "Yo"}]},
            {"id": "no-conv"},
            {"id": ["x"], "conversations": []},
            "just a string"
        ]"#;
        let s = write(&dir, "bad.json", text);
        let file = s.path.display().to_string();
        let read = read_dataset(&s, OnBadSample::Skip).unwrap();
        assert_eq!(read.samples.len(), 1);
        assert_eq!(read.samples[0].image.as_deref(), Some(Path::new("/data/images/one.png")));
        assert_eq!(read.samples[0].conversations[0].value, "<image>\nHi");
        let ids: Vec<&str> = read.bad.iter().map(|b| b.id.as_str()).collect();
        let (f5, f7, f8) = (format!("{file}#5"), format!("{file}#7"), format!("{file}#8"));
        assert_eq!(ids, ["no-gpt", "order", "tag-no-image", "two-tags", &f5, "no-conv", &f7, &f8]);
        let err = read_dataset(&s, OnBadSample::Fail).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("record 1") && err.contains("no-gpt"), "{err}");
    }

    #[test]
    fn spec_serde() {
        let s: DatasetSpec = serde_json::from_str(r#"{"path": "a.jsonl", "image_folder": "imgs"}"#).unwrap();
        assert_eq!(s.weight, 1.0);
        let s: DatasetSpec = toml::from_str("path = \"a.json\"\nimage_folder = \"i\"\nweight = 0.5\n").unwrap();
        assert_eq!(s.weight, 0.5);
        assert!(serde_json::from_str::<DatasetSpec>(r#"{"path": "a", "image_folder": "i", "wieght": 2}"#).is_err());
    }

    fn datasets(specs: &[(usize, f64)]) -> Vec<(DatasetSpec, Vec<Sample>)> {
        specs
            .iter()
            .enumerate()
            .map(|(d, &(n, weight))| {
                let samples =
                    (0..n).map(|i| Sample { id: format!("{d}-{i}"), image: None, conversations: vec![] }).collect();
                (DatasetSpec { path: format!("d{d}.jsonl").into(), image_folder: "i".into(), weight }, samples)
            })
            .collect()
    }

    #[test]
    fn mix_is_deterministic() {
        let ds = datasets(&[(10, 1.0), (7, 0.5), (5, 2.0)]);
        assert_eq!(mix(&ds, 1, 0), mix(&ds, 1, 0));
        assert_ne!(mix(&ds, 1, 0), mix(&ds, 1, 1));
        assert_ne!(mix(&ds, 1, 0), mix(&ds, 2, 0));
        // Only lengths and weights matter, not the sample contents.
        let mut other = ds.clone();
        other[0].1[3].id = "changed".into();
        assert_eq!(mix(&ds, 1, 0), mix(&other, 1, 0));
        // The order is shuffled across datasets.
        let order = mix(&ds, 1, 0);
        let mut sorted = order.clone();
        sorted.sort();
        assert_ne!(order, sorted);
    }

    #[test]
    fn mix_proportions() {
        let ds = datasets(&[(10, 1.0), (10, 0.5), (5, 2.0), (4, 0.0), (0, 3.0), (10, 0.25)]);
        for epoch in 0..5 {
            let order = mix(&ds, 9, epoch);
            let mut counts: HashMap<(usize, usize), usize> = HashMap::new();
            for &e in &order {
                *counts.entry(e).or_default() += 1;
            }
            let per_dataset = |d: usize| order.iter().filter(|e| e.0 == d).count();
            assert_eq!([0, 1, 2, 3, 4, 5].map(per_dataset), [10, 5, 10, 0, 0, 3]);
            assert_eq!(order.len(), 28);
            // Weight 1: each once. Weight 2: each twice. Fractions: distinct samples.
            assert!((0..10).all(|i| counts[&(0, i)] == 1));
            assert!((0..5).all(|i| counts[&(2, i)] == 2));
            assert!(counts.iter().filter(|(k, _)| k.0 == 1 || k.0 == 5).all(|(_, &c)| c == 1));
            assert!(order.iter().all(|&(d, i)| i < ds[d].1.len()));
        }
        // The half changes with the epoch.
        let half = |epoch| {
            let mut v: Vec<usize> = mix(&ds, 9, epoch).into_iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
            v.sort();
            v
        };
        assert!((1..5).any(|e| half(e) != half(0)));
        assert_eq!(contribution(1.5, 3), 5); // 4.5 rounds away from zero
        assert_eq!(contribution(f64::NAN, 3), 0);
        assert!(mix(&[], 0, 0).is_empty());
    }
}
