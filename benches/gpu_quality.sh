#!/usr/bin/env bash
# The quality benchmark on a GPU (issue 11), built to accumulate over short lent windows. Each call:
#   1. a teacher: continues the committed one ($TEACHER) towards DISTILL_STEPS, or distils one from
#      scratch, within DISTILL_MINUTES (`distill-teacher --continue-from` does nothing when it is complete);
#   2. `bench-quality --budget full` (both presets, DFSC at MARGINS, PARALLEL runs sharing the GPU) for
#      every seed of SEEDS that has no result in DONE yet (the committed results of earlier windows), each
#      run capped at TRAIN_MINUTES;
#   3. a CUDA inference check with `predict`.
# Everything worth keeping is written into RESULTS ($OUT on a lent machine) as soon as it exists, so a
# timeout still returns what finished: teacher.safetensors (only when it changed), quality-seed<S>.json
# and quality-seed<S>.md per finished seed, pretrained-juice_bottle-dfsc.safetensors (seed 42's default
# DFSC model in f16, once), summary.md, gpu-quality.log. Commit them (the teacher to $TEACHER, the
# rest to DONE) and the next window goes on from there.
#
# On a lent machine, after `benches/gpu_pack.sh` here (it fills .gpu/ with what must travel):
#   run(command="GPU_PACK=.gpu benches/gpu_quality.sh", carry=[".gpu"], timeout_s=580)
# with DISTILL_MINUTES / TRAIN_MINUTES / SEEDS set to fit the window.
#
# Settings (environment):
#   GPU_PACK          a folder from benches/gpu_pack.sh; sets LINEGUARD, BACKBONE, IMAGES, DATA below
#   LINEGUARD         the release binary                      (target/release/lineguard)
#   TEACHER           the teacher to continue or use          (models/teacher-lite0.safetensors)
#   DISTILL_STEPS     the teacher's full recipe               (60000)
#   DISTILL_MINUTES   distillation time cap in this call      (unset: no cap)
#   IMAGES            natural images for distillation         (../shared/datasets/imagenet_samples)
#   BACKBONE          EfficientNet-Lite0 checkpoint            (.weights/efficientnet-lite0-57934424.pth)
#   DATA              MVTec LOCO category                     (../shared/datasets/mvtec_loco_juice_bottle)
#   SATURATION_SCALE  sPRO saturation scale                   (0.25: the half-size masks of the shared data)
#   SEEDS             training seeds                          (42 7 1234)
#   MARGINS           DFSC margins                            (0.4,1.0)
#   TRAIN_MINUTES     per-run training time cap               (unset: the full 70000 steps)
#   TRAIN_PRECISION   train.precision of every run            (f32; bf16: mixed precision)
#   PARALLEL          runs sharing the device                 (3)
#   DONE              results of earlier windows              (benches/results/gpu)
#   WORK              models and per-run logs                 (runs/gpu-quality)
#   RESULTS           the files worth keeping                 ($OUT, else $WORK/results)
#   REQUIRE_CUDA      stop at once unless CUDA is used        (1)
#   LIBTORCH_LIB      libtorch's lib folder                   (Python torch's, when importable)
#   DISTILL_ARGS, BENCH_ARGS  extra flags. The CPU rehearsal that CI runs (tests/teacher.rs):
#     REQUIRE_CUDA=0 DISTILL_STEPS=2 DISTILL_ARGS="--image-size 128 --batch-size 2 --cpu" \
#     BENCH_ARGS="--image-size 128 --steps 2 --cpu" PREDICT_ARGS=--cpu SEEDS=1 TEACHER=none \
#     IMAGES=<a few images> DATA=<a synth dataset> benches/gpu_quality.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${GPU_PACK:-}" ]; then
    [ -f "$GPU_PACK/lineguard.gz" ] && [ ! -x "$GPU_PACK/lineguard" ] && gunzip -k "$GPU_PACK/lineguard.gz" \
        && chmod +x "$GPU_PACK/lineguard"
    LINEGUARD=${LINEGUARD:-$GPU_PACK/lineguard}
    BACKBONE=${BACKBONE:-$GPU_PACK/efficientnet-lite0-57934424.pth}
    IMAGES=${IMAGES:-$GPU_PACK/imagenet_samples}
    DATA=${DATA:-$GPU_PACK/mvtec_loco_juice_bottle}
fi
LINEGUARD=${LINEGUARD:-target/release/lineguard}
TEACHER=${TEACHER:-models/teacher-lite0.safetensors}
DISTILL_STEPS=${DISTILL_STEPS:-60000}
IMAGES=${IMAGES:-../shared/datasets/imagenet_samples}
BACKBONE=${BACKBONE:-.weights/efficientnet-lite0-57934424.pth}
DATA=${DATA:-../shared/datasets/mvtec_loco_juice_bottle}
SATURATION_SCALE=${SATURATION_SCALE:-0.25}
SEEDS=${SEEDS:-42 7 1234}
MARGINS=${MARGINS:-0.4,1.0}
PARALLEL=${PARALLEL:-3}
DONE=${DONE:-benches/results/gpu}
WORK=${WORK:-runs/gpu-quality}
RESULTS=${RESULTS:-${OUT:-$WORK/results}}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
mkdir -p "$WORK" "$RESULTS"
LOG="$RESULTS/gpu-quality.log"

source benches/gpu_libtorch.sh
stamp() { printf '[gpu-quality %s] %s\n' "$(date +%T)" "$*" | tee -a "$LOG"; }
# Progress lines are many; the log keeps the lines that say what happened.
keep() { grep -vE ": [0-9]+/[0-9]+ " | tee -a "$LOG" || true; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } \
    | tee -a "$LOG"
distill_cap=(); [ -n "${DISTILL_MINUTES:-}" ] && distill_cap=(--max-minutes "$DISTILL_MINUTES")
train_cap=(); [ -n "${TRAIN_MINUTES:-}" ] && train_cap=(--max-train-minutes "$TRAIN_MINUTES")

# A few seconds to learn whether CUDA is really used, before spending the budget.
"$LINEGUARD" distill-teacher --images "$IMAGES" --backbone "$BACKBONE" --out "$WORK/probe.safetensors" \
    --steps 2 --max-images 4 --checkpoint-every 0 ${DISTILL_ARGS:-} > "$WORK/probe.log" 2>&1 || true
if [ "$REQUIRE_CUDA" = 1 ] && ! grep -q "CUDA device" "$WORK/probe.log"; then
    stamp "CUDA is not used; libtorch libraries resolved as:"
    ldd "$LINEGUARD" | grep -E "torch|c10|cuda" | tee -a "$LOG" || true
    tail -5 "$WORK/probe.log" | tee -a "$LOG"
    exit 3
fi

# Training speed per precision on this device (issue 11, part 1), from the model bench that gpu_pack.sh
# packs: f32 and bf16 training steps side by side, 100 s at most.
if [ -n "${GPU_PACK:-}" ] && [ -f "$GPU_PACK/bench-model.gz" ]; then
    gunzip -kf "$GPU_PACK/bench-model.gz" && chmod +x "$GPU_PACK/bench-model"
    stamp "training speed: cargo bench --bench model -- --cuda --rounds 3"
    timeout 100 "$GPU_PACK/bench-model" --cuda --rounds 3 2>/dev/null | tee -a "$LOG" || stamp "the model bench failed"
fi

stamp "teacher: towards $DISTILL_STEPS steps"
continue_from=(); [ -f "$TEACHER" ] && continue_from=(--continue-from "$TEACHER")
"$LINEGUARD" distill-teacher --images "$IMAGES" --backbone "$BACKBONE" --out "$WORK/teacher.safetensors" \
    --steps "$DISTILL_STEPS" "${continue_from[@]}" "${distill_cap[@]}" ${DISTILL_ARGS:-} 2>&1 | keep
[ -f "$WORK/teacher.safetensors" ] || { stamp "distillation failed"; exit 4; }
if [ -f "$TEACHER" ] && cmp -s "$TEACHER" "$WORK/teacher.safetensors"; then
    stamp "the teacher at $TEACHER is complete"
else
    cp "$WORK/teacher.safetensors" "$RESULTS/teacher.safetensors"
    stamp "teacher written to $RESULTS/teacher.safetensors (commit it as $TEACHER)"
fi

[ -d "$DATA/test" ] || { stamp "no dataset at $DATA: this window only distils"; SEEDS=""; }
for seed in $SEEDS; do
    if [ -f "$DONE/quality-seed$seed.json" ]; then
        stamp "seed $seed: done in an earlier window ($DONE/quality-seed$seed.json)"
        continue
    fi
    stamp "quality benchmark, seed $seed"
    "$LINEGUARD" bench-quality --data "$DATA" --teacher "$WORK/teacher.safetensors" --budget full \
        "${train_cap[@]}" --seed "$seed" --margins "$MARGINS" --parallel "$PARALLEL" \
        --train-precision "${TRAIN_PRECISION:-f32}" \
        --saturation-scale "$SATURATION_SCALE" --out-dir "$WORK/quality-seed$seed" ${BENCH_ARGS:-} 2>&1 | keep
    if [ -f "$WORK/quality-seed$seed/results.json" ]; then
        cp "$WORK/quality-seed$seed/results.json" "$RESULTS/quality-seed$seed.json"
        cp "$WORK/quality-seed$seed/results.md" "$RESULTS/quality-seed$seed.md"
    else
        stamp "seed $seed: no results"
    fi
    for log in "$WORK/quality-seed$seed"/*.log; do
        printf '==> %s\n' "$log"
        grep -E "time budget|steps in|DFSC over|written|rror|CUDA" "$log" || true
    done >> "$LOG"
done

# The pretrained model users run (issue 11 part 5): the default configuration (DFSC, margin 0.4) of seed
# 42, whatever its score, stored in f16 only when no check-image score moves by more than 1e-3.
if [ -f "$WORK/quality-seed42/dfsc_m0.4.safetensors" ] && [ ! -f "$DONE/pretrained-juice_bottle-dfsc.safetensors" ]; then
    "$LINEGUARD" model compact --model "$WORK/quality-seed42/dfsc_m0.4.safetensors" \
        --out "$RESULTS/pretrained-juice_bottle-dfsc.safetensors" --check "$DATA/validation/good" \
        "$DATA/test/good" ${PREDICT_ARGS:-} 2>&1 | tee -a "$LOG" || stamp "the f16 copy was refused or failed"
fi

stamp "CUDA inference check"
model=$(ls "$WORK"/quality-seed*/dfsc_m*.safetensors 2>/dev/null | head -1 || true)
if [ -n "$model" ]; then
    started=$(date +%s%N)
    "$LINEGUARD" predict --model "$model" "$DATA/test/logical_anomalies" --json --out "$WORK/heatmaps" ${PREDICT_ARGS:-} \
        > "$WORK/predict.jsonl" 2>> "$WORK/predict.log" || stamp "predict failed"
    stamp "predict: $(wc -l < "$WORK/predict.jsonl") images scored in $(( ($(date +%s%N) - started) / 1000000 )) ms"
fi

{
    printf '# GPU quality window, %s\n\n' "$(date -u +%FT%TZ)"
    printf 'Teacher: %s\n\n' "$(grep -hE "teacher written|already has|nothing to distil" "$LOG" | tail -1)"
    for table in "$RESULTS"/quality-seed*.md "$DONE"/quality-seed*.md; do
        [ -f "$table" ] || continue
        printf '## %s\n\n' "$(basename "$table" .md)"
        cat "$table"
        printf '\n'
    done
} > "$RESULTS/summary.md"
cat "$RESULTS/summary.md"
stamp "done"
