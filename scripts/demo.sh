#!/usr/bin/env bash
# The main job on one machine: build, make the demo data if absent, train
# `tiny` (two S2 scales, ViT unfrozen) on it, and print the eval accuracy.
# Extra arguments go to `worker train` (e.g. --steps 20). The coordinator
# with local workers replaces the single process with issue 4.
set -euo pipefail
cd "$(dirname "$0")/.."
worker="${CARGO_TARGET_DIR:-target}/release/worker"
cargo build --release -p tessera-worker
[ -f data/demo/train.jsonl ] || "$worker" make-demo-data --out data/demo
exec "$worker" train --config configs/demo.toml --out runs/demo/model --metrics runs/demo/metrics.jsonl "$@"
