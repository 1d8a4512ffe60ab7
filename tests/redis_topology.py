"""Real Redis processes for tests: one server, or 1 master + 2 replicas + 3 Sentinels.

Everything runs from the OS's `redis-server` on free loopback ports, in a temp dir per test.
Every process is recorded by PID and stopped by PID (SIGCONT first, in case a test froze
it, then SIGTERM, then SIGKILL); nothing is ever stopped by name, so the machine's own
Redis on 6379 is never touched.

    def test_x(sentinel_topology: Topology) -> None:
        host, port = sentinel_topology.master_addr()      # as the Sentinels see it
        sentinel_topology.signal(sentinel_topology.master(), signal.SIGKILL)
        sentinel_topology.wait_master_change((host, port))

Readiness is strict, so a test never starts on a half-built topology: both replicas report
`master_link_status:up`, the master counts them, every Sentinel sees the master, 2 replicas
and 2 other Sentinels, and `SENTINEL CKQUORUM` passes. Failures name what was missing and
show the tail of each log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
MASTER_NAME = "kasagi-master"
T = TypeVar("T")

Addr = tuple[str, int]


def free_port() -> int:
    # The OS picks a free port; the tiny window before redis-server binds it is accepted.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll(fn: Callable[[], T | None], timeout: float, what: str, on_fail: str = "") -> T:
    """fn() until it returns something truthy; RuntimeError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise RuntimeError(
                f"timed out after {timeout:.0f}s waiting for {what}{detail}{on_fail}"
            )
        time.sleep(0.05)


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
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"  (no log: {exc})"
        return "\n".join("  " + line for line in text)


@dataclass
class Topology:
    """A running set of Redis processes (one server, or master + replicas + Sentinels)."""

    root: Path
    password: str | None = None
    sentinel_password: str | None = None
    nodes: list[Node] = field(default_factory=list)
    master_name: str = MASTER_NAME

    # ------------------------------------------------------------------ processes

    def _spawn(self, node: Node, extra: list[str] | None = None) -> None:
        argv = [REDIS_SERVER, str(node.conf), *(["--sentinel"] if node.sentinel else [])]
        argv += extra or []
        node.proc = subprocess.Popen(
            argv,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        node.stopped = False

    def _server_conf(self, node: Node, replica_of: Addr | None) -> str:
        lines = [
            f"port {node.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {self.root}",
            f"dbfilename {node.name}.rdb",
            f"logfile {node.log}",
            'save ""',
            "appendonly no",
            # Diskless, immediate full syncs: a replica (re)links in milliseconds.
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
            "repl-ping-replica-period 1",
            "repl-timeout 5",
        ]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if replica_of is not None:
            lines.append(f"replicaof {replica_of[0]} {replica_of[1]}")
        return "\n".join(lines) + "\n"

    def add_server(self, name: str, replica_of: Addr | None = None) -> Node:
        port = free_port()
        node = Node(name, port, self.root / f"{name}.conf", self.root / f"{name}.log")
        node.conf.write_text(self._server_conf(node, replica_of))
        self.nodes.append(node)
        self._spawn(node)
        return node

    def add_sentinel(self, name: str, master: Addr, quorum: int = 2) -> Node:
        port = free_port()
        node = Node(name, port, self.root / f"{name}.conf", self.root / f"{name}.log", True)
        m = self.master_name
        lines = [
            f"port {node.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {self.root}",
            f"logfile {node.log}",
            f"sentinel monitor {m} {master[0]} {master[1]} {quorum}",
            f"sentinel down-after-milliseconds {m} 1000",
            f"sentinel failover-timeout {m} 3000",
            f"sentinel parallel-syncs {m} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {m} {self.password}")
        if self.sentinel_password:
            lines += [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        node.conf.write_text("\n".join(lines) + "\n")  # Sentinel rewrites it: a copy per node
        self.nodes.append(node)
        self._spawn(node)
        return node

    def restart(self, node: Node, replica_of: Addr | None = None) -> None:
        """Start a dead node again (a server as a replica of `replica_of`)."""
        assert not node.alive(), f"{node.name} is still running"
        if not node.sentinel:
            node.conf.write_text(self._server_conf(node, replica_of))
        self._spawn(node)
        poll(lambda: self.client(node).ping(), 10, f"{node.name} to answer", self.logs())

    def _wait_answers(self, node: Node, timeout: float) -> None:
        def ping() -> bool:
            c = self.client(node)
            try:
                return bool(c.ping())
            finally:
                c.close()

        poll(ping, timeout, f"{node.name} to answer", self.logs())

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
        for node in self.nodes:
            proc = node.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
                proc.terminate()
        for node in self.nodes:
            proc = node.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)

    # ------------------------------------------------------------------ clients

    def client(self, node: Node, timeout: float = 1.0) -> redis.Redis:
        pw = self.sentinel_password if node.sentinel else self.password
        return redis.Redis(
            "127.0.0.1",
            node.port,
            password=pw,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def _query(self, node: Node, *args: Any) -> Any:
        c = self.client(node)
        try:
            return c.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            c.close()

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

    def info(self, node: Node, section: str = "replication") -> dict[str, Any]:
        c = self.client(node)
        try:
            return dict(c.info(section))
        finally:
            c.close()

    def replicas_online(self, master: Node) -> int:
        """Replicas the master streams to (state=online): only those count for WAIT. A
        replica reports its link up before the master has its first REPLCONF ACK."""
        info = self.info(master)
        slaves = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return sum(1 for v in slaves if v.get("state") == "online")

    def master_addr(self) -> Addr:
        """The master as the Sentinels report it (the first that answers)."""
        last: Exception | None = None
        for s in self.sentinels:
            if not s.alive() or s.stopped:
                continue
            try:
                host, port = self._query(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                return (host.decode(), int(port))
            except Exception as exc:
                last = exc
        raise RuntimeError(f"no Sentinel answered: {last!r}")

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
                seen.add((host.decode(), int(port)))
        return seen.pop() if len(seen) == 1 else None

    def wait_master_change(self, old: Addr, timeout: float = 20.0) -> Addr:
        """Until every Sentinel names a master other than `old`, and it accepts writes."""

        def changed() -> Addr | None:
            addr = self.sentinels_agree_on()
            if addr is None or addr == old:
                return None
            node = self.node_at(addr)
            role = self._query(node, "ROLE")
            return addr if role[0] == b"master" else None

        return poll(changed, timeout, f"a failover away from {old}", self.logs())

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
        """Master with 2 linked replicas, each Sentinel seeing 2 replicas + 2 Sentinels and a
        quorum (or just the single server answering)."""
        for n in self.servers:
            if n.alive() and not n.stopped:
                self._wait_answers(n, timeout)
        if not self.sentinels:
            return
        master = self.master() if self._sentinels_answer() else self.servers[0]
        replicas = [n for n in self.servers if n is not master and n.alive()]

        def linked() -> bool:
            for r in replicas:
                info = self.info(r)
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return False
                if int(info.get("master_port", 0)) != master.port:
                    return False
            return self.replicas_online(master) == len(replicas)

        poll(linked, timeout, "replicas linked to the master", self.logs())

        def sentinels_ready() -> bool:
            for s in self.sentinels:
                fields = _pairs(self._query(s, "SENTINEL", "MASTER", self.master_name))
                if int(fields["port"]) != master.port or "down" in fields["flags"]:
                    return False
                if int(fields["num-slaves"]) != len(replicas):
                    return False
                if int(fields["num-other-sentinels"]) != len(self.sentinels) - 1:
                    return False
                reps = self._query(s, "SENTINEL", "REPLICAS", self.master_name)
                for rep in reps:
                    flags = _pairs(rep)["flags"]
                    if "down" in flags or "disconnected" in flags:
                        return False
                if not self._query(s, "SENTINEL", "CKQUORUM", self.master_name):
                    return False
            return True

        poll(sentinels_ready, timeout, "Sentinels to see 2 replicas and 2 Sentinels", self.logs())

    def _sentinels_answer(self) -> bool:
        try:
            self.master_addr()
            return True
        except RuntimeError:
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


def _pairs(reply: Any) -> dict[str, str]:
    """A Sentinel reply (flat [k, v, ...] list, or the dict redis-py may make of it) as str."""
    if isinstance(reply, dict):
        items = list(reply.items())
    else:
        items = list(zip(reply[::2], reply[1::2], strict=True))

    def s(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {s(k): s(v) for k, v in items}


def _start(
    root: Path, *, sentinels: bool, password: str | None, sentinel_password: str | None
) -> Topology:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"redis-server not found at {REDIS_SERVER} (.ci/run installs it)")
    topo = Topology(root, password, sentinel_password)
    try:
        master = topo.add_server("master")
        poll(lambda: topo.client(master).ping(), 10, "the master to answer", topo.logs())
        if sentinels:
            topo.add_server("replica1", master.addr)
            topo.add_server("replica2", master.addr)
            for i in (1, 2, 3):
                topo.add_sentinel(f"sentinel{i}", master.addr)
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
    root.mkdir(parents=True, exist_ok=True)
    topo = _start(root, sentinels=sentinels, password=password, sentinel_password=sentinel_password)
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Topology]:
    """One redis-server (no password) on a free loopback port."""
    with running_topology(tmp_path / "redis", sentinels=False) as topo:
        yield topo


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[Topology]:
    """1 master, 2 replicas, 3 Sentinels (quorum 2, `kasagi-master`), tight timings."""
    with running_topology(tmp_path / "topology") as topo:
        yield topo
