#!/usr/bin/env bash
# CPU all-reduce: Tessera's ring vs PyTorch gloo, same sizes, iteration
# counts and timing, in one run (worker/examples/bench_allreduce.rs starts
# both). Prints the machine, then a table with both bus bandwidths and the
# ratio ours / gloo (> 1: ours is faster). By default the ring runs twice,
# with its same-host links in shared memory (the default) and on Unix
# sockets (the data path before shared memory). Extra arguments go to the
# example, e.g.
#
#   tools/bench_allreduce.sh --sizes-mib 1,16,128 --iters 20 --warmup 3 --world-size 2
#   tools/bench_allreduce.sh --transports shm,unix,tcp
#   PYTHON=/path/to/python tools/bench_allreduce.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

source tools/machine.sh # the script runs from the repository root
print_machine worker
echo "torch:   $("$PYTHON" -c 'import torch; print(torch.__version__)')"

echo "== build"
cargo build --release -p tessera-worker --example bench_allreduce

echo "== run (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
"${CARGO_TARGET_DIR:-target}/release/examples/bench_allreduce" --python "$PYTHON" "$@"
echo "(loadavg after: $(cut -d" " -f1-3 /proc/loadavg))"
