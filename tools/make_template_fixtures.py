#!/usr/bin/env python3
"""Reference token ids and label masks for worker/src/data/template.rs.

Loads the word-level tokenizer.json that the Rust test suite writes
(job/tests/fixtures/data/word_tokenizer.json; regenerate it with
`TESSERA_WRITE_TEMPLATE_FIXTURES=1 cargo test -p tessera-job --lib data::template`)
and applies LLaVA's own code to a few samples: `conv_vicuna_v1.get_prompt()`,
`tokenizer_image_token`, `preprocess_v1` (the label length arithmetic) and
`preprocess_plain`, re-typed here from LLaVA 1.5 (llava/train/train.py,
llava/mm_utils.py, llava/conversation.py) so that no LLaVA install is needed.
It also records what Python `tokenizers` gives for one string.

Writes job/tests/fixtures/data/template_reference.json, which the Rust
test `template::tests::matches_llava_reference` compares against. No network.

Usage: python3 tools/make_template_fixtures.py
"""

import json
import os

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "job", "tests", "fixtures", "data")

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
SEP, SEP2 = " ", "</s>"

CASES = [
    {
        "name": "two_turn_image",
        "kind": "vicuna_v1",
        "image": True,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": "Brown."},
        ],
    },
    {
        "name": "text_only_two_turn",
        "kind": "vicuna_v1",
        "image": False,
        "conversations": [
            {"from": "human", "value": "Hello!"},
            {"from": "gpt", "value": "Hi!"},
            {"from": "human", "value": "How are you?"},
            {"from": "gpt", "value": "Fine, thanks."},
        ],
    },
    {
        "name": "plain",
        "kind": "plain",
        "image": True,
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": "A dog on grass."},
        ],
    },
]


def vicuna_prompt(conversations):
    # conv_vicuna_v1, SeparatorStyle.TWO
    ret = SYSTEM + SEP
    for i, t in enumerate(conversations):
        role, message = ROLES[t["from"]], t["value"]
        if message:
            ret += role + ": " + message + [SEP, SEP2][i % 2]
        else:
            ret += role + ":"
    return ret


def tokenizer_image_token(prompt, tokenizer):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def preprocess_v1(conversation, tokenizer, has_image):
    if has_image:
        input_ids = tokenizer_image_token(conversation, tokenizer)
    else:
        input_ids = tokenizer(conversation).input_ids
    target = list(input_ids)
    sep = SEP + ROLES["gpt"] + ": "
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    rounds = conversation.split(SEP2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        # (LLaVA's `not tokenizer.legacy` branch is for sentencepiece LLaMA tokenizers only.)
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_INDEX] * (end - cur_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    assert cur_len == total_len, f"tokenization mismatch: {cur_len} vs. {total_len}"
    return input_ids, target


def preprocess_plain(conversations, tokenizer):
    assert len(conversations) == 2 and "<image>" in conversations[0]["value"]
    first = "<image>"
    prompt = first + conversations[1]["value"] + "\n"
    input_ids = tokenizer_image_token(prompt, tokenizer)
    target = list(input_ids)
    n = len(tokenizer_image_token(first, tokenizer))
    target[:n] = [IGNORE_INDEX] * n
    return prompt, input_ids, target


def main():
    path = os.path.join(FIXTURES, "word_tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=path, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    out = {"cases": []}
    for case in CASES:
        if case["kind"] == "vicuna_v1":
            prompt = vicuna_prompt(case["conversations"])
            input_ids, labels = preprocess_v1(prompt, tokenizer, case["image"])
        else:
            prompt, input_ids, labels = preprocess_plain(case["conversations"], tokenizer)
        out["cases"].append(dict(case, prompt=prompt, input_ids=input_ids, llava_labels=labels))

    text = "USER: What is in the picture? ASSISTANT: A dog.</s> zebra"
    raw = Tokenizer.from_file(path)
    out["encode"] = {
        "text": text,
        "ids_with_special_tokens": raw.encode(text).ids,
        "ids_without_special_tokens": raw.encode(text, add_special_tokens=False).ids,
        "tokens": raw.encode(text).tokens,
    }
    dest = os.path.join(FIXTURES, "template_reference.json")
    with open(dest, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", dest)


if __name__ == "__main__":
    main()
