#!/usr/bin/env python3
"""The Redis Cluster deployment kit as local processes: `make cluster-up`, `cluster-status`,
`cluster-failover-test`, `cluster-down` (docs/operations.md, Redis Cluster).

Six `redis-server --cluster-enabled yes` nodes (3 primaries, 3 replicas) joined by
`redis-cli --cluster create`, plus one `kasagi-relay --cluster ...`, each with a PID file in
the state directory; `down` stops exactly those PIDs (after checking each is still ours),
never anything by name. Configs, process handling and readiness are the shared launcher's
(kit/topology.py). Standard library only: any python3 >= 3.10 runs it.

    python3 -m kit.clusterkit up --state-dir .kit-cluster --ports 7001,7002,7003,7004,7005,7006
    python3 -m kit.clusterkit status --state-dir .kit-cluster
    python3 -m kit.clusterkit failover-test --state-dir .kit-cluster
    python3 -m kit.clusterkit down --state-dir .kit-cluster

`up` records its settings in <state-dir>/cluster.json; the other commands read them back.
A second `up` restarts stopped nodes from their own nodes.conf (the cluster keeps its
shape) instead of creating a new cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: the repository is the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit import topology
from kit.localkit import absolute_exe, healthz, tail
from kit.topology import (
    LOCALHOST,
    LaunchError,
    Resp,
    RespError,
    Running,
    answers_as,
    call,
    parse_info,
    port_answers,
    read_pid,
    runs_in,
    stop_all,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "kasagi_relay" / "backends" / "kasagi.lua"
RELAY = "kasagi-relay-cluster"
DEFAULT_PORTS = (7001, 7002, 7003, 7004, 7005, 7006)
DEFAULT_RELAY_PORT = 8766
DEFAULT_NODE_TIMEOUT_MS = 5000
# The room the failover test writes to (its slot's primary is the one killed).
TEST_ROOM = "kit-cluster-failover"

KitError = LaunchError


@dataclass
class Settings:
    ports: tuple[int, ...] = DEFAULT_PORTS
    relay_port: int = DEFAULT_RELAY_PORT
    node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS
    relay: list[str] = field(default_factory=list)
    relay_args: list[str] = field(default_factory=list)
    redis_server: str = "redis-server"
    redis_cli: str = "redis-cli"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        s = cls(**data)
        s.ports = tuple(s.ports)
        return s


class Kit:
    def __init__(self, state_dir: Path) -> None:
        self.state = state_dir.resolve()
        self.settings = Settings()

    @property
    def json_file(self) -> Path:
        return self.state / "cluster.json"

    def load(self) -> None:
        if not self.json_file.exists():
            raise KitError(f"no cluster kit state in {self.state}: run `make cluster-up` first")
        self.settings = Settings.from_json(json.loads(self.json_file.read_text()))

    def names(self) -> list[str]:
        return [f"kasagi-cluster-{i + 1}" for i in range(len(self.settings.ports))]

    def pid_file(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / f"{name}.log"

    def node_dir(self, name: str) -> Path:
        return self.state / name

    def running_pid(self, name: str, port: int) -> int | None:
        pid = read_pid(self.pid_file(name))
        return pid if pid is not None and runs_in(pid, self.state, hint=str(port)) else None

    def nodes(self) -> list[tuple[str, int]]:
        return list(zip(self.names(), self.settings.ports, strict=True))

    def seeds(self) -> str:
        return ",".join(f"{LOCALHOST}:{p}" for p in self.settings.ports)


def start_node(kit: Kit, name: str, port: int) -> str:
    pid = kit.running_pid(name, port)
    if pid:
        return f"already running (pid {pid})"
    if port_answers(port):
        raise KitError(
            f"{name}: port {port} is taken by a process that is not ours: pick free ports, "
            "e.g. `make cluster-up CLUSTER_PORTS=7101,7102,7103,7104,7105,7106`"
        )
    d = kit.node_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "redis.conf"
    if not conf.exists():  # later ups keep the node's identity (its nodes.conf)
        text = topology.cluster_conf(
            port, port + 10000 if port <= 55535 else topology.free_port(), d, name, None,
            kit.settings.node_timeout_ms,
        )  # fmt: skip
        conf.write_text(text)
    proc = topology.spawn(
        [kit.settings.redis_server, str(conf)],
        cwd=d,
        log=kit.log_file(name),
        pid_file=kit.pid_file(name),
        detach=True,
    )
    ok = wait_for(lambda: proc.poll() is not None or answers_as(port, proc.pid), 10)
    if not ok or proc.poll() is not None:
        raise KitError(f"{name} did not answer on {port}:\n{tail(kit.log_file(name))}")
    return f"started (pid {proc.pid})"


def cluster_info(port: int) -> dict[str, str]:
    return parse_info(call(port, "CLUSTER", "INFO"))


def slot_map(kit: Kit) -> list[tuple[int, int, int]]:
    """(first slot, last slot, primary port) from the first node that answers."""
    for _, port in kit.nodes():
        try:
            return [(a, b, addr[1]) for a, b, addr in topology.cluster_slots(port)]
        except (OSError, RespError, ConnectionError):
            continue
    raise KitError("no cluster node answered CLUSTER SLOTS")


def cluster_ok(kit: Kit) -> bool:
    try:
        live = [p for name, p in kit.nodes() if kit.running_pid(name, p)]
        return bool(live) and all(
            cluster_info(p).get("cluster_state") == "ok"
            and cluster_info(p).get("cluster_slots_ok") == "16384"
            for p in live
        )
    except (OSError, RespError, ConnectionError):
        return False


def start_relay(kit: Kit) -> tuple[bool, str]:
    s = kit.settings
    if not s.relay:
        return True, "skipped (RELAY is empty)"
    pid = kit.running_pid(RELAY, s.relay_port)
    if pid:
        return True, f"already running (pid {pid})"
    if shutil.which(s.relay[0]) is None and not Path(s.relay[0]).exists():
        return False, f"{s.relay[0]} not found: install the package into .venv first"
    if port_answers(s.relay_port):
        return False, f"port {s.relay_port} is taken: set CLUSTER_RELAY_PORT"
    argv = [*s.relay, "--host", LOCALHOST, "--port", str(s.relay_port),
            "--cluster", kit.seeds(), *s.relay_args]  # fmt: skip
    cwd = kit.node_dir(RELAY)
    cwd.mkdir(parents=True, exist_ok=True)
    proc = topology.spawn(
        argv, cwd=cwd, log=kit.log_file(RELAY), pid_file=kit.pid_file(RELAY), detach=True
    )
    end = time.monotonic() + 20
    status, body = None, ""
    while time.monotonic() < end:
        if proc.poll() is not None:
            kit.pid_file(RELAY).unlink(missing_ok=True)
            return False, f"exited at start: {shlex.join(argv)}\n{tail(kit.log_file(RELAY))}"
        status, body = healthz(s.relay_port, timeout=1.0)
        if status == 200:
            return True, f"started (pid {proc.pid}), /healthz 200"
        time.sleep(0.2)
    return False, f"/healthz not 200 after 20 s ({status} {body[:200]})"


def cmd_up(kit: Kit, wanted: Settings) -> int:
    kit.state.mkdir(parents=True, exist_ok=True)
    if kit.json_file.exists():
        old = Settings.from_json(json.loads(kit.json_file.read_text()))
        if (old.ports, old.node_timeout_ms) != (wanted.ports, wanted.node_timeout_ms):
            raise KitError(
                f"{kit.state} holds a cluster made with ports {old.ports}: "
                "`make cluster-down` and remove it first, or use the same variables"
            )
    kit.settings = wanted
    kit.json_file.write_text(json.dumps(asdict(wanted), indent=2) + "\n")
    for name, port in kit.nodes():
        print(f"  {name:<22} {LOCALHOST}:{port:<6} {start_node(kit, name, port)}")
    first = wanted.ports[0]
    if int(cluster_info(first).get("cluster_known_nodes", "1")) < len(wanted.ports):
        addrs = [f"{LOCALHOST}:{p}" for p in wanted.ports]
        out = subprocess.run(
            [wanted.redis_cli, "--cluster", "create", *addrs, "--cluster-replicas", "1",
             "--cluster-yes"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            raise KitError(f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
        print("  cluster created: 3 primaries, 3 replicas")
    if not wait_for(lambda: cluster_ok(kit), 60, 0.25):
        raise KitError("the cluster is not ok after 60 s: `make cluster-status` shows why")
    ok, msg = start_relay(kit)
    print(f"  {RELAY:<22} {LOCALHOST}:{wanted.relay_port:<6} {msg}")
    print(f"Cluster: --cluster {kit.seeds()}; state, logs, PID files: {kit.state}")
    if not ok:
        print("FAILED: the cluster is up, the relay is NOT. `make cluster-down` stops it.")
        return 1
    if wanted.relay:
        print(f"Relay: ws://{LOCALHOST}:{wanted.relay_port}/ws")
    return 0


def cmd_status(kit: Kit) -> int:
    kit.load()
    healthy = True
    by_port = {port: name for name, port in kit.nodes()}
    for name, port in kit.nodes():
        pid = kit.running_pid(name, port)
        if pid is None:
            print(f"  {name:<22} {LOCALHOST}:{port:<6} NOT RUNNING")
            healthy = False
            continue
        try:
            role = call(port, "ROLE")
            state = cluster_info(port).get("cluster_state", "?")
            what = (
                "primary"
                if role[0] == "master"
                else f"replica of {by_port.get(int(role[2]), role[2])}"
            )
            print(f"  {name:<22} {LOCALHOST}:{port:<6} pid {pid}  {what}  cluster_state:{state}")
            healthy &= state == "ok"
        except (OSError, RespError, ConnectionError) as exc:
            print(f"  {name:<22} {LOCALHOST}:{port:<6} pid {pid}  NOT ANSWERING ({exc})")
            healthy = False
    try:
        for first, last, port in slot_map(kit):
            print(f"  slots {first:>5}-{last:<5} -> {by_port.get(port, port)}")
    except KitError as exc:
        print(f"  {exc}")
        healthy = False
    if kit.settings.relay:
        pid = kit.running_pid(RELAY, kit.settings.relay_port)
        status, body = healthz(kit.settings.relay_port)
        print(f"  {RELAY:<22} pid {pid or '-'}  /healthz {status} {body[:160]}")
        healthy &= status == 200
    print("status: OK" if healthy else "status: NOT HEALTHY")
    return 0 if healthy else 1


def ours_check(state: Path, pid: int, port: int) -> Callable[[], bool]:
    return lambda: runs_in(pid, state, hint=str(port))


def cmd_down(kit: Kit) -> int:
    if not kit.json_file.exists():
        print(f"nothing to stop: no cluster kit state in {kit.state}")
        return 0
    kit.load()
    n = 0
    for name, port in [(RELAY, kit.settings.relay_port), *reversed(kit.nodes())]:
        pid = read_pid(kit.pid_file(name))
        if pid is None:
            continue
        if runs_in(pid, kit.state, hint=str(port)):
            stop_all([Running(pid, ours_check(kit.state, pid, port))])
            print(f"  {name}: stopped pid {pid}")
            n += 1
        kit.pid_file(name).unlink(missing_ok=True)
    print(f"cluster down: {n} process(es) of ours stopped; data kept in {kit.state}")
    return 0


def key_slot(key: str) -> int:
    """Redis Cluster's CRC16 (XMODEM) of the hash tag, mod 16384."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def primary_of(kit: Kit, slot: int) -> int | None:
    try:
        for first, last, port in slot_map(kit):
            if first <= slot <= last:
                return port
    except KitError:
        pass
    return None


def cmd_failover_test(kit: Kit) -> int:
    """SIGKILL the primary serving TEST_ROOM while writing keyed deltas to it through the
    `kasagi` library with WAIT 1 (what `--ack replica` waits for); restart the killed node
    (it rejoins as a replica); then check every acknowledged delta is in the history of the
    promoted primary, once, and report the pause."""
    kit.load()
    if not cluster_ok(kit):
        raise KitError("the cluster is not ok: `make cluster-status`")
    keys = [f"room:{{{TEST_ROOM}}}:{k}" for k in ("seq", "ops", "channel", "keys")]
    slot = key_slot(keys[0])
    port = primary_of(kit, slot)
    assert port is not None
    for p in {pt for _, _, pt in slot_map(kit)}:
        with Resp(LOCALHOST, p) as r:
            r.call("FUNCTION", "LOAD", "REPLACE", LIBRARY.read_text())
    victim = next(name for name, p in kit.nodes() if p == port)
    pid = kit.running_pid(victim, port)
    if pid is None:
        raise KitError(f"{victim} (primary of slot {slot}) is not ours or not running")
    run = uuid.uuid4().hex[:8]
    acked: dict[str, int] = {}
    failures = 0
    t_kill = t_back = None
    n = 0
    t_end = time.monotonic() + 60
    killed = False
    restarted = False
    while time.monotonic() < t_end:
        key = f"{run}-{n}"
        body = json.dumps({key: n})
        target = primary_of(kit, slot)
        try:
            if target is None:
                raise ConnectionError("no primary")
            with Resp(LOCALHOST, target, timeout=2.0) as r:
                seq = r.call("FCALL", "kasagi_publish", 4, *keys, "merge", body, key)
                if int(r.call("WAIT", 1, 1000)) >= 1:
                    acked[key] = int(seq)
                    n += 1
                    if killed and t_back is None:
                        assert t_kill is not None
                        t_back = time.monotonic() - t_kill
                else:
                    failures += 1
        except (OSError, RespError, ConnectionError):
            failures += 1
            time.sleep(0.05)
        if not killed and n >= 20:
            os.kill(pid, signal.SIGKILL)
            killed, t_kill = True, time.monotonic()
            print(f"  SIGKILL {victim} (pid {pid}, primary of slot {slot}) after {n} acks")
        if killed and not restarted and primary_of(kit, slot) not in (None, port):
            assert t_kill is not None
            took = time.monotonic() - t_kill
            print(f"  replica promoted after {took:.1f} s; restarting {victim} (as a replica)")
            kit.pid_file(victim).unlink(missing_ok=True)
            start_node(kit, victim, port)
            restarted = True
        if t_back is not None and len(acked) >= 60:  # 40 acknowledged after the kill
            break
        time.sleep(0.02)
    final = primary_of(kit, slot)
    if final is None or t_back is None:
        print("FAILED: writes did not resume within 60 s")
        return 1
    with Resp(LOCALHOST, final) as r:
        entries = r.call("XRANGE", keys[1], "-", "+")
    where: dict[str, list[int]] = {}
    for eid, fields in entries:
        doc = json.loads(dict(zip(fields[::2], fields[1::2], strict=False))["d"])
        for k in doc:
            where.setdefault(k, []).append(int(eid.split("-")[0]))
    lost = [k for k in acked if k not in where]
    dup = [k for k, v in where.items() if k.startswith(run) and len(v) > 1]
    print(
        f"  acked {len(acked)}, lost {len(lost)}, stored twice {len(dup)}, "
        f"refused or unanswered {failures}; writes acknowledged again {t_back:.1f} s after SIGKILL"
    )
    if kit.settings.relay:
        ok = wait_for(lambda: healthz(kit.settings.relay_port)[0] == 200, 20, 0.25)
        print(f"  relay /healthz {'200' if ok else 'NOT 200 after 20 s'}")
        if not ok:
            return 1
    if lost or dup:
        print(f"FAILED: lost {lost[:5]} duplicated {dup[:5]}")
        return 1
    print("failover-test: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clusterkit", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("up", "status", "failover-test", "down"))
    p.add_argument("--state-dir", default=str(REPO / ".kit-cluster"))
    p.add_argument("--ports", default=",".join(map(str, DEFAULT_PORTS)), help="6 node ports")
    p.add_argument("--relay-port", type=int, default=DEFAULT_RELAY_PORT)
    p.add_argument("--relay", default="", help="relay command (empty: no relay)")
    p.add_argument("--relay-args", default="")
    p.add_argument("--node-timeout-ms", type=int, default=DEFAULT_NODE_TIMEOUT_MS)
    p.add_argument("--redis-server", default="redis-server")
    p.add_argument("--redis-cli", default="redis-cli")
    a = p.parse_args(argv)
    ports = tuple(int(x) for x in a.ports.split(","))
    if len(ports) != 6:
        print("ERROR: --ports needs 6 ports (3 primaries, 3 replicas)")
        return 2
    kit = Kit(Path(a.state_dir))
    wanted = Settings(
        ports=ports,
        relay_port=a.relay_port,
        node_timeout_ms=a.node_timeout_ms,
        relay=absolute_exe(shlex.split(a.relay)),
        relay_args=shlex.split(a.relay_args),
        redis_server=absolute_exe([a.redis_server])[0],
        redis_cli=a.redis_cli,
    )
    try:
        if a.command == "up":
            if shutil.which(wanted.redis_server) is None:
                raise KitError(f"{wanted.redis_server} not found: install Redis")
            return cmd_up(kit, wanted)
        return {"status": cmd_status, "failover-test": cmd_failover_test, "down": cmd_down}[
            a.command
        ](kit)
    except KitError as e:
        print(f"ERROR: {e}")
        return 1
    except (OSError, RespError, ConnectionError) as e:
        print(f"ERROR: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
