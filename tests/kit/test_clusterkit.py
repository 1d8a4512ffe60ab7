"""The cluster kit (kit/clusterkit.py, `make cluster-up` ... `cluster-down`) end to end in
local mode, as real processes on free loopback ports (no relay: tests/test_cluster.py covers
the relay; RELAY empty is the kit's documented Redis-only mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis.crc import key_slot

from kit import clusterkit
from kit.topology import free_ports, read_pid, runs_in
from testkit.redis import REDIS_SERVER

pytestmark = pytest.mark.timeout(150)


def test_key_slot_matches_redis_py() -> None:
    for key in ("room:{a}:seq", "room:{kit-cluster-failover}:ops", "plain", "x{}y", "{}{a}"):
        assert clusterkit.key_slot(key) == key_slot(key.encode()), key


def test_up_status_failover_test_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server not installed")
    # The kit's bus port is port + 10000: none may be another node's port.
    picked = free_ports(12)
    ports = [p for p in picked if p <= 55535 and p + 10000 not in picked][:6]
    assert len(ports) == 6
    state = tmp_path / "kit"
    common = ["--state-dir", str(state)]
    up = [*common, "--ports", ",".join(map(str, ports)), "--node-timeout-ms", "1000"]
    try:
        assert clusterkit.main(["up", *up]) == 0
        assert clusterkit.main(["status", *common]) == 0
        out = capsys.readouterr().out
        assert out.count(" primary ") == 3 and out.count("replica of") == 3
        assert "status: OK" in out
        assert clusterkit.main(["failover-test", *common]) == 0
        out = capsys.readouterr().out
        assert "lost 0, stored twice 0" in out and "failover-test: OK" in out
        assert clusterkit.main(["status", *common]) == 0
        assert "status: OK" in capsys.readouterr().out
    finally:
        pids = [read_pid(f) for f in state.glob("*.pid")]
        assert clusterkit.main(["down", *common]) == 0
    # The six nodes (one restarted by the failover test) stopped by PID, PID files gone.
    assert len(pids) == 6 and all(pids)
    assert capsys.readouterr().out.count("stopped pid") == 6
    assert not list(state.glob("*.pid"))
    assert not any(runs_in(p, state) for p in pids if p)


def test_compose_cluster_file_matches_the_makefile_and_validates(tmp_path: Path) -> None:
    """docker-compose.cluster.yml (the docker mode of `make cluster-up`): 3 primaries + 3
    replicas on the Makefile's CLUSTER_PORTS with its node timeout, the relay on
    CLUSTER_RELAY_PORT seeded with nodes of the file; and `docker-compose config` accepts it
    when compose is installed (no engine needed)."""
    import re
    import shutil
    import subprocess

    yaml = pytest.importorskip("yaml")
    repo = Path(clusterkit.__file__).resolve().parent.parent
    make = {}
    for line in (repo / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Z_0-9]+)\s*\?=\s*(.*?)\s*$", line)
        if m:
            make[m.group(1)] = m.group(2)
    text = (repo / "docker-compose.cluster.yml").read_text()
    services = yaml.safe_load(text)["services"]
    nodes = {k: v for k, v in services.items() if k.startswith("cluster-") and k[8:].isdigit()}
    ports = []
    for name, svc in sorted(nodes.items()):
        argv = [str(a) for a in svc["command"]]
        flags = dict(zip(argv[1::2], argv[2::2], strict=False))
        assert argv[0] == "redis-server" and flags["--cluster-enabled"] == "yes", name
        assert flags["--cluster-node-timeout"] == make["CLUSTER_NODE_TIMEOUT_MS"], name
        assert flags["--cluster-announce-hostname"] == svc["container_name"], name
        assert svc["ports"] == [f"{flags['--port']}:{flags['--port']}"], name
        ports.append(flags["--port"])
    assert ",".join(ports) == make["CLUSTER_PORTS"]
    init = services["cluster-init"]
    assert "--cluster-replicas 1" in init["command"][-1]
    assert set(init["depends_on"]) == set(nodes)
    relay = [str(a) for a in services["relay"]["command"]]
    port = relay[relay.index("--port") + 1]
    assert port == make["CLUSTER_RELAY_PORT"]
    assert services["relay"]["ports"] == [f"{port}:{port}"]
    seeds = relay[relay.index("--cluster") + 1].split(",")
    hosts = {svc["container_name"]: svc["command"][2] for svc in nodes.values()}
    for seed in seeds:
        host, _, p = seed.partition(":")
        assert hosts[host] == p, seed

    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed: the file was checked statically only")
    # compose 1.29 predates the top-level `name`, which compose v2 (the Makefile's) reads.
    plain = tmp_path / "docker-compose.cluster.yml"
    plain.write_text("\n".join(x for x in text.splitlines() if not x.startswith("name:")))
    done = subprocess.run(
        [compose, "-f", str(plain), "--project-directory", str(repo), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
