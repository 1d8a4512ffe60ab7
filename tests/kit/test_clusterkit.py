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
    ports = [p for p in free_ports(12) if p <= 55535][:6]
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
