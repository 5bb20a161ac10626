#!/usr/bin/env bash
# The S2 demo table: `tiny` trained for the same steps on the demo
# data three ways (two S2 scales with the ViT unfrozen; one scale; two scales
# with the ViT frozen), each evaluated on the held-out split, for the
# training seeds in SEEDS (default "0 1 2": one seed can mislead, as
# training this small model sometimes finds the fine patterns late). A
# benchmark, not a test: about 1 minute a run on an idle 2-core machine,
# 9 runs.
set -euo pipefail
cd "$(dirname "$0")/.."
worker="${CARGO_TARGET_DIR:-target}/release/worker"
seeds="${SEEDS:-0 1 2}"
cargo build --release -p tessera-worker
[ -f data/demo/train.jsonl ] || "$worker" make-demo-data --out data/demo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u); commit $(git rev-parse --short HEAD)"
printf '| config | seed | eval accuracy | eval loss | train seconds |\n|---|---|---|---|---|\n'
summary=""
for cfg in demo demo-one-scale demo-frozen-vit; do
  accs=()
  for seed in $seeds; do
    grep -q '^seed = 0$' "configs/$cfg.toml" || { echo "configs/$cfg.toml: no 'seed = 0' line to replace" >&2; exit 1; }
    sed "s/^seed = 0$/seed = $seed/" "configs/$cfg.toml" > "$tmp/$cfg-$seed.toml"
    out=$("$worker" train --config "$tmp/$cfg-$seed.toml" 2>/dev/null)
    line=$(grep '^eval:' <<<"$out")
    acc=$(sed -E 's/eval: accuracy ([0-9.]+) .*/\1/' <<<"$line")
    frac=$(sed -E 's/.*\(([0-9]+\/[0-9]+)\).*/\1/' <<<"$line")
    loss=$(sed -E 's/.*mean loss ([0-9.]+).*/\1/' <<<"$line")
    secs=$(grep '^trained' <<<"$out" | awk '{print $5}')
    printf '| configs/%s.toml | %s | %s (%s) | %s | %s |\n' "$cfg" "$seed" "$acc" "$frac" "$loss" "$secs"
    accs+=("$acc")
  done
  summary+=$(printf '%s: accuracy mean %s, min %s, max %s over seeds %s' "$cfg" \
    "$(printf '%s\n' "${accs[@]}" | awk '{s+=$1} END {printf "%.3f", s/NR}')" \
    "$(printf '%s\n' "${accs[@]}" | sort -n | head -1)" \
    "$(printf '%s\n' "${accs[@]}" | sort -n | tail -1)" "$seeds")$'\n'
done
echo
printf '%s' "$summary"
