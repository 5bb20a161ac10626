#!/usr/bin/env python3
"""Check that Hugging Face transformers reads a Tessera-written model directory.

Manual check (python is not part of CI). Loads DIR/vision_tower/config.json
with SiglipVisionConfig and DIR/llm/config.json with LlamaConfig and checks
that transformers sees the same numbers as the raw JSON; checks the top-level
VILA config.json for consistency; and, when the safetensors files are present
(skip with --no-weights), loads SiglipVisionModel and LlamaForCausalLM from
them and requires no missing or unexpected tensors.

A directory to check can be written by the worker's ignored test:

  TESSERA_WRITE_MODEL_DIR=/tmp/tessera-model [TESSERA_PRESET=tiny] \
    cargo test -p tessera-worker --lib write_model_dir_for_python -- --ignored
  python3 tools/check_hf_config.py /tmp/tessera-model

Exit status 0 when everything agrees.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from transformers import LlamaConfig, SiglipVisionConfig

FAILURES = []


def check(what, got, want):
    ok = math.isclose(got, want, rel_tol=1e-7) if isinstance(want, float) else got == want
    if not ok:
        FAILURES.append(f"{what}: transformers has {got!r}, the file says {want!r}")


def load_json(path):
    with open(path) as f:
        return json.load(f)


def check_vision(d):
    raw = load_json(d / "vision_tower" / "config.json")
    cfg = SiglipVisionConfig.from_pretrained(d / "vision_tower")
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_channels", "image_size", "patch_size", "layer_norm_eps", "hidden_act"]:
        check(f"vision_tower.{key}", getattr(cfg, key), raw[key])
    check("vision_tower.model_type", cfg.model_type, "siglip_vision_model")
    return cfg


def check_llm(d):
    raw = load_json(d / "llm" / "config.json")
    cfg = LlamaConfig.from_pretrained(d / "llm")
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
                "bos_token_id", "eos_token_id"]:
        check(f"llm.{key}", getattr(cfg, key), raw[key])
    # transformers 5 keeps RoPE settings in rope_parameters; 4 in rope_theta.
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    want_theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
    check("llm.rope_theta", float(theta), float(want_theta))
    check("llm.rope_type", rope.get("rope_type", "default"), "default")
    check("llm.head_dim", getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
          cfg.hidden_size // cfg.num_attention_heads)
    return cfg


def check_top(d, vision, llm):
    top = load_json(d / "config.json")
    scales = top["s2_scales"]
    scales = [int(s) for s in scales.split(",")] if isinstance(scales, str) else list(scales)
    check("config.s2_scales[0] == image_size", scales[0], vision.image_size)
    check("config.s2_max_split_size", top["s2_max_split_size"], vision.image_size)
    check("config.mm_hidden_size", top["mm_hidden_size"], vision.hidden_size * len(scales))
    check("config.hidden_size", top["hidden_size"], llm.hidden_size)
    check("config.mm_projector_type", top["mm_projector_type"], "mlp_downsample")
    proj = load_json(d / "mm_projector" / "config.json")
    check("mm_projector.mm_projector_type", proj["mm_projector_type"], "mlp_downsample")
    return scales


def check_weights(d, vision, llm, scales):
    import torch
    from safetensors import safe_open
    from transformers import LlamaForCausalLM, SiglipVisionModel

    for name, cls in [("vision_tower", SiglipVisionModel), ("llm", LlamaForCausalLM)]:
        model, info = cls.from_pretrained(d / name, output_loading_info=True, dtype=torch.float32)
        for kind in ["missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"]:
            bad = info.get(kind) or []
            if bad:
                FAILURES.append(f"{name}: {kind} when transformers loads the weights: {sorted(bad)[:8]}")
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {cls.__name__} loaded, {n} parameters")
        del model

    mm_in, h = 4 * vision.hidden_size * len(scales), llm.hidden_size
    want = {"layers.1.weight": [mm_in], "layers.1.bias": [mm_in], "layers.2.weight": [h, mm_in],
            "layers.2.bias": [h], "layers.4.weight": [h, h], "layers.4.bias": [h]}
    with safe_open(d / "mm_projector" / "model.safetensors", "pt") as f:
        got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    check("mm_projector tensors", got, want)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--no-weights", action="store_true", help="check the config files only")
    args = ap.parse_args()
    d = args.model_dir
    vision = check_vision(d)
    llm = check_llm(d)
    scales = check_top(d, vision, llm)
    print(f"vision_tower: {vision.num_hidden_layers} x {vision.hidden_size}, image {vision.image_size}, "
          f"patch {vision.patch_size}; llm: {llm.num_hidden_layers} x {llm.hidden_size}, vocab {llm.vocab_size}; "
          f"s2_scales {scales}")
    has_weights = (d / "vision_tower" / "model.safetensors").exists()
    if not args.no_weights and has_weights:
        check_weights(d, vision, llm, scales)
    if FAILURES:
        print("FAILED:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)
    print("OK: transformers reads", d)


if __name__ == "__main__":
    main()
