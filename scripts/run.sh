#!/usr/bin/env bash
# Runs the relay from a fresh clone: builds the package into .venv when needed, then
# `kasagi-relay "$@"` (no arguments: ws://127.0.0.1:8765/ws on the embedded memory backend).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/kasagi-relay ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q -U pip
    .venv/bin/python -m pip install -q -e . --config-settings=build-args="--profile release"
fi
exec .venv/bin/kasagi-relay "$@"
