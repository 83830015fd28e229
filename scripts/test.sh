#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, audits the dependencies, then runs
# every test. Tests that need ../shared/datasets run when it is present and say so when it is not; the
# audit needs ../shared/advisory-db (an offline copy of the RustSec database) in the same way.
# (Installing the test broker while the tests compile was tried: on 2 cores it saves nothing.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/audit.sh
cargo test --locked "$@"
