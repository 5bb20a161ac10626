#!/usr/bin/env bash
# A Tessera job on several machines without Slurm: the coordinator runs here
# (the head node), and ssh starts the workers on each host in HOSTS.
#
#   HOSTS="gpu-a gpu-b" GPUS_PER_HOST=8 CONFIG=configs/my-job.toml scripts/multihost.sh
#   HOSTS="node1 node2" DEVICE=cpu CONFIG=configs/my-job.toml scripts/multihost.sh
#
# Assumptions: passwordless ssh to every host (BatchMode: no prompts); the
# repository, the data and OUT on a file system every host sees at the same
# path (as on a cluster), or at least the same paths on every host; and the
# release binaries built there:
#   cargo build --release -p tessera-worker -p tessera-coordinator
#
# Ranks: host i of HOSTS runs ranks i*GPUS_PER_HOST .. i*GPUS_PER_HOST+G-1,
# its K-th worker on cuda:K (or all of them on DEVICE when set). The job
# config's `[cluster] world_size` must equal (hosts in HOSTS) x GPUS_PER_HOST;
# the script checks it first.
#
# Knobs (environment variables):
#   HOSTS          hosts to run workers on, separated by spaces (required).
#                  The head node may be one of them.
#   GPUS_PER_HOST  workers per host (1).
#   DEVICE         empty (default): worker K of a host uses cuda:K; `cpu`
#                  runs every worker on the CPU.
#   CONFIG         the job config (configs/demo.toml).
#   OUT            the coordinator's output folder (runs/multihost).
#   HEAD           this machine's name or address as the hosts reach it
#                  (default: `hostname -f`).
#   PORT           the coordinator's gRPC port (29500).
#   BIN            folder with the binaries, relative to the repository
#                  (default: ${CARGO_TARGET_DIR:-target}/release).
#   REMOTE_DIR     the repository's path on the hosts (default: this one's).
#   SSH            the ssh command (default: ssh -o BatchMode=yes).
#   TOKEN_FILE     the job token the workers must present (default: a fresh
#                  random one in $OUT/job.token, mode 600, which the hosts
#                  read at the same path).
#
# The workers' output comes back over ssh, each line prefixed with its rank.
# Exit status: the coordinator's (0 = every rank trained every step and left).
# Stopping this script (Ctrl-C) stops the coordinator; workers that lose it
# exit on their own when their next call fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOSTS=${HOSTS:?set HOSTS to the hosts that run workers, e.g. HOSTS="node1 node2"}
GPUS_PER_HOST=${GPUS_PER_HOST:-1}
DEVICE=${DEVICE:-}
CONFIG=${CONFIG:-configs/demo.toml}
OUT=${OUT:-runs/multihost}
HEAD=${HEAD:-$(hostname -f)}
PORT=${PORT:-29500}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
REMOTE_DIR=${REMOTE_DIR:-$PWD}
SSH=${SSH:-ssh -o BatchMode=yes}

die() {
    echo "multihost.sh: $*" >&2
    exit 2
}

[ -f "$CONFIG" ] || die "job config $CONFIG not found"
[ -x "$BIN/coordinator" ] || die "$BIN/coordinator not found: cargo build --release -p tessera-worker -p tessera-coordinator"
read -r -a hosts <<<"$HOSTS"
[ "${#hosts[@]}" -gt 0 ] || die "HOSTS is empty"
[[ $GPUS_PER_HOST =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_HOST=$GPUS_PER_HOST is not a positive number"
read -r -a ssh_cmd <<<"$SSH"

# cluster.world_size from the TOML (1 when absent, as in the worker).
world_size=$(awk '
    /^[[:space:]]*\[/ { in_cluster = ($0 ~ /^[[:space:]]*\[cluster\][[:space:]]*(#.*)?$/); next }
    in_cluster && /^[[:space:]]*world_size[[:space:]]*=/ {
        sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; exit
    }' "$CONFIG")
world_size=${world_size:-1}
workers=$((${#hosts[@]} * GPUS_PER_HOST))
if [ "$world_size" != "$workers" ]; then
    die "$CONFIG has cluster.world_size = $world_size, but ${#hosts[@]} hosts x $GPUS_PER_HOST workers = $workers"
fi

echo "multihost.sh: $workers workers on ${hosts[*]}; coordinator on $HEAD:$PORT; out $OUT"
mkdir -p "$OUT"
# Only this job's workers may join: a token nobody else can read.
TOKEN_FILE=${TOKEN_FILE:-}
if [ -z "$TOKEN_FILE" ]; then
    TOKEN_FILE=$OUT/job.token
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")
fi
"$BIN/coordinator" --config "$CONFIG" --listen "0.0.0.0:$PORT" --out "$OUT" --token-file "$TOKEN_FILE" &
coordinator_pid=$!

pids=()
# Stopped early (Ctrl-C, an error): stop the coordinator and the ssh sessions.
trap 'kill "$coordinator_pid" "${pids[@]}" 2>/dev/null || true' EXIT

rank=0
for host in "${hosts[@]}"; do
    for ((local_rank = 0; local_rank < GPUS_PER_HOST; local_rank++)); do
        device=${DEVICE:-cuda:$local_rank}
        # The remote command line, quoted for the remote shell.
        remote=$(printf 'cd %q && exec %q --rank %q --coordinator %q --device %q --token-file %q' \
            "$REMOTE_DIR" "$BIN/worker" "$rank" "http://$HEAD:$PORT" "$device" "$TOKEN_FILE")
        # -n: ssh must not read this script's stdin. The subshell's status is
        # ssh's (pipefail), not sed's.
        ("${ssh_cmd[@]}" -n "$host" "$remote" 2>&1 | sed -u "s/^/[rank $rank] /") &
        pids+=($!)
        rank=$((rank + 1))
    done
done

set +e
wait "$coordinator_pid"
status=$?
if [ "$status" -ne 0 ]; then
    # A failed job: workers hear "shutdown" on their next heartbeat; do not
    # wait long for the ones that cannot.
    sleep 10
    kill "${pids[@]}" 2>/dev/null
fi
# After a finished job every worker has already left; report any that failed.
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || echo "multihost.sh: the ssh session of rank $i failed" >&2
done
set -e
trap - EXIT
echo "multihost.sh: coordinator exit status $status"
exit "$status"
