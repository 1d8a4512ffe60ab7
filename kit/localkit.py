#!/usr/bin/env python3
"""The deployment kit without Docker: the compose topology as local processes.

Runs the OS's ``redis-server`` (Sentinels with ``--sentinel``) from the kit's own config files
(redis/*.conf, sentinel/*.conf), rendered into a state directory with the ports and paths
substituted, plus one ``kasagi-relay --sentinels ...``. Every process it starts gets a PID
file there; ``down`` stops exactly those PIDs (after checking each one is still ours), never
anything by name. Starting, rendering, waiting and stopping are the shared launcher's
(kit/topology.py, which the tests use too); this module is the kit's commands around it.

Standard library only, so it runs with any python3 >= 3.10, except the relay check of
``failover-test`` (and ``measure``): it talks to the relay with the project's client,
``kasagi_relay.client``, so it needs the project's .venv/bin/python (the Makefile uses it
when it exists) and says so in one line when it is run with another python.

The Makefile calls it; by hand, from the repository root (``python3 kit/localkit.py ...``
works as well)::

    python3 -m kit.localkit up --state-dir .kit --ports 7379,7380,7381 \
        --sentinel-ports 27379,27380,27381 --relay-port 8765 --down-after-ms 1000
    python3 -m kit.localkit status --state-dir .kit
    python3 -m kit.localkit failover-test --state-dir .kit
    python3 -m kit.localkit down --state-dir .kit

Only ``up`` takes the topology options; the later commands read them back from
``<state-dir>/kit.json``. ``status``, ``sentinel-status`` and ``failover-test`` also work
against the docker-compose deployment with ``--docker`` (containers publish the same ports
as they listen on, so the host reaches each node at 127.0.0.1 and the node's port).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

if not __package__:  # run as a script (python3 kit/localkit.py): the repository is the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import topology
from kit.topology import (
    LOCALHOST,
    LaunchError,
    Resp,
    RespError,
    Running,
    answers_as,
    call,
    info,
    log_tail,
    pairs,
    port_answers,
    read_pid,
    runs_in,
    sentinel_view,
    stop_all,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent

# Names and defaults: the same as docker-compose.yml and the config files (the test
# tests/test_deploy_kit.py checks that the three agree).
MASTER = "kasagi-redis-master"
REPLICAS = ("kasagi-redis-replica-1", "kasagi-redis-replica-2")
SENTINELS = ("kasagi-sentinel-1", "kasagi-sentinel-2", "kasagi-sentinel-3")
RELAY = "kasagi-relay"
DEFAULT_PORTS = (6379, 6380, 6381)
DEFAULT_SENTINEL_PORTS = (26379, 26380, 26381)
DEFAULT_RELAY_PORT = 8765
DEFAULT_DOWN_AFTER_MS = 5000

MASTER_CONF = "redis/redis-master.conf"
REPLICA_CONF = "redis/redis-replica.conf"
SENTINEL_CONFS = tuple(f"sentinel/sentinel-{i}.conf" for i in (1, 2, 3))


# A failure with a message meant for the person at the terminal: the launcher's error, so
# what the shared launcher raises (a config it cannot render, a process that will not stop)
# reads the same way.
KitError = LaunchError


# --------------------------------------------------------------------------------------------
# Settings and state
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    ports: tuple[int, int, int] = DEFAULT_PORTS  # master, replica-1, replica-2
    sentinel_ports: tuple[int, int, int] = DEFAULT_SENTINEL_PORTS
    relay_port: int = DEFAULT_RELAY_PORT
    down_after_ms: int = DEFAULT_DOWN_AFTER_MS
    failover_timeout_ms: int | None = None  # None: as the sentinel configs say
    relay: list[str] = field(default_factory=list)  # the relay command; empty: no relay
    relay_args: list[str] = field(default_factory=list)
    redis_server: str = "redis-server"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        s = cls(**data)
        s.ports = tuple(s.ports)  # type: ignore[assignment]
        s.sentinel_ports = tuple(s.sentinel_ports)  # type: ignore[assignment]
        return s


@dataclass
class Node:
    name: str
    kind: str  # "redis" | "sentinel" | "relay"
    port: int
    template: str | None  # config file in the repo, None for the relay
    master_port: int | None = None  # replicas: the port of the master they start under


class Kit:
    def __init__(self, state_dir: Path, docker: bool = False) -> None:
        self.state = state_dir.resolve()
        self.docker = docker
        self.settings = Settings()

    # ---- topology ----

    def redis_nodes(self) -> list[Node]:
        p = self.settings.ports
        return [
            Node(MASTER, "redis", p[0], MASTER_CONF),
            Node(REPLICAS[0], "redis", p[1], REPLICA_CONF, p[0]),
            Node(REPLICAS[1], "redis", p[2], REPLICA_CONF, p[0]),
        ]

    def sentinel_nodes(self) -> list[Node]:
        return [
            Node(name, "sentinel", port, conf, self.settings.ports[0])
            for name, port, conf in zip(
                SENTINELS, self.settings.sentinel_ports, SENTINEL_CONFS, strict=True
            )
        ]

    def relay_node(self) -> Node:
        return Node(RELAY, "relay", self.settings.relay_port, None)

    def name_of_port(self, port: int) -> str:
        for n in [*self.redis_nodes(), *self.sentinel_nodes()]:
            if n.port == port:
                return n.name
        return f"?:{port}"

    def master_name_and_quorum(self) -> tuple[str, int]:
        return topology.monitor_line((REPO / SENTINEL_CONFS[0]).read_text(), SENTINEL_CONFS[0])

    # ---- state files ----

    @property
    def kit_json(self) -> Path:
        return self.state / "kit.json"

    def load(self) -> None:
        if self.docker:
            return
        if not self.kit_json.exists():
            raise KitError(f"no kit state in {self.state}: run `make up` first")
        self.settings = Settings.from_json(json.loads(self.kit_json.read_text()))

    def pid_file(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / f"{name}.log"

    def node_dir(self, name: str) -> Path:
        return self.state / name

    def conf_file(self, node: Node) -> Path:
        return self.node_dir(node.name) / (
            "sentinel.conf" if node.kind == "sentinel" else "redis.conf"
        )

    def read_pid(self, name: str) -> int | None:
        return read_pid(self.pid_file(name))

    def ours(self, pid: int, node: Node) -> bool:
        """The PID is alive, not a zombie, and still the process we started (not reused):
        every process of ours runs with its working directory inside the state dir."""
        return runs_in(pid, self.state, hint=str(node.port))

    def running_pid(self, node: Node) -> int | None:
        pid = self.read_pid(node.name)
        return pid if pid is not None and self.ours(pid, node) else None

    # ---- docker mode ----

    def container_running(self, name: str) -> bool:
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True
        )
        return out.stdout.strip() == "true"

    def alive_label(self, node: Node) -> tuple[bool, str]:
        if self.docker:
            ok = self.container_running(node.name)
            return ok, "container up" if ok else "container DOWN"
        pid = self.running_pid(node)
        return (pid is not None), (f"pid {pid}" if pid else "NOT RUNNING")


# --------------------------------------------------------------------------------------------
# Rendering the config files for local mode
# --------------------------------------------------------------------------------------------


def render_node(node: Node, data_dir: Path, s: Settings) -> str:
    assert node.template is not None
    text = (REPO / node.template).read_text()
    header = (
        f"# Rendered by kit/localkit.py from {node.template} for local mode "
        f"({node.name}): bind/port/dir/announce/replicaof/monitor substituted.\n"
    )
    if node.kind == "redis":
        body = topology.render_redis(text, node.template, node.port, data_dir, node.master_port)
        return header + body
    assert node.master_port is not None
    body = topology.render_sentinel(
        text,
        node.template,
        node.port,
        data_dir,
        node.master_port,
        s.down_after_ms,
        s.failover_timeout_ms,
    )
    return header + body


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def spawn(kit: Kit, node: Node, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    # Detached: Ctrl-C on make does not reach it; `down` stops it by the PID file.
    return topology.spawn(
        argv, cwd=cwd, log=kit.log_file(node.name), pid_file=kit.pid_file(node.name), detach=True
    )


def tail(path: Path) -> str:
    return log_tail(path, 8, prefix="    | ")


def start_redis(kit: Kit, node: Node) -> str:
    pid = kit.running_pid(node)
    if pid:
        return f"already running (pid {pid})"
    if port_answers(node.port):
        raise KitError(
            f"{node.name}: port {node.port} is taken by a process that is not ours "
            f"(another Redis?). Pick free ports, e.g. `make up REDIS_PORT=7379 "
            f"REPLICA_1_PORT=7380 REPLICA_2_PORT=7381 SENTINEL_1_PORT=27379 "
            f"SENTINEL_2_PORT=27380 SENTINEL_3_PORT=27381` (then the same variables for "
            f"every later target is not needed: they are kept in {kit.kit_json})"
        )
    conf = kit.conf_file(node)
    argv = [kit.settings.redis_server, str(conf)]
    if node.kind == "sentinel":
        argv.append("--sentinel")
    proc = spawn(kit, node, argv, conf.parent)
    # Ours answering, not whatever else holds the port; an early exit ends the wait.
    started = wait_for(lambda: proc.poll() is not None or answers_as(node.port, proc.pid), 10)
    code = proc.poll()
    if not started or code is not None:
        raise KitError(
            f"{node.name} did not answer on {node.port} within 10 s"
            f" ({'exited ' + str(code) if code is not None else 'still starting'}); "
            f"log {kit.log_file(node.name)}:\n{tail(kit.log_file(node.name))}"
        )
    return f"started (pid {proc.pid})"


def healthz(port: int, timeout: float = 2.0) -> tuple[int | None, str]:
    url = f"http://{LOCALHOST}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(400).decode(errors="replace").strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read(400).decode(errors="replace").strip()
    except (OSError, ValueError) as e:
        return None, str(e)


def start_relay(kit: Kit) -> tuple[bool, str]:
    s = kit.settings
    node = kit.relay_node()
    if not s.relay:
        return True, "skipped (RELAY is empty)"
    pid = kit.running_pid(node)
    if pid:
        return True, f"already running (pid {pid})"
    exe = s.relay[0]
    if shutil.which(exe) is None and not Path(exe).exists():
        return False, (
            f"{exe} not found: install the package into .venv first "
            "(`./scripts/test.sh` or `.venv/bin/pip install -e .`), or set RELAY=<command>"
        )
    if port_answers(s.relay_port):
        return False, f"port {s.relay_port} is taken by a process that is not ours: set RELAY_PORT"
    master_name, _ = kit.master_name_and_quorum()
    sentinels = ",".join(f"{LOCALHOST}:{p}" for p in s.sentinel_ports)
    argv = [
        *s.relay,
        "--host", LOCALHOST,
        "--port", str(s.relay_port),
        "--sentinels", sentinels,
        "--master", master_name,
        *s.relay_args,
    ]  # fmt: skip
    cwd = kit.node_dir(RELAY)
    cwd.mkdir(parents=True, exist_ok=True)
    proc = spawn(kit, node, argv, cwd)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        code = proc.poll()
        if code is not None:
            kit.pid_file(RELAY).unlink(missing_ok=True)
            return False, (
                f"exited with status {code} at start: {shlex.join(argv)}\n"
                f"  log {kit.log_file(RELAY)}:\n{tail(kit.log_file(RELAY))}"
            )
        status, body = healthz(s.relay_port, timeout=1.0)
        if status == 200:
            return True, f"started (pid {proc.pid}), /healthz 200 {body}"
        time.sleep(0.2)
    return False, (
        f"running (pid {proc.pid}) but /healthz is not 200 after 20 s "
        f"(last: {status} {body}); log {kit.log_file(RELAY)}:\n{tail(kit.log_file(RELAY))}"
    )


def stop_pid(kit: Kit, node: Node, timeout: float = 15.0) -> str:
    pid = kit.read_pid(node.name)
    if pid is None:
        return ""
    pf = kit.pid_file(node.name)
    if not kit.ours(pid, node):
        pf.unlink(missing_ok=True)
        return f"{node.name}: pid {pid} already gone (PID file removed)"
    killed = stop_all([Running(pid, lambda: kit.ours(pid, node))], grace=timeout)
    pf.unlink(missing_ok=True)
    if killed:
        return f"{node.name}: pid {pid} did not stop on SIGTERM in {timeout:.0f} s: SIGKILLed"
    return f"{node.name}: stopped pid {pid}"


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_up(kit: Kit, wanted: Settings) -> int:
    kit.state.mkdir(parents=True, exist_ok=True)
    if kit.kit_json.exists():
        old = Settings.from_json(json.loads(kit.kit_json.read_text()))
        topo = ("ports", "sentinel_ports", "down_after_ms", "failover_timeout_ms")
        diff = {
            k: (getattr(old, k), getattr(wanted, k))
            for k in topo
            if getattr(old, k) != getattr(wanted, k)
        }
        if diff:
            raise KitError(
                f"{kit.state} holds a deployment made with other settings {diff} "
                "(kept, because Sentinel rewrote its configs): `make down clean` first, or "
                "run with the same variables"
            )
    kit.settings = wanted
    kit.kit_json.write_text(json.dumps(asdict(wanted), indent=2) + "\n")
    rendered = []
    for node in [*kit.redis_nodes(), *kit.sentinel_nodes()]:
        conf = kit.conf_file(node)
        data = kit.node_dir(node.name) / "data" if node.kind == "redis" else kit.node_dir(node.name)
        data.mkdir(parents=True, exist_ok=True)
        if not conf.exists():  # first up; later ups keep what Redis/Sentinel rewrote
            conf.write_text(render_node(node, data, wanted))
            rendered.append(node.name)
    if rendered:
        print(f"configs rendered into {kit.state} for: {', '.join(rendered)}")
    else:
        print(f"configs reused from {kit.state} (as rewritten by Redis/Sentinel)")

    for node in kit.redis_nodes():
        print(f"  {node.name:<24} {LOCALHOST}:{node.port:<6} {start_redis(kit, node)}")
    # Replicas in sync before the Sentinels look at them.
    for node in kit.redis_nodes():

        def linked(n: Node = node) -> bool:
            return info(n.port).get("master_link_status") == "up"

        if info(node.port).get("role") == "slave" and not wait_for(linked, 30):
            raise KitError(
                f"{node.name}: replication link not up after 30 s:\n"
                + tail(kit.log_file(node.name))
            )
    for node in kit.sentinel_nodes():
        print(f"  {node.name:<24} {LOCALHOST}:{node.port:<6} {start_redis(kit, node)}")
    name, _ = kit.master_name_and_quorum()
    t = time.monotonic()
    ok = wait_for(lambda: sentinel_problems(kit, name) == [], 40, 0.25)
    if not ok:
        raise KitError(
            "Sentinels did not converge in 40 s: " + "; ".join(sentinel_problems(kit, name))
        )
    print(
        f"  sentinels agree on {name}, see 2 replicas and each other ({time.monotonic() - t:.1f} s)"
    )

    ok, msg = start_relay(kit)
    relay = kit.relay_node()
    print(f"  {RELAY:<24} {LOCALHOST}:{relay.port:<6} {msg}")
    sentinels = ",".join(f"{LOCALHOST}:{p}" for p in wanted.sentinel_ports)
    print(f"Sentinels: {sentinels} (master name {name}); state, logs, PID files: {kit.state}")
    if not ok:
        print(
            "FAILED: Redis and the Sentinels are up, the relay is NOT. `make status` shows the "
            "cluster; `make up RELAY=` brings it up without a relay; `make down` stops it."
        )
        return 1
    if wanted.relay:
        print(
            f"Relay: ws://{LOCALHOST}:{wanted.relay_port}/ws  health http://{LOCALHOST}:{wanted.relay_port}/healthz"
        )
    return 0


def sentinel_problems(kit: Kit, name: str) -> list[str]:
    return topology.sentinel_problems(
        kit.settings.sentinel_ports, name, replicas=len(REPLICAS), labels=SENTINELS
    )


def cmd_status(kit: Kit) -> int:
    kit.load()
    name, quorum = kit.master_name_and_quorum()
    problems: list[str] = []
    masters: list[Node] = []
    replicas_ok = 0
    offsets: dict[str, int] = {}
    for node in kit.redis_nodes():
        alive, label = kit.alive_label(node)
        head = f"redis     {node.name:<24} {LOCALHOST}:{node.port:<6} {label:<14}"
        if not alive:
            print(f"{head} -")
            problems.append(f"{node.name} is not running")
            continue
        try:
            inf = info(node.port)
        except (OSError, RespError, ConnectionError) as e:
            print(f"{head} no answer: {e}")
            problems.append(f"{node.name} does not answer")
            continue
        if inf.get("role") == "master":
            masters.append(node)
            offsets["master"] = int(inf.get("master_repl_offset", 0))
            print(
                f"{head} role=master connected_slaves={inf.get('connected_slaves')} "
                f"offset={inf.get('master_repl_offset')}"
            )
            for k in sorted(k for k in inf if k.startswith("slave") and k[5:].isdigit()):
                print(f"{'':>20}  -> {inf[k]}")
            if inf.get("connected_slaves") != "2":
                problems.append(f"{node.name} has {inf.get('connected_slaves')} connected replicas")
        else:
            link = inf.get("master_link_status")
            off = int(inf.get("slave_repl_offset", 0))
            offsets[node.name] = off
            print(
                f"{head} role=replica of {inf.get('master_host')}:{inf.get('master_port')} "
                f"link={link} offset={off} last_io={inf.get('master_last_io_seconds_ago')}s"
            )
            if link == "up":
                replicas_ok += 1
            else:
                problems.append(f"{node.name}: master_link_status={link}")
    if len(masters) != 1:
        problems.append(f"{len(masters)} masters: {[m.name for m in masters]}")
    if "master" in offsets:
        lags = [f"{n}={offsets['master'] - o}" for n, o in offsets.items() if n != "master"]
        if lags:
            print(f"{'':>20}  replication lag (bytes behind master): {', '.join(lags)}")
    sentinels_ok = 0
    for node in kit.sentinel_nodes():
        alive, label = kit.alive_label(node)
        head = f"sentinel  {node.name:<24} {LOCALHOST}:{node.port:<6} {label:<14}"
        if not alive:
            print(f"{head} -")
            problems.append(f"{node.name} is not running")
            continue
        try:
            v = sentinel_view(node.port, name)
        except (OSError, RespError, ConnectionError) as e:
            print(f"{head} no answer: {e}")
            problems.append(f"{node.name} does not answer")
            continue
        m = v["master"]
        healthy = [r for r in v["replicas"] if r.get("flags") == "slave"]
        print(
            f"{head} {name} at {v['addr'][0]}:{v['addr'][1]} flags={m.get('flags')} "
            f"replicas={len(healthy)}/{m.get('num-slaves')} "
            f"other-sentinels={m.get('num-other-sentinels')} quorum={m.get('quorum')} "
            f"ckquorum={'OK' if str(v['ckquorum']).startswith('OK') else v['ckquorum']}"
        )
        mine = [x for x in masters if x.port == int(v["addr"][1])]
        if (
            m.get("flags") == "master"
            and len(healthy) == 2
            and m.get("num-other-sentinels") == "2"
            and str(v["ckquorum"]).startswith("OK")
            and mine
        ):
            sentinels_ok += 1
        else:
            problems.append(f"{node.name}: view not healthy")
        if int(m.get("quorum", 0)) != quorum:
            problems.append(f"{node.name}: quorum {m.get('quorum')} != {quorum} in the config")
    relay_line = relay_status(kit)
    print(relay_line[1])
    if relay_line[0] is False:
        problems.append("relay not healthy")
    if problems:
        print("UNHEALTHY: " + "; ".join(problems))
        return 1
    m = masters[0]
    relay_word = {True: "relay healthy", None: "no relay (RELAY empty)"}[relay_line[0]]
    print(
        f"OK: 1 master ({m.name} {LOCALHOST}:{m.port}), {replicas_ok} replicas linked, "
        f"{sentinels_ok} sentinels agree (quorum {quorum}), {relay_word}"
    )
    return 0


def relay_status(kit: Kit) -> tuple[bool | None, str]:
    s = kit.settings
    node = kit.relay_node()
    head = f"relay     {RELAY:<24} {LOCALHOST}:{node.port:<6}"
    if not kit.docker and not s.relay:
        return None, f"{head} {'-':<14} not started (RELAY was empty at `make up`)"
    alive, label = kit.alive_label(node)
    where = f"docker logs {RELAY}" if kit.docker else str(kit.log_file(RELAY))
    if not alive:
        return (
            False,
            f"{head} {label:<14} (see {where})",
        )
    code, body = healthz(node.port)
    return code == 200, f"{head} {label:<14} /healthz {code} {body}"


def cmd_sentinel_status(kit: Kit) -> int:
    kit.load()
    name, _ = kit.master_name_and_quorum()
    port = kit.settings.sentinel_ports[0]
    print(f"(asking {SENTINELS[0]} at {LOCALHOST}:{port})")
    with Resp(LOCALHOST, port) as r:
        for title, args in (
            (f"SENTINEL master {name}", ("SENTINEL", "master", name)),
            (f"SENTINEL replicas {name}", ("SENTINEL", "replicas", name)),
            (f"SENTINEL sentinels {name}", ("SENTINEL", "sentinels", name)),
        ):
            print(f"== {title}")
            reply = r.call(*args)
            groups = [reply] if title.startswith("SENTINEL master") else reply
            for g in groups:
                d = pairs(g)
                keys = ("name", "ip", "port", "flags", "role-reported", "master-link-status",
                        "slave-repl-offset", "num-slaves", "num-other-sentinels", "quorum",
                        "down-after-milliseconds", "failover-timeout", "parallel-syncs",
                        "config-epoch", "last-ok-ping-reply")  # fmt: skip
                print("  " + "  ".join(f"{k}={d[k]}" for k in keys if k in d))
        print(f"== SENTINEL ckquorum {name}\n  {r.call('SENTINEL', 'ckquorum', name)}")
    return 0


def cmd_down(kit: Kit) -> int:
    if not kit.kit_json.exists() and not any(kit.state.glob("*.pid")):
        print(f"nothing to stop: no kit state in {kit.state}")
        return 0
    kit.load()
    stopped = []
    order = [kit.relay_node(), *kit.sentinel_nodes(), *reversed(kit.redis_nodes())]
    for node in order:
        msg = stop_pid(kit, node)
        if msg:
            stopped.append(msg)
            print("  " + msg)
    left = [n.name for n in order if kit.read_pid(n.name) is not None]
    if left:
        print(f"FAILED: still running: {left}")
        return 1
    print(f"down: {len(stopped)} process(es) of ours stopped; data kept in {kit.state}")
    return 0


def cmd_clean(kit: Kit) -> int:
    if not kit.state.exists():
        print(f"clean: {kit.state} does not exist")
        return 0
    if not kit.kit_json.exists():
        raise KitError(
            f"{kit.state} has no kit.json: not removing a directory the kit did not make"
        )
    rc = cmd_down(kit)
    if rc:
        return rc
    shutil.rmtree(kit.state)
    print(f"clean: removed {kit.state} (configs, data, logs)")
    return 0


# --------------------------------------------------------------------------------------------
# failover-test
# --------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """Watches Sentinel and writes to the master it names, every 50 ms, from t0 on."""

    kit: Kit
    name: str
    old_port: int
    t0: float = 0.0
    t_switch: float | None = None
    t_write: float | None = None
    new_port: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def current_master(self) -> int | None:
        for node in self.kit.sentinel_nodes():
            try:
                addr = call(
                    node.port, "SENTINEL", "get-master-addr-by-name", self.name, timeout=0.5
                )
                return int(addr[1])
            except (OSError, RespError, ConnectionError, TypeError):
                continue
        return None

    def run(self, deadline: float) -> None:
        n = 0
        while time.monotonic() < deadline and not self.done.is_set():
            port = self.current_master()
            now = time.monotonic()
            if port is not None and port != self.old_port and self.t_switch is None:
                self.t_switch, self.new_port = now - self.t0, port
            if port is not None and port != self.old_port:
                n += 1
                try:
                    call(port, "SET", "kasagi:kit:probe", n, timeout=0.5)
                    self.t_write = time.monotonic() - self.t0
                    self.new_port = port
                    return
                except RespError as e:
                    k = str(e).split()[0]
                    self.errors[k] = self.errors.get(k, 0) + 1
                except (OSError, ConnectionError) as e:
                    k = type(e).__name__
                    self.errors[k] = self.errors.get(k, 0) + 1
            time.sleep(0.05)


def relay_client() -> ModuleType:
    """The project's client (kasagi_relay.client), which the relay half of failover-test
    uses; it needs the project's packages (websockets, msgpack, the delta engine), so it is
    imported only here and the other commands run with any python3."""
    try:
        return importlib.import_module("kasagi_relay.client")
    except ImportError as e:
        raise KitError(
            f"the relay check needs the project's client ({e}): run it with the project's "
            ".venv/bin/python (`make failover-test` does when .venv exists; `./scripts/test.sh` "
            "creates it)"
        ) from None


async def relay_failover(
    url: str, kill: Any, t0_box: list[float], deadline_s: float, log: list[str], probe: Probe
) -> dict[str, Any]:
    """A member joined before the kill sees a delta sent (and acked) right after the kill,
    and one sent once Sentinel's new master takes writes: no gap, no duplicate.

    Member and writer are `kasagi_relay.client.Client`s: the writer's client sends a delta
    again with the same key after an `unavailable` or a lost connection, until it is acked;
    the member's follows the room with `async for`. The kit checks the member's stream
    itself: every delta starts at the previous seq + 1, and no state replaces it (a reset)."""
    import asyncio

    client = relay_client()
    room_name = f"kit-failover-{uuid.uuid4().hex[:8]}"
    res: dict[str, Any] = {"room": room_name}
    # Retried until `deadline_s`, not a count; short backoffs, as the pause is what is shown.
    options: dict[str, Any] = {
        "unavailable_retries": 1_000_000,
        "min_delay": 0.1,
        "max_delay": 0.5,
    }

    def frame(change: Any) -> dict[str, Any]:
        return {"t": change.kind, "from": change.from_seq, "seq": change.seq}

    try:
        async with client.Client(url, **options) as member, client.Client(url, **options) as writer:
            room = await member.join(room_name)
            last = room.seq
            changes = aiter(room)

            async def member_sees(seq: int, wait_s: float) -> dict[str, Any]:
                nonlocal last
                try:
                    async with asyncio.timeout(wait_s):
                        while True:
                            change = await anext(changes)
                            if change.kind == "delta" and change.from_seq != last + 1:
                                raise KitError(
                                    f"relay: gap in the member's stream: after {last} came "
                                    f"{frame(change)}"
                                )
                            if change.kind == "reset":
                                res["reset"] = True
                            last = change.seq
                            if last >= seq:
                                return frame(change)
                except TimeoutError:
                    raise KitError(
                        f"relay: the member did not receive seq {seq} within {wait_s:.0f} s "
                        f"(it is at {last})"
                    ) from None

            async def send_until_ack(patch: list[Any], key: str) -> tuple[int, int]:
                before = writer.unavailable + writer.resent, len(writer.disconnects)
                try:
                    async with asyncio.timeout(deadline_s):
                        seq: int = await writer.send(room_name, patch=patch, key=key)
                except TimeoutError:
                    raise KitError(
                        f"relay: no ack for key {key} within {deadline_s:.0f} s "
                        f"({writer.unavailable + writer.resent - before[0]} retries)"
                    ) from None
                except client.RelayError as e:
                    raise KitError(f"relay: delta refused: {e}") from None
                retries = writer.unavailable + writer.resent - before[0]
                for code in writer.disconnects[before[1] :]:
                    log.append(f"send: connection closed ({code}); sent again with the same key")
                return seq, retries

            seq1, _ = await send_until_ack(
                [{"op": "add", "path": "/before", "value": 1}], f"{room_name}-1"
            )
            await member_sees(seq1, 10)
            res["seq_before"] = seq1

            kill()
            t0 = t0_box[0]
            seq2, retries = await send_until_ack(
                [{"op": "add", "path": "/after", "value": 2}], f"{room_name}-2"
            )
            res["ack_s"] = time.monotonic() - t0
            res["seq_after"], res["retries"] = seq2, retries
            res["member_frame"] = await member_sees(seq2, 15)
            res["member_s"] = time.monotonic() - t0
            # Once the new master takes writes, a delta must flow without retries.
            end = time.monotonic() + deadline_s
            while probe.t_write is None and time.monotonic() < end and not probe.done.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            t = time.monotonic()
            seq3, retries3 = await send_until_ack(
                [{"op": "add", "path": "/steady", "value": 3}], f"{room_name}-3"
            )
            res["steady_ack_ms"] = (time.monotonic() - t) * 1000
            res["steady"] = {
                "seq": seq3,
                "retries": retries3,
                "frame": await member_sees(seq3, 10),
            }
            res["gapless"] = not res.get("reset")
    except client.KasagiError as e:
        # The client gave up (a refused join, a connection it may not retry).
        raise KitError(f"relay client: {e}") from None
    return res


def cmd_failover_test(kit: Kit) -> int:
    kit.load()
    relay_expected = kit.docker or bool(kit.settings.relay)
    if relay_expected:
        relay_client()  # first: without the client, one line and nothing touched
    name, _ = kit.master_name_and_quorum()
    problems = sentinel_problems(kit, name)
    if problems:
        raise KitError(
            "the cluster is not healthy before the test (`make status`): " + "; ".join(problems)
        )
    old_port = int(
        call(kit.settings.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", name)[1]
    )
    old = next(n for n in kit.redis_nodes() if n.port == old_port)
    relay_ok, relay_line = relay_status(kit)
    failures: list[str] = []
    if relay_expected and not relay_ok:
        failures.append("relay not healthy before the test: " + relay_line.split(None, 3)[-1])

    # A marker every replica has (WAIT 2) must survive the failover.
    marker = uuid.uuid4().hex
    with Resp(LOCALHOST, old_port) as r:
        r.call("SET", "kasagi:kit:marker", marker)
        acked = r.call("WAIT", 2, 2000)
    down_after = int(
        pairs(call(kit.settings.sentinel_ports[0], "SENTINEL", "master", name))[
            "down-after-milliseconds"
        ]
    )
    deadline_s = max(30.0, down_after / 1000 * 3 + 20)

    probe = Probe(kit, name, old_port)
    t0_box = [0.0]
    old_pid = None if kit.docker else kit.running_pid(old)

    def kill() -> None:
        t0_box[0] = probe.t0 = time.monotonic()
        if kit.docker:
            subprocess.run(["docker", "kill", old.name], check=True, capture_output=True)
        else:
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)
        th = threading.Thread(target=probe.run, args=(probe.t0 + deadline_s,), daemon=True)
        th.start()
        probe_thread[0] = th

    probe_thread: list[threading.Thread | None] = [None]
    how = "container" if kit.docker else f"pid {old_pid}"
    who = f"{old.name} ({how}, {LOCALHOST}:{old_port})"
    print(f"failover-test: master {name} is {who}; marker written, WAIT 2 -> {acked} replicas")
    print(f"  down-after-milliseconds {down_after}; killing the master with SIGKILL")

    relay_res: dict[str, Any] | None = None
    relay_log: list[str] = []
    if relay_expected and relay_ok:
        import asyncio

        url = f"ws://{LOCALHOST}:{kit.settings.relay_port}/ws"
        try:
            relay_res = asyncio.run(relay_failover(url, kill, t0_box, deadline_s, relay_log, probe))
        except (KitError, OSError, TimeoutError, Exception) as e:
            failures.append(f"relay: {type(e).__name__}: {e}")
            if probe_thread[0] is None:  # failed before the kill: still test Redis
                kill()
    else:
        kill()
    th = probe_thread[0]
    assert th is not None
    th.join(deadline_s + 5)
    probe.done.set()

    if probe.t_write is None:
        failures.append(f"no writable new master within {deadline_s:.0f} s (errors {probe.errors})")
    else:
        new = kit.name_of_port(probe.new_port or 0)
        print(
            f"  +{probe.t_switch:6.2f} s  sentinels name the new master: "
            f"{new} {LOCALHOST}:{probe.new_port}"
        )
        errs = ", ".join(f"{k} x{v}" for k, v in probe.errors.items()) or "none"
        print(
            f"  +{probe.t_write:6.2f} s  first write accepted by the new master "
            f"(refused before: {errs})"
        )
        assert probe.new_port is not None  # set with t_write
        got = call(probe.new_port, "GET", "kasagi:kit:marker")
        if got == marker:
            print("             the marker written before the kill is on the new master")
        else:
            failures.append(f"marker lost: {got!r} != {marker!r}")
    if relay_res is not None:
        print(
            f"  +{relay_res['ack_s']:6.2f} s  relay acked a delta sent right after the kill: room "
            f"{relay_res['room']} seq {relay_res['seq_after']} (before the kill: seq "
            f"{relay_res['seq_before']}; {relay_res['retries']} retries)"
        )
        frame = relay_res["member_frame"]
        print(
            f"  +{relay_res['member_s']:6.2f} s  a member joined before the kill received it: "
            f"{frame['t']} from {frame['from']} seq {frame['seq']}"
            + ("" if relay_res["gapless"] else " (a reset, not a gapless stream)")
        )
        st = relay_res["steady"]
        print(
            f"             after the failover: delta acked in {relay_res['steady_ack_ms']:.0f} ms "
            f"(seq {st['seq']}, {st['retries']} retries), member got {st['frame']['t']} "
            f"from {st['frame']['from']} seq {st['frame']['seq']}"
        )
        if not relay_res["gapless"]:
            failures.append("member got a reset instead of the delta stream")
    for line in relay_log[-5:]:
        print(f"             relay client: {line}")
    if not relay_expected:
        print("             relay: not started (RELAY was empty at `make up`), not tested")

    # Bring the killed node back; Sentinel turns it into a replica of the new master.
    if probe.t_write is not None:
        t = time.monotonic()
        if kit.docker:
            subprocess.run(["docker", "start", old.name], check=True, capture_output=True)
            how = "container started"
        else:
            start_redis(kit, old)
            how = f"restarted as pid {kit.read_pid(old.name)}"

        def rejoined() -> bool:
            # A replica of the master the Sentinels name now: usually probe.new_port, but a
            # second failover (a stall longer than down-after on a busy machine) can move it.
            inf = info(old.port)
            return (
                inf.get("role") == "slave"
                and inf.get("master_link_status") == "up"
                and int(inf.get("master_port", 0)) == probe.current_master()
            )

        ok = wait_for(rejoined, 60, 0.2)
        dt = time.monotonic() - t
        now = probe.current_master()
        if now is not None and now != probe.new_port:
            print(
                f"  NOTE: the Sentinels moved the master again after the failover, to "
                f"{kit.name_of_port(now)} {LOCALHOST}:{now} (a second failover: see the "
                f"+switch-master lines in the Sentinel logs)"
            )
        if ok:
            print(f"  {old.name} {how}; Sentinel made it a replica of the master in {dt:.1f} s")
        else:
            seen: tuple[object, ...]
            try:
                inf = info(old.port)
                seen = inf.get("role"), inf.get("master_port"), inf.get("master_link_status")
            except (OSError, RespError, ConnectionError) as e:
                seen = (f"no answer: {e}",)
            views = []
            for sn in kit.sentinel_nodes():
                try:
                    reps = [pairs(x) for x in call(sn.port, "SENTINEL", "replicas", name)]
                    views.append(
                        f"{sn.name}: " + ",".join(f"{r.get('port')}={r.get('flags')}" for r in reps)
                    )
                except (OSError, RespError, ConnectionError) as e:
                    views.append(f"{sn.name}: {e}")
            failures.append(
                f"{old.name} did not rejoin as a replica within 60 s (it reports {seen}; "
                f"sentinels' replicas: {'; '.join(views)}; see the logs in {kit.state})"
            )
        if not wait_for(lambda: sentinel_problems(kit, name) == [], 30, 0.25):
            failures.append(
                "sentinels not healthy after the test: " + "; ".join(sentinel_problems(kit, name))
            )
    result = {
        "down_after_ms": down_after,
        "switch_s": probe.t_switch,
        "write_pause_s": probe.t_write,
        "relay_ack_s": relay_res["ack_s"] if relay_res else None,
    }
    print("RESULT " + json.dumps(result))
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    relay_word = f", relay pause {relay_res['ack_s']:.2f} s" if relay_res else ""
    print(f"PASS: failover in {probe.t_write:.2f} s (kill -> first accepted write){relay_word}")
    return 0


def cmd_measure(kit: Kit, runs: int) -> int:
    """Runs failover-test N times and prints the median pauses (README, "Failover behaviour")."""
    results = []
    for i in range(runs):
        print(f"==== run {i + 1}/{runs}")
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cmd_failover_test(kit)
        out = buf.getvalue()
        print(out, end="")
        if rc:
            return rc
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    for key in ("switch_s", "write_pause_s", "relay_ack_s"):
        vals = [r[key] for r in results if r[key] is not None]
        if vals:
            print(
                f"{key}: median {statistics.median(vals):.2f} s, min {min(vals):.2f}, "
                f"max {max(vals):.2f} over {len(vals)} runs: {', '.join(f'{v:.2f}' for v in vals)}"
            )
    return 0


# --------------------------------------------------------------------------------------------


def ports(text: str, n: int) -> tuple[int, ...]:
    vals = tuple(int(x) for x in text.split(","))
    if len(vals) != n or not all(0 < v < 65536 for v in vals):
        raise argparse.ArgumentTypeError(f"expected {n} ports separated by commas: {text!r}")
    return vals


def absolute_exe(argv: list[str]) -> list[str]:
    """A relative path (.venv/bin/kasagi-relay) is relative to here, not to the child's cwd."""
    if argv and os.sep in argv[0] and not os.path.isabs(argv[0]):
        return [os.path.abspath(argv[0]), *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `make status | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    p = argparse.ArgumentParser(prog="localkit", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=(
        "up", "status", "sentinel-status", "cli-sentinel", "failover-test", "down", "clean",
        "measure", "render",
    ))  # fmt: skip
    p.add_argument("--state-dir", default=os.environ.get("KIT_STATE_DIR", str(REPO / ".kit")))
    p.add_argument("--docker", action="store_true", help="status/failover-test on docker compose")
    p.add_argument("--ports", type=lambda t: ports(t, 3), default=DEFAULT_PORTS,
                   help="master,replica-1,replica-2")  # fmt: skip
    p.add_argument("--sentinel-ports", type=lambda t: ports(t, 3), default=DEFAULT_SENTINEL_PORTS)
    p.add_argument("--relay-port", type=int, default=DEFAULT_RELAY_PORT)
    p.add_argument("--relay", default="", help="relay command (empty: no relay)")
    p.add_argument("--relay-args", default="", help="extra relay flags")
    p.add_argument("--down-after-ms", type=int, default=DEFAULT_DOWN_AFTER_MS)
    p.add_argument("--failover-timeout-ms", type=int, default=None)
    p.add_argument("--redis-server", default="redis-server")
    p.add_argument("--redis-cli", default="redis-cli")
    p.add_argument("--runs", type=int, default=5, help="measure: failover-tests to run")
    a = p.parse_args(argv)
    kit = Kit(Path(a.state_dir), docker=a.docker)
    wanted = Settings(
        ports=a.ports,
        sentinel_ports=a.sentinel_ports,
        relay_port=a.relay_port,
        down_after_ms=a.down_after_ms,
        failover_timeout_ms=a.failover_timeout_ms or None,
        relay=absolute_exe(shlex.split(a.relay)),
        relay_args=shlex.split(a.relay_args),
        redis_server=absolute_exe([a.redis_server])[0],
    )
    try:
        if a.command == "up":
            if shutil.which(wanted.redis_server) is None:
                raise KitError(
                    f"{wanted.redis_server} not found: install Redis (apt-get install redis-server)"
                )
            return cmd_up(kit, wanted)
        if a.command == "render":  # print the rendered configs (debugging, tests)
            kit.settings = wanted
            for node in [*kit.redis_nodes(), *kit.sentinel_nodes()]:
                print(
                    f"### {node.name}\n"
                    + render_node(node, kit.node_dir(node.name) / "data", wanted)
                )
            return 0
        if a.docker:
            kit.settings = wanted
        if a.command == "cli-sentinel":
            kit.load()
            port = kit.settings.sentinel_ports[0]
            print(
                f"{a.redis_cli} -p {port}   ({SENTINELS[0]}; "
                f"try: SENTINEL master {kit.master_name_and_quorum()[0]})"
            )
            sys.stdout.flush()
            os.execvp(a.redis_cli, [a.redis_cli, "-p", str(port)])
        commands: dict[str, Callable[[Kit], int]] = {
            "status": cmd_status,
            "sentinel-status": cmd_sentinel_status,
            "failover-test": cmd_failover_test,
            "down": cmd_down,
            "clean": cmd_clean,
            "measure": lambda k: cmd_measure(k, a.runs),
        }
        return commands[a.command](kit)
    except KitError as e:
        print(f"ERROR: {e}")
        return 1
    except (OSError, RespError, ConnectionError) as e:
        print(f"ERROR: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
