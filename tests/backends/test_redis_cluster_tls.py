"""The Redis Cluster backend over TLS (`--cluster ... --redis-tls-ca CA`): a real cluster of
3 primaries and 3 replicas whose nodes listen for TLS clients on a port of their own and
speak TLS on the cluster bus and for replication (kit/topology.py, ClusterTopology.tls),
with certificates from a throwaway CA (trustme)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from kasagi_relay.backends.base import Op
from kasagi_relay.backends.redis_cluster import ClusterBackend
from kasagi_relay.cli import parse_config
from kasagi_relay.domain import BackendUnavailable
from testkit.redis import ClusterTopology, running_cluster
from testkit.relay import connect_client, relay_process

pytestmark = pytest.mark.timeout(150)


def pem_files(ca: trustme.CA, root: Path) -> tuple[str, str, str]:
    root.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = root / "cert.pem", root / "key.pem", root / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert), str(key), str(ca_file)


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[ClusterTopology, str]]:
    cert, key, ca = pem_files(trustme.CA(), tmp_path / "pki")
    with running_cluster(tmp_path / "cluster", tls=(cert, key, ca)) as topo:
        yield topo, ca


class _Rec:
    def __init__(self) -> None:
        self.ops: dict[str, list[int]] = {}

    def on_op(self, room: str, op: Op) -> None:
        self.ops.setdefault(room, []).append(op.seq)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        pass


async def test_rooms_on_every_shard_over_tls(tls_cluster: tuple[ClusterTopology, str]) -> None:
    topo, ca = tls_cluster
    seed = ("127.0.0.1", topo.tls_ports[topo.servers[0].name])
    b = ClusterBackend([seed], op_timeout_s=5.0, tls={"ssl_ca_certs": ca})
    rec = _Rec()
    b.set_listener(rec)
    await b.start()
    try:
        rooms = [f"room{i}" for i in range(30)]
        for room in rooms:
            await b.subscribe(room)
        # --ack replica (the default): WAIT on each shard, so replication runs over TLS too.
        seqs = await asyncio.gather(*(b.publish(r, "merge", b'{"a":1}', key="k") for r in rooms))
        assert seqs == [1] * len(rooms)
        async with asyncio.timeout(5):
            while sum(len(v) for v in rec.ops.values()) < len(rooms):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert rec.ops == {r: [1] for r in rooms}
        health = await b.health()
        assert health["ok"] is True and health["slots_covered"] == 16384
        # Every shard is reached on its primary's TLS port, not its plain one.
        primaries = {s.primary for s in b.router.shards}
        assert len(primaries) == 3
        assert {port for _, port in primaries} <= set(topo.tls_ports.values())
    finally:
        await b.close()


async def test_a_node_signed_by_another_ca_is_refused(
    tls_cluster: tuple[ClusterTopology, str], tmp_path: Path
) -> None:
    topo, _ = tls_cluster
    _, _, other_ca = pem_files(trustme.CA(), tmp_path / "other")
    seed = ("127.0.0.1", topo.tls_ports[topo.servers[0].name])
    b = ClusterBackend([seed], op_timeout_s=2.0, tls={"ssl_ca_certs": other_ca})
    await b.start()  # the backend keeps looking for a node it can reach
    try:
        health = await b.health()
        assert health["ok"] is False, health
        with pytest.raises(BackendUnavailable):
            await b.publish("room", "merge", b'{"a":1}')
    finally:
        await b.close()


async def test_the_command_line_over_tls(tls_cluster: tuple[ClusterTopology, str]) -> None:
    topo, ca = tls_cluster
    seeds = ",".join(f"127.0.0.1:{topo.tls_ports[n.name]}" for n in topo.servers[:2])
    async with (
        relay_process("--cluster", seeds, "--redis-tls-ca", ca) as proc,
        connect_client(proc.url) as member,
        connect_client(proc.url) as writer,
    ):
        await member.join("tls-room")
        ack = await writer.delta("tls-room", merge={"a": 1})
        assert ack is not None and ack["seq"] == 1
        assert (await member.expect("delta"))["seq"] == 1


def test_redis_tls_ca_needs_cluster(tmp_path: Path) -> None:
    for argv in ([], ["--redis", "redis://127.0.0.1:6379/0"]):
        with pytest.raises(SystemExit) as exc:
            parse_config([*argv, "--redis-tls-ca", str(tmp_path / "ca.pem")])
        assert exc.value.code == 2
