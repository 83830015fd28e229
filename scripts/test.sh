#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, then runs every test.
# Tests that need ../shared/datasets run when it is present and say so when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh libtorch
# The test broker is only needed once the tests run: install it while they compile (both take minutes).
mkdir -p .tools
scripts/setup.sh broker > .tools/setup-broker.log 2>&1 &
broker_install=$!
if ! cargo test --locked --no-run; then
    wait "$broker_install" || true
    exit 1
fi
if ! wait "$broker_install"; then
    cat .tools/setup-broker.log >&2
    exit 1
fi
cat .tools/setup-broker.log >&2
cargo test --locked "$@"
