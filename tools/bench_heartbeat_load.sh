#!/usr/bin/env bash
# Coordinator under heartbeat load: a real 4-worker training job on
# 127.0.0.1, alone (A), while 1024 simulated clients heartbeat its
# coordinator at 10 Hz each (B), and while they heartbeat a decoy
# coordinator with no workers instead (C), in the order A, B, C, A, C, B, A
# (worker/examples/bench_heartbeat_load/). Prints the machine, then a table
# with the mean step time of each run against the mean of the A runs, the
# heartbeats' latency and outcomes, the job coordinator's latency to a probe,
# and the CPU use of the coordinator, the workers, the simulated clients and
# the rest of the machine; then B vs A, C vs A and B vs C. About 4 minutes on
# 2 cores. Extra arguments go to the example, e.g.
#
#   tools/bench_heartbeat_load.sh --clients 1024 --steps 1000 --runs A,B,C,A,C,B,A --keep
#
# The workers on a core of their own, as on a cluster where the simulated
# clients are other machines (the clients run in the benchmark process):
#
#   taskset -c 1 tools/bench_heartbeat_load.sh --worker-cpus 0 --coordinator-cpus 1
#
# Run kind D (--runs C,D,C,D) makes the clients members of a decoy job, to
# compare a member's accepted beat with the refusals of B and C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/coordinator_bench.sh # the script runs from the repository root
run_coordinator_bench bench_heartbeat_load "$@"
