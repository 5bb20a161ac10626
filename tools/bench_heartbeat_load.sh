#!/usr/bin/env bash
# Coordinator under heartbeat load (issue 7): a real 4-worker training job on
# 127.0.0.1, alone (A), while 1024 simulated clients heartbeat its
# coordinator at 10 Hz each (B), and while they heartbeat a decoy
# coordinator with no workers instead (C), in the order A, B, C, A, C, B, A
# (worker/examples/bench_heartbeat_load.rs). Prints the machine, then a table
# with the mean step time of each run against the mean of the A runs, the
# heartbeats' latency and outcomes, the job coordinator's latency to a probe,
# and the CPU use of the coordinator, the workers, the simulated clients and
# the rest of the machine; then B vs A, C vs A and B vs C. About 4 minutes on
# 2 cores. Extra arguments go to the example, e.g.
#
#   tools/bench_heartbeat_load.sh --clients 1024 --steps 1000 --runs A,B,C,A,C,B,A --keep
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"

source tools/machine.sh # the script runs from the repository root
print_machine coordinator worker proto

echo "== build"
cargo build --release -p tessera-worker -p tessera-coordinator --bin worker --bin coordinator --example bench_heartbeat_load

# Each side holds one socket per simulated client: raise the soft open-file
# limit to the hard one when it is lower.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$(ulimit -n)" -lt "$hard" ]; then
    ulimit -n "$hard" 2>/dev/null || true
fi
echo "open files: soft $(ulimit -n), hard $(ulimit -Hn)"

echo "== run (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
"$target/release/examples/bench_heartbeat_load" --bin-dir "$target/release" "$@"
echo "(loadavg after: $(cut -d" " -f1-3 /proc/loadavg))"
