#!/usr/bin/env bash
# The DFSC reading protocol (benches/protocols/dfsc-reading.md): for every seed, a synthetic line, then one
# training + evaluation per reading of the DFSC loss. Results go to $OUT/results.jsonl, one line per run;
# runs already there are skipped, so an interrupted sweep resumes. A summary table ends the sweep.
#
# Settings (environment):
#   LINEGUARD   the release binary                           (target/release/lineguard)
#   SEEDS       synth and training seeds                      (11 12 13)
#   READINGS    readings to run (see reading_keys below)      (all five)
#   RECIPE      recipe every reading starts from              (pipelines/recipes/quick.toml)
#   IMAGE_SIZE  synthetic image side                          (128)
#   TEACHER     teacher weights                               (unset: random)
#   EXTRA       extra `train` flags, e.g. "--steps 20" for a rehearsal
#   OUT         work folder                                   (runs/dfsc-readings)
set -euo pipefail
cd "$(dirname "$0")/.."

LINEGUARD=${LINEGUARD:-target/release/lineguard}
SEEDS=${SEEDS:-11 12 13}
READINGS=${READINGS:-pair_element pair_location teacher_student_element teacher_student_location off}
RECIPE=${RECIPE:-pipelines/recipes/quick.toml}
IMAGE_SIZE=${IMAGE_SIZE:-128}
OUT=${OUT:-runs/dfsc-readings}
mkdir -p "$OUT"
export RUST_LOG=${RUST_LOG:-info}
stamp() { printf '[dfsc-readings %s] %s\n' "$(date +%T)" "$*"; }

# The [dfsc] keys of a reading.
reading_keys() {
    case "$1" in
        pair_element) printf 'source = "pair"\nselection = "element"\n' ;;
        pair_location) printf 'source = "pair"\nselection = "location"\n' ;;
        teacher_student_element) printf 'source = "teacher_student"\nselection = "element"\n' ;;
        teacher_student_location) printf 'source = "teacher_student"\nselection = "location"\n' ;;
        off) printf 'enabled = false\n' ;;
        *) echo "unknown reading $1" >&2; return 1 ;;
    esac
}

teacher=(); [ -n "${TEACHER:-}" ] && teacher=(--teacher "$TEACHER")
for seed in $SEEDS; do
    data="$OUT/synth-$seed"
    [ -d "$data/test" ] || "$LINEGUARD" synth --seed "$seed" --image-size "$IMAGE_SIZE" --out "$data" 2>&1 | tail -1
    for reading in $READINGS; do
        if grep -q "\"seed\":$seed,\"reading\":\"$reading\"" "$OUT/results.jsonl" 2>/dev/null; then
            continue
        fi
        recipe="$OUT/$reading.toml"
        { cat "$RECIPE"; printf '\n[dfsc]\n'; reading_keys "$reading"; } > "$recipe"
        model="$OUT/$reading-seed$seed.safetensors"
        started=$(date +%s)
        if ! "$LINEGUARD" train --data "$data" -c "$recipe" --seed "$seed" --out "$model" "${teacher[@]}" \
            ${EXTRA:-} > "$OUT/$reading-seed$seed.log" 2>&1; then
            stamp "seed $seed $reading: training failed (log: $OUT/$reading-seed$seed.log)"
            continue
        fi
        eval_json=$("$LINEGUARD" eval --model "$model" --data "$data" --json 2>>"$OUT/$reading-seed$seed.log")
        seconds=$(( $(date +%s) - started ))
        printf '{"seed":%s,"reading":"%s","seconds":%s,"eval":%s}\n' "$seed" "$reading" "$seconds" "$eval_json" \
            >> "$OUT/results.jsonl"
        stamp "seed $seed $reading done in ${seconds} s"
    done
done

python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by_reading = {}
for run in runs:
    by_reading.setdefault(run["reading"], []).append(run)
def pct(values):
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"
print("| reading | seeds | logical AUROC | structural AUROC | logical AU-sPRO | hinge active (min over seeds) | DFSC term |")
print("|---|---|---|---|---|---|---|")
for reading, rs in by_reading.items():
    acts = [r["eval"]["model"].get("dfsc_activity") for r in rs]
    acts = [a for a in acts if a]
    active = f"{100 * statistics.mean(a['mean_active_share'] for a in acts):.0f}% ({100 * min(a['mean_active_share'] for a in acts):.0f}%)" if acts else "-"
    term = f"{statistics.mean(a['mean_loss'] for a in acts):.4f}" if acts else "-"
    print(f"| {reading} | {' '.join(str(r['seed']) for r in rs)} "
          f"| {pct([r['eval']['image_auroc']['logical'] for r in rs])} "
          f"| {pct([r['eval']['image_auroc']['structural'] for r in rs])} "
          f"| {pct([r['eval']['au_spro']['logical'] for r in rs])} | {active} | {term} |")
PY
