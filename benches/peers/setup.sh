#!/bin/sh
# Installs what the peer benchmark (python -m benches.peers) needs and is missing:
#   - Go and the Debian Go source packages the load generator and the Centrifuge server build
#     against offline in GOPATH mode (/usr/share/gocode);
#   - nginx with Nchan (libnginx-mod-nchan), redis-server, taskset (util-linux);
#   - python-socketio and aiohttp (the Python baseline) into the project's venv.
# Run as root (or with sudo available). PYTHON=path/to/python picks the venv (default .venv).
set -eu
cd "$(dirname "$0")/../.."

PKGS="golang-go golang-github-centrifugal-centrifuge-dev golang-github-centrifugal-protocol-dev \
golang-github-fzambia-eagle-dev golang-github-igm-sockjs-go-dev golang-github-mna-redisc-dev \
golang-github-gomodule-redigo-dev golang-github-fzambia-sentinel-dev \
golang-github-gorilla-websocket-dev libnginx-mod-nchan nginx redis-server util-linux"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "setup: apt-get install$missing"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
fi

PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c "import socketio, aiohttp" 2>/dev/null; then
    echo "setup: pip install python-socketio aiohttp"
    "$PYTHON" -m pip install -q "python-socketio>=5" "aiohttp>=3.9"
fi

# Build the Go programs now, so that a missing dependency shows here rather than mid-run.
"$PYTHON" -c "from benches.peers import build; print(build.loadgen()); print(build.centrifuge())"
echo "setup: ready: $PYTHON -m benches.peers --quick"
