//! Conversation templates, tokenization and label masks, as VILA 1.5 / LLaVA
//! build them.
//!
//! Two templates:
//! - [`TemplateKind::VicunaV1`] (stages 2 and 3): LLaVA's `conv_vicuna_v1`,
//!   `SeparatorStyle.TWO` with sep `" "` and sep2 `"</s>"`:
//!   `SYSTEM + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + ...`.
//!   The BOS token, the system prompt and every `"USER: ... ASSISTANT:"` part
//!   are masked (-100); each reply and its `"</s>"` are targets.
//! - [`TemplateKind::Plain`] (stage 1): LLaVA's `conv_llava_plain` /
//!   `preprocess_plain`: one human turn reduced to `"<image>"`, prompt
//!   `"<image>" + reply + "\n"`. BOS and the image are masked, the reply is
//!   the target.
//!
//! The `<image>` tag becomes one [`IMAGE_TOKEN_INDEX`] (-200) position, as
//! LLaVA's `tokenizer_image_token` does; the model later replaces it with the
//! projected image tokens.
//!
//! # How the labels are computed (a deliberate difference from LLaVA)
//!
//! LLaVA's `preprocess_v1` tokenizes the whole prompt once and then finds the
//! mask boundaries by length arithmetic (`round_len = len(tok(round))`,
//! `instruction_len = len(tok(instruction)) - 2`). The `- 2` assumes the
//! LLaMA sentencepiece tokenizer, which emits BOS plus a stray `"▁"` token for
//! the trailing space of `"ASSISTANT: "`; with other tokenizers the boundary
//! moves by one (with a word-level tokenizer LLaVA would leave the `":"` after
//! `ASSISTANT` as a target), and newer sentencepiece versions trigger its
//! "tokenization mismatch" warning, which masks whole samples.
//!
//! Here the prompt is instead cut into pieces whose labels are known (the
//! masked instruction text, the reply text, the `</s>` token), each piece is
//! tokenized on its own and the ids are concatenated. The boundaries are
//! exact by construction. For any tokenizer whose pre-tokenizer splits at
//! whitespace and special tokens (the word-level tokenizer of
//! [`build_word_tokenizer`], BERT-like ones) the concatenation equals the
//! tokenization of the full prompt (a test checks this). The space between
//! `"ASSISTANT:"` and the reply is tokenized with the reply (`" " + reply`),
//! which is also what a Metaspace (sentencepiece-style) tokenizer does
//! inside a full prompt.
//!
//! # Lengths
//!
//! `max_len` counts positions of `input_ids`, the image placeholder as one.
//! When the limit is the LLM's context, the caller subtracts the extra
//! positions the image will take (e.g. 196 - 1 for the VILA-3B-S2 projector).

use super::{BadSample, Role, Sample, Turn};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

/// The image placeholder in conversation text.
pub const IMAGE_TAG: &str = "<image>";
/// The image's input id and the ignored label are the model's own constants.
pub use crate::model::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};
/// Special tokens, as in the LLaMA tokenizer.
pub const UNK_TOKEN: &str = "<unk>";
pub const BOS_TOKEN: &str = "<s>";
pub const EOS_TOKEN: &str = "</s>";
pub const PAD_TOKEN: &str = "<pad>";

/// The vicuna_v1 system prompt (LLaVA's `conv_vicuna_v1.system`).
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";
/// Role names of vicuna_v1.
pub const VICUNA_V1_ROLES: [&str; 2] = ["USER", "ASSISTANT"];
/// vicuna_v1 separators: after a user message, and after an assistant reply.
pub const VICUNA_V1_SEP: &str = " ";
pub const VICUNA_V1_SEP2: &str = EOS_TOKEN;
/// The plain template's separator (after the reply).
pub const PLAIN_SEP: &str = "\n";

/// Which conversation template to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// Stages 2 and 3: `"USER: ... ASSISTANT: ...</s>"` with the vicuna system prompt.
    VicunaV1,
    /// Stage 1 (projector alignment): `"<image>" + caption + "\n"`.
    Plain,
}

/// A tokenized sample, ready for the collator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    /// Token ids, with [`IMAGE_TOKEN_INDEX`] where `<image>` was.
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] except on assistant replies.
    pub labels: Vec<i64>,
    /// Whether the sample was cut to `max_len`.
    pub truncated: bool,
}

impl Tokenized {
    /// Number of positions that are trained on.
    pub fn num_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Checks a conversation and returns its turns ready for a template.
///
/// Rules (each violation is a [`BadSample`]): at least one gpt turn; turns
/// alternate human, gpt, human, ... starting with human (a trailing human turn
/// is allowed: it is masked like any instruction); at most one `<image>` tag,
/// never in a gpt turn; a tag only when the sample has an image. With an image
/// and no tag, `"<image>\n"` is prepended to the first human turn (as VILA's
/// `preprocess_multimodal` does). An existing tag stays where it is.
pub fn prepare_turns(sample: &Sample) -> Result<Vec<Turn>, BadSample> {
    let bad = |reason: String| BadSample::new(sample.id.clone(), reason);
    let turns = &sample.conversations;
    if turns.is_empty() {
        return Err(bad("empty conversation".into()));
    }
    if !turns.iter().any(|t| t.role == Role::Gpt) {
        return Err(bad("no assistant (gpt) turn".into()));
    }
    for (i, t) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { Role::Human } else { Role::Gpt };
        if t.role != expected {
            return Err(bad(format!(
                "turns must alternate human/gpt starting with human, but turn {i} is {}",
                role_name(t.role)
            )));
        }
    }
    let mut tags = 0;
    for (i, t) in turns.iter().enumerate() {
        let n = t.value.matches(IMAGE_TAG).count();
        if n > 0 && t.role == Role::Gpt {
            return Err(bad(format!("`{IMAGE_TAG}` tag in an assistant turn (turn {i})")));
        }
        tags += n;
    }
    if tags > 1 {
        return Err(bad(format!("{tags} `{IMAGE_TAG}` tags; only one image per sample is supported")));
    }
    let mut out = turns.clone();
    match (&sample.image, tags) {
        (None, 0) | (Some(_), 1) => {}
        (None, _) => return Err(bad(format!("`{IMAGE_TAG}` tag but the sample has no image"))),
        (Some(_), _) => out[0].value = format!("{IMAGE_TAG}\n{}", out[0].value),
    }
    Ok(out)
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Human => "human",
        Role::Gpt => "gpt",
    }
}

/// One piece of a prompt: text (which may hold `<image>`) or the EOS token,
/// with whether its tokens are targets.
enum Piece {
    Text { text: String, target: bool },
    Eos,
}

fn pieces(sample: &Sample, kind: TemplateKind) -> Result<Vec<Piece>, BadSample> {
    let turns = prepare_turns(sample)?;
    let bad = |reason: String| BadSample::new(sample.id.clone(), reason);
    let mut out = Vec::new();
    match kind {
        TemplateKind::VicunaV1 => {
            let [user, assistant] = VICUNA_V1_ROLES;
            let mut instruction = format!("{VICUNA_V1_SYSTEM}{VICUNA_V1_SEP}");
            for pair in turns.chunks(2) {
                instruction.push_str(&format!("{user}: {}{VICUNA_V1_SEP}", pair[0].value));
                if let Some(reply) = pair.get(1) {
                    instruction.push_str(&format!("{assistant}:"));
                    out.push(Piece::Text { text: std::mem::take(&mut instruction), target: false });
                    out.push(Piece::Text { text: format!(" {}", reply.value), target: true });
                    out.push(Piece::Eos);
                }
            }
            if !instruction.is_empty() {
                out.push(Piece::Text { text: instruction, target: false });
            }
        }
        TemplateKind::Plain => {
            if sample.image.is_none() {
                return Err(bad("the plain template needs an image".into()));
            }
            if turns.len() != 2 {
                return Err(bad(format!(
                    "the plain template needs exactly one human and one gpt turn, got {} turns",
                    turns.len()
                )));
            }
            out.push(Piece::Text { text: IMAGE_TAG.into(), target: false });
            out.push(Piece::Text { text: format!("{}{PLAIN_SEP}", turns[1].value), target: true });
        }
    }
    Ok(out)
}

/// The full prompt text of a sample, as LLaVA's `conv.get_prompt()` (vicuna_v1)
/// or `preprocess_plain` (plain) writes it, `<image>` included, BOS excluded.
pub fn render_prompt(sample: &Sample, kind: TemplateKind) -> Result<String, BadSample> {
    Ok(pieces(sample, kind)?
        .iter()
        .map(|p| match p {
            Piece::Text { text, .. } => text.as_str(),
            Piece::Eos => EOS_TOKEN,
        })
        .collect())
}

/// Tokenizes text without special tokens, with [`IMAGE_TOKEN_INDEX`] for
/// each `<image>` (LLaVA's `tokenizer_image_token`, BOS aside).
pub fn encode_with_image(text: &str, tok: &Tokenizer) -> tokenizers::Result<Vec<i64>> {
    let mut ids = Vec::new();
    for (i, chunk) in text.split(IMAGE_TAG).enumerate() {
        if i > 0 {
            ids.push(IMAGE_TOKEN_INDEX);
        }
        if !chunk.is_empty() {
            ids.extend(tok.encode(chunk, false)?.get_ids().iter().map(|&id| i64::from(id)));
        }
    }
    Ok(ids)
}

fn special_id(tok: &Tokenizer, token: &str, id: &str) -> Result<i64, BadSample> {
    tok.token_to_id(token)
        .map(i64::from)
        .ok_or_else(|| BadSample::new(id, format!("the tokenizer has no `{token}` token")))
}

/// Applies the template, tokenizes, masks the labels and truncates to `max_len`.
///
/// Errors (bad samples): the conversation rules of [`prepare_turns`], the
/// plain template's shape (an image and exactly one exchange), a tokenizer
/// without `<s>` (or `</s>` for vicuna_v1), no target token at all, and
/// truncation that leaves no answer token or removes the image.
pub fn tokenize(sample: &Sample, kind: TemplateKind, tok: &Tokenizer, max_len: usize) -> Result<Tokenized, BadSample> {
    let bad = |reason: String| BadSample::new(sample.id.clone(), reason);
    let pieces = pieces(sample, kind)?;
    let bos = special_id(tok, BOS_TOKEN, &sample.id)?;
    let eos = match kind {
        TemplateKind::VicunaV1 => Some(special_id(tok, EOS_TOKEN, &sample.id)?),
        TemplateKind::Plain => None,
    };
    let mut input_ids = vec![bos];
    let mut labels = vec![IGNORE_INDEX];
    for piece in &pieces {
        let (ids, target) = match piece {
            Piece::Text { text, target } => {
                (encode_with_image(text, tok).map_err(|e| bad(format!("tokenizer error: {e}")))?, *target)
            }
            Piece::Eos => (vec![eos.unwrap_or(IGNORE_INDEX)], true),
        };
        labels.extend(ids.iter().map(|&id| if target { id } else { IGNORE_INDEX }));
        input_ids.extend(ids);
    }
    if !labels.iter().any(|&l| l != IGNORE_INDEX) {
        return Err(bad("no answer token (empty reply)".into()));
    }
    let truncated = input_ids.len() > max_len;
    if truncated {
        input_ids.truncate(max_len);
        labels.truncate(max_len);
        if !labels.iter().any(|&l| l != IGNORE_INDEX) {
            return Err(bad(format!("text longer than max_length ({max_len}) leaves no answer token")));
        }
        if sample.image.is_some() && !input_ids.contains(&IMAGE_TOKEN_INDEX) {
            return Err(bad(format!("text longer than max_length ({max_len}) cuts off the image")));
        }
    }
    Ok(Tokenized { input_ids, labels, truncated })
}

/// Splits text the way [`build_word_tokenizer`]'s pre-tokenizer does, for
/// ASCII text: at whitespace, with each ASCII punctuation character on its own.
fn split_words(text: &'static str) -> impl Iterator<Item = &'static str> {
    text.split_whitespace().flat_map(|word| {
        let mut parts = Vec::new();
        let mut start = 0;
        for (i, c) in word.char_indices() {
            if c.is_ascii_punctuation() {
                if start < i {
                    parts.push(&word[start..i]);
                }
                parts.push(&word[i..i + 1]);
                start = i + 1;
            }
        }
        if start < word.len() {
            parts.push(&word[start..]);
        }
        parts
    })
}

/// The words the templates need in a word-level vocabulary: the vicuna_v1
/// system prompt split into words and punctuation, and the role names with
/// `":"`. Case as written (the tokenizer has no normalizer). No duplicates,
/// in order of first appearance.
pub fn template_words() -> Vec<&'static str> {
    let mut seen = HashSet::new();
    split_words(VICUNA_V1_SYSTEM).chain(VICUNA_V1_ROLES).chain([":"]).filter(|w| seen.insert(*w)).collect()
}

/// Builds a small word-level tokenizer (for the demo model and tests).
///
/// Vocabulary: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, then
/// [`template_words`], then `words`, without duplicates, in that order.
/// Each of `words` is split by the pre-tokenizer first, so `"dog."` adds
/// `"dog"` and `"."`.
///
/// - Pre-tokenizer: BERT's (split at whitespace, every punctuation character
///   on its own), so `"ASSISTANT:"` is `"ASSISTANT"`, `":"`.
/// - The four special tokens are added tokens, matched before
///   pre-tokenization, so `"reply</s>USER"` gives `"reply"`, `"</s>"`, `"USER"`.
/// - No normalizer: case matters. Unknown words map to `<unk>`.
/// - Post-processor: `"<s> $A"`, like LLaMA's, so `encode(text, true)`
///   starts with BOS; [`tokenize`] adds BOS itself and encodes without.
///
/// It saves to a standard `tokenizer.json` (`tok.save(path, false)`) that
/// `Tokenizer::from_file` and Python's `tokenizers` / `transformers` load.
pub fn build_word_tokenizer(words: &[&str]) -> Tokenizer {
    let specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN];
    let mut vocab: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut add = |w: &str| {
        if !w.is_empty() && seen.insert(w.to_string()) {
            vocab.push(w.to_string());
        }
    };
    for w in specials.iter().chain(template_words().iter()) {
        add(w);
    }
    for w in words {
        if specials.contains(w) {
            continue;
        }
        let mut pre = PreTokenizedString::from(*w);
        match BertPreTokenizer.pre_tokenize(&mut pre) {
            Ok(()) => {
                for (piece, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                    add(piece);
                }
            }
            Err(_) => add(w),
        }
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().enumerate().map(|(i, w)| (w, i as u32)).collect())
        .unk_token(UNK_TOKEN.to_string())
        .build()
        .expect("the vocabulary contains <unk>");
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN}:0 $A:0"))
        .expect("valid single template")
        .try_pair(format!("{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1"))
        .expect("valid pair template")
        .special_tokens(vec![(BOS_TOKEN, 1)])
        .build()
        .expect("valid post-processor");
    tok.with_post_processor(Some(post));
    tok.add_special_tokens(&specials.map(|s| AddedToken::from(s, true)));
    tok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const WORDS: &[&str] = &[
        "What", "is", "in", "the", "picture", "?", "A", "dog", ".", "color", "it", "Brown", "Describe", "image", "a",
        "on", "grass", "Hello", "Hi", "!", "How", "are", "you", "Fine", "thanks",
    ];

    fn tok() -> Tokenizer {
        build_word_tokenizer(WORDS)
    }

    fn turn(role: Role, value: &str) -> Turn {
        Turn { role, value: value.to_string() }
    }

    fn sample(image: bool, turns: &[(Role, &str)]) -> Sample {
        Sample {
            id: "s1".into(),
            image: image.then(|| PathBuf::from("images/dog.png")),
            conversations: turns.iter().map(|&(r, v)| turn(r, v)).collect(),
        }
    }

    fn two_turn() -> Sample {
        sample(
            true,
            &[
                (Role::Human, "<image>\nWhat is in the picture?"),
                (Role::Gpt, "A dog."),
                (Role::Human, "What color is it?"),
                (Role::Gpt, "Brown."),
            ],
        )
    }

    /// Expected (token, is_target) lists to ids and labels; "<image>" is -200.
    fn expected(tok: &Tokenizer, rows: &[(&str, bool)]) -> (Vec<i64>, Vec<i64>) {
        let ids: Vec<i64> = rows
            .iter()
            .map(|(t, _)| {
                if *t == IMAGE_TAG {
                    IMAGE_TOKEN_INDEX
                } else {
                    i64::from(tok.token_to_id(t).unwrap_or_else(|| panic!("`{t}` not in vocab")))
                }
            })
            .collect();
        let labels = rows.iter().zip(&ids).map(|((_, target), &id)| if *target { id } else { IGNORE_INDEX }).collect();
        (ids, labels)
    }

    const SYSTEM_TOKENS: &[&str] = &[
        "A",
        "chat",
        "between",
        "a",
        "curious",
        "user",
        "and",
        "an",
        "artificial",
        "intelligence",
        "assistant",
        ".",
        "The",
        "assistant",
        "gives",
        "helpful",
        ",",
        "detailed",
        ",",
        "and",
        "polite",
        "answers",
        "to",
        "the",
        "user",
        "'",
        "s",
        "questions",
        ".",
    ];

    #[test]
    fn vicuna_two_turn_token_by_token() {
        let tok = tok();
        let got = tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, 4096).unwrap();
        // Written by hand: 0 = masked, 1 = target.
        let mut rows: Vec<(&str, bool)> = vec![("<s>", false)];
        rows.extend(SYSTEM_TOKENS.iter().map(|t| (*t, false)));
        rows.extend([
            ("USER", false),
            (":", false),
            ("<image>", false),
            ("What", false),
            ("is", false),
            ("in", false),
            ("the", false),
            ("picture", false),
            ("?", false),
            ("ASSISTANT", false),
            (":", false),
            ("A", true),
            ("dog", true),
            (".", true),
            ("</s>", true),
            ("USER", false),
            (":", false),
            ("What", false),
            ("color", false),
            ("is", false),
            ("it", false),
            ("?", false),
            ("ASSISTANT", false),
            (":", false),
            ("Brown", true),
            (".", true),
            ("</s>", true),
        ]);
        let (ids, labels) = expected(&tok, &rows);
        assert_eq!(got.input_ids, ids);
        assert_eq!(got.labels, labels);
        assert!(!got.truncated);
        assert_eq!(got.num_targets(), 7);
        // Ids of the special tokens are the fixed ones.
        assert_eq!(got.input_ids[0], 1);
        assert_eq!(*got.input_ids.last().unwrap(), 2);
    }

    #[test]
    fn vicuna_prompt_text_is_llava_conv_vicuna_v1() {
        let prompt = render_prompt(&two_turn(), TemplateKind::VicunaV1).unwrap();
        assert_eq!(
            prompt,
            format!(
                "{VICUNA_V1_SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT: A dog.</s>\
                 USER: What color is it? ASSISTANT: Brown.</s>"
            )
        );
    }

    /// The pieces tokenized separately give the same ids as LLaVA's
    /// `tokenizer_image_token` on the whole prompt (for this tokenizer).
    #[test]
    fn piecewise_ids_equal_full_prompt_tokenization() {
        let tok = tok();
        for s in [
            two_turn(),
            sample(false, &[(Role::Human, "Hello!"), (Role::Gpt, "Hi!"), (Role::Human, "How are you?")]),
            sample(true, &[(Role::Human, "Describe the image."), (Role::Gpt, "A dog on grass.")]),
        ] {
            for kind in [TemplateKind::VicunaV1, TemplateKind::Plain] {
                let Ok(got) = tokenize(&s, kind, &tok, 4096) else { continue };
                let prompt = render_prompt(&s, kind).unwrap();
                let mut full = vec![i64::from(tok.token_to_id(BOS_TOKEN).unwrap())];
                full.extend(encode_with_image(&prompt, &tok).unwrap());
                assert_eq!(got.input_ids, full, "{kind:?} {prompt:?}");
                // And the same as the tokenizer with its post-processor, where there is no image.
                if !prompt.contains(IMAGE_TAG) {
                    let enc = tok.encode(prompt.as_str(), true).unwrap();
                    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
                    assert_eq!(got.input_ids, ids);
                }
            }
        }
    }

    #[test]
    fn plain_template() {
        let tok = tok();
        let s = sample(true, &[(Role::Human, "Describe the image.\n<image>"), (Role::Gpt, "A dog on grass.")]);
        assert_eq!(render_prompt(&s, TemplateKind::Plain).unwrap(), "<image>A dog on grass.\n");
        let got = tokenize(&s, TemplateKind::Plain, &tok, 4096).unwrap();
        let (ids, labels) = expected(
            &tok,
            &[
                ("<s>", false),
                ("<image>", false),
                ("A", true),
                ("dog", true),
                ("on", true),
                ("grass", true),
                (".", true),
            ],
        );
        assert_eq!(got.input_ids, ids);
        assert_eq!(got.labels, labels);
        // No image tag in the data: prepended, then replaced the same way.
        let s = sample(true, &[(Role::Human, "Describe the image."), (Role::Gpt, "A dog.")]);
        let got = tokenize(&s, TemplateKind::Plain, &tok, 4096).unwrap();
        assert_eq!(&got.input_ids[..2], &[1, IMAGE_TOKEN_INDEX]);
    }

    #[test]
    fn plain_template_refuses_text_only_and_multi_turn() {
        let tok = tok();
        let text_only = sample(false, &[(Role::Human, "Hello"), (Role::Gpt, "Hi")]);
        let err = tokenize(&text_only, TemplateKind::Plain, &tok, 4096).unwrap_err();
        assert!(err.reason.contains("needs an image"), "{err}");
        let err = tokenize(&two_turn(), TemplateKind::Plain, &tok, 4096).unwrap_err();
        assert!(err.reason.contains("exactly one human and one gpt turn"), "{err}");
    }

    #[test]
    fn text_only_sample_has_no_image_token() {
        let tok = tok();
        let s = sample(false, &[(Role::Human, "Hello!"), (Role::Gpt, "Hi!")]);
        let got = tokenize(&s, TemplateKind::VicunaV1, &tok, 4096).unwrap();
        assert!(!got.input_ids.contains(&IMAGE_TOKEN_INDEX));
        let mut rows: Vec<(&str, bool)> = vec![("<s>", false)];
        rows.extend(SYSTEM_TOKENS.iter().map(|t| (*t, false)));
        rows.extend([
            ("USER", false),
            (":", false),
            ("Hello", false),
            ("!", false),
            ("ASSISTANT", false),
            (":", false),
            ("Hi", true),
            ("!", true),
            ("</s>", true),
        ]);
        let (ids, labels) = expected(&tok, &rows);
        assert_eq!((got.input_ids, got.labels), (ids, labels));
    }

    #[test]
    fn multi_turn_masks_every_instruction_and_a_trailing_question() {
        let tok = tok();
        let s = sample(
            false,
            &[
                (Role::Human, "Hello"),
                (Role::Gpt, "Hi"),
                (Role::Human, "How are you?"),
                (Role::Gpt, "Fine, thanks."),
                (Role::Human, "What is it?"),
            ],
        );
        let got = tokenize(&s, TemplateKind::VicunaV1, &tok, 4096).unwrap();
        let targets: Vec<String> =
            got.labels.iter().filter(|&&l| l != IGNORE_INDEX).map(|&l| tok.id_to_token(l as u32).unwrap()).collect();
        assert_eq!(targets, ["Hi", "</s>", "Fine", ",", "thanks", ".", "</s>"]);
        // The trailing human turn is in the input, masked.
        let tail: Vec<String> =
            got.input_ids[got.input_ids.len() - 6..].iter().map(|&id| tok.id_to_token(id as u32).unwrap()).collect();
        assert_eq!(tail, ["USER", ":", "What", "is", "it", "?"]);
        assert!(got.labels[got.labels.len() - 6..].iter().all(|&l| l == IGNORE_INDEX));
    }

    #[test]
    fn image_tag_is_prepended_when_missing() {
        let tok = tok();
        let s = sample(true, &[(Role::Human, "What is in the picture?"), (Role::Gpt, "A dog.")]);
        let turns = prepare_turns(&s).unwrap();
        assert_eq!(turns[0].value, "<image>\nWhat is in the picture?");
        let got = tokenize(&s, TemplateKind::VicunaV1, &tok, 4096).unwrap();
        assert_eq!(got.input_ids.iter().filter(|&&i| i == IMAGE_TOKEN_INDEX).count(), 1);
        // Same ids as a sample that has the tag already.
        let tagged = sample(true, &[(Role::Human, "<image>\nWhat is in the picture?"), (Role::Gpt, "A dog.")]);
        assert_eq!(got, tokenize(&tagged, TemplateKind::VicunaV1, &tok, 4096).unwrap());
        // A tag in a later human turn stays there.
        let later = sample(
            true,
            &[(Role::Human, "Hello"), (Role::Gpt, "Hi"), (Role::Human, "<image> What is it?"), (Role::Gpt, "A dog.")],
        );
        assert_eq!(prepare_turns(&later).unwrap(), later.conversations);
    }

    #[test]
    fn image_tag_errors() {
        let two_tags = sample(true, &[(Role::Human, "<image> <image> What?"), (Role::Gpt, "A dog.")]);
        assert!(prepare_turns(&two_tags).unwrap_err().reason.contains("2 `<image>` tags"));
        let no_image = sample(false, &[(Role::Human, "<image>\nWhat?"), (Role::Gpt, "A dog.")]);
        assert!(prepare_turns(&no_image).unwrap_err().reason.contains("no image"));
        let in_reply = sample(true, &[(Role::Human, "What?"), (Role::Gpt, "<image>")]);
        assert!(prepare_turns(&in_reply).unwrap_err().reason.contains("assistant turn"));
    }

    #[test]
    fn truncation_is_recorded() {
        let tok = tok();
        let full = tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, 4096).unwrap();
        // Cut in the middle of the second reply: "Brown" stays, "." and "</s>" go.
        let max_len = full.input_ids.len() - 2;
        let got = tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, max_len).unwrap();
        assert!(got.truncated);
        assert_eq!(got.input_ids, full.input_ids[..max_len]);
        assert_eq!(got.labels, full.labels[..max_len]);
        assert_eq!(got.num_targets(), 5);
        // Exactly at the limit is not truncation.
        let exact = tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, full.input_ids.len()).unwrap();
        assert!(!exact.truncated);
    }

    #[test]
    fn truncation_that_removes_all_answers_is_bad() {
        let tok = tok();
        // BOS + 29 system tokens + "USER", ":", <image>, 6 question tokens + "ASSISTANT", ":" = 41.
        let err = tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, 41).unwrap_err();
        assert_eq!(err.id, "s1");
        assert!(err.reason.contains("text longer than max_length (41) leaves no answer token"), "{err}");
        let ok = tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, 42).unwrap();
        assert_eq!(ok.num_targets(), 1);
        assert!(ok.truncated);
        assert!(tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, 0).is_err());
    }

    #[test]
    fn no_assistant_turn_is_bad() {
        let tok = tok();
        let s = sample(true, &[(Role::Human, "What is in the picture?")]);
        let err = tokenize(&s, TemplateKind::VicunaV1, &tok, 4096).unwrap_err();
        assert!(err.reason.contains("no assistant"), "{err}");
        let s = sample(false, &[(Role::Gpt, "Hi"), (Role::Human, "Hello")]);
        let err = tokenize(&s, TemplateKind::VicunaV1, &tok, 4096).unwrap_err();
        assert!(err.reason.contains("alternate"), "{err}");
        let s = sample(false, &[]);
        assert!(tokenize(&s, TemplateKind::VicunaV1, &tok, 4096).unwrap_err().reason.contains("empty"));
    }

    #[test]
    fn empty_plain_reply_is_bad() {
        let tok = tok();
        let s = sample(true, &[(Role::Human, "<image>"), (Role::Gpt, "")]);
        let err = tokenize(&s, TemplateKind::Plain, &tok, 4096).unwrap_err();
        assert!(err.reason.contains("no answer token"), "{err}");
    }

    #[test]
    fn template_kind_serde_names() {
        assert_eq!(serde_json::to_string(&TemplateKind::VicunaV1).unwrap(), "\"vicuna_v1\"");
        assert_eq!(serde_json::to_string(&TemplateKind::Plain).unwrap(), "\"plain\"");
        assert_eq!(serde_json::from_str::<TemplateKind>("\"vicuna_v1\"").unwrap(), TemplateKind::VicunaV1);
    }

    #[test]
    fn word_tokenizer_layout() {
        let tok = tok();
        for (i, s) in [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN].iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some(i as u32));
        }
        let words = template_words();
        assert_eq!(words[..3], ["A", "chat", "between"]);
        for w in ["USER", "ASSISTANT", ":", "user", "'", "s", "questions", ",", "."] {
            assert!(words.contains(&w), "{w}");
        }
        assert_eq!(words.len(), words.iter().collect::<HashSet<_>>().len());
        // "dog." in the word list adds "dog" (once) and ".".
        let t = build_word_tokenizer(&["dog.", "dog", "<s>"]);
        assert_eq!(t.get_vocab_size(true), 4 + words.len() + 1);
        let enc = t.encode("ASSISTANT: dog.</s>USER: cat", false).unwrap();
        assert_eq!(enc.get_tokens(), ["ASSISTANT", ":", "dog", ".", "</s>", "USER", ":", "<unk>"]);
        let enc = t.encode("dog", true).unwrap();
        assert_eq!(enc.get_ids(), [1, t.token_to_id("dog").unwrap()]);
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
    }

    fn to_i64(v: &serde_json::Value) -> Vec<i64> {
        v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
    }

    /// Compares with LLaVA's own code run by Python on the same tokenizer.json
    /// (tools/make_template_fixtures.py wrote template_reference.json). Input
    /// ids are identical; the labels differ only where LLaVA's `- 2` length
    /// arithmetic (made for LLaMA's sentencepiece) leaves the `":"` after
    /// `ASSISTANT` as a target with a word-level tokenizer: one position per
    /// round, which we mask.
    #[test]
    fn matches_llava_reference() {
        let built = tok();
        let path = fixture("word_tokenizer.json");
        if std::env::var_os("TESSERA_WRITE_TEMPLATE_FIXTURES").is_some() {
            built.save(&path, true).unwrap();
        }
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(
            tok.get_vocab(true),
            built.get_vocab(true),
            "word_tokenizer.json is stale: regenerate it (see tools/make_template_fixtures.py)"
        );
        let text = std::fs::read_to_string(fixture("template_reference.json")).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Python `tokenizers` on the same file gives the same ids.
        let enc = &reference["encode"];
        let text = enc["text"].as_str().unwrap();
        for (special, key) in [(true, "ids_with_special_tokens"), (false, "ids_without_special_tokens")] {
            let ids: Vec<i64> = tok.encode(text, special).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect();
            assert_eq!(ids, to_i64(&enc[key]), "{key}");
        }
        let colon = i64::from(tok.token_to_id(":").unwrap());
        let assistant = i64::from(tok.token_to_id("ASSISTANT").unwrap());
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        for case in cases {
            let kind: TemplateKind = serde_json::from_value(case["kind"].clone()).unwrap();
            let conversations: Vec<Turn> = case["conversations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| Turn {
                    role: if t["from"] == "human" { Role::Human } else { Role::Gpt },
                    value: t["value"].as_str().unwrap().to_string(),
                })
                .collect();
            let replies = conversations.iter().filter(|t| t.role == Role::Gpt).count();
            let s = Sample {
                id: case["name"].as_str().unwrap().to_string(),
                image: case["image"].as_bool().unwrap().then(|| PathBuf::from("x.png")),
                conversations,
            };
            assert_eq!(render_prompt(&s, kind).unwrap(), case["prompt"].as_str().unwrap(), "{}", s.id);
            let got = tokenize(&s, kind, &tok, 4096).unwrap();
            assert_eq!(got.input_ids, to_i64(&case["input_ids"]), "{}", s.id);
            let llava = to_i64(&case["llava_labels"]);
            assert_eq!(got.labels.len(), llava.len());
            let diffs: Vec<usize> = (0..llava.len()).filter(|&i| got.labels[i] != llava[i]).collect();
            for &i in &diffs {
                assert_eq!(
                    (got.labels[i], llava[i], got.input_ids[i - 1]),
                    (IGNORE_INDEX, colon, assistant),
                    "{}",
                    s.id
                );
            }
            let expected = if kind == TemplateKind::VicunaV1 { replies } else { 0 };
            assert_eq!(diffs.len(), expected, "{}", s.id);
        }
    }

    #[test]
    fn word_tokenizer_json_round_trip() {
        let tok = tok();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path, false).unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.get_vocab(true), tok.get_vocab(true));
        let text = "USER: What is in the picture? ASSISTANT: A dog.</s> zebra";
        for special in [false, true] {
            assert_eq!(loaded.encode(text, special).unwrap().get_ids(), tok.encode(text, special).unwrap().get_ids());
        }
        assert_eq!(
            tokenize(&two_turn(), TemplateKind::VicunaV1, &loaded, 4096).unwrap(),
            tokenize(&two_turn(), TemplateKind::VicunaV1, &tok, 4096).unwrap()
        );
    }
}
