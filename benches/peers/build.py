"""Building the compiled parts of the peer benchmark, offline, from Debian's packages.

The Go programs (the load generator, the Centrifuge server) build in GOPATH mode
(GO111MODULE=off) against the Go source packages Debian installs under /usr/share/gocode
(`golang-github-centrifugal-centrifuge-dev`, `golang-github-gorilla-websocket-dev`, ...), so no
module proxy is involved. Nchan is Debian's `libnginx-mod-nchan`, loaded by the system nginx.
`benches/peers/setup.sh` installs all of them. Each check raises `Missing` with the package to
install, so that a peer that cannot be built is reported by name and the others still run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
GOCODE = Path("/usr/share/gocode")
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


class Missing(RuntimeError):
    """A peer cannot be built or run here; the message says what to install."""


def _go_build(name: str) -> Path:
    """benches/peers/NAME/*.go -> .build/bin/NAME, rebuilt when a source is newer."""
    go = shutil.which("go")
    if go is None:
        raise Missing("`go` not found: install golang-go (benches/peers/setup.sh)")
    src = HERE / name
    out = BUILD / "bin" / name
    sources = sorted(src.glob("*.go"))
    if out.exists() and all(s.stat().st_mtime <= out.stat().st_mtime for s in sources):
        return out
    # GOPATH mode wants the package under $GOPATH/src; a copy keeps the tree clean.
    pkg = BUILD / "gopath" / "src" / "peersbench" / name
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    for s in sources:
        shutil.copy2(s, pkg / s.name)
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{BUILD / 'gopath'}:{GOCODE}",
        "GOCACHE": str(BUILD / "gocache"),
        "GOFLAGS": "",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=pkg,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if r.returncode != 0:
        raise Missing(
            f"cannot build benches/peers/{name} (install its Debian Go packages with "
            f"benches/peers/setup.sh):\n{r.stderr.strip()[-2000:]}"
        )
    return out


def loadgen() -> Path:
    if not (GOCODE / "src/github.com/gorilla/websocket").is_dir():
        raise Missing(
            "gorilla/websocket sources missing: install golang-github-gorilla-websocket-dev"
        )
    return _go_build("loadgen")


def centrifuge() -> Path:
    if not (GOCODE / "src/github.com/centrifugal/centrifuge").is_dir():
        raise Missing(
            "Centrifuge sources missing: install golang-github-centrifugal-centrifuge-dev "
            "(benches/peers/setup.sh)"
        )
    return _go_build("centrifuge")


def nginx() -> Path:
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if path is None or not NCHAN_MODULE.exists():
        raise Missing(
            "nginx with Nchan missing: install libnginx-mod-nchan (benches/peers/setup.sh)"
        )
    return Path(path)


def socketio() -> None:
    try:
        # Optional (the bench's own deps, installed by setup.sh): the ignores also cover a
        # type check run where they are not installed.
        import aiohttp  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        import socketio  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
    except ImportError as e:
        raise Missing(f"python-socketio baseline: {e}; pip install python-socketio aiohttp") from e


def redis_server() -> Path:
    path = shutil.which("redis-server")
    if path is None:
        raise Missing("redis-server not found: install redis-server")
    return Path(path)
