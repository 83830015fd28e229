#!/usr/bin/env bash
# The embedded default, from a fresh clone: installs what is missing, builds, then synthesises a line,
# trains a small DFSC model, evaluates it and writes heatmaps under runs/demo/.
# Extra arguments go to `lineguard demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo needs libtorch and the local broker; the rest of setup serves the tests.
scripts/setup.sh libtorch broker
cargo build --release --locked
exec target/release/lineguard demo "$@"
