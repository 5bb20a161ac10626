#!/usr/bin/env python3
"""Reference outputs for the CPU op tests that have no gradient to check.

Writes worker/tests/fixtures/ops/bicubic.json: PyTorch's
F.interpolate(mode='bicubic', align_corners=False, antialias=False) on a fixed
[1, 2, 10, 10] input whose flat element i is (i * 0.37) mod 1.3, resized to 4,
7 (down) and 13 (up). Computed in float64 so the Rust f64 path can be held to
a tight tolerance. Rerun with: python3 tools/make_op_fixtures.py
"""
import json
import os

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "worker", "tests", "fixtures", "ops", "bicubic.json")


def main():
    shape = [1, 2, 10, 10]
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    flat = [(i * 0.37) % 1.3 for i in range(numel)]
    x = torch.tensor(flat, dtype=torch.float64).reshape(shape)
    cases = []
    for size in (4, 7, 13):
        y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
        cases.append({"size": size, "output": [float(v) for v in y.flatten().tolist()]})
    doc = {
        "generator": "tools/make_op_fixtures.py",
        "torch": torch.__version__,
        "op": "F.interpolate(mode='bicubic', align_corners=False, antialias=False), float64",
        "input_shape": shape,
        "input": flat,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
