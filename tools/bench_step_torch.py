#!/usr/bin/env python3
"""Time one full training step of Tessera's `small` preset in PyTorch on CPU.

The PyTorch peer of `worker bench-step --preset small` (worker/src/main.rs):
the same model, batch shape and step, written with PyTorch + Hugging Face
transformers, in float32, so that tools/bench_cpu_step.sh can compare the two
at the same thread count.

Model (ModelConfig::small(), worker/src/model/config.rs; DESIGN.md 1-2):
  SiglipVisionModel   hidden 256, intermediate 1024, 7 layers, 4 heads,
                      image 224, patch 14 (16x16 grid), gelu_pytorch_tanh
  S2                  scales [224, 448], max split 224: per image the 448
                      input bicubic-resized to 224 (1 tile) + a 2x2
                      chessboard split (4 tiles); all B*5 tiles through the
                      ViT in one batch; hidden_states[-2]; merge, area pool,
                      concat channels -> [B, 256, 512]
  mlp_downsample      DownSampleBlock 16x16 -> 8x8 = 64 tokens of 2048,
                      LayerNorm(2048), Linear(2048,512), GELU, Linear(512,512)
  LlamaForCausalLM    hidden 512, intermediate 1376, 6 layers, 8 heads,
                      vocab 32000, untied lm_head
Batch (Batch::synthetic): B samples of T text tokens with one image
placeholder (at index min(b % 3, T-2)), so the LLM sees T - 1 + 64 tokens;
labels on text positions t >= T/2. Pixels uniform in [-1, 1] at 448x448.
Step: zero grads, forward, loss (mean next-token CE), backward into every
parameter (ViT unfrozen), clip the global grad norm to 1.0 (Tessera's
OptimConfig::default() does the same; --no-clip turns it off), AdamW(lr=1e-4,
weight_decay=0, default foreach implementation).

Variants measured (each in its own subprocess, so peak RSS is per variant):
  attn eager / sdpa    the SigLIP and LLaMA attention implementation
  vit_layers all       stock VILA/HF: all 7 ViT layers run, hidden_states[-2]
  vit_layers used      the ViT truncated to the 6 layers the output depends
                       on (what Tessera computes); same function, less work
By default: eager+all, sdpa+all, then the faster attention with vit_layers
used. One JSON line per variant, then a final summary line whose
`step_s_median` is the peer: the faster attention with the stock model
(vit_layers all), as specified for the benchmark.

Usage:
  python3 tools/bench_step_torch.py --threads 2 [--batch 8 --seq 32 --warmup 1 --steps 3]
  python3 tools/bench_step_torch.py --threads 2 --attn sdpa --vit-layers all   # one variant
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

# ModelConfig::small()
VIT = dict(hidden=256, intermediate=1024, layers=7, heads=4, image=224, patch=14)
S2_SCALES = [224, 448]
S2_MAX_SPLIT = 224
SELECT_LAYER = -2
LLM = dict(hidden=512, intermediate=1376, layers=6, heads=8, kv_heads=8, vocab=32000)


def build(args):
    import torch
    import torch.nn as nn
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    vcfg = SiglipVisionConfig(
        hidden_size=VIT["hidden"],
        intermediate_size=VIT["intermediate"],
        num_hidden_layers=VIT["layers"],
        num_attention_heads=VIT["heads"],
        num_channels=3,
        image_size=VIT["image"],
        patch_size=VIT["patch"],
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
        attn_implementation=args.attn,
    )
    lcfg = LlamaConfig(
        hidden_size=LLM["hidden"],
        intermediate_size=LLM["intermediate"],
        num_hidden_layers=LLM["layers"],
        num_attention_heads=LLM["heads"],
        num_key_value_heads=LLM["kv_heads"],
        vocab_size=LLM["vocab"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attn_implementation=args.attn,
    )

    class DownSampleBlock(nn.Module):
        """VILA 1.5's DownSampleBlock (as in tools/make_fixtures.py)."""

        def forward(self, x):
            h = w = int(x.shape[1] ** 0.5)
            # The S2 output is a transposed view; an even grid skips the
            # padding concat that would make it contiguous, so copy here.
            x = x.reshape(x.shape[0], h, w, -1).contiguous()
            n, w, h, c = x.size()
            if w % 2 == 1:
                x = torch.concat([x, x.new_zeros((n, 1, h, c))], dim=1).contiguous()
                n, w, h, c = x.size()
            if h % 2 == 1:
                x = torch.concat([x, x.new_zeros((n, w, 1, c))], dim=2).contiguous()
                n, w, h, c = x.size()
            x = x.view(n, w, h // 2, c * 2)
            x = x.permute(0, 2, 1, 3).contiguous()
            x = x.view(n, h // 2, w // 2, c * 4)
            return x.reshape(x.shape[0], -1, x.shape[-1])

    mm_hidden = VIT["hidden"] * len(S2_SCALES)
    proj = nn.Sequential(
        DownSampleBlock(),
        nn.LayerNorm(4 * mm_hidden),
        nn.Linear(4 * mm_hidden, LLM["hidden"]),
        nn.GELU(),
        nn.Linear(LLM["hidden"], LLM["hidden"]),
    )
    vit = SiglipVisionModel(vcfg)
    llm = LlamaForCausalLM(lcfg)
    assert vit.config._attn_implementation == args.attn, vit.config._attn_implementation
    assert llm.config._attn_implementation == args.attn, llm.config._attn_implementation
    select = SELECT_LAYER
    if args.vit_layers == "used":
        # Drop the layers after the selected one: hidden_states[-1] of the
        # truncated tower is hidden_states[-2] of the full one.
        enc = vit.vision_model.encoder if hasattr(vit, "vision_model") else vit.encoder
        keep = VIT["layers"] + 1 + SELECT_LAYER
        enc.layers = nn.ModuleList(list(enc.layers)[:keep])
        select = -1
    mods = (vit, proj, llm)
    for m in mods:
        m.to(torch.float32)
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
    return mods, select


def split_chessboard(x, n):
    import torch

    _, _, H, W = x.shape
    h, w = H // n, W // n
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)], dim=0)


def merge_chessboard(x, n):
    import torch

    b = x.shape[0] // (n * n)
    return torch.cat(
        [torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1) for i in range(n)],
        dim=-2,
    )


def s2_forward(vit, select, pixels):
    """s2wrapper.forward (output 'bnc'), with every scale's tiles in ONE ViT call."""
    import torch
    import torch.nn.functional as F

    B = pixels.shape[0]
    splits = [math.ceil(s / S2_MAX_SPLIT) for s in S2_SCALES]
    tiles = []
    with torch.no_grad():  # pixels are inputs: no gradient through the resize
        for size, n in zip(S2_SCALES, splits):
            x = pixels if size == pixels.shape[-1] else F.interpolate(
                pixels, size=(size, size), mode="bicubic", align_corners=False)
            tiles.append(split_chessboard(x, n))
    feats = vit(torch.cat(tiles, dim=0), output_hidden_states=True).hidden_states[select]  # [B*5, g*g, C]
    g = int(round(feats.shape[1] ** 0.5))
    maps, off = [], 0
    for n in splits:
        f = feats[off:off + n * n * B]
        off += n * n * B
        fmap = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], g, g)
        maps.append(merge_chessboard(fmap, n))
    out = torch.cat([F.interpolate(m, size=g, mode="area") for m in maps], dim=1)
    return out.flatten(2).transpose(1, 2)  # [B, g*g, C * n_scales]


def make_batch(batch, seq, gen):
    import torch

    pixels = torch.rand(batch, 3, S2_SCALES[-1], S2_SCALES[-1], generator=gen) * 2 - 1
    ids = torch.randint(1, LLM["vocab"], (batch, seq), generator=gen)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.int64)
    for b in range(batch):
        at = min(b % 3, max(seq - 2, 0))
        ids[b, at] = IMAGE_TOKEN_INDEX
        for t in range(seq):
            if t != at and t >= seq // 2:
                labels[b, t] = ids[b, t]
    return pixels, ids, labels


def step(mods, select, opt, params, batch, clip):
    import torch

    vit, proj, llm = mods
    pixels, ids, labels = batch
    opt.zero_grad(set_to_none=True)
    img = proj(s2_forward(vit, select, pixels))  # [B, 64, 512]
    embed = llm.get_input_embeddings()
    embeds, labs = [], []
    for b in range(ids.shape[0]):  # VILA prepare_inputs_labels_for_multimodal
        p = int((ids[b] == IMAGE_TOKEN_INDEX).nonzero()[0])
        embeds.append(torch.cat([embed(ids[b, :p]), img[b], embed(ids[b, p + 1:])], dim=0))
        labs.append(torch.cat([labels[b, :p], labels.new_full((img.shape[1],), IGNORE_INDEX), labels[b, p + 1:]]))
    out = llm(inputs_embeds=torch.stack(embeds), labels=torch.stack(labs))
    out.loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return out.loss.item(), out.logits.shape[1]


def run_one(args):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mods, select = build(args)
    params = [p for m in mods for p in m.parameters()]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batch = make_batch(args.batch, args.seq, gen)
    times, losses = [], []
    for i in range(args.warmup + max(args.steps, 1)):
        t0 = time.perf_counter()
        loss, llm_seq = step(mods, select, opt, params, batch, not args.no_clip)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
    # ViT params actually received gradients (sanity: the tower is trained).
    vit_grad = mods[0].get_input_embeddings().weight.grad
    assert vit_grad is not None and vit_grad.abs().sum() > 0
    rec = {
        "impl": "pytorch",
        "attn": args.attn,
        "vit_layers": args.vit_layers,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "text_tokens": args.seq,
        "llm_seq": llm_seq,
        "clip_grad_norm": not args.no_clip,
        "params": n_params,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "loss_first_last": [losses[0], losses[-1]],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(rec), flush=True)
    return rec


def sub(args, attn, vit_layers):
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--batch", str(args.batch),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--attn", attn, "--vit-layers", vit_layers] + (["--no-clip"] if args.no_clip else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    print(line, flush=True)
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32, help="text tokens per sample (the image adds 64)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attn", choices=["eager", "sdpa", "both"], default="both")
    ap.add_argument("--vit-layers", choices=["all", "used"], default=None,
                    help="one variant only: 'all' = stock 7-layer tower, 'used' = truncated to the 6 used layers")
    ap.add_argument("--no-clip", action="store_true", help="skip clip_grad_norm_(1.0)")
    args = ap.parse_args()

    if args.attn != "both":
        args.vit_layers = args.vit_layers or "all"
        run_one(args)
        return 0

    stock = [sub(args, a, "all") for a in ("eager", "sdpa")]
    best = min(stock, key=lambda r: r["step_s_median"])
    used = sub(args, best["attn"], "used") if args.vit_layers != "all" else None
    summary = {
        "impl": "pytorch",
        "summary": True,
        "attn": best["attn"],
        "vit_layers": "all",
        "threads": best["threads"],
        "step_s_median": best["step_s_median"],
        "step_s_all": best["step_s_all"],
        "peak_rss_mib": best["peak_rss_mib"],
        "by_attn": {r["attn"]: r["step_s_median"] for r in stock},
        "vit_used_step_s_median": used["step_s_median"] if used else None,
        "torch": best["torch"],
        "transformers": best["transformers"],
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
