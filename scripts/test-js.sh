#!/usr/bin/env bash
# Builds, lints, type-checks and tests the browser/Node client (clients/js) against real relays
# and a real redis-server. Needs Node 20+ with npm, redis-server, and the relay's Python
# (KASAGI_PYTHON, default .venv/bin/python, as scripts/test.sh builds it). Exits non-zero when
# any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
export KASAGI_PYTHON="${KASAGI_PYTHON:-$REPO/.venv/bin/python}"
export KASAGI_REPO="$REPO"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "scripts/test-js.sh: node and npm are needed (Node 20 or newer)" >&2
    exit 1
fi
# The browser test drives Debian's chromium (browser downloads are not possible everywhere).
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
cd clients/js
echo "== npm ci (clients/js)"
npm ci --no-audit --no-fund
echo "== build, tsc --noEmit, eslint, node --test (clients/js)"
npm test
