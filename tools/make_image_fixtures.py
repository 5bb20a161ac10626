#!/usr/bin/env python3
"""Reference outputs for the image pipeline tests (worker/src/data/image.rs).

Writes worker/tests/fixtures/images/: a few small images in the formats and
colour modes a dataset holds, and for each the output of VILA's image
pipeline at S = 40 as raw little-endian f32, [3, 40, 40] (CHW):

  resize: Image.open(p).convert("RGB").resize((S, S)) (PIL's default
          resample, BICUBIC), then transformers' SigLIP image processor with
          size {"height": S, "width": S} (PIL backend: bicubic resize, which is
          a no-op here, x * (1/255), (x - 0.5) / 0.5), as VILA's process_image
          does for image_aspect_ratio "resize".
  pad:    VILA's expand2square with background (127, 127, 127) (=
          int(0.5 * 255) per channel), then the same processor.

The processor's output is checked against a hand-written PIL resize +
normalize, so the fixtures pin down exactly what the Rust code reimplements.

The expected outputs are those of the installed Pillow (its version is in the
manifest): Pillow 13 changed the order of the two resize passes for images
whose height shrinks much more than their width (see the resample cases).

It also writes PIL's uint8 output of Image.resize(..., BICUBIC) for a few
shapes (raw HWC bytes), in both pass orders, for the resampler test, and the
dynamic S2 tile grids
of NVILA's dynamic_s2_preprocess (transcribed below) for a few image sizes,
and for two images the tiles themselves (scales [10, 20], tiles of 10 px, at
most 6 tiles), each tile through the SigLIP processor, as little-endian f32
[T, 3, 10, 10].
Everything is listed in manifest.json. The output is deterministic (fixed
seeds). Rerun with: python3 tools/make_image_fixtures.py
"""
import json
import os

import numpy as np
import PIL
from PIL import Image

try:  # transformers 5 names the PIL backend explicitly
    from transformers import SiglipImageProcessorPil as SiglipProcessor
except ImportError:  # transformers 4: the slow processor is the PIL one
    from transformers import SiglipImageProcessor as SiglipProcessor
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "worker", "tests", "fixtures", "images")
S = 40
MEAN = (0.5, 0.5, 0.5)
# Images whose pad variant is not stored (the fixtures stay under 300 KB).
RESIZE_ONLY = {"palette_16x12.png", "lossy_20x28.webp", "tall_24x90.png", "rgba_64x40.png"}


def smooth_rgb(rng, w, h, noise):
    """A colour gradient plus some noise: photo-like enough for JPEG/WebP."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 128 + 100 * np.sin(x / 3.0) * np.cos(y / 4.0)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, noise, (h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_images(rng):
    """name -> (PIL image to save, save kwargs, format, note)."""
    imgs = {}
    # Pure noise: every output pixel has large negative lobes, so clamping
    # and rounding are exercised everywhere.
    noise = rng.randint(0, 256, (23, 37, 3), dtype=np.uint8)
    imgs["rgb_37x23.png"] = (Image.fromarray(noise, "RGB"), {}, "png", "RGB noise")
    rgb = smooth_rgb(rng, 64, 40, 20.0)
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (40, 1))
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    imgs["rgba_64x40.png"] = (Image.fromarray(rgba, "RGBA"), {}, "png", "RGBA, alpha 0..255 across")
    # Portrait: Pillow >= 13 resizes it to a square vertical pass first.
    imgs["tall_24x90.png"] = (Image.fromarray(smooth_rgb(rng, 24, 90, 6.0), "RGB"), {}, "png", "RGB, portrait")
    gray = rng.randint(0, 256, (30, 30), dtype=np.uint8)
    imgs["gray_30x30.png"] = (Image.fromarray(gray, "L"), {}, "png", "grayscale L")
    pal = Image.fromarray(smooth_rgb(rng, 16, 12, 30.0), "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    imgs["palette_16x12.png"] = (pal, {}, "png", "palette (P) with 16 colours")
    imgs["q90_50x33.jpg"] = (
        Image.fromarray(smooth_rgb(rng, 50, 33, 12.0), "RGB"),
        {"quality": 90},
        "jpeg",
        "baseline JPEG, quality 90, 4:2:0",
    )
    webp = smooth_rgb(rng, 20, 28, 25.0)
    imgs["lossless_20x28.webp"] = (
        Image.fromarray(webp, "RGB"),
        {"lossless": True},
        "webp",
        "lossless WebP (VP8L)",
    )
    imgs["lossy_20x28.webp"] = (Image.fromarray(webp, "RGB"), {"quality": 80}, "webp", "lossy WebP (VP8)")
    return imgs


def expand2square(pil_img, background_color):
    """VILA's llava/mm_utils.py expand2square, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def manual(pil_rgb):
    """Hand-written reference: PIL bicubic to S x S, then SigLIP normalize."""
    u8 = np.asarray(pil_rgb.resize((S, S), resample=Image.Resampling.BICUBIC))
    x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return x.transpose(2, 0, 1)


# --- NVILA's dynamic S2 grid choice (llava/mm_utils.py), transcribed ---------
def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_s2_grid(w, h, s2_scales, max_num, image_size):
    min_num = (s2_scales[-1] // s2_scales[0]) ** 2
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return find_closest_aspect_ratio(w / h, target_ratios, w, h, image_size)


def dynamic_s2_preprocess(image, s2_scales, max_num, image_size):
    """NVILA's dynamic_s2_preprocess (llava/mm_utils.py), transcribed: each
    smaller scale resized to a square and cut into (scale / first)^2 tiles,
    the largest resized to the closest-aspect grid and cut row by row."""
    tiles = []
    for scale in s2_scales[:-1]:
        n = scale // s2_scales[0]
        resized = image.resize((image_size * n, image_size * n))
        for i in range(n * n):
            box = ((i % n) * image_size, (i // n) * image_size, (i % n + 1) * image_size, (i // n + 1) * image_size)
            tiles.append(resized.crop(box))
    w, h = image.size
    cols, rows = dynamic_s2_grid(w, h, s2_scales, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    for i in range(cols * rows):
        box = ((i % cols) * image_size, (i // cols) * image_size, (i % cols + 1) * image_size, (i // cols + 1) * image_size)
        tiles.append(resized.crop(box))
    return tiles, (rows, cols)


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.RandomState(1234)
    processor = SiglipProcessor(size={"height": S, "width": S})
    assert list(processor.image_mean) == list(MEAN) and list(processor.image_std) == list(MEAN)
    bg = tuple(int(x * 255) for x in processor.image_mean)
    assert bg == (127, 127, 127)

    cases = []
    for name, (img, kwargs, fmt, note) in make_images(rng).items():
        path = os.path.join(OUT, name)
        img.save(path, **kwargs)
        opened = Image.open(path)
        w, h = opened.size
        rgb = opened.convert("RGB")
        modes = {"resize": rgb.resize((S, S)), "pad": expand2square(rgb, bg)}
        for mode, vila_img in modes.items():
            if mode == "pad" and (w == h or name in RESIZE_ONLY):
                continue  # identical to resize, or kept out to keep the fixtures small
            out = processor(vila_img, return_tensors="np")["pixel_values"][0]
            assert out.dtype == np.float32 and out.shape == (3, S, S), (out.dtype, out.shape)
            ref = manual(vila_img)
            assert np.array_equal(out, ref), f"{name} {mode}: processor != manual, {np.abs(out - ref).max()}"
            stem = os.path.splitext(name)[0]
            exp = f"{stem}.{mode}.f32"
            out.astype("<f4").tofile(os.path.join(OUT, exp))
            cases.append(
                {
                    "image": name,
                    "format": fmt,
                    "pil_mode": opened.mode,
                    "note": note,
                    "width": w,
                    "height": h,
                    "mode": mode,
                    "expected": exp,
                }
            )

    # PIL's uint8 bicubic resampler alone: down, up, mixed, 1 and 3 channels.
    # Pillow <= 12 always runs the horizontal pass first; Pillow >= 13 runs
    # the vertical pass first when the height shrinks by more than twice as
    # many pixels as the width. Both orders are stored, each computed as two
    # one-axis resizes (a one-axis resize runs a single pass), and the
    # installed Pillow's own result is checked against the order its version
    # uses.
    resample = []
    src_rgb = np.asarray(Image.open(os.path.join(OUT, "rgb_37x23.png")))
    src_gray = np.asarray(Image.open(os.path.join(OUT, "gray_30x30.png")))
    pillow13 = int(PIL.__version__.split(".")[0]) >= 13
    for src_name, src, mode, (ow, oh) in [
        ("rgb_37x23.png", src_rgb, "RGB", (16, 11)),  # down ~2.2x
        ("rgb_37x23.png", src_rgb, "RGB", (5, 3)),  # down ~7.5x, wide support
        ("rgb_37x23.png", src_rgb, "RGB", (45, 31)),  # up
        ("rgb_37x23.png", src_rgb, "RGB", (20, 50)),  # down in x, up in y
        ("rgb_37x23.png", src_rgb, "RGB", (37, 9)),  # vertical pass only
        ("rgb_37x23.png", src_rgb, "RGB", (30, 5)),  # down, height more: vertical first in Pillow 13
        ("rgb_37x23.png", src_rgb, "RGB", (50, 4)),  # up in x, down in y: vertical first in Pillow 13
        ("gray_30x30.png", src_gray, "L", (13, 47)),  # one channel
        ("gray_30x30.png", src_gray, "L", (33, 7)),  # one channel, vertical first in Pillow 13
    ]:
        im = Image.fromarray(src, mode)
        (w, h), B = im.size, Image.Resampling.BICUBIC
        h_first = np.asarray(im.resize((ow, h), resample=B).resize((ow, oh), resample=B))
        v_first = np.asarray(im.resize((w, oh), resample=B).resize((ow, oh), resample=B))
        direct = np.asarray(im.resize((ow, oh), resample=B))
        dy, dx = h - oh, w - ow
        rule_h_first = not (dy > 0 and dy > dx * 2) if pillow13 else True
        assert np.array_equal(direct, h_first if rule_h_first else v_first), (src_name, ow, oh)
        stem = f"resample_{os.path.splitext(src_name)[0]}_to_{ow}x{oh}"
        h_name = f"{stem}.h_first.u8"
        h_first.astype(np.uint8).tofile(os.path.join(OUT, h_name))
        v_name = h_name
        if not np.array_equal(h_first, v_first):
            v_name = f"{stem}.v_first.u8"
            v_first.astype(np.uint8).tofile(os.path.join(OUT, v_name))
        resample.append(
            {
                "input": src_name,
                "channels": 1 if mode == "L" else 3,
                "out_width": ow,
                "out_height": oh,
                "horizontal_first": h_name,
                "vertical_first": v_name,
                "installed_pillow_horizontal_first": rule_h_first,
            }
        )

    dynamic = []
    for w, h in [(384, 384), (1000, 500), (500, 1000), (1920, 1080), (300, 1200), (4000, 300), (640, 480), (100, 90)]:
        c, r = dynamic_s2_grid(w, h, [384, 768], 12, 384)
        dynamic.append({"width": w, "height": h, "cols": c, "rows": r})

    dyn_scales, dyn_tile, dyn_max = [10, 20], 10, 6
    dyn_processor = SiglipProcessor(size={"height": dyn_tile, "width": dyn_tile})
    dynamic_tiles = []
    for name in ["rgb_37x23.png", "tall_24x90.png"]:
        rgb = Image.open(os.path.join(OUT, name)).convert("RGB")
        tiles, (rows, cols) = dynamic_s2_preprocess(rgb, dyn_scales, dyn_max, dyn_tile)
        out = np.stack([dyn_processor(t, return_tensors="np")["pixel_values"][0] for t in tiles])
        assert out.dtype == np.float32 and out.shape == (len(tiles), 3, dyn_tile, dyn_tile), out.shape
        exp = f"{os.path.splitext(name)[0]}.dynamic_s2.f32"
        out.astype("<f4").tofile(os.path.join(OUT, exp))
        dynamic_tiles.append({"image": name, "rows": rows, "cols": cols, "tiles": len(tiles), "expected": exp})

    doc = {
        "generator": "tools/make_image_fixtures.py",
        "pillow": PIL.__version__,
        "transformers": transformers.__version__,
        "processor": type(processor).__name__,
        "size": S,
        "pad_background": list(bg),
        "layout": "expected *.f32: little-endian f32 [3, size, size]; *.u8: PIL uint8 HWC",
        "cases": cases,
        "resample": resample,
        "dynamic_s2": {"scales": [384, 768], "max_tiles": 12, "base": 384, "grids": dynamic},
        "dynamic_s2_tiles": {"scales": dyn_scales, "max_tiles": dyn_max, "tile": dyn_tile, "cases": dynamic_tiles},
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
