"""Fixtures of the backend tests: a real Redis Cluster on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.redis import ClusterTopology, running_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterTopology]:
    """3 primaries with a replica each, stopped by PID at the end of the test."""
    with running_cluster(tmp_path / "cluster") as topo:
        yield topo
