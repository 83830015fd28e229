#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, through cargo-fuzz) of what reads bytes from outside: PyTorch
# checkpoints, camera frames with their headers, the models topic, model files; and our AU-sPRO against
# its definition. `fuzz/harness.rs` says what each target checks; `tests/fuzz.rs` checks the same
# properties with random mutation on stable Rust.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 300 s for each of the five targets)
#
# Each target starts from its seeds (fuzz/seeds/<target>) and the corpus of earlier runs
# (fuzz/corpus/<target>.corpus), and ends by minimising what it kept to the inputs that reach distinct
# code (libFuzzer's merge, counting edges only), written back to fuzz/corpus/<target>.corpus: commit it,
# the test suite replays it on every CI run. One packed file per target (each input as a 4-byte
# little-endian length and its bytes) keeps thousands of inputs out of the tree.
# A failure stops its target, leaves the input in fuzz/artifacts/<target>/ and makes this script exit 1;
# replay it with `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz into .tools/bin.
# Not part of CI: fuzzing for minutes is a session's job, replaying its corpus is CI's.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint frame models_topic model_file spro)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "[fuzz] needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
export PATH="$PWD/.tools/bin:$PATH"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2 --root .tools
scripts/setup.sh libtorch
# libtorch's libraries, for the targets (tch links them without a run path).
export LD_LIBRARY_PATH="$PWD/.libtorch/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# fuzz/corpus/<target>.corpus <-> a folder of one file per input.
unpack() {
    python3 - "$1" "$2" <<'PY'
import hashlib, pathlib, struct, sys
packed, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
data = packed.read_bytes() if packed.exists() else b""
at = 0
while at < len(data):
    (length,) = struct.unpack_from("<I", data, at)
    item = data[at + 4:at + 4 + length]
    at += 4 + length
    (folder / hashlib.sha1(item).hexdigest()).write_bytes(item)
PY
}
pack() {
    python3 - "$1" "$2" <<'PY'
import pathlib, struct, sys
folder, packed = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
items = [path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()]
packed.write_bytes(b"".join(struct.pack("<I", len(item)) + item for item in items))
print(f"[fuzz] {packed}: {len(items)} inputs, {packed.stat().st_size} bytes")
PY
}

cd fuzz
failed=0
for target in "${targets[@]}"; do
    work="target/corpus/$target"
    rm -rf "$work" "$work.min"
    unpack "corpus/$target.corpus" "$work"
    seeds=()
    [ -d "seeds/$target" ] && seeds+=("seeds/$target")
    # The checkpoint reader also starts from the test fixtures (zip, legacy, wrapped, f16 checkpoints).
    [ "$target" = checkpoint ] && seeds+=(../tests/fixtures/pth)
    echo "[fuzz] $target for $seconds s"
    # The model target builds networks: a longer timeout than the parsers need.
    if ! cargo +nightly fuzz run "$target" "$work" "${seeds[@]}" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=30 -rss_limit_mb=4096 -print_final_stats=1; then
        echo "[fuzz] $target FAILED: see fuzz/artifacts/$target/" >&2
        failed=1
        continue
    fi
    mkdir -p "$work.min"
    "target/x86_64-unknown-linux-gnu/release/$target" -merge=1 -use_counters=0 -max_len=65536 -timeout=30 \
        "$work.min" "$work"
    mkdir -p corpus
    pack "$work.min" "corpus/$target.corpus"
done
exit "$failed"
