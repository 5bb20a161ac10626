#!/usr/bin/env python3
"""The PIL + numpy side of the image pipeline benchmark.

Driven by `worker/examples/bench_image_pipeline.rs` (see tools/bench_images.sh),
which runs our `load_image` and this script on the same files in one run and
prints the ratio. Three subcommands:

  gen   --dir D [--count 200] [--seed 0]
        Writes `count` deterministic, photo-like JPEGs (quality 90, PIL's
        default 4:2:0 subsampling) of a few sizes and aspect ratios into D,
        plus D/manifest.json (file names, sizes, bytes, sha256 of the set).
        Photo-like: a smooth random colour field, shaded shapes, soft edges,
        texture and sensor-like noise, so the JPEGs are not trivially
        compressible (about 1.5 to 2.5 bits a pixel). Skipped when the
        manifest already matches (same count and seed).

  serve --dir D [--size 768] [--procs 2]
        Times PIL + numpy doing VILA's preprocessing on every file in the
        manifest: Image.open, convert("RGB"), resize((size, size), BICUBIC),
        numpy float32, (x / 255 - 0.5) / 0.5, CHW. Starts a multiprocessing
        pool of `procs` worker processes (fork), prints one JSON line
        {"ready": true, versions...}, then reads commands from stdin, one a
        line: `1` times one pass over every file in this process, `N` (the
        pool size) one pass on the pool; each answer is a JSON line
        {"procs": .., "images": .., "seconds": ..}. The caller decides the
        warm-up, the repetitions and their order (the Rust side interleaves
        them with its own runs, so machine noise hits both alike). The pool's
        workers return only a scalar, not the 7 MB array: no IPC cost is
        charged to PIL.

  dump  --dir D --out O [--size 768] NAME...
        Writes the benchmarked function's output for the named files to
        O/NAME.f32 (raw little-endian f32, [3, size, size]), and PIL's decoded
        RGB pixels to O/NAME.rgb (raw uint8 HWC), so the Rust side can check
        that both compute the same thing.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter

# (width, height, how many): COCO-like 640x480 dominates, plus portrait,
# larger landscape, 16:9, small, square, and tall images that Pillow >= 13
# resizes vertical pass first (height shrinks by more than twice the width).
SHAPES = [
    (640, 480, 100),
    (480, 640, 20),
    (800, 600, 20),
    (1024, 768, 15),
    (1280, 720, 15),
    (500, 375, 15),
    (336, 336, 10),
    (1024, 1536, 5),
]


def shape_list(count):
    """The (width, height) of each of `count` images, in file order."""
    base = [(w, h) for w, h, n in SHAPES for _ in range(n)]
    total = len(base)
    # Spread the kinds over the file order (and so over the workers).
    order = sorted(range(total), key=lambda i: (i * 7919) % total)
    base = [base[i] for i in order]
    return [base[i % total] for i in range(count)]


def photo_like(rng, w, h):
    """A deterministic photo-like RGB image (uint8 HWC)."""
    # Smooth background: a low-resolution random colour field, upscaled.
    gw, gh = rng.randint(3, 7), rng.randint(3, 7)
    field = rng.randint(0, 256, (gh, gw, 3)).astype(np.uint8)
    bg = Image.fromarray(field, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    img = bg.copy()
    draw = ImageDraw.Draw(img)
    # Shapes of many sizes (objects near and far).
    for _ in range(rng.randint(12, 30)):
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        s = int(min(w, h) * rng.uniform(0.03, 0.45))
        x1, y1 = x0 + s + rng.randint(0, s + 1), y0 + s + rng.randint(0, s + 1)
        colour = tuple(int(v) for v in rng.randint(0, 256, 3))
        kind = rng.randint(0, 3)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            pts = [(int(x0 + rng.randint(0, s + 1)), int(y0 + rng.randint(0, s + 1))) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    # Thin lines and small text-like marks: fine detail.
    for _ in range(rng.randint(10, 40)):
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        draw.line(
            [x0, y0, x0 + rng.randint(-80, 81), y0 + rng.randint(-80, 81)],
            fill=tuple(int(v) for v in rng.randint(0, 256, 3)),
            width=int(rng.randint(1, 4)),
        )
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.6))))
    a = np.asarray(img).astype(np.float32)
    # Shading across the frame (light falloff), texture and sensor noise.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    shade = 1.0 - 0.35 * (((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2)
    texture = 10.0 * np.sin(xx / rng.uniform(2.0, 9.0) + np.cos(yy / rng.uniform(3.0, 11.0)) * 3.0)
    a = a * shade[..., None] + texture[..., None]
    a += rng.normal(0.0, rng.uniform(3.0, 7.0), a.shape).astype(np.float32)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def cmd_gen(args):
    os.makedirs(args.dir, exist_ok=True)
    manifest_path = os.path.join(args.dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if (
            old.get("count") == args.count
            and old.get("seed") == args.seed
            and all(os.path.exists(os.path.join(args.dir, e["file"])) for e in old["files"])
        ):
            print(f"{args.dir}: {args.count} images already there", file=sys.stderr)
            return
    t0 = time.perf_counter()
    files = []
    digest = hashlib.sha256()
    for i, (w, h) in enumerate(shape_list(args.count)):
        rng = np.random.RandomState(args.seed * 1_000_003 + i)
        name = f"img{i:04d}_{w}x{h}.jpg"
        path = os.path.join(args.dir, name)
        Image.fromarray(photo_like(rng, w, h), "RGB").save(path, quality=90)
        with open(path, "rb") as f:
            data = f.read()
        digest.update(data)
        files.append({"file": name, "width": w, "height": h, "bytes": len(data)})
    total = sum(e["bytes"] for e in files)
    pixels = sum(e["width"] * e["height"] for e in files)
    manifest = {
        "count": args.count,
        "seed": args.seed,
        "quality": 90,
        "pillow": PIL.__version__,
        "sha256": digest.hexdigest(),
        "total_bytes": total,
        "bits_per_pixel": round(8 * total / pixels, 3),
        "files": files,
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    print(
        f"{args.dir}: wrote {args.count} JPEGs ({total / 1e6:.1f} MB, {manifest['bits_per_pixel']} bits/pixel) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )


SIZE = 768


def preprocess(path, size=None):
    """What VILA does to an image before the vision tower, with PIL + numpy:
    [3, size, size] float32, (x / 255 - 0.5) / 0.5."""
    size = size or SIZE
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    # CHW on the uint8 data (a quarter of the bytes), then float32 in place.
    x = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1)).astype(np.float32)
    x /= 255.0
    x -= 0.5
    x /= 0.5
    return x


def preprocess_scalar(path):
    """`preprocess` in a worker process: only a scalar goes back."""
    return float(preprocess(path)[0, 0, 0])


def set_size(size):
    global SIZE
    SIZE = size


def paths_of(dir_):
    with open(os.path.join(dir_, "manifest.json")) as f:
        manifest = json.load(f)
    return [os.path.join(dir_, e["file"]) for e in manifest["files"]]


def cmd_serve(args):
    set_size(args.size)
    paths = paths_of(args.dir)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.procs, initializer=set_size, initargs=(args.size,)) as pool:
        versions = {"pillow": PIL.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}
        print(json.dumps({"ready": True, "procs": args.procs, **versions}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if not cmd or cmd == "quit":
                break
            procs = int(cmd)
            t0 = time.perf_counter()
            if procs == 1:
                for p in paths:
                    preprocess(p)
            elif procs == args.procs:
                pool.map(preprocess_scalar, paths, chunksize=args.chunksize)
            else:
                raise SystemExit(f"serve: {procs} processes asked, the pool has {args.procs}")
            dt = time.perf_counter() - t0
            print(json.dumps({"procs": procs, "images": len(paths), "seconds": dt}), flush=True)


def cmd_dump(args):
    os.makedirs(args.out, exist_ok=True)
    for name in args.names:
        path = os.path.join(args.dir, name)
        with Image.open(path) as im:
            np.asarray(im.convert("RGB")).tofile(os.path.join(args.out, name + ".rgb"))
        x = preprocess(path, args.size)
        assert x.shape == (3, args.size, args.size) and x.dtype == np.float32
        x.astype("<f4").tofile(os.path.join(args.out, name + ".f32"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--dir", required=True)
    g.add_argument("--count", type=int, default=200)
    g.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("serve")
    b.add_argument("--dir", required=True)
    b.add_argument("--size", type=int, default=768)
    b.add_argument("--procs", type=int, default=2)
    b.add_argument("--chunksize", type=int, default=2)
    d = sub.add_parser("dump")
    d.add_argument("--dir", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--size", type=int, default=768)
    d.add_argument("names", nargs="+")
    args = ap.parse_args()
    {"gen": cmd_gen, "serve": cmd_serve, "dump": cmd_dump}[args.cmd](args)


if __name__ == "__main__":
    main()
