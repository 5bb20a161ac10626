#!/usr/bin/env bash
# Coordinator scale: N simulated workers (default 64, 256, 1024) in one
# process, each on its own gRPC connection to a real `coordinator` process,
# join, rendezvous, fetch 100 step assignments, report and leave
# (worker/examples/bench_coordinator.rs). Prints the machine, then a table
# with the rendezvous time and assignments per second. Extra arguments go to
# the example, e.g.
#
#   tools/bench_coordinator.sh --workers 64,256,1024 --steps 100 --keep
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"

source tools/machine.sh # the script runs from the repository root
print_machine coordinator worker proto

echo "== build"
cargo build --release -p tessera-worker -p tessera-coordinator --bin worker --bin coordinator --example bench_coordinator

# Each side holds one socket per simulated worker: raise the soft open-file
# limit to the hard one when it is lower than the run needs.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$(ulimit -n)" -lt "$hard" ]; then
    ulimit -n "$hard" 2>/dev/null || true
fi
echo "open files: soft $(ulimit -n), hard $(ulimit -Hn)"

echo "== run (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
"$target/release/examples/bench_coordinator" --bin-dir "$target/release" "$@"
echo "(loadavg after: $(cut -d" " -f1-3 /proc/loadavg))"
