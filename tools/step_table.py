#!/usr/bin/env python3
"""Prints the step-time table of scripts/device-check.sh as Markdown.

Reads the JSON line of one or more `worker bench-step` runs (Tessera, e.g.
bf16 and TF32 GEMMs) and, when given, the summary line of
tools/bench_step_torch.py (PyTorch) for the same shape, and prints per run:
step time, LLM tokens/s, images/s, MFU, peak GPU memory, and for each
Tessera run the ratio of PyTorch's step time to its own (> 1: Tessera is
faster).

MFU = model FLOPs of the step / step time / peak. The FLOPs come from
Tessera's JSON (worker/src/model/flops.rs: every GEMM and attention product,
forward once and backward twice) and serve every row, so the ratio of the
MFUs is the ratio of the speeds. The peak defaults to 989 TFLOP/s, H100 SXM
dense bf16, for every row, TF32 or not.

Usage: tools/step_table.py [--peak-tflops 989] TESSERA.json [TESSERA.json ...] [--pytorch PYTORCH.json]
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
    ap.add_argument("--pytorch", help="the JSON of tools/bench_step_torch.py for the same shape")
    ap.add_argument("tessera", nargs="+", help="the JSON line of each `worker bench-step` run")
    a = ap.parse_args()
    ours = [load(path) for path in a.tessera]
    first = ours[0]
    for path, other in zip(a.tessera[1:], ours[1:]):
        for k, _ in SAME_SHAPE:
            if other.get(k) != first.get(k):
                sys.exit(f"error: {path} differs from {a.tessera[0]} in {k}: {other.get(k)} against {first.get(k)}")
    flops = first["model_flops_per_step"]
    rows = [("tessera", r, f"{r['device']} {r['precision']}") for r in ours]
    peer = None
    if a.pytorch:
        peer = load(a.pytorch)
        for k_ours, k_peer in SAME_SHAPE:
            if first.get(k_ours) != peer.get(k_peer):
                sys.exit(f"error: the runs differ in {k_ours}: tessera {first.get(k_ours)}, pytorch {peer.get(k_peer)}")
        rows.append(("pytorch", peer, f"{peer.get('device')} {peer.get('dtype')} {peer.get('attn', '')} adamw {peer.get('adamw', '')}"))
    print(f"shape: preset {first['preset']}, batch {first['batch']}, text tokens {first['text_tokens']}, "
          f"ViT layers {first['vit_layers']}, LLM layers {first['llm_layers']}; "
          f"{flops / 1e12:.2f} model TFLOP per step; peak {a.peak_tflops:g} TFLOP/s")
    print()
    print("| impl | setting | step (s) | LLM tokens/s | images/s | MFU | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r, setting in rows:
        s = r["step_s_median"]
        mfu = flops / s / (a.peak_tflops * 1e12)
        # Tessera: its memory pool's high-water mark; PyTorch: max_memory_allocated.
        mem = r.get("peak_mem_gib")
        print(f"| {name} | {setting} | {s:.4f} | {first['llm_tokens_per_step'] / s:.0f} | "
              f"{first['images_per_step'] / s:.2f} | {100 * mfu:.1f}% | {'-' if mem is None else f'{mem:.1f}'} |")
    if peer is not None:
        print()
        for r in ours:
            print(f"ratio pytorch / tessera ({r['precision']}) step time: "
                  f"{peer['step_s_median'] / r['step_s_median']:.2f} (> 1: Tessera is faster)")


if __name__ == "__main__":
    main()
