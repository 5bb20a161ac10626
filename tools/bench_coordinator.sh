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
source tools/coordinator_bench.sh # the script runs from the repository root
run_coordinator_bench bench_coordinator "$@"
