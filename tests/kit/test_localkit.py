"""The Sentinel deployment kit: docker-compose.yml, the Redis/Sentinel configs and the Makefile
agree with each other, and the no-Docker mode works end to end with real processes.

The end-to-end test runs `make up` / `status` / `failover-test` / `down` in local mode on free
ports, in a temporary state directory, with Sentinel's down-after-milliseconds at 1000 ms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kit import localkit, topology
from kit.topology import free_ports

REPO = Path(__file__).resolve().parents[2]

MASTER = "kasagi-redis-master"
REPLICAS = ["kasagi-redis-replica-1", "kasagi-redis-replica-2"]
SENTINELS = ["kasagi-sentinel-1", "kasagi-sentinel-2", "kasagi-sentinel-3"]
REDIS_PORTS = {MASTER: 6379, REPLICAS[0]: 6380, REPLICAS[1]: 6381}
SENTINEL_PORTS = {SENTINELS[0]: 26379, SENTINELS[1]: 26380, SENTINELS[2]: 26381}
MASTER_NAME = "kasagi-master"
QUORUM = 2
NETWORK = "kasagi-network"

# The relay gains its sentinel backend in parallel with this kit. Until then it exits at
# start with this message, and the relay half of the end-to-end test is an expected failure
# (xfail, reported). Once the message is gone, every relay check fails loudly.
RELAY_NOT_READY = "sentinel backend is not available yet"


# --------------------------------------------------------------------------------------------
# Static checks: compose file vs config files vs Makefile vs kit defaults
# --------------------------------------------------------------------------------------------


def directives(path: Path) -> list[list[str]]:
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s.split())
    return out


def one(conf: list[list[str]], *key: str) -> list[str]:
    hits = [d for d in conf if [w.lower() for w in d[: len(key)]] == list(key)]
    assert len(hits) == 1, f"{key}: {hits}"
    return hits[0][len(key) :]


def command_flags(service: dict[str, Any]) -> dict[str, str]:
    """`--flag value` pairs of a service's command (also inside `sh -c "..."`)."""
    cmd = service["command"]
    words = shlex.split(cmd[-1]) if cmd[:2] == ["sh", "-c"] else list(cmd)
    flags = {}
    for i, w in enumerate(words):
        if w.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[w[2:]] = words[i + 1]
    return flags


def makefile_defaults() -> dict[str, str]:
    out = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Z_0-9]+)\s*\?=\s*(.*?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")  # pyyaml: in the project's test extra
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def by_container(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {s["container_name"]: (name, s) for name, s in compose["services"].items()}


def published(service: dict[str, Any]) -> list[tuple[int, int]]:
    out = []
    for p in service["ports"]:
        host, container = str(p).split(":")
        out.append((int(host), int(container)))
    return out


def mounted_conf(service: dict[str, Any]) -> Path:
    for v in service["volumes"]:
        src, dst, *_ = v.split(":")
        if dst.startswith("/etc/kasagi/"):
            return REPO / str(src)
    raise AssertionError(f"no config mounted: {service['volumes']}")


def test_compose_names_network_volumes(compose: dict[str, Any]) -> None:
    bc = by_container(compose)
    assert set(bc) == {MASTER, *REPLICAS, *SENTINELS, "kasagi-relay"}
    assert compose["networks"][NETWORK]["name"] == NETWORK
    for container, (_, s) in bc.items():
        nets = s["networks"]
        assert NETWORK in nets and len(nets) == 1, container
        if container != "kasagi-relay":
            assert s["hostname"] == container
            assert nets[NETWORK]["aliases"] == [container]
            data = [v for v in s["volumes"] if v.split(":")[1] == "/data"]
            assert len(data) == 1 and data[0].split(":")[0] in compose["volumes"], container
            assert "healthcheck" in s
            # Runs from a writable copy of its config (Redis and Sentinel rewrite it).
            assert "cp /etc/kasagi/" in s["command"][-1], container


def test_compose_redis_nodes_match_configs(compose: dict[str, Any]) -> None:
    bc = by_container(compose)
    for container, port in REDIS_PORTS.items():
        _, s = bc[container]
        assert published(s) == [(port, port)], container
        conf_path = mounted_conf(s)
        conf = directives(conf_path)
        flags = command_flags(s)
        assert int(flags.get("port", one(conf, "port")[0])) == port, container
        announce = flags.get("replica-announce-ip", one(conf, "replica-announce-ip")[0])
        assert announce == container
        assert (
            int(flags.get("replica-announce-port", one(conf, "replica-announce-port")[0])) == port
        )
        assert f"-p {port} ping" in s["healthcheck"]["test"][-1]
        if container == MASTER:
            assert conf_path.name == "redis-master.conf"
            assert not [d for d in conf if d[0] == "replicaof"]
        else:
            assert conf_path.name == "redis-replica.conf"
            assert one(conf, "replicaof") == [MASTER, str(REDIS_PORTS[MASTER])]
            assert s["depends_on"]["redis-master"]["condition"] == "service_healthy"


@pytest.mark.parametrize("conf_name", ["redis-master.conf", "redis-replica.conf"])
def test_redis_config_requirements(conf_name: str) -> None:
    path = REPO / "redis" / conf_name
    conf = directives(path)
    text = path.read_text()
    assert one(conf, "appendonly") == ["yes"]
    assert one(conf, "appendfsync") == ["everysec"]
    assert one(conf, "save")  # RDB snapshots on
    assert re.fullmatch(r"\d+(mb|gb)", one(conf, "maxmemory")[0])
    assert one(conf, "maxmemory-policy") == ["noeviction"]
    assert one(conf, "min-replicas-to-write") == ["1"]
    lag = int(one(conf, "min-replicas-max-lag")[0])
    assert 0 < lag <= 10
    # Auth ready to switch on, commented out.
    assert re.search(r"^# requirepass \S+", text, re.M)
    assert re.search(r"^# masterauth \S+", text, re.M)
    # The reasons are written down next to the settings.
    prose = " ".join(text.replace("#", " ").split())
    assert "store of record" in prose and "split brain" in prose


def test_compose_sentinels_match_configs(compose: dict[str, Any]) -> None:
    bc = by_container(compose)
    make = makefile_defaults()
    for i, (container, port) in enumerate(SENTINEL_PORTS.items(), 1):
        _, s = bc[container]
        assert published(s) == [(port, port)]
        path = mounted_conf(s)
        assert path == REPO / "sentinel" / f"sentinel-{i}.conf"
        conf = directives(path)
        assert one(conf, "port") == [str(port)]
        assert one(conf, "sentinel", "resolve-hostnames") == ["yes"]
        assert one(conf, "sentinel", "announce-hostnames") == ["yes"]
        assert one(conf, "sentinel", "announce-ip") == [container]
        assert one(conf, "sentinel", "announce-port") == [str(port)]
        monitor = one(conf, "sentinel", "monitor")
        assert monitor == [MASTER_NAME, MASTER, str(REDIS_PORTS[MASTER]), str(QUORUM)]
        keys = [" ".join(d[:2]) for d in conf]
        assert keys.index("sentinel resolve-hostnames") < keys.index("sentinel monitor")
        assert one(conf, "sentinel", "down-after-milliseconds") == [MASTER_NAME, "5000"]
        assert one(conf, "sentinel", "parallel-syncs") == [MASTER_NAME, "1"]
        assert int(one(conf, "sentinel", "failover-timeout")[1]) >= 10_000
        assert "--sentinel" in s["command"][-1]
        assert f"-p {port} SENTINEL" in s["healthcheck"]["test"][-1]
        assert make[f"SENTINEL_{i}_PORT"] == str(port)
    assert make["MASTER_NAME"] == MASTER_NAME
    assert make["QUORUM"] == str(QUORUM)
    assert make["NETWORK"] == NETWORK
    assert make["REDIS_PORT"] == str(REDIS_PORTS[MASTER])
    assert make["REPLICA_1_PORT"] == str(REDIS_PORTS[REPLICAS[0]])
    assert make["REPLICA_2_PORT"] == str(REDIS_PORTS[REPLICAS[1]])
    assert make["DOWN_AFTER_MS"] == "5000"
    # The no-Docker kit's own defaults and names.
    assert tuple(REDIS_PORTS.values()) == localkit.DEFAULT_PORTS
    assert tuple(SENTINEL_PORTS.values()) == localkit.DEFAULT_SENTINEL_PORTS
    assert (localkit.MASTER, *localkit.REPLICAS) == (MASTER, *REPLICAS)
    assert tuple(SENTINELS) == localkit.SENTINELS


def test_compose_relay_service(compose: dict[str, Any]) -> None:
    _, s = by_container(compose)["kasagi-relay"]
    assert s["build"]["dockerfile"] == "Dockerfile"
    args = s["command"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--host"] == "0.0.0.0"
    assert flags["--master"] == MASTER_NAME
    relay_port = int(flags["--port"])
    assert published(s) == [(relay_port, relay_port)]
    assert str(relay_port) == makefile_defaults()["RELAY_PORT"]
    # --sentinels names the sentinel services at the ports they listen on.
    services = compose["services"]
    listed = [item.rsplit(":", 1) for item in flags["--sentinels"].split(",")]
    assert len(listed) == 3
    for host, port in listed:
        assert host in services, host
        assert published(services[host]) == [(int(port), int(port))]
        assert services[host]["container_name"] in SENTINELS
        assert s["depends_on"][host]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(s["healthcheck"]["test"])


def test_compose_relay_starts_on_its_non_loopback_address(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 0.0.0.0 the relay wants a JWT key or an explicit --auth none (docs/operations.md,
    "Identity"): the compose service's command and environment pass its start-up check."""
    from kasagi_relay import cli

    _, s = by_container(compose)["kasagi-relay"]
    for name, value in s["environment"].items():
        monkeypatch.setenv(name, str(value))
    config = cli.parse_config([str(arg) for arg in s["command"]])
    assert config.host == "0.0.0.0"
    assert config.auth_none or config.jwt_configured


def test_dockerfile_multi_stage() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) == 2
    build, runtime = text.split("\nFROM ", 2)[1:]
    assert "maturin build --release" in build and "rustup" in build
    assert "COPY --from=build" in runtime and "pip install" in runtime
    assert "cargo" not in runtime and "rustup" not in runtime
    assert 'ENTRYPOINT ["kasagi-relay"]' in runtime


def test_local_mode_renders_same_files_with_ports_substituted(tmp_path: Path) -> None:
    kit = localkit.Kit(tmp_path)
    kit.settings = localkit.Settings(
        ports=(7001, 7002, 7003), sentinel_ports=(7101, 7102, 7103), down_after_ms=1234
    )
    for node in [*kit.redis_nodes(), *kit.sentinel_nodes()]:
        text = localkit.render_node(node, tmp_path / node.name, kit.settings)
        conf = [d for d in (line.split() for line in text.splitlines()) if d and d[0][0] != "#"]
        assert one(conf, "port") == [str(node.port)]
        assert one(conf, "bind") == ["127.0.0.1"]
        assert one(conf, "dir") == [str(tmp_path / node.name)]
        # No container hostname is left; everything else is the file as written.
        for d in conf:
            assert not any(
                w.startswith("kasagi-redis") or w.startswith("kasagi-sentinel") for w in d
            ), d
        assert node.template is not None  # Redis and Sentinel nodes render a file
        source = directives(REPO / node.template)
        assert len(conf) == len(source)
        if node.kind == "sentinel":
            assert one(conf, "sentinel", "monitor") == [MASTER_NAME, "127.0.0.1", "7001", "2"]
            assert one(conf, "sentinel", "down-after-milliseconds") == [MASTER_NAME, "1234"]
            assert one(conf, "sentinel", "announce-hostnames") == ["no"]
        elif node.name != MASTER:
            assert one(conf, "replicaof") == ["127.0.0.1", "7001"]
    with pytest.raises(localkit.KitError, match="exactly once"):
        topology.render("port 1\nport 2\n", {"port": "port 3"}, "x.conf")


def test_failover_test_without_the_client_says_so_in_one_line(tmp_path: Path) -> None:
    """The kit runs with the standard library alone, except the relay half of failover-test,
    which uses the project's client: a python without the project's packages (here the same
    interpreter with -S: no site-packages) gets one line, before the kit touches anything."""
    settings = localkit.Settings(relay=["kasagi-relay"])
    (tmp_path / "kit.json").write_text(json.dumps(dataclasses.asdict(settings)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-S", "-m", "kit.localkit", "failover-test", "--state-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1, r
    assert r.stdout.splitlines() == [r.stdout.strip()], r.stdout
    assert r.stdout.startswith("ERROR: the relay check needs the project's client ("), r.stdout
    assert ".venv/bin/python" in r.stdout
    assert r.stderr == ""


# --------------------------------------------------------------------------------------------
# End to end, native path: make up -> status -> failover-test -> down
# --------------------------------------------------------------------------------------------


def relay_command() -> list[str]:
    cmd = os.environ.get("KASAGI_KIT_RELAY") or str(REPO / ".venv" / "bin" / "kasagi-relay")
    argv = shlex.split(cmd)
    if not (Path(argv[0]).exists() or shutil.which(argv[0])):
        pytest.fail(
            f"{argv[0]} missing: the package must be installed into .venv (./scripts/test.sh "
            "does it), or point KASAGI_KIT_RELAY at a relay command"
        )
    return argv


def relay_supports_sentinels(argv: list[str]) -> tuple[bool, str]:
    """False only while the relay still says its sentinel backend does not exist."""
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--sentinels", "127.0.0.1:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return RELAY_NOT_READY not in out, out.strip()[-300:]


def proc_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False
    return True


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_local_mode_end_to_end(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (./scripts/test.sh installs it)")
    relay = relay_command()
    relay_ready, relay_said = relay_supports_sentinels(relay)
    ports = free_ports(7)
    state = tmp_path / "kit"
    variables = [
        "MODE=local",  # the native path, even where a Docker engine runs
        f"STATE_DIR={state}",
        f"REDIS_PORT={ports[0]}",
        f"REPLICA_1_PORT={ports[1]}",
        f"REPLICA_2_PORT={ports[2]}",
        f"SENTINEL_1_PORT={ports[3]}",
        f"SENTINEL_2_PORT={ports[4]}",
        f"SENTINEL_3_PORT={ports[5]}",
        f"RELAY_PORT={ports[6]}",
        "DOWN_AFTER_MS=1000",
        # Without a sentinel backend the relay cannot start: bring up Redis + Sentinels only.
        f"RELAY={shlex.join(relay) if relay_ready else ''}",
    ]

    def make(target: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), target, *variables],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        print(f"$ make {target}  (rc {r.returncode})\n{r.stdout}{r.stderr}")
        assert r.stdout.splitlines()[0].startswith("mode: local"), r.stdout
        return r

    def recorded_pids() -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in state.glob("*.pid")}

    pids_seen: dict[str, int] = {}
    try:
        up = make("up")
        assert up.returncode == 0, up.stdout
        pids_seen.update(recorded_pids())
        expected = {MASTER, *REPLICAS, *SENTINELS} | ({"kasagi-relay"} if relay_ready else set())
        assert set(pids_seen) == expected
        assert all(proc_alive(pid) for pid in pids_seen.values())

        st = make("status")
        assert st.returncode == 0, st.stdout
        lines = st.stdout.splitlines()
        assert len([ln for ln in lines if ln.startswith("redis ") and "role=master" in ln]) == 1
        replicas = [ln for ln in lines if ln.startswith("redis ") and "role=replica" in ln]
        assert len(replicas) == 2 and all("link=up" in ln for ln in replicas)
        sentinels = [ln for ln in lines if ln.startswith("sentinel ")]
        assert len(sentinels) == 3
        for ln in sentinels:
            assert f"{MASTER_NAME} at 127.0.0.1:{ports[0]}" in ln
            assert "flags=master replicas=2/2 other-sentinels=2 quorum=2 ckquorum=OK" in ln
        relay_line = next(ln for ln in lines if ln.startswith("relay "))
        if relay_ready:
            assert "/healthz 200" in relay_line
            assert lines[-1].startswith("OK:") and "relay healthy" in lines[-1]

        ft = make("failover-test", timeout=180)
        assert ft.returncode == 0, ft.stdout
        assert "PASS: failover in" in ft.stdout
        assert "the marker written before the kill is on the new master" in ft.stdout
        if relay_ready:
            assert "relay acked a delta sent right after the kill" in ft.stdout
            assert "a member joined before the kill received it: delta" in ft.stdout
        pids_seen.update({f"{k}@2": v for k, v in recorded_pids().items()})

        st2 = make("status")
        assert st2.returncode == 0, st2.stdout
        assert f"{MASTER_NAME} at 127.0.0.1:{ports[0]}" not in st2.stdout  # a new master
    finally:
        down = make("down")
        for name, pid in pids_seen.items():
            deadline = time.monotonic() + 5
            while proc_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not proc_alive(pid), f"{name} (pid {pid}) still running after make down"
    assert down.returncode == 0, down.stdout
    assert not list(state.glob("*.pid"))
    assert (state / "kit.json").exists()  # data kept by down ...
    clean = make("clean")
    assert clean.returncode == 0 and not state.exists()  # ... and removed by clean

    if not relay_ready:
        pytest.xfail(
            "Redis + Sentinel path passed; the relay half was not run because the relay has "
            f"no sentinel backend yet ({relay_said!r}). It runs and fails loudly once it has."
        )
