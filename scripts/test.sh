#!/usr/bin/env bash
# Runs every check of the project from a fresh clone: installs what is missing (redis-server,
# a virtualenv with the package built in place and the test tools), then Rust format, lint and
# tests, Python lint and types, the pytest suite, then the browser/Node client's build, lint
# and tests (scripts/test-js.sh: npm ci, and Debian's chromium when missing). Exits non-zero
# when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q -U pip
echo "== building the package in place (editable, release profile)"
# Editable install: the source package at the root is the one that is imported, with the
# native module built into it, so the root directory cannot shadow a different install.
$PY -m pip install -q -e ".[test]" --config-settings=build-args="--profile release"

echo "== cargo fmt / clippy / test"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# The binding module (rust/python.rs) is compiled only with the pyo3 feature.
cargo clippy --all-targets --quiet --features pyo3 -- -D warnings
cargo test --quiet

echo "== ruff / mypy"
.venv/bin/ruff check kasagi_relay tests benches kit testkit
.venv/bin/ruff format --check kasagi_relay tests benches kit testkit
.venv/bin/mypy

echo "== pytest"
$PY -c 'import kasagi_relay.delta as d; assert d.IMPLEMENTATION == "native", d.IMPLEMENTATION'
# The native engine must be there: a missing build is a failure, not a skip.
KASAGI_REQUIRE_NATIVE=1 $PY -m pytest tests "$@"

echo "== the browser/Node client (clients/js)"
./scripts/test-js.sh
