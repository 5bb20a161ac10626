#!/usr/bin/env bash
# The S2 demo table (issue 3): `tiny` trained for the same steps on the demo
# data three ways (two S2 scales with the ViT unfrozen; one scale; two scales
# with the ViT frozen), each evaluated on the held-out split. A benchmark,
# not a test: about 3 minutes a run on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
worker="${CARGO_TARGET_DIR:-target}/release/worker"
cargo build --release -p tessera-worker
[ -f data/demo/train.jsonl ] || "$worker" make-demo-data --out data/demo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u)"
printf '| run | config | eval accuracy | eval loss | train seconds |\n|---|---|---|---|---|\n'
for cfg in demo demo-one-scale demo-frozen-vit; do
  out=$("$worker" train --config "configs/$cfg.toml")
  acc=$(grep '^eval:' <<<"$out" | sed -E 's/eval: accuracy ([0-9.]+) \(([0-9]+\/[0-9]+)\), mean loss ([0-9.]+).*/\1 (\2)|\3/')
  secs=$(grep '^trained' <<<"$out" | awk '{print $5}')
  printf '| %s | configs/%s.toml | %s | %s |\n' "$cfg" "$cfg" "${acc/|/ | }" "$secs"
done
