#!/usr/bin/env bash
# The serving benchmark on a GPU (issue 12) in one device call: `lineguard bench-serving` twice,
#   1. synthetic trays at 256 px: model-only images/s for f32, bf16 and f16 at batch 1-64 (batches assembled
#      in pinned host memory as the service does, plus one row per precision from pageable memory), the end-to-end
#      curve through a local nisshi broker and the pipeline at rising offered rates until the knee, and
#      inference beside a background trainer;
#   2. the 400x800 juice_bottle frames (when they travelled): the end-to-end curve in PRECISION, with
#      INFERENCE_WORKERS model copies scoring side by side (one's host work - copies, maps back - overlaps
#      the other's kernels), and the model-only rates of that many workers beside one's.
# Each writes serving.json and serving.md into RESULTS/<run>/ as measurements finish, so a timeout still
# returns what finished; gpu-serving.log holds the commands and the device. Commit them to
# benches/results/gpu-serving/.
#
# On a lent machine, after `PURPOSE=serving benches/gpu_pack.sh` here (the binary, nisshi, the frames):
#   run(command="GPU_PACK=.gpu benches/gpu_serving.sh", carry=[".gpu"], timeout_s=580)
#
# Settings (environment):
#   GPU_PACK       a folder from `PURPOSE=serving benches/gpu_pack.sh`; sets LINEGUARD, NISSHI, FRAMES
#   LINEGUARD      the release binary                          (target/release/lineguard)
#   NISSHI         the broker                                  (.tools/bin/nisshi)
#   FRAMES         real frames for run 2                       (../shared/datasets/mvtec_loco_juice_bottle/test)
#   PRECISIONS     run 1's precisions                          (f32,bf16,f16)
#   PRECISION      run 2's precision                           (bf16)
#   INFERENCE_WORKERS  run 2's inference workers               (2)
#   RESULTS        where results go                            ($OUT, else runs/gpu-serving)
#   REQUIRE_CUDA   stop at once unless CUDA is used            (1)
#   LIBTORCH_LIB   libtorch's lib folder                       (Python torch's, when importable)
#   TRAINER_ROUNDS rounds of the trainer-sharing measurement in run 1 (bench-serving's default, 3)
#   SERVING_ARGS   extra flags for both runs (not --precisions or --trainer-rounds). The CPU rehearsal
#     that CI runs (tests/bench_serving.rs) at toy sizes (bf16 only where the CPU computes it natively):
#     REQUIRE_CUDA=0 PRECISIONS=f32,bf16 PRECISION=f32 TRAINER_ROUNDS=1 FRAMES=<a few images> \
#     SERVING_ARGS="--cpu --side 128 --channels 8 --batches 1,2 --seconds 0.2 ..." benches/gpu_serving.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${GPU_PACK:-}" ]; then
    for binary in lineguard nisshi; do
        [ -f "$GPU_PACK/$binary.gz" ] && [ ! -x "$GPU_PACK/$binary" ] && gunzip -k "$GPU_PACK/$binary.gz" \
            && chmod +x "$GPU_PACK/$binary"
    done
    LINEGUARD=${LINEGUARD:-$GPU_PACK/lineguard}
    NISSHI=${NISSHI:-$GPU_PACK/nisshi}
    FRAMES=${FRAMES:-$GPU_PACK/frames}
fi
LINEGUARD=${LINEGUARD:-target/release/lineguard}
NISSHI=${NISSHI:-.tools/bin/nisshi}
FRAMES=${FRAMES:-../shared/datasets/mvtec_loco_juice_bottle/test}
PRECISIONS=${PRECISIONS:-f32,bf16,f16}
PRECISION=${PRECISION:-bf16}
INFERENCE_WORKERS=${INFERENCE_WORKERS:-2}
RESULTS=${RESULTS:-${OUT:-runs/gpu-serving}}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-serving.log"
export LINEGUARD_NISSHI=$NISSHI

source benches/gpu_libtorch.sh
stamp() { printf '[gpu-serving %s] %s\n' "$(date +%T)" "$*" | tee -a "$LOG"; }
# The pipeline's per-partition lines are many; the log keeps what the benchmark says.
keep() { grep -E "bench_serving|ERROR|WARN|rror" | tee -a "$LOG" || true; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"; nproc; } | tee -a "$LOG"
cuda=(); [ "$REQUIRE_CUDA" = 1 ] && cuda=(--require-cuda)

stamp "run 1: synthetic trays, model only, end to end, beside a trainer"
rounds=(); [ -n "${TRAINER_ROUNDS:-}" ] && rounds=(--trainer-rounds "$TRAINER_ROUNDS")
if ! "$LINEGUARD" bench-serving "${cuda[@]}" --precisions "$PRECISIONS" "${rounds[@]}" --out-dir "$RESULTS/synthetic" \
    ${SERVING_ARGS:-} 2>&1 | keep; then
    stamp "run 1 failed"
    # Nothing measured (no CUDA, no broker): the second run would fail the same way.
    [ -f "$RESULTS/synthetic/serving.json" ] || exit 3
fi

if [ -d "$FRAMES" ]; then
    stamp "run 2: the frames of $FRAMES in $PRECISION, $INFERENCE_WORKERS inference workers"
    "$LINEGUARD" bench-serving "${cuda[@]}" --frames "$FRAMES" --precisions "$PRECISION" --trainer-rounds 0 \
        --inference-workers "$INFERENCE_WORKERS" --out-dir "$RESULTS/frames" ${SERVING_ARGS:-} 2>&1 | keep || stamp "run 2 failed"
else
    stamp "no frames at $FRAMES: run 2 skipped"
fi
for table in "$RESULTS"/*/serving.md; do
    [ -f "$table" ] && cat "$table"
done
stamp "done"
