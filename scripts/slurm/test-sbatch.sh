#!/usr/bin/env bash
# Runs scripts/slurm/train.sbatch without Slurm: fake `scontrol` and `srun`
# on PATH, one "node" (localhost) with 2 tasks, DEVICE=cpu, a few steps of
# the demo job on a small demo dataset. Checks that it trains and exits 0,
# and that a world-size mismatch fails early with a clear message.
#
#   scripts/slurm/test-sbatch.sh        (builds the release binaries first;
#                                        SKIP_BUILD=1 uses them as they are)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$PWD
bin="${CARGO_TARGET_DIR:-target}/release"
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release -p tessera-worker -p tessera-coordinator
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/shims"

# scontrol show hostnames LIST: one host per line (no bracket ranges needed here).
cat >"$tmp/shims/scontrol" <<'EOF'
#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: only 'show hostnames' is supported" >&2; exit 1; }
tr ',' '\n' <<<"${3:-$SLURM_JOB_NODELIST}"
EOF

# srun [options] command...: starts --ntasks copies on this machine with
# SLURM_PROCID / SLURM_LOCALID set, waits for all, fails if any failed.
cat >"$tmp/shims/srun" <<'EOF'
#!/usr/bin/env bash
n=${SLURM_NTASKS:-1}
while [ $# -gt 0 ]; do
    case $1 in
        --ntasks=*) n=${1#--ntasks=} ;;
        -n) n=$2; shift ;;
        -N|-w|--nodes|--nodelist) shift ;;
        -*) ;;
        *) break ;;
    esac
    shift
done
echo "fake srun: $n tasks: $*" >&2
pids=()
# Like srun, pass SIGTERM / SIGINT on to the tasks.
trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NTASKS=$n "$@" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do
    wait "$p" || status=$?
done
exit "$status"
EOF
chmod +x "$tmp/shims/scontrol" "$tmp/shims/srun"

"$bin/worker" make-demo-data --out "$tmp/data" --train 64 --eval 16 >/dev/null

# configs/demo.toml with few steps, a small batch, this data, and its
# [cluster] section (if any) replaced by 2 ranks.
awk '/^[[:space:]]*\[/ { skip = ($0 ~ /^[[:space:]]*\[cluster\]/) } !skip' configs/demo.toml |
    sed -e 's/^steps = .*/steps = 6/' -e 's/^batch_size = .*/batch_size = 4/' -e "s#data/demo#$tmp/data#g" \
        >"$tmp/job.toml"
printf '\n[cluster]\nworld_size = 2\nheartbeat_interval_s = 1.0\n' >>"$tmp/job.toml"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + RANDOM % 20000)))

run_sbatch() {
    env PATH="$tmp/shims:$PATH" SLURM_JOB_ID=test SLURM_JOB_NODELIST=localhost SLURM_JOB_NUM_NODES=1 \
        SLURM_SUBMIT_DIR="$repo" CONFIG="$tmp/job.toml" OUT="$tmp/out" PORT="$port" BIN="$bin" DEVICE=cpu \
        CONNECT_TIMEOUT=60 COORDINATOR_GRACE=30 "$@" timeout 600 bash scripts/slurm/train.sbatch
}

echo "== 1. world size 2 on 2 tasks: trains and exits 0"
run_sbatch SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=2
steps=$(wc -l <"$tmp/out/metrics.jsonl")
[ "$steps" -eq 6 ] || { echo "FAIL: metrics.jsonl has $steps lines, expected 6" >&2; exit 1; }
[ -f "$tmp/out/model/config.json" ] || { echo "FAIL: rank 0 saved no model in $tmp/out/model" >&2; exit 1; }
echo "ok: 6 steps in metrics.jsonl, model saved"

echo "== 2. world size 2 on 3 tasks: refused before anything starts"
if run_sbatch SLURM_NTASKS=3 SLURM_NTASKS_PER_NODE=3 2>"$tmp/err"; then
    echo "FAIL: train.sbatch accepted 3 tasks for world_size 2" >&2
    exit 1
fi
grep -q "world_size = 2, but this job runs 3 tasks" "$tmp/err" ||
    { echo "FAIL: unexpected message:" >&2; cat "$tmp/err" >&2; exit 1; }
echo "ok: $(cat "$tmp/err")"

echo "== 3. the coordinator fails (its tokenizer is missing): the workers are stopped, the status is passed on"
sed "s#$tmp/data/tokenizer.json#$tmp/missing.json#" "$tmp/job.toml" >"$tmp/bad.toml"
start=$SECONDS
status=0
run_sbatch SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=2 CONFIG="$tmp/bad.toml" >"$tmp/log3" 2>&1 || status=$?
if [ "$status" -eq 0 ]; then
    echo "FAIL: train.sbatch exited 0 although the coordinator failed" >&2
    exit 1
fi
if [ $((SECONDS - start)) -gt 30 ]; then
    echo "FAIL: took $((SECONDS - start)) s to give up (the workers were not stopped)" >&2
    exit 1
fi
grep -q "coordinator exit status 2" "$tmp/log3" || { echo "FAIL: unexpected output:" >&2; cat "$tmp/log3" >&2; exit 1; }
echo "ok: exit status $status after $((SECONDS - start)) s"
echo "PASS"
