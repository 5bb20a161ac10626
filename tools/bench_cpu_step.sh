#!/usr/bin/env bash
# One full training step (forward, backward, AdamW) of the `small` preset on
# CPU: Tessera (`worker bench-step`) vs PyTorch (tools/bench_step_torch.py),
# same model, batch shape and thread count. Prints both medians and the
# ratio pytorch / tessera (> 1 means Tessera is faster).
#
# Usage: tools/bench_cpu_step.sh            # THREADS=2, batch 8, 32 text tokens
#        THREADS=4 BATCH=8 SEQ=32 WARMUP=1 STEPS=3 PYTHON=python3 tools/bench_cpu_step.sh
#        BEFORE=50b91f1 tools/bench_cpu_step.sh  # also an older Tessera, built from that commit
set -euo pipefail

THREADS="${THREADS:-2}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-32}"
WARMUP="${WARMUP:-1}"
STEPS="${STEPS:-3}"
PYTHON="${PYTHON:-python3}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
worker="${CARGO_TARGET_DIR:-target}/release/worker"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

source tools/machine.sh # the script runs from the repository root
print_machine worker
echo "torch:   $("$PYTHON" -c 'import torch, transformers; print(torch.__version__, "/ transformers", transformers.__version__)')"
echo "shape:   preset small, batch $BATCH, text tokens $SEQ, warmup $WARMUP, steps $STEPS, threads $THREADS"

echo "== build"
cargo build --release -p tessera-worker
before_worker=""
if [ -n "${BEFORE:-}" ]; then
    # The older commit in a worktree of its own, built into its own target.
    git worktree add --detach "$out/before" "$BEFORE" >/dev/null
    trap 'git worktree remove --force "$out/before" 2>/dev/null; rm -rf "$out"' EXIT
    before_target="${CARGO_TARGET_DIR:-$PWD/target}-before"
    (cd "$out/before" && CARGO_TARGET_DIR="$before_target" cargo build --release -p tessera-worker)
    before_worker="$before_target/release/worker"
fi

# Peak RSS per run, where GNU time is present.
timed=()
if [ -x /usr/bin/time ]; then timed=(/usr/bin/time -f '%M' -o); fi

echo "== tessera (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
if [ ${#timed[@]} -gt 0 ]; then
    RAYON_NUM_THREADS="$THREADS" "${timed[@]}" "$out/tessera.rss" "$worker" bench-step \
        --preset small --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" | tee "$out/tessera.json"
else
    RAYON_NUM_THREADS="$THREADS" "$worker" bench-step \
        --preset small --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" | tee "$out/tessera.json"
fi

if [ -n "$before_worker" ]; then
    echo "== tessera at $BEFORE (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
    RAYON_NUM_THREADS="$THREADS" "$before_worker" bench-step \
        --preset small --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" | tee "$out/before.json"
fi

echo "== pytorch (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$PYTHON" tools/bench_step_torch.py \
    --threads "$THREADS" --batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS" | tee "$out/torch.json"

echo "== result (loadavg after: $(cut -d" " -f1-3 /proc/loadavg))"
"$PYTHON" - "$out" <<'EOF'
import json, os, sys
d = sys.argv[1]
last = lambda f: json.loads([l for l in open(os.path.join(d, f)) if l.startswith("{")][-1])
rs = json.loads("[" + ",".join(l for l in open(os.path.join(d, "torch.json")) if l.startswith("{")) + "]")
ours, peer = last("tessera.json"), rs[-1]
t_rss = open(os.path.join(d, "tessera.rss")).read().split()[-1] if os.path.exists(os.path.join(d, "tessera.rss")) else None
t = ours["step_s_median"]
print(f"{'impl':<40} {'threads':>7} {'step s (median)':>16} {'pytorch/tessera':>16} {'peak RSS MiB':>13}")
print(f"{'tessera':<40} {ours['threads']:>7} {t:>16.3f} {'':>16} {(int(t_rss) / 1024 if t_rss else float('nan')):>13.0f}")
if os.path.exists(os.path.join(d, "before.json")):
    b = last("before.json")["step_s_median"]
    print(f"{'tessera before (' + os.environ.get('BEFORE', '') + ')':<40} {ours['threads']:>7} {b:>16.3f} {b / t:>16.2f}")
for r in rs[:-1]:
    name = f"pytorch {r['attn']}, vit layers {r['vit_layers']}"
    print(f"{name:<40} {r['threads']:>7} {r['step_s_median']:>16.3f} {r['step_s_median'] / t:>16.2f} {r['peak_rss_mib']:>13.0f}")
print(f"peer = pytorch {peer['attn']} (stock 7-layer ViT): {peer['step_s_median']:.3f} s vs tessera {t:.3f} s"
      f" -> ratio pytorch/tessera = {peer['step_s_median'] / t:.2f} (> 1: Tessera faster)")
EOF
