#!/usr/bin/env python3
"""Prints the step-time table of scripts/device-check.sh as Markdown.

Reads the JSON line of `worker bench-step` (Tessera) and, when given, the
summary line of tools/bench_step_torch.py (PyTorch) for the same shape, and
prints per implementation: step time, LLM tokens/s, images/s, MFU, and the
ratio of PyTorch's step time to Tessera's (> 1: Tessera is faster).

MFU = model FLOPs of the step / step time / peak. The FLOPs come from
Tessera's JSON (worker/src/model/flops.rs: every GEMM and attention product,
forward once and backward twice) and serve both rows, so the ratio of the
MFUs is the ratio of the speeds. The peak defaults to 989 TFLOP/s, H100 SXM
dense bf16, for every row, TF32 or not.

Usage: tools/step_table.py [--peak-tflops 989] TESSERA.json [PYTORCH.json]
"""

import argparse
import json
import sys

# Fields that must agree for the two rows to time the same step.
SAME_SHAPE = [("batch", "batch"), ("text_tokens", "text_tokens"), ("llm_layers", "llm_layers"),
              ("vit_layers", "vit_layers_count"), ("llm_tokens_per_step", "llm_tokens_per_step"),
              ("images_per_step", "images_per_step"), ("tiles_per_step", "tiles_per_step")]


def load(path):
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"error: {path} holds no JSON line")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("tessera")
    ap.add_argument("pytorch", nargs="?")
    a = ap.parse_args()
    ours = load(a.tessera)
    flops = ours["model_flops_per_step"]
    rows = [("tessera", ours, f"{ours['device']} {ours['precision']}")]
    if a.pytorch:
        peer = load(a.pytorch)
        for k_ours, k_peer in SAME_SHAPE:
            if ours.get(k_ours) != peer.get(k_peer):
                sys.exit(f"error: the two runs differ in {k_ours}: tessera {ours.get(k_ours)}, pytorch {peer.get(k_peer)}")
        rows.append(("pytorch", peer, f"{peer.get('device')} {peer.get('dtype')} {peer.get('attn', '')} adamw {peer.get('adamw', '')}"))
    print(f"shape: preset {ours['preset']}, batch {ours['batch']}, text tokens {ours['text_tokens']}, "
          f"ViT layers {ours['vit_layers']}, LLM layers {ours['llm_layers']}; "
          f"{flops / 1e12:.2f} model TFLOP per step; peak {a.peak_tflops:g} TFLOP/s")
    print()
    print("| impl | setting | step (s) | LLM tokens/s | images/s | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r, setting in rows:
        s = r["step_s_median"]
        mfu = flops / s / (a.peak_tflops * 1e12)
        print(f"| {name} | {setting} | {s:.4f} | {ours['llm_tokens_per_step'] / s:.0f} | "
              f"{ours['images_per_step'] / s:.2f} | {100 * mfu:.1f}% |")
    if len(rows) == 2:
        print()
        print(f"ratio pytorch / tessera step time: {rows[1][1]['step_s_median'] / ours['step_s_median']:.2f} "
              f"(> 1: Tessera is faster)")


if __name__ == "__main__":
    main()
