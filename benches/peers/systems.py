"""The servers of the peer benchmark, each started on free loopback ports, pinned to the
server core with `taskset`, and stopped by PID (SIGTERM, then SIGKILL) when its `with` ends.

A `Server` knows its WebSocket URL (and Nchan's HTTP publish URL), which loadgen adapter speaks
to it, and the PIDs whose CPU time and RSS count as the server (nginx: master and worker).
Redis, where a system uses it, runs on the server core too, as its own process; its CPU is
reported apart.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import build

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"did not listen on {port} within {within:.0f} s: {tail(log)}")


def tail(log: Path, n: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def stop(proc: subprocess.Popen[bytes], within: float = 10.0) -> None:
    """SIGTERM by PID, then SIGKILL after `within` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(within)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)


def children(pid: int) -> list[int]:
    """pid and its descendants (nginx's worker, a Python server's helpers)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rindex(")") + 2 :].split()
            total += int(f[11]) + int(f[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
    return total


@dataclass
class Redis:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pids(self) -> list[int]:
        return [self.proc.pid]


@contextlib.contextmanager
def redis(tmp: Path, core: int | None, replica_of: int | None = None) -> Iterator[Redis]:
    port = free_port()
    d = tmp / f"redis-{port}"
    d.mkdir()
    log = d / "log"
    argv = [
        *pin(core),
        str(build.redis_server()),
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
        "--save", "", "--appendonly", "no", "--logfile", str(log),
    ]  # fmt: skip
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_port(port, proc, log)
        if replica_of is not None:
            _wait_replica_link(port)
        yield Redis(port, proc)
    finally:
        stop(proc)


def _wait_replica_link(port: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["redis-cli", "-p", str(port), "info", "replication"],
            capture_output=True,
            text=True,
            check=False,
        )
        if "master_link_status:up" in r.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis replica did not link to its master")


@dataclass
class Server:
    system: str  # the loadgen adapter
    url: str
    proc: subprocess.Popen[bytes]
    pub_url: str = ""
    redis: list[Redis] = field(default_factory=list)

    def pids(self) -> list[int]:
        return children(self.proc.pid)

    def redis_pids(self) -> list[int]:
        return [p for r in self.redis for p in r.pids()]


# name -> (adapter, backend, extra): the systems a scenario can name.
SYSTEMS: dict[str, tuple[str, str, str]] = {
    "kasagi": ("kasagi", "memory", ""),
    "kasagi+redis": ("kasagi", "redis", "leader"),
    "kasagi+redis/replica": ("kasagi", "redis", "replica"),
    "centrifuge": ("centrifuge", "memory", ""),
    "centrifuge+redis": ("centrifuge", "redis", ""),
    "nchan": ("nchan", "memory", ""),
    "nchan+redis": ("nchan", "redis", ""),
    "socketio": ("socketio", "memory", ""),
    "socketio+redis": ("socketio", "redis", ""),
}


def check(name: str) -> None:
    """Raise build.Missing if system `name` cannot run here (before any scenario starts)."""
    adapter, backend, _ = SYSTEMS[name]
    if backend == "redis":
        build.redis_server()
    if adapter == "centrifuge":
        build.centrifuge()
    elif adapter == "nchan":
        build.nginx()
    elif adapter == "socketio":
        build.socketio()


def _python_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASAGI_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


@contextlib.contextmanager
def server(name: str, core: int | None) -> Iterator[Server]:
    """Start system `name` (with its Redis, if any) and stop everything on exit."""
    adapter, backend, extra = SYSTEMS[name]
    with (
        tempfile.TemporaryDirectory(prefix=f"peers-{adapter}-") as t,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(t)
        reds: list[Redis] = []
        if backend == "redis":
            reds.append(stack.enter_context(redis(tmp, core)))
            if extra == "replica":
                reds.append(stack.enter_context(redis(tmp, core, replica_of=reds[0].port)))
        port = free_port()
        log = tmp / "server.log"
        pub_url = ""
        if adapter == "kasagi":
            argv = [
                sys.executable, "-m", "kasagi_relay", "--port", str(port),
                "--rate-limit", "0", "--rate-bytes", "0", "--max-connections", "0",
                "--max-connections-per-address", "0", "--log-level", "warning",
            ]  # fmt: skip
            if backend == "redis":
                argv += ["--redis", reds[0].url, "--ack", extra]
            url = f"ws://127.0.0.1:{port}/ws"
        elif adapter == "centrifuge":
            argv = [str(build.centrifuge()), "-addr", f"127.0.0.1:{port}"]
            if backend == "redis":
                argv += ["-redis", f"127.0.0.1:{reds[0].port}"]
            url = f"ws://127.0.0.1:{port}/connection/websocket"
        elif adapter == "nchan":
            conf = nchan_conf(tmp, port, reds[0].port if reds else None)
            argv = [
                str(build.nginx()),
                "-p",
                str(tmp),
                "-c",
                str(conf),
                "-e",
                str(tmp / "error.log"),
            ]
            url = f"ws://127.0.0.1:{port}"
            pub_url = f"http://127.0.0.1:{port}"
            log = tmp / "error.log"
        elif adapter == "socketio":
            argv = [sys.executable, "-m", "benches.peers.sio_server", "--port", str(port)]
            if backend == "redis":
                argv += ["--redis", reds[0].url]
            url = f"ws://127.0.0.1:{port}"
        else:
            raise ValueError(name)
        with open(tmp / "server.log", "wb") as out:
            proc = subprocess.Popen(
                [*pin(core), *argv],
                cwd=REPO,
                env=_python_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,
            )
        try:
            wait_port(port, proc, log)
            if adapter == "nchan" and reds:
                _wait_nchan_redis(port, log)
            yield Server(adapter, url, proc, pub_url, reds)
        finally:
            stop(proc)


def _wait_nchan_redis(port: int, log: Path, within: float = 30.0) -> None:
    """Nchan answers 503 until its Redis connection is up: publish until it does not."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/pub/ready", data=b"{}", method="POST"
        )
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(req, timeout=5) as r,
        ):
            if r.status // 100 == 2:
                return
        time.sleep(0.2)
    raise RuntimeError(f"Nchan did not reach its Redis within {within:.0f} s: {tail(log)}")


def nchan_conf(tmp: Path, port: int, redis_port: int | None) -> Path:
    """nginx.conf for Nchan: one worker, WebSocket subscribers at /sub/ROOM, HTTP publishers at
    /pub/ROOM keeping 1,000 messages per channel for 600 s (the relay's history defaults),
    everything (pid, logs, temp dirs) under `tmp`, run as the current user."""
    upstream, use = "", ""
    if redis_port is not None:
        upstream = f"upstream redis_server {{ nchan_redis_server redis://127.0.0.1:{redis_port}; }}"
        use = "nchan_redis_pass redis_server;"
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    text = f"""
load_module {build.NCHAN_MODULE};
{user}
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 60000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    nchan_max_reserved_memory 512m;
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/sub/(\\w+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
            {use}
        }}
        location ~ ^/pub/(\\w+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 600s;
            {use}
        }}
    }}
}}
"""
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path
