"""Redis and Sentinel processes on loopback: the one launcher the tests, the benchmarks and the
deployment kit (kit/localkit.py) share.

Standard library only, so the kit runs it under any python3 >= 3.10 (no redis-py needed).

- Processes: `spawn` starts a `redis-server` (a Sentinel with `--sentinel`), its output
  appended to a log file, optionally recording its PID in a PID file; `stop_all` stops
  processes by PID: SIGCONT first (a test may have frozen one with SIGSTOP and a frozen
  process cannot handle SIGTERM), then SIGTERM, then SIGKILL after a grace period. Nothing is
  ever stopped by name, so the machine's own Redis (6379) is never touched. `runs_in` tells
  whether a PID from a PID file is still the process we started (PIDs are reused).
- Ports: `free_port`/`free_ports` let the OS pick free loopback ports.
- Configs: `server_conf`/`sentinel_conf` write the tight-timing configs the tests use;
  `render_redis`/`render_sentinel` render the deployment kit's own files (redis/*.conf,
  sentinel/*.conf) with ports, paths and addresses substituted (docs/operations.md).
- Readiness: `poll`/`wait_for`, a tiny RESP client (`call`, `info`), and `sentinel_problems`,
  the one definition of "the Sentinels agree on a healthy master" used by both.
- Topologies: `Topology` (one server, or 1 master + 2 replicas + 3 Sentinels, quorum 2) with
  the failover helpers the tests use; `running_topology` starts one and stops it on exit::

      with running_topology(tmp_path / "t") as topo:
          old = topo.master_addr()                       # as the Sentinels see it
          topo.signal(topo.node_at(old), signal.SIGKILL)
          topo.wait_master_change(old)

Readiness of a Topology is strict, so nothing starts on a half-built topology: both replicas
report `master_link_status:up`, the master streams to them, every Sentinel sees the master, 2
replicas and 2 other Sentinels, and `SENTINEL CKQUORUM` passes. Failures raise `LaunchError`
naming what was missing, with the tail of each log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # redis-py is only needed by Topology.client(), which the kit never calls
    import redis

LOCALHOST = "127.0.0.1"
MASTER_NAME = "kasagi-master"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

Addr = tuple[str, int]
T = TypeVar("T")


class LaunchError(RuntimeError):
    """A process or topology did not come up (or down) as expected; the message says what
    was missing and is meant for a person (it carries log tails)."""


class ConfigError(LaunchError):
    """A config file the launcher renders does not have the shape it substitutes into."""


# --------------------------------------------------------------------------------------------
# Waiting
# --------------------------------------------------------------------------------------------


def poll(
    fn: Callable[[], T | None],
    timeout: float,
    what: str,
    on_fail: str | Callable[[], str] = "",
) -> T:
    """fn() until it returns something truthy; LaunchError naming `what` at the deadline,
    followed by on_fail (a callable is called then, so log tails are read after the failure).
    A LaunchError from fn() is final (e.g. the process exited) and ends the wait at once."""

    def more() -> str:
        return on_fail() if callable(on_fail) else on_fail

    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except LaunchError as exc:
            raise LaunchError(f"{exc}{more()}") from None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise LaunchError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{more()}")
        time.sleep(0.05)


def wait_for(pred: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """pred() until truthy; False at the deadline. Connection-level errors count as "not yet"."""
    end = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return True
        except (OSError, RespError, ValueError):
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# A tiny RESP2 client (PING, INFO, SET, WAIT, ROLE, SENTINEL ...): the kit has no redis-py
# --------------------------------------------------------------------------------------------


class RespError(Exception):
    """An error reply from the server (`-ERR ...`)."""


class Resp:
    """One connection; bulk strings come back as str (decoded with errors="replace")."""

    def __init__(
        self, host: str, port: int, timeout: float = 1.0, password: str | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        if password is not None:
            try:
                self.call("AUTH", password)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, *args: object) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RespError(f"unexpected reply {line[:40]!r}")


def call(port: int, *args: object, timeout: float = 1.0, password: str | None = None) -> Any:
    """One command on a fresh connection to 127.0.0.1:port."""
    with Resp(LOCALHOST, port, timeout, password) as r:
        return r.call(*args)


def parse_info(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


def info(port: int, section: str = "replication", password: str | None = None) -> dict[str, str]:
    return parse_info(call(port, "INFO", section, password=password))


def answers_as(port: int, pid: int, password: str | None = None) -> bool:
    """The server answering on 127.0.0.1:port is the process `pid` (not another process that
    holds the port, e.g. one that took it between free_port() and the bind)."""
    return info(port, "server", password).get("process_id") == str(pid)


def pairs(flat: Any) -> dict[str, Any]:
    """A flat [k, v, k, v ...] reply (SENTINEL MASTER, REPLICAS ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=False))


def port_answers(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.3):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Ports and processes
# --------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS reports free on 127.0.0.1 (all held open while picking, so
    they differ); the short window before a server binds one is accepted."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((LOCALHOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def log_tail(path: Path, lines: int = 15, prefix: str = "  ") -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"{prefix}(no log: {exc})"
    return "\n".join(prefix + line for line in text)


def spawn(
    argv: Sequence[str],
    *,
    cwd: Path,
    log: Path,
    pid_file: Path | None = None,
    detach: bool = False,
) -> subprocess.Popen[bytes]:
    """Start argv with stdout and stderr appended to `log` (after a line naming the command).

    detach: a session of its own, so a Ctrl-C on the terminal that started it (make) does not
    reach it; whoever started it stops it by PID (the kit's `down`). pid_file: where the PID
    is recorded for that later stop."""
    with open(log, "ab") as out:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        out.write(f"\n==== {stamp} launcher starts: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            close_fds=True,
        )
    if pid_file is not None:
        pid_file.write_text(f"{proc.pid}\n")
    return proc


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def runs_in(pid: int, directory: Path, hint: str = "") -> bool:
    """The PID is alive, not a zombie, and still a process we started (PIDs are reused): every
    process the kit starts runs with its working directory inside `directory`. Without /proc
    (macOS) `ps` is asked, and its command line must contain `hint` (e.g. the port)."""
    directory = directory.resolve()
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
            cwd = os.readlink(proc / "cwd")
        except OSError:
            return False
        return cwd == str(directory) or cwd.startswith(str(directory) + os.sep)
    try:
        out = subprocess.run(
            ["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return False
    return bool(out) and not out.startswith("Z") and hint in out


@dataclass
class Running:
    """A process to stop: its PID and how to tell it still runs (Popen.poll() for a child,
    which also reaps it; runs_in() for a PID read back from a PID file)."""

    pid: int
    running: Callable[[], bool]

    @classmethod
    def child(cls, proc: subprocess.Popen[bytes]) -> Running:
        return cls(proc.pid, lambda: proc.poll() is None)


def stop_all(procs: Sequence[Running], grace: float = 5.0) -> list[int]:
    """Stop every process by PID: SIGCONT + SIGTERM, then SIGKILL for those still running
    after `grace` seconds. Returns the PIDs that needed SIGKILL; LaunchError if one survives."""

    def send(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    live = [p for p in procs if p.running()]
    for p in live:
        send(p.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
        send(p.pid, signal.SIGTERM)
    wait_for(lambda: not any(p.running() for p in live), grace, 0.05)
    killed = [p for p in live if p.running()]
    for p in killed:
        send(p.pid, signal.SIGKILL)
    if not wait_for(lambda: not any(p.running() for p in killed), 5.0, 0.05):
        left = [p.pid for p in killed if p.running()]
        raise LaunchError(f"processes still running after SIGKILL: {left}")
    return [p.pid for p in killed]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def server_conf(
    port: int, data_dir: Path, name: str, password: str | None, replica_of: Addr | None
) -> str:
    """A redis-server for the tests: no persistence, and diskless immediate full syncs so a
    replica (re)links in milliseconds. Logs go to stdout (the launcher's log file)."""
    lines = [
        f"port {port}",
        f"bind {LOCALHOST}",
        "protected-mode no",
        f"dir {data_dir}",
        f"dbfilename {name}.rdb",
        'save ""',
        "appendonly no",
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
        "repl-ping-replica-period 1",
        "repl-timeout 5",
    ]
    if password:
        lines += [f"requirepass {password}", f"masterauth {password}"]
    if replica_of is not None:
        lines.append(f"replicaof {replica_of[0]} {replica_of[1]}")
    return "\n".join(lines) + "\n"


def sentinel_conf(
    port: int,
    data_dir: Path,
    master: Addr,
    *,
    master_name: str = MASTER_NAME,
    quorum: int = 2,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> str:
    """A Sentinel for the tests, with tight timings (the kit's files say 5000 / 60000)."""
    m = master_name
    lines = [
        f"port {port}",
        f"bind {LOCALHOST}",
        "protected-mode no",
        f"dir {data_dir}",
        f"sentinel monitor {m} {master[0]} {master[1]} {quorum}",
        f"sentinel down-after-milliseconds {m} {down_after_ms}",
        f"sentinel failover-timeout {m} {failover_timeout_ms}",
        f"sentinel parallel-syncs {m} 1",
    ]
    if password:
        lines.append(f"sentinel auth-pass {m} {password}")
    if sentinel_password:
        lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
    return "\n".join(lines) + "\n"


def directive_key(line: str) -> str | None:
    """The name a config line sets ("port", "sentinel monitor" ...), None for comments."""
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    w = s.split()
    return " ".join(w[:2]).lower() if w[0].lower() == "sentinel" else w[0].lower()


def render(template: str, subs: dict[str, str], source: str) -> str:
    """Replace each directive named in subs (it must occur exactly once) by the given line."""
    seen: dict[str, int] = dict.fromkeys(subs, 0)
    out = []
    for line in template.splitlines():
        key = directive_key(line)
        if key is not None and key in subs:
            seen[key] += 1
            out.append(subs[key])
        else:
            out.append(line)
    bad = {k: n for k, n in seen.items() if n != 1}
    if bad:
        raise ConfigError(
            f"{source}: expected each of these directives exactly once, found {bad}; "
            "the launcher substitutes them to run the file on loopback"
        )
    return "\n".join(out) + "\n"


def render_redis(
    template: str, source: str, port: int, data_dir: Path, master_port: int | None
) -> str:
    """A Redis config of the kit (redis/*.conf) on 127.0.0.1:port, a replica of master_port
    when given; every other directive is the file as written."""
    subs = {
        "bind": f"bind {LOCALHOST}",
        "port": f"port {port}",
        "dir": f"dir {data_dir}",
        "replica-announce-ip": f"replica-announce-ip {LOCALHOST}",
        "replica-announce-port": f"replica-announce-port {port}",
    }
    if master_port is not None:
        subs["replicaof"] = f"replicaof {LOCALHOST} {master_port}"
    return render(template, subs, source)


def monitor_line(template: str, source: str) -> tuple[str, int]:
    """(master name, quorum) from a Sentinel config's `sentinel monitor` line."""
    for line in template.splitlines():
        if directive_key(line) == "sentinel monitor":
            w = line.split()
            return w[2], int(w[5])
    raise ConfigError(f"{source}: no `sentinel monitor` line")


def render_sentinel(
    template: str,
    source: str,
    port: int,
    data_dir: Path,
    master_port: int,
    down_after_ms: int,
    failover_timeout_ms: int | None = None,
) -> str:
    """A Sentinel config of the kit (sentinel/*.conf) on 127.0.0.1:port, monitoring the master
    on master_port, announcing addresses instead of container hostnames."""
    name, quorum = monitor_line(template, source)
    subs = {
        "bind": f"bind {LOCALHOST}",
        "port": f"port {port}",
        "dir": f"dir {data_dir}",
        "sentinel announce-hostnames": "sentinel announce-hostnames no",
        "sentinel announce-ip": f"sentinel announce-ip {LOCALHOST}",
        "sentinel announce-port": f"sentinel announce-port {port}",
        "sentinel monitor": f"sentinel monitor {name} {LOCALHOST} {master_port} {quorum}",
        "sentinel down-after-milliseconds": (
            f"sentinel down-after-milliseconds {name} {down_after_ms}"
        ),
    }
    if failover_timeout_ms is not None:
        subs["sentinel failover-timeout"] = (
            f"sentinel failover-timeout {name} {failover_timeout_ms}"
        )
    return render(template, subs, source)


# --------------------------------------------------------------------------------------------
# What the Sentinels see
# --------------------------------------------------------------------------------------------


def sentinel_view(port: int, name: str, password: str | None = None) -> dict[str, Any]:
    """One Sentinel's view of master `name`: addr [host, port], master fields, replicas'
    fields, and CKQUORUM's answer (or "ERR ...")."""
    with Resp(LOCALHOST, port, password=password) as r:
        addr = r.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        master = pairs(r.call("SENTINEL", "MASTER", name))
        replicas = [pairs(x) for x in r.call("SENTINEL", "REPLICAS", name)]
        try:
            ck = r.call("SENTINEL", "CKQUORUM", name)
        except RespError as e:
            ck = f"ERR {e}"
    return {"addr": addr, "master": master, "replicas": replicas, "ckquorum": ck}


def sentinel_problems(
    sentinel_ports: Sequence[int],
    name: str,
    *,
    replicas: int,
    master_port: int | None = None,
    replica_links: bool = True,
    password: str | None = None,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """What keeps the Sentinels from agreeing on a healthy master (empty: they do).

    Every Sentinel must answer, name the same master (master_port when given) with flags
    exactly "master", see `replicas` replicas none of them down or disconnected, see every
    other Sentinel, and pass CKQUORUM. replica_links: also require each replica's
    master-link-status "ok" as the Sentinel last read it (Sentinel reads replicas' INFO only
    every 10 s, so a caller that checks the replicas' links itself leaves this off)."""
    problems: list[str] = []
    addrs: set[int] = set()
    names = list(labels) if labels is not None else [f"sentinel :{p}" for p in sentinel_ports]
    for label, port in zip(names, sentinel_ports, strict=True):
        try:
            v = sentinel_view(port, name, password)
        except (OSError, RespError) as e:
            problems.append(f"{label}: {e}")
            continue
        m = v["master"]
        at = int(v["addr"][1])
        addrs.add(at)
        if master_port is not None and at != master_port:
            problems.append(f"{label}: names the master at port {at}, not {master_port}")
        if m.get("flags") != "master":
            problems.append(f"{label}: master flags {m.get('flags')}")
        healthy = [
            r
            for r in v["replicas"]
            if r.get("flags") == "slave"
            and (not replica_links or r.get("master-link-status") == "ok")
        ]
        if len(healthy) != replicas or len(v["replicas"]) != replicas:
            problems.append(f"{label}: {len(healthy)} healthy replicas of {len(v['replicas'])}")
        others = int(m.get("num-other-sentinels", 0))
        if others != len(sentinel_ports) - 1:
            problems.append(f"{label}: sees {others} other sentinels")
        if not str(v["ckquorum"]).startswith("OK"):
            problems.append(f"{label}: ckquorum {v['ckquorum']}")
    if len(addrs) > 1:
        problems.append(f"sentinels disagree on the master port: {sorted(addrs)}")
    return problems


# --------------------------------------------------------------------------------------------
# Topologies for tests and benchmarks
# --------------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    port: int
    conf: Path
    log: Path
    sentinel: bool = False
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped by the test

    @property
    def addr(self) -> Addr:
        return (LOCALHOST, self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log, lines)


@dataclass
class Topology:
    """A running set of Redis processes (one server, or master + replicas + Sentinels), all
    children of this process, in `root` (configs, data and logs)."""

    root: Path
    password: str | None = None
    sentinel_password: str | None = None
    nodes: list[Node] = field(default_factory=list)
    master_name: str = MASTER_NAME
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    # Every port this topology picked. The OS may hand a port out again once the probe
    # socket closed, and a picked port stays unbound until its server starts: a cluster
    # node's bus port was once given to the next node as its client port (one failed to
    # bind, a CI run's setup error).
    picked: set[int] = field(default_factory=set)

    # ------------------------------------------------------------------ processes

    def free_port(self) -> int:
        """A free loopback port no other node of this topology was given."""
        while True:
            port = free_port()
            if port not in self.picked:
                self.picked.add(port)
                return port

    def _spawn(self, node: Node) -> None:
        argv = [REDIS_SERVER, str(node.conf), *(["--sentinel"] if node.sentinel else [])]
        node.proc = spawn(argv, cwd=self.root, log=node.log)
        node.stopped = False

    def _node(self, name: str, sentinel: bool = False) -> Node:
        node = Node(name, self.free_port(), self.root / f"{name}.conf", self.root / f"{name}.log")
        node.sentinel = sentinel
        self.nodes.append(node)
        return node

    def add_server(self, name: str, replica_of: Addr | None = None, port: int = 0) -> Node:
        """Start a redis-server (on `port`, else a free one); wait_answers() waits for it."""
        node = self._node(name)
        node.port = port or node.port
        node.conf.write_text(server_conf(node.port, self.root, name, self.password, replica_of))
        self._spawn(node)
        return node

    def add_sentinel(self, name: str, master: Addr, quorum: int = 2) -> Node:
        node = self._node(name, sentinel=True)
        text = sentinel_conf(
            node.port,
            self.root,
            master,
            master_name=self.master_name,
            quorum=quorum,
            down_after_ms=self.down_after_ms,
            failover_timeout_ms=self.failover_timeout_ms,
            password=self.password,
            sentinel_password=self.sentinel_password,
        )
        node.conf.write_text(text)  # Sentinel rewrites it: a file per node
        self._spawn(node)
        return node

    def restart(self, node: Node, replica_of: Addr | None = None) -> None:
        """Start a dead node again (a server as a replica of `replica_of`)."""
        assert not node.alive(), f"{node.name} is still running"
        if not node.sentinel:
            text = server_conf(node.port, self.root, node.name, self.password, replica_of)
            node.conf.write_text(text)
        self._spawn(node)
        self.wait_answers(node, 10)

    def wait_answers(self, node: Node, timeout: float) -> None:
        """Until the node's own process answers on its port; LaunchError with the logs if it
        does not, at once if it exits (a port taken after free_port(), a bad config)."""

        def answers() -> bool:
            if node.proc is not None and node.proc.poll() is not None:
                raise LaunchError(f"{node.name} exited with status {node.proc.returncode}")
            pw = self.sentinel_password if node.sentinel else self.password
            return node.proc is None or answers_as(node.port, node.proc.pid, pw)

        poll(answers, timeout, f"{node.name} to answer", self.logs)

    def signal(self, node: Node, sig: int) -> None:
        """Send `sig` to the node's PID (SIGSTOP/SIGCONT are tracked for the teardown)."""
        assert node.proc is not None
        os.kill(node.pid, sig)
        if sig == signal.SIGSTOP:
            node.stopped = True
        elif sig == signal.SIGCONT:
            node.stopped = False
        elif sig == signal.SIGKILL:
            node.stopped = False
            node.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process this topology started, by PID."""
        stop_all([Running.child(n.proc) for n in self.nodes if n.proc is not None])
        for n in self.nodes:
            n.stopped = False

    # ------------------------------------------------------------------ clients

    def client(self, node: Node, timeout: float = 1.0) -> redis.Redis:
        """A redis-py client of the node (tests; the launcher itself speaks RESP directly)."""
        import redis

        pw = self.sentinel_password if node.sentinel else self.password
        return redis.Redis(
            LOCALHOST,
            node.port,
            password=pw,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def _query(self, node: Node, *args: object, timeout: float = 1.0) -> Any:
        pw = self.sentinel_password if node.sentinel else self.password
        return call(node.port, *args, timeout=timeout, password=pw)

    @property
    def servers(self) -> list[Node]:
        return [n for n in self.nodes if not n.sentinel]

    @property
    def sentinels(self) -> list[Node]:
        return [n for n in self.nodes if n.sentinel]

    @property
    def sentinel_addrs(self) -> list[Addr]:
        return [n.addr for n in self.sentinels]

    def node_at(self, addr: Addr) -> Node:
        for n in self.servers:
            if n.port == addr[1]:
                return n
        raise KeyError(addr)

    def info(self, node: Node, section: str = "replication") -> dict[str, str]:
        return parse_info(self._query(node, "INFO", section))

    def replicas_online(self, master: Node) -> int:
        """Replicas the master streams to (state=online): only those count for WAIT. A
        replica reports its link up before the master has its first REPLCONF ACK."""
        info = self.info(master)
        slaves = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
        return sum(1 for v in slaves if "state=online" in v.split(","))

    def master_addr(self) -> Addr:
        """The master as the Sentinels report it (the first that answers)."""
        last: Exception | None = None
        for s in self.sentinels:
            if not s.alive() or s.stopped:
                continue
            try:
                host, port = self._query(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                return (host, int(port))
            except Exception as exc:
                last = exc
        raise LaunchError(f"no Sentinel answered: {last!r}")

    def master(self) -> Node:
        if not self.sentinels:
            return self.servers[0]
        return self.node_at(self.master_addr())

    def sentinels_agree_on(self) -> Addr | None:
        """The master address if every live Sentinel reports the same one, else None."""
        seen = set()
        for s in self.sentinels:
            if s.alive() and not s.stopped:
                host, port = self._query(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                seen.add((host, int(port)))
        return seen.pop() if len(seen) == 1 else None

    def wait_master_change(self, old: Addr, timeout: float = 20.0) -> Addr:
        """Until every Sentinel names a master other than `old`, and it accepts writes."""

        def changed() -> Addr | None:
            addr = self.sentinels_agree_on()
            if addr is None or addr == old:
                return None
            role = self._query(self.node_at(addr), "ROLE")
            return addr if role[0] == "master" else None

        return poll(changed, timeout, f"a failover away from {old}", self.logs)

    def failover(self) -> None:
        """SENTINEL FAILOVER through the first live Sentinel."""
        s = next(n for n in self.sentinels if n.alive() and not n.stopped)
        self._query(s, "SENTINEL", "FAILOVER", self.master_name)

    # ------------------------------------------------------------------ readiness

    def logs(self) -> str:
        parts = [
            f"\n--- {n.name} (port {n.port}, pid {n.proc.pid if n.proc else '-'}) ---\n"
            + n.log_tail()
            for n in self.nodes
        ]
        return "".join(parts)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Master with its replicas linked, each Sentinel seeing them, the other Sentinels and
        a quorum (without Sentinels: the first server is the master)."""
        for n in self.servers:
            if n.alive() and not n.stopped:
                self.wait_answers(n, timeout)
        master = self.master() if self._sentinels_answer() else self.servers[0]
        replicas = [n for n in self.servers if n is not master and n.alive()]

        def linked() -> bool:
            for r in replicas:
                inf = self.info(r)
                if inf.get("role") != "slave" or inf.get("master_link_status") != "up":
                    return False
                if int(inf.get("master_port", 0)) != master.port:
                    return False
            return self.replicas_online(master) == len(replicas)

        poll(linked, timeout, "replicas linked to the master", self.logs)
        if not self.sentinels:
            return

        def sentinels_ready() -> bool:
            return not sentinel_problems(
                [s.port for s in self.sentinels],
                self.master_name,
                replicas=len(replicas),
                master_port=master.port,
                replica_links=False,  # checked on the replicas themselves, just above
                password=self.sentinel_password,
            )

        poll(sentinels_ready, timeout, "Sentinels to see the replicas and each other", self.logs)

    def _sentinels_answer(self) -> bool:
        try:
            self.master_addr()
            return True
        except LaunchError:
            return False

    def heal(self, timeout: float = 30.0) -> None:
        """Bring every dead or frozen server back as a replica of the current master and
        wait until the topology is ready again (tests that share one topology call this)."""
        for n in self.nodes:
            if n.stopped:
                self.signal(n, signal.SIGCONT)
        master = self.master_addr()
        for n in self.servers:
            if not n.alive():
                self.restart(n, replica_of=master)
        self.wait_ready(timeout)


def start_topology(
    root: Path,
    *,
    sentinels: bool = True,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> Topology:
    """One server, or (sentinels) 1 master + 2 replicas + 3 Sentinels (quorum 2, master name
    `kasagi-master`, down-after 1000 ms, failover-timeout 3000 ms), ready; the caller stops it."""
    if not os.path.exists(REDIS_SERVER):
        raise LaunchError(f"redis-server not found at {REDIS_SERVER}")
    root.mkdir(parents=True, exist_ok=True)
    topo = Topology(root, password, sentinel_password)
    try:
        master = topo.add_server("master")
        topo.wait_answers(master, 10)
        if sentinels:
            topo.add_server("replica1", master.addr)
            topo.add_server("replica2", master.addr)
            # Replicas linked before the Sentinels look: a Sentinel learns replicas from the
            # master's INFO, which it reads every 10 s, so one that looks too early waits that.
            topo.wait_ready()
            for i in (1, 2, 3):
                topo.add_sentinel(f"sentinel{i}", master.addr)
        for node in topo.nodes:  # every process of the shape, not only those still alive
            topo.wait_answers(node, 10)
        topo.wait_ready()
    except BaseException:
        topo.stop()
        raise
    return topo


@contextlib.contextmanager
def running_topology(
    root: Path,
    *,
    sentinels: bool = True,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> Iterator[Topology]:
    """start_topology(), stopped by PID on exit."""
    topo = start_topology(
        root, sentinels=sentinels, password=password, sentinel_password=sentinel_password
    )
    try:
        yield topo
    finally:
        topo.stop()


# --------------------------------------------------------------------------------------------
# Redis Cluster
# --------------------------------------------------------------------------------------------


def cluster_conf(
    port: int,
    bus_port: int,
    data_dir: Path,
    name: str,
    password: str | None,
    node_timeout_ms: int,
) -> str:
    """A cluster node for the tests and the local kit: server_conf() plus cluster mode.
    The bus port is picked free too (the default, port + 10000, may be taken or past
    65535). `cluster-node-timeout` sets how fast a dead primary is failed over."""
    lines = [
        server_conf(port, data_dir, name, password, None).rstrip("\n"),
        "cluster-enabled yes",
        f"cluster-port {bus_port}",
        f"cluster-config-file {name}-nodes.conf",
        f"cluster-node-timeout {node_timeout_ms}",
        # A replica promoted however long its link was down: the tests kill primaries.
        "cluster-replica-validity-factor 0",
        # The other shards keep serving while one has no primary.
        "cluster-require-full-coverage no",
        "cluster-allow-reads-when-down no",
    ]
    return "\n".join(lines) + "\n"


def cluster_slots(port: int, password: str | None = None) -> list[tuple[int, int, Addr]]:
    """CLUSTER SLOTS as (first slot, last slot, primary address), sorted."""
    out = []
    for entry in call(port, "CLUSTER", "SLOTS", password=password):
        out.append((int(entry[0]), int(entry[1]), (str(entry[2][0]), int(entry[2][1]))))
    return sorted(out)


@dataclass
class ClusterTopology(Topology):
    """A Redis Cluster of `primaries` shards with `replicas` replicas each, every node a child
    of this process (stopped by PID like the other topologies)."""

    node_timeout_ms: int = 1000
    # (certificate, key, CA) PEM files: every node also listens for TLS clients on a port of
    # its own (tls_ports), the bus and replication speak TLS, and the plain port stays for
    # the launcher's own checks (CLUSTER SHARDS lists both ports of each node).
    tls: tuple[str, str, str] | None = None
    tls_ports: dict[str, int] = field(default_factory=dict)

    def add_cluster_node(self, name: str) -> Node:
        node = self._node(name)
        text = cluster_conf(
            node.port, self.free_port(), self.root, name, self.password, self.node_timeout_ms
        )
        if self.tls is not None:
            cert, key, ca = self.tls
            self.tls_ports[name] = self.free_port()
            text += (
                "\n".join(
                    [
                        f"tls-port {self.tls_ports[name]}",
                        f"tls-cert-file {cert}",
                        f"tls-key-file {key}",
                        f"tls-ca-cert-file {ca}",
                        "tls-auth-clients no",
                        "tls-cluster yes",
                        "tls-replication yes",
                    ]
                )
                + "\n"
            )
        node.conf.write_text(text)
        self._spawn(node)
        return node

    def restart_node(self, node: Node) -> None:
        """Start a dead cluster node again (its nodes.conf brings it back into the cluster,
        as a replica of whoever took its slots)."""
        assert not node.alive(), f"{node.name} is still running"
        self._spawn(node)
        self.wait_answers(node, 10)

    def live(self) -> list[Node]:
        return [n for n in self.servers if n.alive() and not n.stopped]

    def slots(self) -> list[tuple[int, int, Addr]]:
        """The slot map as the first live node answering sees it."""
        last: Exception | None = None
        for n in self.live():
            try:
                return cluster_slots(n.port, self.password)
            except Exception as exc:  # a node still starting
                last = exc
        raise LaunchError(f"no cluster node answered CLUSTER SLOTS: {last!r}")

    def primaries(self) -> list[Node]:
        """The nodes that own slots now, in slot order."""
        seen: list[Node] = []
        for _, _, addr in self.slots():
            node = self.node_at(addr)
            if node not in seen:
                seen.append(node)
        return seen

    def primary_of_slot(self, slot: int) -> Node:
        for first, last, addr in self.slots():
            if first <= slot <= last:
                return self.node_at(addr)
        raise LaunchError(f"slot {slot} is not served")

    def role(self, node: Node) -> str:
        return str(self._query(node, "ROLE")[0])

    def cluster_ok(self) -> bool:
        """Every live node says cluster_state:ok, sees every slot served by a live
        primary, and each primary streams to its replicas."""
        for n in self.live():
            state = parse_info(self._query(n, "CLUSTER", "INFO"))
            if state.get("cluster_state") != "ok" or state.get("cluster_slots_ok") != "16384":
                return False
        for p in self.primaries():
            if not p.alive() or p.stopped or self.role(p) != "master":
                return False
        return True

    def wait_cluster_ok(
        self, timeout: float = 30.0, replicas_per_primary: int | None = None
    ) -> None:
        def ok() -> bool:
            if not self.cluster_ok():
                return False
            if replicas_per_primary is None:
                return True
            return all(self.replicas_online(p) >= replicas_per_primary for p in self.primaries())

        poll(ok, timeout, "the cluster to be ok", self.logs)

    def wait_primary_change(self, slot: int, old: Addr, timeout: float = 20.0) -> Addr:
        """Until every live node says another primary serves `slot`, and it is a master."""

        def changed() -> Addr | None:
            seen = set()
            for n in self.live():
                for first, last, addr in cluster_slots(n.port, self.password):
                    if first <= slot <= last:
                        seen.add(addr)
            if len(seen) != 1:
                return None
            addr = seen.pop()
            if addr == old or self.role(self.node_at(addr)) != "master":
                return None
            return addr

        return poll(changed, timeout, f"a new primary for slot {slot}", self.logs)

    def heal(self, timeout: float = 30.0) -> None:
        """Thaw frozen nodes, restart dead ones (they rejoin as replicas), until ok."""
        for n in self.servers:
            if n.stopped:
                self.signal(n, signal.SIGCONT)
        for n in self.servers:
            if not n.alive():
                self.restart_node(n)
        self.wait_cluster_ok(timeout, replicas_per_primary=1)

    def node_id(self, node: Node) -> str:
        return str(self._query(node, "CLUSTER", "MYID"))

    def migrate_slot(self, slot: int, target: Node, *, dwell_s: float = 0.0) -> int:
        """Move `slot` to `target` the way `redis-cli --cluster reshard` does (IMPORTING
        on the target, MIGRATING on the source, MIGRATE its keys in batches, then NODE on
        the target, the source and every other primary). `dwell_s`: how long the slot
        stays half-migrated before its keys move (clients meanwhile get ASK for new keys).
        Returns the number of keys moved."""
        source = self.primary_of_slot(slot)
        if source is target:
            return 0
        src_id, dst_id = self.node_id(source), self.node_id(target)
        self._query(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        self._query(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        time.sleep(dwell_s)
        moved = 0
        while True:
            keys = self._query(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            auth = ["AUTH", self.password] if self.password else []
            self._query(
                source, "MIGRATE", LOCALHOST, target.port, "", 0, 5000, *auth, "KEYS", *keys,
                timeout=10.0,
            )  # fmt: skip
            moved += len(keys)
        for node in [target, source, *(p for p in self.primaries() if p not in (source, target))]:
            self._query(node, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def seeds(self) -> str:
        """`--cluster` flag value: every node as HOST:PORT, comma-separated."""
        return ",".join(f"{n.addr[0]}:{n.addr[1]}" for n in self.servers)

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """redis-cli with `args` (e.g. `--cluster reshard ...`), its output; LaunchError
        naming the command when it fails."""
        argv = [REDIS_CLI, *(["-a", self.password, "--no-auth-warning"] if self.password else [])]
        proc = subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise LaunchError(f"redis-cli {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
        return proc.stdout


def _small_cluster(topo: ClusterTopology, nodes: list[Node], primaries: int, replicas: int) -> None:
    """Slots split evenly over the first `primaries` nodes, every node MEETs the first, and
    the rest replicate the primaries in turn."""
    pw = topo.password
    first = nodes[0]
    per = 16384 // primaries
    for i in range(primaries):
        last = 16383 if i == primaries - 1 else (i + 1) * per - 1
        call(nodes[i].port, "CLUSTER", "ADDSLOTSRANGE", i * per, last, password=pw)
    bus = next(
        line.split()[1] for line in first.conf.read_text().splitlines()
        if line.startswith("cluster-port ")
    )  # fmt: skip
    for node in nodes[1:]:
        call(node.port, "CLUSTER", "MEET", LOCALHOST, first.port, bus, password=pw)
    ids = [topo.node_id(n) for n in nodes[:primaries]]

    def known(node: Node) -> bool:
        state = parse_info(call(node.port, "CLUSTER", "INFO", password=pw))
        return int(state.get("cluster_known_nodes", "0")) == len(nodes)

    poll(lambda: all(known(n) for n in nodes), 30, "the nodes to meet", topo.logs)
    for j, node in enumerate(nodes[primaries:]):
        call(node.port, "CLUSTER", "REPLICATE", ids[j % primaries], password=pw)


def start_cluster(
    root: Path,
    *,
    primaries: int = 3,
    replicas: int = 1,
    password: str | None = None,
    node_timeout_ms: int = 1000,
    tls: tuple[str, str, str] | None = None,
) -> ClusterTopology:
    """`primaries` x (1 + `replicas`) `redis-server --cluster-enabled yes` nodes joined by
    `redis-cli --cluster create`, ready (every slot served, replicas streaming); the caller
    stops it. `tls`: (certificate, key, CA) PEM files, see ClusterTopology.tls."""
    if not os.path.exists(REDIS_SERVER):
        raise LaunchError(f"redis-server not found at {REDIS_SERVER}")
    root.mkdir(parents=True, exist_ok=True)
    topo = ClusterTopology(root, password, node_timeout_ms=node_timeout_ms, tls=tls)
    try:
        nodes = [topo.add_cluster_node(f"node{i}") for i in range(primaries * (1 + replicas))]
        for node in nodes:
            topo.wait_answers(node, 10)
        addrs = [f"{n.addr[0]}:{n.addr[1]}" for n in nodes]
        if primaries < 3:
            # redis-cli refuses fewer than 3 primaries: the same steps by hand (benchmarks
            # compare 1 primary with 3).
            _small_cluster(topo, nodes, primaries, replicas)
        else:
            topo.cli("--cluster", "create", *addrs, "--cluster-replicas", str(replicas),
                     "--cluster-yes")  # fmt: skip
        topo.wait_cluster_ok(60.0, replicas_per_primary=replicas)
    except BaseException:
        topo.stop()
        raise
    return topo


@contextlib.contextmanager
def running_cluster(root: Path, **options: Any) -> Iterator[ClusterTopology]:
    """start_cluster(), stopped by PID on exit."""
    topo = start_cluster(root, **options)
    try:
        yield topo
    finally:
        topo.stop()
