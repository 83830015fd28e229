#!/usr/bin/env bash
# Fills .gpu/ with what benches/gpu_quality.sh needs on a lent GPU machine, which reaches nothing and
# receives at most 64 MiB (the working tree included): the release binary (stripped, gzipped), the
# EfficientNet-Lite0 checkpoint and the ImageNet samples re-encoded at 256 px (shorter side; JPEG quality
# 70) while the committed teacher ($TEACHER) is not complete, and juice_bottle as it is when it still fits
# (measured with the unfinished teacher: 60 MiB in all with the model bench), then the model bench
# (stripped, gzipped, 1.4 MB) when room is left. The re-encoding uses Pillow from PyPI, in a
# virtual environment under .tools/.
# Then: run(command="GPU_PACK=.gpu benches/gpu_quality.sh", carry=[".gpu"], ...).
#
# PURPOSE=serving fills it for benches/gpu_serving.sh instead: the binary, the nisshi broker built with
# optimisations (`scripts/setup.sh broker-release`, 10 minutes the first time; stripped and gzipped 16 MiB;
# the debug build would need ~4x its CPU per frame) and the first 64 juice_bottle test/good frames (400x800).
set -euo pipefail
cd "$(dirname "$0")/.."

PACK=${PACK:-.gpu}
TEACHER=${TEACHER:-models/teacher-lite0.safetensors}
DISTILL_STEPS=${DISTILL_STEPS:-60000}
SHARED=${SHARED:-../shared/datasets}
grep -qx "/$PACK/" .git/info/exclude 2>/dev/null || echo "/$PACK/" >> .git/info/exclude
rm -rf "$PACK" && mkdir -p "$PACK"

cargo build --release --locked
strip -o "$PACK/lineguard" target/release/lineguard
gzip -9 "$PACK/lineguard"
limit=$((63 * 1048576))
travelling() { echo $(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb "$PACK" | cut -f1) )); }

if [ "${PURPOSE:-quality}" = serving ]; then
    scripts/setup.sh broker-release
    strip -o "$PACK/nisshi" .tools/release/bin/nisshi
    gzip -9 "$PACK/nisshi"
    mkdir -p "$PACK/frames"
    find "$SHARED/mvtec_loco_juice_bottle/test/good" -maxdepth 1 -type f | sort | head -64 \
        | xargs -I{} cp {} "$PACK/frames/"
    echo "working tree + pack: $(( $(travelling) / 1048576 )) MiB (at most 64 MiB travel)"
    [ "$(travelling)" -lt "$limit" ] || { echo "too large to travel" >&2; exit 1; }
    exit 0
fi

teacher_steps=0
if [ -f "$TEACHER" ]; then
    # The teacher's provenance (JSON in the safetensors header) holds its step count.
    teacher_steps=$(head -c 65536 "$TEACHER" | grep -ao '"steps\\*":[0-9]*' | head -1 | grep -o '[0-9]*$' || echo 0)
fi
if [ "${teacher_steps:-0}" -lt "$DISTILL_STEPS" ]; then
    cp .weights/efficientnet-lite0-57934424.pth "$PACK/"
    venv=.tools/pack-venv
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import PIL" 2>/dev/null \
        || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet pillow; }
    mkdir -p "$PACK/imagenet_samples"
    "$venv/bin/python" - "$SHARED/imagenet_samples" "$PACK/imagenet_samples" <<'PY'
import pathlib, sys
from PIL import Image
source, target = map(pathlib.Path, sys.argv[1:])
for path in sorted(source.iterdir()):
    if path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
        continue
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    image.save(target / (path.stem + ".jpg"), quality=70)
PY
else
    echo "the teacher at $TEACHER is complete ($teacher_steps steps): no backbone, no ImageNet samples"
fi
data_bytes=$(du -sb "$SHARED/mvtec_loco_juice_bottle" | cut -f1)
if [ $(( $(travelling) + data_bytes )) -lt "$limit" ]; then
    cp -r "$SHARED/mvtec_loco_juice_bottle" "$PACK/"
else
    echo "juice_bottle does not fit beside the distillation inputs: this window only distils"
fi
# The model bench (training steps in f32 and bf16 side by side, run first in the window), when room is left.
bench=$(cargo bench --locked --bench model --no-run --message-format=json 2>/dev/null \
    | grep '"kind":\["bench"\]' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
strip -o "$PACK/bench-model" "$bench" && gzip -9 "$PACK/bench-model"
[ "$(travelling)" -lt "$limit" ] || { rm "$PACK/bench-model.gz"; echo "no room for the model bench"; }
echo "working tree + pack: $(( $(travelling) / 1048576 )) MiB (at most 64 MiB travel)"
[ "$(travelling)" -lt "$limit" ] || { echo "too large to travel" >&2; exit 1; }
