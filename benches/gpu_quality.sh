#!/usr/bin/env bash
# The quality benchmark on a GPU in one go, inside fixed time budgets: distil a teacher from
# EfficientNet-Lite0, then `bench-quality --budget full` (both presets, DFSC at two margins, three runs
# sharing the GPU), then a CUDA inference check with `predict`. Written for a lent machine with a time
# limit; on a GPU of your own, drop the *_MINUTES caps to get the full recipe (60000 + 70000 steps).
#
# Settings (environment):
#   LINEGUARD        the release binary                 (target/release/lineguard)
#   IMAGES           natural images for distillation    (../shared/datasets/imagenet_samples)
#   BACKBONE         EfficientNet-Lite0 checkpoint       (.weights/efficientnet-lite0-57934424.pth)
#   DATA             MVTec LOCO category                 (../shared/datasets/mvtec_loco_juice_bottle)
#   SATURATION_SCALE sPRO saturation scale               (0.25: the half-size masks of the shared data)
#   DISTILL_MINUTES  distillation time cap               (unset: the full 60000 steps)
#   TRAIN_MINUTES    per-run training time cap           (unset: the full 70000 steps)
#   WORK             models and per-run logs             (runs/gpu-quality)
#   RESULTS          the few files worth keeping         ($WORK/results)
#   REQUIRE_CUDA     stop at once unless CUDA is used    (1)
#   LIBTORCH_LIB     libtorch's lib folder               (Python torch's, when importable)
#   DISTILL_ARGS, BENCH_ARGS  extra flags, e.g. for a quick rehearsal on a CPU:
#     REQUIRE_CUDA=0 DISTILL_MINUTES=0.5 TRAIN_MINUTES=0.5 DISTILL_ARGS="--image-size 128 --batch-size 2" \
#     BENCH_ARGS="--image-size 128" benches/gpu_quality.sh
set -euo pipefail
cd "$(dirname "$0")/.."

LINEGUARD=${LINEGUARD:-target/release/lineguard}
IMAGES=${IMAGES:-../shared/datasets/imagenet_samples}
BACKBONE=${BACKBONE:-.weights/efficientnet-lite0-57934424.pth}
DATA=${DATA:-../shared/datasets/mvtec_loco_juice_bottle}
SATURATION_SCALE=${SATURATION_SCALE:-0.25}
WORK=${WORK:-runs/gpu-quality}
RESULTS=${RESULTS:-$WORK/results}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
mkdir -p "$WORK" "$RESULTS"

if [ -z "${LIBTORCH_LIB:-}" ] && command -v python3 >/dev/null; then
    LIBTORCH_LIB=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib || true
fi
[ -n "${LIBTORCH_LIB:-}" ] && export LD_LIBRARY_PATH="$LIBTORCH_LIB:${LD_LIBRARY_PATH:-}"
export RUST_LOG=${RUST_LOG:-info}
stamp() { printf '[gpu-quality %s] %s\n' "$(date +%T)" "$*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || stamp "no nvidia-smi"
distill_cap=(); [ -n "${DISTILL_MINUTES:-}" ] && distill_cap=(--max-minutes "$DISTILL_MINUTES")
train_cap=(); [ -n "${TRAIN_MINUTES:-}" ] && train_cap=(--max-train-minutes "$TRAIN_MINUTES")

# A few seconds to learn whether CUDA is really used, before spending the budget.
"$LINEGUARD" distill-teacher --images "$IMAGES" --backbone "$BACKBONE" --out "$WORK/probe.safetensors" \
    --steps 2 --max-images 4 --checkpoint-every 0 ${DISTILL_ARGS:-} 2>&1 | tee "$WORK/probe.log" | tail -3
if [ "$REQUIRE_CUDA" = 1 ] && ! grep -q "CUDA device" "$WORK/probe.log"; then
    stamp "CUDA is not used; libtorch libraries resolved as:"
    ldd "$LINEGUARD" | grep -E "torch|c10|cuda" || true
    exit 3
fi

stamp "distilling the teacher"
"$LINEGUARD" distill-teacher --images "$IMAGES" --backbone "$BACKBONE" --out "$RESULTS/teacher.safetensors" \
    --steps 60000 "${distill_cap[@]}" ${DISTILL_ARGS:-} 2>&1 | tee "$RESULTS/distill.log" | grep -E "time budget|steps in|written|rror" || true
[ -f "$RESULTS/teacher.safetensors" ] || { stamp "distillation failed"; tail -20 "$RESULTS/distill.log"; exit 4; }

stamp "quality benchmark"
"$LINEGUARD" bench-quality --data "$DATA" --teacher "$RESULTS/teacher.safetensors" --budget full \
    "${train_cap[@]}" ${BENCH_ARGS:-} --parallel 3 --saturation-scale "$SATURATION_SCALE" --out-dir "$WORK/quality" \
    2>&1 | tee "$RESULTS/bench.log" | grep -vE "^\[.*(train|eval|loading).*: [0-9]+/" || true
cp "$WORK/quality/results.json" "$WORK/quality/results.md" "$RESULTS/" 2>/dev/null || true
for log in "$WORK"/quality/*.log; do
    printf '==> %s\n' "$log"
    grep -E "time budget|steps in|written|rror|CUDA" "$log" || true
done > "$RESULTS/runs.log"

stamp "CUDA inference check"
model=$(ls "$WORK"/quality/dfsc_m*.safetensors 2>/dev/null | head -1)
if [ -n "$model" ]; then
    { time "$LINEGUARD" predict --model "$model" "$DATA/test/logical_anomalies" --json --out "$WORK/heatmaps" \
        > "$WORK/predict.jsonl"; } 2> "$RESULTS/predict.log"
    printf '%s images scored\n' "$(wc -l < "$WORK/predict.jsonl")" >> "$RESULTS/predict.log"
    tail -4 "$RESULTS/predict.log"
fi
stamp "done"
