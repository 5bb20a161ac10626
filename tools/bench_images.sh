#!/usr/bin/env bash
# Image pipeline benchmark: images per second through decode,
# resize to the largest S2 scale (768 for vila-3b-s2) and SigLIP normalize,
# Tessera's `load_image` vs PIL + numpy on the same 200 JPEGs, in one run.
# Prints a Markdown table and the ratios ours / PIL for 1 thread vs 1 process
# and THREADS threads vs a pool of THREADS processes.
#
# Usage: tools/bench_images.sh                      # THREADS=2 WARMUP=1 REPS=5
#        THREADS=4 REPS=7 PYTHON=python3 DIR=/tmp/imgs tools/bench_images.sh [--stages]
# Extra arguments go to the example (see its --help).
set -euo pipefail

THREADS="${THREADS:-2}"
WARMUP="${WARMUP:-1}"
REPS="${REPS:-5}"
PYTHON="${PYTHON:-python3}"
DIR="${DIR:-${TMPDIR:-/tmp}/tessera-bench-images}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source tools/machine.sh # the script runs from the repository root
print_machine worker/src/data
echo "python:  $("$PYTHON" -c 'import sys, PIL, numpy; from PIL import features; print(sys.version.split()[0], "/ Pillow", PIL.__version__, "/ numpy", numpy.__version__, "/ libjpeg-turbo", features.version("libjpeg_turbo"))')"

echo "== build"
cargo build --release -p tessera-worker --example bench_image_pipeline

echo "== run (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
"${CARGO_TARGET_DIR:-target}/release/examples/bench_image_pipeline" \
    --dir "$DIR" --threads "$THREADS" --warmup "$WARMUP" --reps "$REPS" --python "$PYTHON" "$@"
echo "== done (loadavg after: $(cut -d" " -f1-3 /proc/loadavg))"
