#!/usr/bin/env python3
"""Generate the tiny VILA-style S2 fixtures used by Tessera's parity tests.

This is an independent reference written with PyTorch + Hugging Face
transformers (no Tessera code involved). It builds a tiny model with the same
structure as VILA 1.5 3B-S2 (see docs/DESIGN.md sections 1-4):

  SigLIP ViT (hidden 32, 3 layers, 5x5 patch grid)  --S2 [20, 40]-->
  mlp_downsample projector (DownSampleBlock, LN, Linear, GELU, Linear)  -->
  LLaMA (hidden 64, 2 layers, vocab 256)

and writes, under tests/fixtures/tiny/:

  model/                        VILA layout (docs/DESIGN.md section 3), f32 safetensors
  batch.safetensors             worker debug-step input (docs/DESIGN.md section 4)
  expected_grads.safetensors    loss + one gradient per parameter (section 4)
  expected_forward.safetensors  intermediate activations for debugging
  batch_dynamic.safetensors     a dynamic S2 batch (NVILA's dynamic_s2): tiles
                                [T, 3, 20, 20] and tile_grids [B, 2] (rows,
                                cols of the largest scale per image)
  expected_grads_dynamic.safetensors  loss + gradients for that batch, with
                                NVILA's merge_features_for_dynamic_s2
                                (s2_resize_output_to_scale_idx = 0)

The reference runs in float64 on weights that are exactly the saved f32 values.
transformers computes a few things in float32 even for a float64 model
(attention softmax, LlamaRMSNorm, the RoPE cos/sin table, the loss). For a true
float64 reference those spots are patched to keep the input precision (the
math is unchanged; at float32 the patches are exact no-ops), the loss is
computed by hand in float64 and checked against the transformers loss, and the
whole pipeline is re-run in float32 through unpatched transformers code to show
that the patched float64 run computes the same function.

Usage:  python3 tools/make_fixtures.py [--out DIR]
The output is deterministic (byte-identical across runs).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llama import modeling_llama
from transformers.models.siglip import modeling_siglip

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tiny"

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

# Geometry of the tiny model.
VIT_HIDDEN = 32
IMAGE_SIZE = 20
PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 5 (odd on purpose: exercises the zero padding)
S2_SCALES = [20, 40]
S2_MAX_SPLIT = 20
SELECT_LAYER = -2
LLM_HIDDEN = 64
VOCAB = 256
BATCH = 2
SEQ = 14
IMAGE_POS = [2, 4]  # position of the -200 token in each sample
ANSWER_LEN = 6  # the last ANSWER_LEN positions carry labels
PAD_GRID = GRID + (GRID % 2)  # 6
N_IMG_TOKENS = (PAD_GRID // 2) ** 2  # 9
MM_HIDDEN = VIT_HIDDEN * len(S2_SCALES)  # 64
PROJ_IN = 4 * MM_HIDDEN  # 256


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def vision_config():
    return SiglipVisionConfig(
        hidden_size=VIT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_channels=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        # VILA never uses SigLIP's attention-pooling head; leave it out so that
        # every saved tensor is a real parameter of the model.
        vision_use_head=False,
        attn_implementation="eager",
    )


def llm_config():
    return LlamaConfig(
        hidden_size=LLM_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        # transformers 5 stores this as rope_parameters={"rope_type": "default", "rope_theta": ...}
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attn_implementation="eager",
    )


class DownSampleBlock(nn.Module):
    """VILA 1.5's DownSampleBlock (llava/model/multimodal_projector/base_projector.py).

    Kept operation for operation, including its (transposing) view/permute
    order, which differs from NVILA's later version.
    """

    def forward(self, x):
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, -1)
        x = self.flat_square(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def flat_square(x):
        n, w, h, c = x.size()
        if w % 2 == 1:
            x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype).to(x.device)], dim=1).contiguous()
            n, w, h, c = x.size()
        if h % 2 == 1:
            x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype).to(x.device)], dim=2).contiguous()
            n, w, h, c = x.size()
        x = x.view(n, w, int(h / 2), int(c * 2))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
        return x


class Projector(nn.Module):
    """mlp_downsample: parameter names layers.1.* (LN), layers.2.*, layers.4.*."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            DownSampleBlock(),
            nn.LayerNorm(PROJ_IN),  # eps 1e-5 (torch default), as in VILA
            nn.Linear(PROJ_IN, LLM_HIDDEN),
            nn.GELU(),  # exact erf
            nn.Linear(LLM_HIDDEN, LLM_HIDDEN),
        )

    def forward(self, x):
        return self.layers(x)


def is_norm_param(key, name):
    if key == "mm_projector":
        return name.startswith("layers.1.")  # the projector's LayerNorm
    return "norm" in name  # layer_norm1/2, post_layernorm, input_layernorm, post_attention_layernorm, model.norm


def randomize(key, named_params, gen):
    """Return {name: f32 tensor} with every parameter re-drawn (f64 draw, rounded to f32)."""
    out = {}
    for name, p in named_params:
        shape = tuple(p.shape)

        def randn(std):
            return torch.randn(shape, generator=gen, dtype=torch.float64) * std

        leaf = name.rsplit(".", 1)[-1]
        is_norm = is_norm_param(key, name)
        if name.endswith("position_embedding.weight"):
            v = randn(0.1)
        elif name.endswith("embed_tokens.weight"):
            v = randn(0.5)
        elif is_norm and leaf == "weight":  # LayerNorm / RMSNorm gain
            v = 1.0 + randn(0.1)
        elif leaf == "bias":
            v = randn(0.05)
        elif leaf == "weight" and p.dim() >= 2:
            fan_in = p[0].numel()
            v = randn(1.0 / math.sqrt(fan_in))
        else:
            raise RuntimeError(f"no init rule for parameter {name} {shape}")
        out[name] = v.to(torch.float32).contiguous()
    return out


def build_models(dtype, weights):
    """Instantiate the three modules in `dtype`, loaded with the given f32 weights."""
    vit = SiglipVisionModel(vision_config())
    proj = Projector()
    llm = LlamaForCausalLM(llm_config())
    for mod, key in ((vit, "vision_tower"), (proj, "mm_projector"), (llm, "llm")):
        mod.to(dtype)
        sd = {k: v.to(dtype) for k, v in weights[key].items()}
        mod.load_state_dict(sd, strict=True)
        mod.train()  # no dropout in these configs; mirrors a training step
        for p in mod.parameters():
            p.requires_grad_(True)
    return vit, proj, llm


# --------------------------------------------------------------------------
# float64-faithful versions of the few spots where transformers drops to f32
# --------------------------------------------------------------------------

PATCH_CALLS = {"attn": 0, "rmsnorm": 0, "rope": 0}


def _work_dtype(dtype):
    # float32 for f32/bf16/f16 inputs (exactly what transformers does), float64 for float64.
    return torch.promote_types(dtype, torch.float32)


def _make_eager(orig_name):
    def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        PATCH_CALLS["attn"] += 1
        n_rep = getattr(module, "num_key_value_groups", 1)
        if n_rep != 1:
            key = modeling_llama.repeat_kv(key, n_rep)
            value = modeling_llama.repeat_kv(value, n_rep)
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=_work_dtype(query.dtype)).to(query.dtype)
        attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
        attn_output = torch.matmul(attn_weights, value)
        attn_output = attn_output.transpose(1, 2).contiguous()
        return attn_output, attn_weights

    eager_attention_forward.__name__ = orig_name
    return eager_attention_forward


def _rmsnorm_forward(self, hidden_states):
    PATCH_CALLS["rmsnorm"] += 1
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(_work_dtype(input_dtype))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _make_rope_forward(orig_forward):
    def forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return orig_forward(self, x, position_ids)
        PATCH_CALLS["rope"] += 1
        assert self.rope_type == "default" and self.attention_scaling == 1.0
        base = self.config.rope_parameters["rope_theta"]
        dim = self.inv_freq.shape[0] * 2
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    return forward


@contextlib.contextmanager
def full_precision_patches():
    saved = [
        (modeling_llama, "eager_attention_forward", modeling_llama.eager_attention_forward),
        (modeling_siglip, "eager_attention_forward", modeling_siglip.eager_attention_forward),
        (modeling_llama.LlamaRMSNorm, "forward", modeling_llama.LlamaRMSNorm.forward),
        (modeling_llama.LlamaRotaryEmbedding, "forward", modeling_llama.LlamaRotaryEmbedding.forward),
    ]
    modeling_llama.eager_attention_forward = _make_eager("eager_attention_forward")
    modeling_siglip.eager_attention_forward = _make_eager("eager_attention_forward")
    modeling_llama.LlamaRMSNorm.forward = _rmsnorm_forward
    modeling_llama.LlamaRotaryEmbedding.forward = _make_rope_forward(saved[3][2])
    try:
        yield
    finally:
        for obj, attr, val in saved:
            setattr(obj, attr, val)


# --------------------------------------------------------------------------
# S2 (s2wrapper.forward with output_shape='bnc', no prefix tokens)
# --------------------------------------------------------------------------

def split_chessboard(x, num_split):
    _, _, H, W = x.shape
    assert H % num_split == 0 and W % num_split == 0
    h, w = H // num_split, W // num_split
    return torch.cat(
        [x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(num_split) for j in range(num_split)],
        dim=0,
    )


def merge_chessboard(x, num_split):
    B = x.shape[0]
    assert B % (num_split ** 2) == 0
    b = B // (num_split ** 2)
    return torch.cat(
        [
            torch.cat([x[(i * num_split + j) * b:(i * num_split + j + 1) * b] for j in range(num_split)], dim=-1)
            for i in range(num_split)
        ],
        dim=-2,
    )


def merge_chessboard_hw(x, num_split_h, num_split_w):
    """NVILA's merge_chessboard: tiles (i, j) at batch index (i * num_split_w + j) * b."""
    b = x.shape[0] // (num_split_h * num_split_w)
    assert b * num_split_h * num_split_w == x.shape[0]
    return torch.cat(
        [
            torch.cat([x[(i * num_split_w + j) * b:(i * num_split_w + j + 1) * b] for j in range(num_split_w)], dim=-1)
            for i in range(num_split_h)
        ],
        dim=-2,
    )


def vit_select(vit, x):
    out = vit(x, output_hidden_states=True)
    assert len(out.hidden_states) == vit.config.num_hidden_layers + 1
    return out.hidden_states[SELECT_LAYER]  # 'cls_patch': all tokens (SigLIP has no CLS)


def s2_forward(vit, pixels, record):
    num_splits = [math.ceil(s / S2_MAX_SPLIT) for s in S2_SCALES]
    maps, tiles = [], []
    for size, n in zip(S2_SCALES, num_splits):
        x = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
        x = split_chessboard(x, n)
        feat = vit_select(vit, x)  # [n*n*B, g*g, C], tile-major
        tiles.append(feat)
        g = int(round(feat.shape[1] ** 0.5))
        fmap = feat.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], g, g)  # 'b (h w) c -> b c h w'
        maps.append(merge_chessboard(fmap, n))
    out_size = maps[0].shape[-2]
    out = torch.cat([F.interpolate(m, size=out_size, mode="area") for m in maps], dim=1)
    out = out.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
    record["vit_tiles_selected"] = torch.cat(tiles, dim=0)
    record["s2_maps"] = maps
    return out


def dynamic_s2_forward(vit, tiles, grids):
    """NVILA's dynamic S2 with s2_resize_output_to_scale_idx = 0: the ViT on
    every tile, then per image (merge_features_for_dynamic_s2) each smaller
    scale's n x n tiles and the largest scale's rows x cols tiles merged,
    every map area-resized to the first scale's g x g and concatenated."""
    feat = vit_select(vit, tiles)  # [T, g*g, C]
    g = int(round(feat.shape[1] ** 0.5))
    fmap = feat.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], g, g)
    out, cnt = [], 0
    for rows, cols in grids:
        maps = []
        for scale in S2_SCALES[:-1]:
            n = scale // S2_SCALES[0]
            maps.append(merge_chessboard_hw(fmap[cnt:cnt + n * n], n, n))
            cnt += n * n
        maps.append(merge_chessboard_hw(fmap[cnt:cnt + rows * cols], rows, cols))
        cnt += rows * cols
        size = maps[0].shape[-2:]
        out.append(torch.cat([F.interpolate(m, size=size, mode="area") for m in maps], dim=1))
    assert cnt == tiles.shape[0]
    return torch.cat(out, dim=0).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------
# Full step
# --------------------------------------------------------------------------

def merge_image_tokens(llm, input_ids, labels, image_feats):
    """Replace each sample's -200 token by its image tokens (VILA prepare_inputs_labels_for_multimodal)."""
    embed = llm.get_input_embeddings()
    embeds, labs = [], []
    for b in range(input_ids.shape[0]):
        ids, lab = input_ids[b], labels[b]
        pos = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        assert pos.numel() == 1
        p = int(pos[0])
        feats = image_feats[b]
        embeds.append(torch.cat([embed(ids[:p]), feats, embed(ids[p + 1:])], dim=0))
        labs.append(torch.cat([
            lab[:p],
            torch.full((feats.shape[0],), IGNORE_INDEX, dtype=lab.dtype),
            lab[p + 1:],
        ]))
    return torch.stack(embeds), torch.stack(labs)


def shifted_ce(logits, labels):
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    n = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n


def forward_step(models, batch, dtype):
    vit, proj, llm = models
    pixels = batch["pixel_values"].to(dtype)
    rec = {}
    if "tile_grids" in batch:
        s2 = dynamic_s2_forward(vit, pixels, batch["tile_grids"].tolist())
    else:
        s2 = s2_forward(vit, pixels, rec)
    rec["s2_features"] = s2
    rec["downsample_out"] = proj.layers[0](s2)
    img = proj(s2)
    rec["projector_out"] = img
    embeds, labels = merge_image_tokens(llm, batch["input_ids"], batch["labels"], img)
    rec["llm_inputs_embeds"] = embeds
    rec["labels_expanded"] = labels
    out = llm(inputs_embeds=embeds, labels=labels)
    rec["logits"] = out.logits
    rec["hf_loss"] = out.loss
    rec["hand_loss"] = shifted_ce(out.logits, labels)
    return rec


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------

def check_downsample_formula():
    gen = torch.Generator().manual_seed(1)
    R = C = GRID
    c = 3
    x = torch.randn(2, R * C, c, generator=gen, dtype=torch.float64)
    got = DownSampleBlock()(x)
    Rp, Cp = R + R % 2, C + C % 2
    grid = torch.zeros(2, Rp, Cp, c, dtype=torch.float64)
    grid[:, :R, :C] = x.reshape(2, R, C, c)
    want = torch.zeros(2, (Rp // 2) * (Cp // 2), 4 * c, dtype=torch.float64)
    for k in range(Cp // 2):
        for q in range(Rp // 2):
            t = k * (Rp // 2) + q
            want[:, t] = torch.cat([grid[:, 2 * q, 2 * k], grid[:, 2 * q, 2 * k + 1],
                                    grid[:, 2 * q + 1, 2 * k], grid[:, 2 * q + 1, 2 * k + 1]], dim=-1)
    assert got.shape == want.shape and torch.equal(got, want), "DownSampleBlock disagrees with docs/DESIGN.md formula"


def check_vit_hidden_states(vit, pixels):
    """hidden_states[-2] must be the output of encoder layer L-2 (before post_layernorm)."""
    with torch.no_grad():
        x = pixels[:, :, :IMAGE_SIZE, :IMAGE_SIZE]
        h = vit.embeddings(x)
        for layer in vit.encoder.layers[: vit.config.num_hidden_layers + 1 + SELECT_LAYER]:
            h = layer(h, None)
        assert torch.allclose(vit_select(vit, x), h, rtol=0, atol=1e-13)


def check_s2_by_hand(vit, pixels, rec):
    """Recompute the S2 features image by image, quadrant by quadrant, with avg pooling."""
    with torch.no_grad():
        for b in range(pixels.shape[0]):
            img = pixels[b:b + 1]
            parts = []
            for size in S2_SCALES:
                n = size // S2_MAX_SPLIT
                x = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False)
                big = torch.zeros(1, VIT_HIDDEN, n * GRID, n * GRID, dtype=torch.float64)
                for i in range(n):
                    for j in range(n):
                        tile = x[:, :, i * S2_MAX_SPLIT:(i + 1) * S2_MAX_SPLIT, j * S2_MAX_SPLIT:(j + 1) * S2_MAX_SPLIT]
                        f = vit_select(vit, tile)[0]  # [g*g, C]
                        big[0, :, i * GRID:(i + 1) * GRID, j * GRID:(j + 1) * GRID] = f.T.reshape(VIT_HIDDEN, GRID, GRID)
                parts.append(F.avg_pool2d(big, n))
            want = torch.cat(parts, dim=1)[0].reshape(MM_HIDDEN, GRID * GRID).T
            assert torch.allclose(rec["s2_features"][b], want, rtol=0, atol=1e-12), "S2 mismatch"


def finite_difference_check(models, batch, grads, names):
    vit = models[0]
    params = dict(vit.named_parameters())
    h = 1e-5
    for name in names:
        p = params[name]
        g = grads[name]
        idx = tuple(int(i) for i in torch.nonzero(g.abs() == g.abs().max())[0])
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + h
            lp = forward_step(models, batch, torch.float64)["hand_loss"].item()
            p[idx] = orig - h
            lm = forward_step(models, batch, torch.float64)["hand_loss"].item()
            p[idx] = orig
        fd = (lp - lm) / (2 * h)
        ad = g[idx].item()
        rel = abs(fd - ad) / max(abs(ad), 1e-30)
        print(f"  finite difference vision_tower.vision_model.{name}{list(idx)}: fd={fd:.10e} autograd={ad:.10e} rel={rel:.1e}")
        assert abs(ad) > 1e-6, "gradient too small to be a meaningful check"
        assert rel < 1e-6, "finite difference disagrees with autograd"


# --------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------

def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_st(path, tensors):
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# Dynamic S2 grids (rows, cols) of the largest scale, one per sample: a wide
# and a tall image, neither the static 2 x 2.
DYNAMIC_GRIDS = [(2, 3), (4, 1)]


def make_dynamic_batch(gen):
    tiles = sum(1 + r * c for r, c in DYNAMIC_GRIDS)
    pixel_values = (torch.rand(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen, dtype=torch.float64) * 2 - 1)
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    labels = torch.full((BATCH, SEQ), IGNORE_INDEX, dtype=torch.int64)
    for b, p in enumerate(IMAGE_POS):
        input_ids[b, p] = IMAGE_TOKEN_INDEX
        labels[b, SEQ - ANSWER_LEN:] = input_ids[b, SEQ - ANSWER_LEN:]
    return {
        "pixel_values": pixel_values.to(torch.float32),
        "input_ids": input_ids,
        "labels": labels,
        "tile_grids": torch.tensor(DYNAMIC_GRIDS, dtype=torch.int64),
    }


def make_batch(gen):
    yy, xx = torch.meshgrid(torch.arange(40, dtype=torch.float64), torch.arange(40, dtype=torch.float64), indexing="ij")
    pix = torch.empty(BATCH, 3, 40, 40, dtype=torch.float64)
    for b in range(BATCH):
        for c in range(3):
            fx, fy, ph = (torch.rand(3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 3.0, 6.283])).tolist()
            smooth = torch.sin(2 * math.pi * (fx * xx + fy * yy) / 40 + ph)
            checker = (-1.0) ** (xx + yy + b + c)  # Nyquist-frequency detail
            noise = torch.rand(40, 40, generator=gen, dtype=torch.float64) * 2 - 1
            pix[b, c] = 0.5 * smooth + 0.2 * checker + 0.3 * noise
    pixel_values = pix.clamp(-1, 1).to(torch.float32)

    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    labels = torch.full((BATCH, SEQ), IGNORE_INDEX, dtype=torch.int64)
    for b, p in enumerate(IMAGE_POS):
        input_ids[b, p] = IMAGE_TOKEN_INDEX
        labels[b, SEQ - ANSWER_LEN:] = input_ids[b, SEQ - ANSWER_LEN:]
    assert all(p < SEQ - ANSWER_LEN for p in IMAGE_POS)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "labels": labels}


def vila_top_config():
    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "hidden_size": LLM_HIDDEN,
        "mm_hidden_size": MM_HIDDEN,
        "s2": True,
        "s2_scales": ",".join(str(s) for s in S2_SCALES),
        "s2_max_split_size": S2_MAX_SPLIT,
        "s2_resize_output_to_scale_idx": 0,
        "mm_vision_select_layer": SELECT_LAYER,
        "mm_vision_select_feature": "cls_patch",
        "mm_projector_type": "mlp_downsample",
        "image_aspect_ratio": "resize",
    }


def hf_config_dict(cfg, arch):
    d = cfg.to_dict()
    d["architectures"] = [arch]
    d["dtype"] = "float32"
    d["torch_dtype"] = "float32"  # transformers 4 spelling, read by older loaders
    if "rope_parameters" in d:
        # transformers 4 / original VILA configs carry rope_theta at the top level.
        d["rope_theta"] = d["rope_parameters"]["rope_theta"]
    return d


def tensor_bytes(t):
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    out_dir = args.out

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    check_downsample_formula()

    # ---- weights (drawn once, stored as f32; every reference below uses exactly these values)
    shapes = (SiglipVisionModel(vision_config()), Projector(), LlamaForCausalLM(llm_config()))
    weights = {}
    for key, mod in zip(("vision_tower", "mm_projector", "llm"), shapes):
        weights[key] = randomize(key, mod.named_parameters(), gen)
        assert set(weights[key]) == set(mod.state_dict()), f"{key}: parameters and state_dict differ"
    batch = make_batch(gen)

    # ---- float64 reference, forward + backward
    with full_precision_patches():
        models64 = build_models(torch.float64, weights)
        check_vit_hidden_states(models64[0], batch["pixel_values"].to(torch.float64))
        rec = forward_step(models64, batch, torch.float64)
        assert all(v > 0 for v in PATCH_CALLS.values()), PATCH_CALLS
        loss = rec["hand_loss"]
        hf_loss = rec["hf_loss"]  # transformers upcasts logits with .float(): f32 precision
        assert abs(hf_loss.item() - loss.item()) < 1e-6 * max(1.0, abs(loss.item())), (hf_loss, loss)
        loss.backward()
        check_s2_by_hand(models64[0], batch["pixel_values"].to(torch.float64), rec)

        grads = {}
        for key, mod in zip(("vision_tower", "mm_projector", "llm"), models64):
            for name, p in mod.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                grads[(key, name)] = g.detach().clone()
        vit_grads = {n: g for (k, n), g in grads.items() if k == "vision_tower"}
        no_grad = sorted(n for n, p in models64[0].named_parameters() if p.grad is None)
        want_no_grad = sorted(n for n in vit_grads if n.startswith("encoder.layers.2.") or n.startswith("post_layernorm."))
        assert no_grad == want_no_grad, no_grad
        for (key, name), g in grads.items():
            if key != "vision_tower" or name not in no_grad:
                assert g.abs().max() > 0, f"zero gradient for {key}.{name}"

        print("finite-difference checks (float64):")
        finite_difference_check(models64, batch, vit_grads, [
            "encoder.layers.0.mlp.fc1.weight",
            "encoder.layers.0.self_attn.q_proj.weight",
            "embeddings.patch_embedding.weight",
        ])

        # Dynamic S2: the same weights, a separate generator (the static
        # fixtures stay byte-identical), fresh models for clean gradients.
        dyn_batch = make_dynamic_batch(torch.Generator().manual_seed(7))
        dyn_models = build_models(torch.float64, weights)
        dyn_rec = forward_step(dyn_models, dyn_batch, torch.float64)
        dyn_loss = dyn_rec["hand_loss"]
        assert abs(dyn_rec["hf_loss"].item() - dyn_loss.item()) < 1e-6 * max(1.0, abs(dyn_loss.item()))
        dyn_loss.backward()
        dyn_grads = {}
        for key, mod in zip(("vision_tower", "mm_projector", "llm"), dyn_models):
            for name, p in mod.named_parameters():
                dyn_grads[(key, name)] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        print("finite-difference checks, dynamic S2 (float64):")
        finite_difference_check(dyn_models, dyn_batch, {n: g for (k, n), g in dyn_grads.items() if k == "vision_tower"}, [
            "encoder.layers.0.mlp.fc1.weight",
            "embeddings.patch_embedding.weight",
        ])

    # ---- float32 cross-check through unpatched transformers code
    models32 = build_models(torch.float32, weights)
    rec32 = forward_step(models32, batch, torch.float32)
    rec32["hf_loss"].backward()
    d_loss = abs(rec32["hf_loss"].item() - loss.item())
    worst = 0.0
    for (key, mod) in zip(("vision_tower", "mm_projector", "llm"), models32):
        for name, p in mod.named_parameters():
            g64 = grads[(key, name)]
            g32 = p.grad.double() if p.grad is not None else torch.zeros_like(g64)
            # Floor the scale: SigLIP's k_proj.bias gradient is mathematically zero (softmax
            # ignores a per-query constant), so it holds only rounding noise in both runs.
            scale = max(g64.abs().max().item(), 1e-2)
            worst = max(worst, (g32 - g64).abs().max().item() / scale)
    print(f"float32 unpatched transformers vs float64 reference: |dloss|={d_loss:.2e}, worst grad err/max={worst:.2e}")
    assert d_loss < 1e-5 and worst < 1e-4

    # ---- write everything
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model_dir = out_dir / "model"
    for sub in ("vision_tower", "mm_projector", "llm"):
        (model_dir / sub).mkdir(parents=True)

    write_json(model_dir / "config.json", vila_top_config())

    write_json(model_dir / "vision_tower" / "config.json", hf_config_dict(vision_config(), "SiglipVisionModel"))
    save_st(model_dir / "vision_tower" / "model.safetensors",
            {"vision_model." + k: v for k, v in weights["vision_tower"].items()})

    write_json(model_dir / "mm_projector" / "config.json",
               {"model_type": "v2l_projector", "mm_projector_type": "mlp_downsample", "architectures": ["MultimodalProjector"]})
    save_st(model_dir / "mm_projector" / "model.safetensors", weights["mm_projector"])

    write_json(model_dir / "llm" / "config.json", hf_config_dict(llm_config(), "LlamaForCausalLM"))
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = ({}, {})
    for k, v in weights["llm"].items():
        first = k == "model.embed_tokens.weight" or k.startswith("model.layers.0.")
        shards[0 if first else 1][k] = v
    weight_map = {}
    for fname, tensors in zip(shard_names, shards):
        save_st(model_dir / "llm" / fname, tensors)
        weight_map.update({k: fname for k in tensors})
    total = sum(tensor_bytes(v) for v in weights["llm"].values())
    write_json(model_dir / "llm" / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    save_st(out_dir / "batch.safetensors", batch)

    prefix = {"vision_tower": "vision_tower.vision_model.", "mm_projector": "mm_projector.", "llm": "llm."}
    g_out = {"loss": loss.detach().to(torch.float32).reshape(())}
    for (key, name), g in grads.items():
        g_out[prefix[key] + name] = g.to(torch.float32)
    save_st(out_dir / "expected_grads.safetensors", g_out)
    save_st(out_dir / "batch_dynamic.safetensors", dyn_batch)
    g_dyn = {"loss": dyn_loss.detach().to(torch.float32).reshape(())}
    for (key, name), g in dyn_grads.items():
        g_dyn[prefix[key] + name] = g.to(torch.float32)
    save_st(out_dir / "expected_grads_dynamic.safetensors", g_dyn)

    f_out = {k: rec[k].detach().to(torch.float32) for k in
             ("vit_tiles_selected", "s2_features", "downsample_out", "projector_out", "llm_inputs_embeds", "logits")}
    f_out["labels_expanded"] = rec["labels_expanded"]
    save_st(out_dir / "expected_forward.safetensors", f_out)

    # ---- read back: files equal the in-memory reference
    vt = load_file(str(model_dir / "vision_tower" / "model.safetensors"))
    assert all(torch.equal(vt["vision_model." + k], v) for k, v in weights["vision_tower"].items())
    eg = load_file(str(out_dir / "expected_grads.safetensors"))
    n_params = sum(len(w) for w in weights.values())
    assert len(eg) == n_params + 1 and eg["loss"].shape == ()
    # transformers itself can load the written model folders (prefix + sharded index).
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        vit_loaded = SiglipVisionModel.from_pretrained(model_dir / "vision_tower")
        llm_loaded = LlamaForCausalLM.from_pretrained(model_dir / "llm")
    for k, v in vit_loaded.state_dict().items():
        assert torch.equal(v, weights["vision_tower"][k]), k
    for k, v in llm_loaded.state_dict().items():
        assert torch.equal(v, weights["llm"][k]), k

    # ---- summary
    print(f"loss (float64 reference) = {loss.item():.12f}   (transformers f32 loss {rec32['hf_loss'].item():.8f})")
    print(f"dynamic S2 loss (float64 reference) = {dyn_loss.item():.12f}, grids {DYNAMIC_GRIDS}")
    print(f"sequence length {rec['logits'].shape[1]}, image tokens per sample {N_IMG_TOKENS}, "
          f"target tokens {int((rec['labels_expanded'][:, 1:] != IGNORE_INDEX).sum())}, parameters {n_params} tensors")
    total_size = 0
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total_size += size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"  {size:>9}  {digest}  {path.relative_to(out_dir)}")
    print(f"  {total_size:>9}  total")
    assert total_size < 5 * 1024 * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
