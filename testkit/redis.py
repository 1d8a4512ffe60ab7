"""Real Redis processes for tests: the shared launcher (kit/topology.py) as pytest fixtures
(registered for every test by tests/conftest.py).

    def test_x(sentinel_topology: Topology) -> None:
        host, port = sentinel_topology.master_addr()      # as the Sentinels see it
        sentinel_topology.signal(sentinel_topology.master(), signal.SIGKILL)
        sentinel_topology.wait_master_change((host, port))

Everything runs from the OS's `redis-server` on free loopback ports, in a temp dir per test,
started and stopped by PID (never by name). Without redis-server the tests that need it skip.
The launcher's names are re-exported, so a test imports everything Redis from here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kit.topology import (
    MASTER_NAME,
    REDIS_CLI,
    REDIS_SERVER,
    Addr,
    ClusterTopology,
    LaunchError,
    Node,
    Topology,
    free_port,
    poll,
    start_cluster,
    start_topology,
)

__all__ = [
    "MASTER_NAME",
    "REDIS_CLI",
    "REDIS_SERVER",
    "Addr",
    "ClusterTopology",
    "LaunchError",
    "Node",
    "Topology",
    "free_port",
    "poll",
    "redis_server",
    "running_cluster",
    "running_topology",
    "sentinel_topology",
]


@contextlib.contextmanager
def running_topology(
    root: Path,
    *,
    sentinels: bool = True,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> Iterator[Topology]:
    """kit.topology.running_topology, skipping the test when redis-server is not installed."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"redis-server not found at {REDIS_SERVER} (./scripts/test.sh installs it)")
    topo = start_topology(
        root, sentinels=sentinels, password=password, sentinel_password=sentinel_password
    )
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


@contextlib.contextmanager
def running_cluster(root: Path, **options: Any) -> Iterator[ClusterTopology]:
    """kit.topology.start_cluster (3 primaries, 3 replicas unless told), skipping the test
    when redis-server is not installed; stopped by PID on exit."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"redis-server not found at {REDIS_SERVER} (./scripts/test.sh installs it)")
    topo = start_cluster(root, **options)
    try:
        yield topo
    finally:
        topo.stop()
