#!/usr/bin/env python3
"""Time one full training step of a Tessera preset in PyTorch (CPU or CUDA).

The PyTorch peer of `worker bench-step` (worker/src/main.rs): the same model,
batch shape and step, written with PyTorch + Hugging Face transformers
(random init from configs; nothing is downloaded). Two uses:
  * CPU, float32, preset small: tools/bench_cpu_step.sh compares it with
    Tessera at the same thread count (the default flags).
  * CUDA (--device cuda), preset vila-3b-s2 with the same widths and fewer
    layers where the whole model does not fit a useful batch: the PyTorch row
    of the GPU timing table. This script reports shapes and times only; the
    table printer computes MFU from one FLOP formula.

Presets (ModelConfig::small() / ::vila_3b_s2(), worker/src/model/config.rs;
docs/DESIGN.md 1-2):
                      small                        vila-3b-s2
  SiglipVisionModel   hidden 256, inter 1024,      hidden 1152, inter 4304,
                      7 layers, 4 heads,           27 layers, 16 heads,
                      image 224 (16x16 patches)    image 384 (27x27 patches)
                      patch 14, gelu_pytorch_tanh, layer_norm_eps 1e-6
  S2                  scales [224, 448]            scales [384, 768]
                      max split = the ViT image size: per image the large
                      input bicubic-resized (1 tile) + a 2x2 chessboard
                      split (4 tiles); all B*5 tiles through the ViT in one
                      batch; hidden_states[-2]; merge, area pool, concat
                      channels -> [B, g*g, 2*hidden]
  mlp_downsample      DownSampleBlock (odd grids zero-padded) to ceil(g/2)^2
                      tokens of 4*2*hidden, LayerNorm(eps 1e-5), Linear, GELU
                      (erf), Linear
                      -> 64 tokens of 2048 -> 512  -> 196 tokens of 9216 -> 2560
  LlamaForCausalLM    hidden 512, inter 1376,      hidden 2560, inter 6912,
                      6 layers, 8 heads            32 layers, 20 heads
                      kv heads = heads, vocab 32000, rms eps 1e-5, rope theta
                      1e4, untied lm_head
--vit-layers-count / --llm-layers keep the widths and change the depths; the
feature layer stays hidden_states[-2] of the (shorter) ViT.

Batch (Batch::synthetic): B samples of T text tokens with one image
placeholder (at index min(b % 3, T-2)), so the LLM sees T - 1 + image-token
positions; labels on text positions t >= T/2. Pixels uniform in [-1, 1] at
the largest S2 scale.
Step: zero grads, forward, loss (mean next-token CE), backward into every
parameter (ViT unfrozen), clip the global grad norm to 1.0 (Tessera's
OptimConfig::default() does the same; --no-clip turns it off), AdamW(lr=1e-4,
weight_decay=0): PyTorch's default implementation on CPU, fused=True on CUDA
where available (the JSON's "adamw" says which).

Precision (--dtype):
  f32    float32 weights and math; on CUDA TF32 is switched OFF for matmuls
         and cuDNN (the patch-embedding conv), so it is true float32
  tf32   CUDA only: float32 weights, matmuls and convs in TF32
         (torch.backends.cuda.matmul.allow_tf32 / cudnn.allow_tf32 = True)
  bf16   the usual mixed precision: torch.autocast(bfloat16) around forward
         and loss, float32 master weights, gradients and AdamW state (also
         accepted on CPU, with CPU autocast, to exercise the code path)
On CUDA the timed region is bracketed by torch.cuda.synchronize(), and the
JSON adds "gpu" and "peak_mem_gib" (torch.cuda.max_memory_allocated over the
whole run: weights, gradients, optimizer state and activations).

Variants measured (each in its own subprocess, so peak RSS is per variant):
  attn eager / sdpa    the SigLIP and LLaMA attention implementation
  vit_layers all       stock VILA/HF: every ViT layer runs, hidden_states[-2]
  vit_layers used      the ViT truncated to the layers the output depends on
                       (what Tessera computes: one fewer); same function,
                       less work
By default: eager+all, sdpa+all, then the faster attention with vit_layers
used. One JSON line per variant, then a final summary line whose
`step_s_median` is the peer: the faster attention with the stock model
(vit_layers all), as specified for the benchmark. "vit_layers" is that
variant name; the depths are "vit_layers_count" (layers built),
"vit_layers_run" (layers executed) and "llm_layers".

Usage (CPU, preset small; what tools/bench_cpu_step.sh runs):
  python3 tools/bench_step_torch.py --threads 2 [--batch 8 --seq 32 --warmup 1 --steps 3]
  python3 tools/bench_step_torch.py --threads 2 --attn sdpa --vit-layers all   # one variant
Usage (GPU table, one variant per row; pick depths and batch to fit memory):
  python3 tools/bench_step_torch.py --preset vila-3b-s2 --device cuda --dtype bf16 --attn sdpa \\
      --vit-layers all --vit-layers-count 27 --llm-layers 4 --batch 4 --seq 256 --warmup 2 --steps 5
  python3 tools/bench_step_torch.py --preset vila-3b-s2 --device cuda --dtype tf32 --attn sdpa \\
      --vit-layers all --vit-layers-count 27 --llm-layers 4 --batch 4 --seq 256 --warmup 2 --steps 5
CPU smoke test of the vila-3b-s2 shapes:
  python3 tools/bench_step_torch.py --preset vila-3b-s2 --vit-layers-count 1 --llm-layers 1 \\
      --batch 1 --seq 16 --warmup 0 --steps 1 --attn sdpa --vit-layers all --threads 2
"""

import argparse
import contextlib
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
SELECT_LAYER = -2

# ModelConfig presets (worker/src/model/config.rs). The S2 max split is the
# ViT image size in both.
PRESETS = {
    "small": dict(
        vit=dict(hidden=256, intermediate=1024, layers=7, heads=4, image=224, patch=14),
        s2_scales=[224, 448],
        llm=dict(hidden=512, intermediate=1376, layers=6, heads=8, kv_heads=8, vocab=32000),
    ),
    "vila-3b-s2": dict(
        vit=dict(hidden=1152, intermediate=4304, layers=27, heads=16, image=384, patch=14),
        s2_scales=[384, 768],
        llm=dict(hidden=2560, intermediate=6912, layers=32, heads=20, kv_heads=20, vocab=32000),
    ),
}


class Shape:
    """The preset with the depth overrides applied, plus derived sizes."""

    def __init__(self, args):
        p = PRESETS[args.preset]
        self.vit = dict(p["vit"], layers=args.vit_layers_count or p["vit"]["layers"])
        self.llm = dict(p["llm"], layers=args.llm_layers or p["llm"]["layers"])
        self.scales = p["s2_scales"]
        self.max_split = self.vit["image"]
        self.splits = [math.ceil(s / self.max_split) for s in self.scales]
        self.tiles_per_image = sum(n * n for n in self.splits)
        self.grid = self.vit["image"] // self.vit["patch"]
        self.image_tokens = ((self.grid + 1) // 2) ** 2  # DownSampleBlock pads odd grids
        self.mm_hidden = self.vit["hidden"] * len(self.scales)
        # Layers the feature depends on (hidden_states[-2]): Tessera runs only these.
        self.vit_used = self.vit["layers"] + 1 + SELECT_LAYER


def build(args, shape):
    import torch
    import torch.nn as nn
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    VIT, LLM = shape.vit, shape.llm
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

    # Build on the target device: random init of a 3B model is slow on CPU.
    with torch.device(args.device):
        proj = nn.Sequential(
            DownSampleBlock(),
            nn.LayerNorm(4 * shape.mm_hidden, eps=1e-5),
            nn.Linear(4 * shape.mm_hidden, LLM["hidden"]),
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
        enc.layers = nn.ModuleList(list(enc.layers)[:shape.vit_used])
        select = -1
    mods = (vit, proj, llm)
    for m in mods:
        # float32 master weights in every mode (bf16 is autocast only).
        m.to(device=args.device, dtype=torch.float32)
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


def s2_forward(vit, select, pixels, shape):
    """s2wrapper.forward (output 'bnc'), with every scale's tiles in ONE ViT call."""
    import torch
    import torch.nn.functional as F

    B = pixels.shape[0]
    tiles = []
    with torch.no_grad():  # pixels are inputs: no gradient through the resize
        for size, n in zip(shape.scales, shape.splits):
            x = pixels if size == pixels.shape[-1] else F.interpolate(
                pixels, size=(size, size), mode="bicubic", align_corners=False)
            tiles.append(split_chessboard(x, n))
    feats = vit(torch.cat(tiles, dim=0), output_hidden_states=True).hidden_states[select]  # [B*5, g*g, C]
    g = int(round(feats.shape[1] ** 0.5))
    maps, off = [], 0
    for n in shape.splits:
        f = feats[off:off + n * n * B]
        off += n * n * B
        fmap = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], g, g)
        maps.append(merge_chessboard(fmap, n))
    out = torch.cat([F.interpolate(m, size=g, mode="area") for m in maps], dim=1)
    return out.flatten(2).transpose(1, 2)  # [B, g*g, C * n_scales]


def make_batch(batch, seq, gen, shape, device):
    import torch

    # Drawn on the CPU generator so every device sees the same batch.
    side = shape.scales[-1]
    pixels = torch.rand(batch, 3, side, side, generator=gen) * 2 - 1
    ids = torch.randint(1, shape.llm["vocab"], (batch, seq), generator=gen)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.int64)
    for b in range(batch):
        at = min(b % 3, max(seq - 2, 0))
        ids[b, at] = IMAGE_TOKEN_INDEX
        for t in range(seq):
            if t != at and t >= seq // 2:
                labels[b, t] = ids[b, t]
    return pixels.to(device), ids.to(device), labels.to(device)


def step(mods, select, opt, params, batch, clip, shape, autocast):
    import torch

    vit, proj, llm = mods
    pixels, ids, labels = batch
    opt.zero_grad(set_to_none=True)
    with autocast:  # forward + loss only; backward runs outside, as recommended
        img = proj(s2_forward(vit, select, pixels, shape))  # [B, image tokens, LLM hidden]
        embed = llm.get_input_embeddings()
        embeds, labs = [], []
        for b in range(ids.shape[0]):  # VILA prepare_inputs_labels_for_multimodal
            p = int((ids[b] == IMAGE_TOKEN_INDEX).nonzero()[0])
            # Under autocast img is bf16 and the embeddings f32: cat promotes to f32.
            embeds.append(torch.cat([embed(ids[b, :p]), img[b], embed(ids[b, p + 1:])], dim=0))
            labs.append(torch.cat([labels[b, :p], labels.new_full((img.shape[1],), IGNORE_INDEX), labels[b, p + 1:]]))
        out = llm(inputs_embeds=torch.stack(embeds), labels=torch.stack(labs))
    out.loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return out.loss.item(), out.logits.shape[1]


def setup_precision(args):
    """Set the matmul/conv precision flags; return the autocast context for forward + loss."""
    import torch

    if args.device == "cuda":
        # Explicit both ways: cuDNN convs default to TF32, which f32 must not use.
        tf32 = args.dtype == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if args.dtype == "bf16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(args, params):
    import torch

    if args.device == "cuda":
        try:
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True), "fused"
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True), "foreach"
    # CPU: keep PyTorch's default choice (what the CPU comparison has always used).
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0), "default"


def sync(args):
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()


def run_one(args):
    import torch
    import transformers

    shape = Shape(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast = setup_precision(args)
    gen = torch.Generator().manual_seed(1)
    mods, select = build(args, shape)
    params = [p for m in mods for p in m.parameters()]
    n_params = sum(p.numel() for p in params)
    opt, adamw = make_optimizer(args, params)
    batch = make_batch(args.batch, args.seq, gen, shape, args.device)
    times, losses = [], []
    for i in range(args.warmup + max(args.steps, 1)):
        sync(args)
        t0 = time.perf_counter()
        loss, llm_seq = step(mods, select, opt, params, batch, not args.no_clip, shape, autocast)
        sync(args)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
    # ViT params actually received gradients (sanity: the tower is trained).
    vit_grad = mods[0].get_input_embeddings().weight.grad
    assert vit_grad is not None and vit_grad.abs().sum() > 0
    assert llm_seq == args.seq - 1 + shape.image_tokens, (llm_seq, shape.image_tokens)
    rec = {
        "impl": "pytorch",
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "vit_layers": args.vit_layers,
        "vit_layers_count": shape.vit["layers"],
        "vit_layers_run": shape.vit_used if args.vit_layers == "used" else shape.vit["layers"],
        "llm_layers": shape.llm["layers"],
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "text_tokens": args.seq,
        "llm_seq": llm_seq,
        "image_tokens": shape.image_tokens,
        "llm_tokens_per_step": args.batch * llm_seq,
        "images_per_step": args.batch,
        "tiles_per_step": args.batch * shape.tiles_per_image,
        "clip_grad_norm": not args.no_clip,
        "adamw": adamw,
        "params": n_params,
        "params_by_module": {name: sum(p.numel() for p in m.parameters())
                             for name, m in zip(("vit", "projector", "llm"), mods)},
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "loss_first_last": [losses[0], losses[-1]],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.device == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(rec), flush=True)
    return rec


def sub(args, attn, vit_layers):
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--batch", str(args.batch),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--attn", attn, "--vit-layers", vit_layers, "--preset", args.preset,
           "--device", args.device, "--dtype", args.dtype]
    cmd += ["--vit-layers-count", str(args.vit_layers_count)] if args.vit_layers_count else []
    cmd += ["--llm-layers", str(args.llm_layers)] if args.llm_layers else []
    cmd += ["--no-clip"] if args.no_clip else []
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    print(line, flush=True)
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "tf32", "bf16"], default="f32",
                    help="f32; tf32 (cuda only); bf16 = autocast with f32 master weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32,
                    help="text tokens per sample (the image adds 64 for small, 196 for vila-3b-s2, less one placeholder)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attn", choices=["eager", "sdpa", "both"], default="both")
    ap.add_argument("--vit-layers", choices=["all", "used"], default=None,
                    help="one variant only: 'all' = stock tower (every layer runs), "
                         "'used' = truncated to the layers hidden_states[-2] depends on (one fewer)")
    ap.add_argument("--vit-layers-count", type=int, default=None,
                    help="ViT depth (default: the preset's); the feature stays hidden_states[-2]")
    ap.add_argument("--llm-layers", type=int, default=None, help="LLaMA depth (default: the preset's)")
    ap.add_argument("--no-clip", action="store_true", help="skip clip_grad_norm_(1.0)")
    args = ap.parse_args()
    if args.vit_layers_count is not None and args.vit_layers_count < 1:
        ap.error("--vit-layers-count must be >= 1 (hidden_states[-2] needs one layer)")
    if args.vit_layers == "used" and args.vit_layers_count == 1:
        # A 0-layer HF encoder records no hidden_states at all.
        ap.error("--vit-layers used needs --vit-layers-count >= 2")
    if args.llm_layers is not None and args.llm_layers < 1:
        ap.error("--llm-layers must be >= 1")
    if args.dtype == "tf32" and args.device != "cuda":
        ap.error("--dtype tf32 needs --device cuda")
    if args.seq < 1:
        ap.error("--seq must be >= 1 (the image placeholder)")

    if args.attn != "both":
        args.vit_layers = args.vit_layers or "all"
        run_one(args)
        return 0

    stock = [sub(args, a, "all") for a in ("eager", "sdpa")]
    best = min(stock, key=lambda r: r["step_s_median"])
    # No 'used' run for a 1-layer ViT: it would truncate to nothing.
    used = sub(args, best["attn"], "used") if args.vit_layers != "all" and args.vit_layers_count != 1 else None
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
    # The shape and device context of the peer row, for the table printers.
    for k in ("preset", "device", "dtype", "vit_layers_count", "vit_layers_run", "llm_layers", "batch", "seq",
              "llm_tokens_per_step", "images_per_step", "tiles_per_step", "adamw", "gpu", "peak_mem_gib"):
        if k in best:
            summary[k] = best[k]
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
