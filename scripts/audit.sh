#!/usr/bin/env bash
# Checks Cargo.lock and fuzz/Cargo.lock against the RustSec advisory database: any vulnerability, and any
# warning (an unmaintained or unsound crate, a yanked version) not excepted with a reason in
# .cargo/audit.toml, fails.
# These machines cannot fetch the database, so it reads the offline copy in ../shared/advisory-db (or
# $ADVISORY_DB); where there is none it says so and skips, as the tests on real data do.
# Elsewhere, with network: `cargo install cargo-audit --locked && cargo audit` (it fetches the database).
set -euo pipefail
cd "$(dirname "$0")/.."
db="${ADVISORY_DB:-../shared/advisory-db}"
if [ ! -d "$db" ]; then
    echo "[audit] NOTE: no advisory database at $db: the dependency audit was skipped" >&2
    exit 0
fi
audit=.tools/bin/cargo-audit
command -v "$audit" >/dev/null 2>&1 || audit=cargo-audit
# The yanked check reads cargo's local copy of the crates.io index, which holds only crates fetched
# before: on a fresh machine it lacked the fuzz targets' libfuzzer-sys, and cargo-audit then skipped the
# check with an error line but a success status. Fetching both lock files first makes the check whole,
# and --locked fails here if either lock file no longer matches its manifest.
cargo fetch --locked --quiet
cargo fetch --locked --quiet --manifest-path fuzz/Cargo.toml
"$audit" audit --db "$db" --no-fetch --deny warnings
# The fuzz targets' own lock file (fuzz/ is a workspace of its own, built only by scripts/fuzz.sh).
"$audit" audit --db "$db" --no-fetch --deny warnings --file fuzz/Cargo.lock
