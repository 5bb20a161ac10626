#!/usr/bin/env bash
# GPU checks of the CUDA backend, for a GPU machine with no Rust
# toolchain and no network: it takes a worker built elsewhere with
#   cargo build --release -p tessera-worker --features cuda
# and runs, in under 8 minutes on one H100:
#   (a) every backend op on the GPU against the CPU in f64, on fresh random
#       inputs with outputs poisoned first: f32 (limit 1e-5), then TF32 GEMMs
#       (limit 3e-4; 1e-3 for attention's two GEMMs in a row), then bf16 mixed
#       precision (limit 1e-2) -- `worker
#       check-ops`;
#   (b) `worker debug-step` on the committed PyTorch fixtures, on the GPU,
#       against the reference gradients (static and dynamic S2);
#   (c) one training step of the vila-3b-s2 shape (all widths; LLM_LAYERS of
#       the LLM's 32 layers) in Tessera (bf16 mixed precision, then TF32) and in
#       PyTorch + transformers (bf16 autocast, fused AdamW) on the same GPU:
#       tokens/s, images/s, MFU against 989 dense bf16 TFLOP/s (H100) and
#       the ratios.
#
# Usage: scripts/device-check.sh [WORKER]        (default target/release/worker)
#   DEVICE=cuda:0 LLM_LAYERS=8 VIT_LAYERS=27 BATCH=4 SEQ=256 STEPS=5 PEAK_TFLOPS=989
#   PRECISIONS="bf16 tf32"   Tessera's step rows
#   TORCH=skip     leave out the PyTorch peer
#   DEVICE=cpu PRESET=tiny TORCH=skip   the CPU rehearsal the test suite runs
#   DEVICE=cuda-emu PRESET=tiny TORCH=skip   the same on the emulated GPU (a
#       worker built with --features cuda-emu; CI runs it)
# It ends with one verdict line per part (also in $OUT/verdict.txt); a part
# that fails costs only its own row of the step table.
# Results (and every command's output) go to $OUT (default a temp folder).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

worker="${1:-target/release/worker}"
DEVICE="${DEVICE:-cuda:0}"
PRESET="${PRESET:-vila-3b-s2}"
LLM_LAYERS="${LLM_LAYERS:-8}"
VIT_LAYERS="${VIT_LAYERS:-27}"
BATCH="${BATCH:-4}"
SEQ="${SEQ:-256}"
WARMUP="${WARMUP:-2}"
STEPS="${STEPS:-5}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
PRECISIONS="${PRECISIONS:-bf16 tf32}"
TORCH="${TORCH:-run}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
fixtures=tests/fixtures/tiny
failed=()
verdicts=()

if [ ! -x "$worker" ]; then
    echo "error: no worker binary at $worker; build it with: cargo build --release -p tessera-worker --features cuda" >&2
    exit 2
fi
# cudarc opens the CUDA libraries at run time: the toolkit's, and those the
# Python wheels of PyTorch carry (NCCL comes only from there), which are not
# on the loader's path by default.
if [ "$DEVICE" != cpu ]; then
    wheels=$("$PYTHON" -c 'import glob, os, site
dirs = {d for sp in site.getsitepackages() for pat in ("nvidia/*/lib", "nvidia/cu13/lib")
        for d in glob.glob(os.path.join(sp, pat))}
print(":".join(sorted(dirs)))' 2>/dev/null)
    export LD_LIBRARY_PATH="${wheels:+$wheels:}${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
echo "device-check: worker $worker, device $DEVICE, results in $OUT"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

# step NAME TIMEOUT CMD...: runs one check, keeps its output, records failure.
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-60}" "$OUT/$name.log"
    echo "-- $name: exit $rc after $((SECONDS - t0)) s"
    if [ $rc -eq 0 ]; then
        verdicts+=("$(printf '%-22s PASS  %4d s' "$name" $((SECONDS - t0)))")
    else
        failed+=("$name")
        verdicts+=("$(printf '%-22s FAIL  %4d s  exit %d, log %s' "$name" $((SECONDS - t0)) $rc "$OUT/$name.log")")
    fi
    return $rc
}

# row NAME: the JSON line a benchmark step printed, kept only when the step
# succeeded, so one failed row never costs the table the others.
row() {
    grep '^{' "$OUT/$1.log" | tail -n 1 > "$OUT/$2.json"
    [ -s "$OUT/$2.json" ]
}

# (a) op parity
step ops-f32 120 "$worker" check-ops --device "$DEVICE" --precision f32
step ops-tf32 120 "$worker" check-ops --device "$DEVICE" --precision tf32
step ops-bf16 120 "$worker" check-ops --device "$DEVICE" --precision bf16

# (b) the PyTorch reference step on the fixtures (debug-step runs f32 GEMMs)
step debug-step 60 "$worker" debug-step --device "$DEVICE" --model "$fixtures/model" \
    --batch "$fixtures/batch.safetensors" --out "$OUT/grads.safetensors" \
    --expect "$fixtures/expected_grads.safetensors"
step debug-step-dynamic 60 "$worker" debug-step --device "$DEVICE" --model "$fixtures/model" \
    --batch "$fixtures/batch_dynamic.safetensors" --out "$OUT/grads_dynamic.safetensors" \
    --expect "$fixtures/expected_grads_dynamic.safetensors"

# (c) one training step, Tessera then PyTorch, same shape
shape=(--batch "$BATCH" --seq "$SEQ" --warmup "$WARMUP" --steps "$STEPS")
rows=()
for precision in $PRECISIONS; do
    if TAIL=3 step "step-tessera-$precision" 150 "$worker" bench-step --preset "$PRESET" --device "$DEVICE" \
        --precision "$precision" --vit-layers "$VIT_LAYERS" --llm-layers "$LLM_LAYERS" "${shape[@]}" &&
        row "step-tessera-$precision" "tessera-$precision"; then
        rows+=("$OUT/tessera-$precision.json")
    fi
done
if [ "$TORCH" != skip ]; then
    torch_device=cuda
    [ "$DEVICE" = cpu ] && torch_device=cpu
    if TAIL=3 step step-pytorch 180 "$PYTHON" tools/bench_step_torch.py --preset "$PRESET" \
        --device "$torch_device" --dtype bf16 --attn sdpa --vit-layers all --vit-layers-count "$VIT_LAYERS" \
        --llm-layers "$LLM_LAYERS" "${shape[@]}" && row step-pytorch pytorch; then
        rows+=(--pytorch "$OUT/pytorch.json")
    fi
fi
echo "== step table"
tessera_rows=0
for r in "${rows[@]}"; do [[ "$r" == */tessera-*.json ]] && tessera_rows=$((tessera_rows + 1)); done
if [ $tessera_rows -gt 0 ]; then
    "$PYTHON" tools/step_table.py --peak-tflops "$PEAK_TFLOPS" "${rows[@]}" | tee "$OUT/step_table.md" ||
        { failed+=(step-table); verdicts+=("$(printf '%-22s FAIL' step-table)"); }
else
    echo "no Tessera step succeeded: no table"
fi

echo "== verdict"
printf '%s\n' "${verdicts[@]}" | tee "$OUT/verdict.txt"
if [ ${#failed[@]} -gt 0 ]; then
    echo "device-check: FAILED: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "device-check: all checks passed (logs in $OUT)"
