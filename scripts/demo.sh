#!/usr/bin/env bash
# The main job on one machine: build, make the demo data if absent, start the
# coordinator and 2 CPU workers on 127.0.0.1, train `tiny` (two S2 scales,
# ViT unfrozen) on the demo data, and print the eval accuracy. Writes
# runs/demo/{metrics.jsonl,loss_curve.svg,model/}.
#
# Options: --steps N (fewer steps, e.g. for CI), --workers N (default 2),
# --port P (default 29500). Each worker uses cores/N compute threads.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="" workers=2 port=29500
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        *) echo "demo.sh: unknown option $1 (use --steps N, --workers N, --port P)" >&2; exit 2 ;;
    esac
done
target="${CARGO_TARGET_DIR:-target}/release"
cargo build --release -p tessera-worker -p tessera-coordinator
[ -f data/demo/train.jsonl ] || "$target/worker" make-demo-data --out data/demo

# The job: configs/demo.toml with the chosen steps and world size.
mkdir -p runs/demo
config=runs/demo/job.toml
sed -e "s/^world_size = .*/world_size = $workers/" configs/demo.toml > "$config"
if [ -n "$steps" ]; then
    sed -i -e "s/^steps = .*/steps = $steps/" "$config"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

"$target/coordinator" --config "$config" --listen "127.0.0.1:$port" --out runs/demo &
coordinator=$!
# A coordinator that cannot start (port taken, bad config) must not leave the
# workers to find whatever else listens on that port.
sleep 1
if ! kill -0 "$coordinator" 2>/dev/null; then
    status=0; wait "$coordinator" || status=$?
    exit "$status"
fi
threads=$(( $(nproc) / workers )); [ "$threads" -ge 1 ] || threads=1
for rank in $(seq 0 $((workers - 1))); do
    RAYON_NUM_THREADS=$threads RUST_LOG=warn "$target/worker" --rank "$rank" \
        --coordinator "http://127.0.0.1:$port" --connect-timeout 60 &
    pids+=($!)
done
status=0
wait "$coordinator" || status=$?
for p in "${pids[@]}"; do wait "$p" || status=$?; done
pids=()
exit "$status"
