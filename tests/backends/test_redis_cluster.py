"""The Redis Cluster backend against a real cluster: 3 primaries, 3 replicas
(`redis-server --cluster-enabled yes`, `redis-cli --cluster create`, kit/topology.py), all
on free loopback ports, stopped by PID.

- Backend level: rooms land on every shard and are delivered through sharded pub/sub; a
  service that SSUBSCRIBEs a room's channel sees what `FCALL kasagi_publish 4 ...` announces
  (a plain SUBSCRIBE does not: docs/protocol.md); the library is on every primary.
- Relay level (two relay processes, writers and members from testkit/failover.py): SIGKILL
  of the primary serving the room, SIGSTOP/SIGCONT of it, and a migration of the room's
  slot to another shard, all under load. After each: no acknowledged delta lost, none
  stored twice, no gap or duplicate for any member, every member's state equals the
  history's, a fresh joiner and the compacted snapshot agree, and delivery resumed within
  RESUME_WITHIN_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from redis.exceptions import AuthenticationError

import redis
from kasagi_relay.backends.base import Op
from kasagi_relay.backends.redis_cluster import ClusterBackend, room_slot
from kasagi_relay.backends.redis_link import FUNCTION_VERSION
from kasagi_relay.backends.redis_store import room_keys
from kasagi_relay.domain import BackendUnavailable
from testkit.failover import (
    ROOM,
    Outcome,
    Stream,
    fresh_join_state,
    read_history,
    snapshot_agrees,
    state_of,
    wait_healthy,
)
from testkit.redis import ClusterTopology, Node, Topology, running_cluster
from testkit.relay import RelayProcess, relay_process

pytestmark = pytest.mark.timeout(150)

RESUME_WITHIN_S = 10.0


class RoomShard:
    """What the harness reads the history from (it asks `master_addr()`): the primary
    that serves the harness's room now."""

    def __init__(self, topo: ClusterTopology) -> None:
        self.topo = topo
        self.password = topo.password

    def master_addr(self) -> tuple[str, int]:
        return self.topo.primary_of_slot(room_slot(ROOM)).addr


class _Rec:
    def __init__(self) -> None:
        self.ops: dict[str, list[int]] = {}
        self.resyncs: list[frozenset[str] | None] = []

    def on_op(self, room: str, op: Op) -> None:
        self.ops.setdefault(room, []).append(op.seq)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs.append(rooms)


# --------------------------------------------------------------------------- backend level


async def test_rooms_spread_over_every_shard_and_sharded_subscribers_see_them(
    cluster: ClusterTopology,
) -> None:
    b = ClusterBackend([cluster.servers[0].addr], op_timeout_s=5.0)
    rec = _Rec()
    b.set_listener(rec)
    await b.start()
    try:
        rooms = [f"room{i}" for i in range(30)]
        for room in rooms:
            await b.subscribe(room)
        seqs = await asyncio.gather(*(b.publish(r, "merge", b'{"a":1}', key="k") for r in rooms))
        assert seqs == [1] * len(rooms)
        async with asyncio.timeout(5):
            while sum(len(v) for v in rec.ops.values()) < len(rooms):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert rec.ops == {r: [1] for r in rooms}
        # Each room's keys are on the primary of its slot, and every primary has some.
        by_primary: dict[int, int] = {}
        for room in rooms:
            node = cluster.primary_of_slot(room_slot(room))
            client = cluster.client(node)
            try:
                assert client.get(room_keys(room)["seq"]) == b"1"
            finally:
                client.close()
            by_primary[node.port] = by_primary.get(node.port, 0) + 1
        assert len(by_primary) == 3, by_primary
        health = await b.health()
        assert health["ok"] is True and health["slots_covered"] == 16384
        shards = cast(list[dict[str, object]], health["shards"])
        assert len(shards) == 3 and all(s["ok"] for s in shards)
        # The library is on every primary (loaded at start), and on its replica.
        for node in cluster.servers:
            client = cluster.client(node)
            try:
                if node in cluster.primaries():
                    version = client.fcall_ro("kasagi_version", 0)
                    assert version == FUNCTION_VERSION.encode()
                listed = client.execute_command("FUNCTION", "LIST")  # type: ignore[no-untyped-call]
                assert "kasagi" in str(listed)
            finally:
                client.close()
    finally:
        await b.close()


async def test_other_services_subscribe_with_ssubscribe(cluster: ClusterTopology) -> None:
    """docs/protocol.md: in a cluster, `room:{R}:channel` is a shard channel. A plain
    SUBSCRIBE (even on the right node) hears nothing; SSUBSCRIBE on the room's primary
    hears `{"seq":N,...}`, published by any caller's `FCALL kasagi_publish 4 ...`."""
    b = ClusterBackend([cluster.servers[0].addr], op_timeout_s=5.0)
    await b.start()  # loads the library
    await b.close()
    room = "svc"
    k = room_keys(room)
    node = cluster.primary_of_slot(room_slot(room))
    plain, sharded, writer = (cluster.client(node) for _ in range(3))
    try:
        ps_plain = plain.pubsub()  # type: ignore[no-untyped-call]
        ps_plain.subscribe(k["channel"])
        ps_sharded = sharded.pubsub()  # type: ignore[no-untyped-call]
        ps_sharded.ssubscribe(k["channel"])
        for ps in (ps_plain, ps_sharded):
            assert ps.get_message(timeout=2) is not None  # the confirmation
        seq = writer.execute_command(  # type: ignore[no-untyped-call]
            "FCALL", "kasagi_publish", 4, k["seq"], k["ops"], k["channel"], k["keys"],
            "merge", '{"x":1}',
        )  # fmt: skip
        assert seq == 1
        got = None
        deadline = time.monotonic() + 3
        while got is None and time.monotonic() < deadline:
            got = ps_sharded.get_sharded_message(timeout=0.2)
        assert got is not None and got["type"] == "smessage"
        assert got["data"] == b'{"seq":1,"merge":{"x":1}}'
        assert ps_plain.get_message(timeout=0.3) is None
        ps_plain.close()
        ps_sharded.close()
    finally:
        for c in (plain, sharded, writer):
            c.close()


async def test_backend_follows_a_failover_and_a_slot_move(cluster: ClusterTopology) -> None:
    """SIGKILL of a room's primary: the promoted replica has no replica of its own, so a
    publish at `--ack replica` is stored but not acknowledged (BackendUnavailable) until
    the killed node is back as its replica; the keyed retry then gets the same seq.
    Then the room's slot moves to another shard: publishes follow MOVED and the
    subscription follows the slot."""
    b = ClusterBackend([n.addr for n in cluster.servers], op_timeout_s=15.0)
    rec = _Rec()
    b.set_listener(rec)
    await b.start()
    try:
        room = "p"
        slot = room_slot(room)
        await b.subscribe(room)
        assert await b.publish(room, "merge", b'{"a":1}', key="a") == 1
        old = cluster.primary_of_slot(slot)
        cluster.signal(old, signal.SIGKILL)
        t0 = time.monotonic()
        new = await asyncio.to_thread(cluster.wait_primary_change, slot, old.addr)
        print(f"\nreplica promoted {time.monotonic() - t0:.2f}s after SIGKILL")
        with pytest.raises(BackendUnavailable, match="0 of 1 replica"):
            await b.publish(room, "merge", b'{"b":1}', key="b")
        await asyncio.to_thread(cluster.restart_node, old)
        await asyncio.to_thread(cluster.wait_cluster_ok, 30.0, 1)
        assert await b.publish(room, "merge", b'{"b":1}', key="b") == 2
        print(f"publish acknowledged {time.monotonic() - t0:.2f}s after SIGKILL")
        async with asyncio.timeout(10):
            while not (await b.health())["ok"]:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        shard = b.router.shard_for(room)
        assert shard is not None and shard.link.addr == new
        async with asyncio.timeout(5):
            while rec.ops.get(room, [])[-1:] != [2] and not rec.resyncs:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # The slot moves to another live primary.
        target = next(p for p in cluster.primaries() if p.addr != new)
        await asyncio.to_thread(cluster.migrate_slot, slot, target)
        assert await b.publish(room, "merge", b'{"c":1}', key="c") == 3
        async with asyncio.timeout(10):
            while True:
                shard = b.router.shard_for(room)
                if (
                    shard is not None
                    and shard.link.addr == target.addr
                    and shard.feed.ready.is_set()
                    and room in shard.feed.rooms
                ):
                    break
                await asyncio.sleep(0.05)
        assert await b.publish(room, "merge", b'{"d":1}', key="d") == 4
        async with asyncio.timeout(5):
            while 4 not in rec.ops.get(room, []):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert frozenset({room}) in rec.resyncs or None in rec.resyncs
        ops = await b.read_ops(room, 0)
        assert ops is not None and [o.seq for o in ops] == [1, 2, 3, 4]
    finally:
        await b.close()


async def test_deltas_handed_over_inline_follow_their_slot(cluster: ClusterTopology) -> None:
    """`publish_soon` (the room service's inline hand-over) on a cluster: deltas of rooms on
    every shard join their shard's batch and get seqs in the order handed over; after a
    room's slot moved to another shard, the deltas the old shard refuses (MOVED: they did
    not run) follow the slot, each stored once and answered once, and the ones handed over
    meanwhile follow them, in order (they went to the new shard directly, ahead of the
    refused ones); once none is on its way, they go to the new shard directly."""
    b = ClusterBackend([n.addr for n in cluster.servers], op_timeout_s=15.0)
    b.set_listener(_Rec())
    await b.start()
    got: dict[tuple[str, int], tuple[int | None, BaseException | None]] = {}

    def hand_over(room: str, n: int) -> None:
        def answered(seq: int | None, exc: BaseException | None) -> None:
            assert (room, n) not in got, f"{room} {n} answered twice"
            got[(room, n)] = (seq, exc)

        b.cluster_log.publish_soon(room, "merge", b'{"n":%d}' % n, None, answered)

    try:
        rooms = [f"inline{i}" for i in range(12)]
        assert len({s.name for r in rooms if (s := b.router.shard_for(r)) is not None}) == 3
        for n in range(30):
            for room in rooms:
                hand_over(room, n)
            if n % 4 == 0:
                await asyncio.sleep(0)
        async with asyncio.timeout(10):
            while len(got) < 30 * len(rooms):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        for room in rooms:
            assert [got[(room, n)] for n in range(30)] == [(n + 1, None) for n in range(30)]
        room = rooms[0]
        slot = room_slot(room)
        source = cluster.primary_of_slot(slot)
        target = next(p for p in cluster.primaries() if p.addr != source.addr)
        await asyncio.to_thread(cluster.migrate_slot, slot, target)
        for n in range(30, 60):
            hand_over(room, n)
            if n % 3 == 2:
                await asyncio.sleep(0)  # some refused while later ones are handed over
        async with asyncio.timeout(20):
            while len([k for k in got if k[0] == room]) < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        answers = [got[(room, n)] for n in range(30, 60)]
        assert answers == [(n + 1, None) for n in range(30, 60)]
        shard = b.router.shard_for(room)
        assert shard is not None and shard.link.addr == target.addr
        hand_over(room, 60)
        async with asyncio.timeout(10):
            while (room, 60) not in got:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert got[(room, 60)] == (61, None)
        ops = await b.read_ops(room, 0)
        assert ops is not None and [o.seq for o in ops] == list(range(1, 62))
    finally:
        await b.close()


# --------------------------------------------------------------------------- relay level


def relay_args(topo: ClusterTopology, ack: str = "replica") -> list[str]:
    return [
        "--cluster", topo.seeds(), "--ack", ack,
        "--history", "100000", "--compaction-interval", "1", "--log-level", "info",
        "--rate-limit", "0",
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def two_relays(topo: ClusterTopology) -> AsyncIterator[list[RelayProcess]]:
    args = relay_args(topo)
    async with relay_process(*args) as a, relay_process(*args) as b:
        await wait_healthy([a.url, b.url], None, 20)
        yield [a, b]


def assert_safe(out: Outcome) -> None:
    assert out.acked > 20, "the stream did not flow"
    assert not out.lost, f"acknowledged deltas lost: {out.lost[:10]}"
    assert not out.duplicated, f"deltas stored twice: {out.duplicated[:10]}"
    assert not out.wrong_seq, f"acked seqs differ from history: {out.wrong_seq[:10]}"
    assert not out.violations, f"gaps/duplicates: {out.violations}"
    assert not out.diverged, f"members differ from the history: {out.diverged}"
    assert out.pause_s is not None and out.pause_s < RESUME_WITHIN_S, out.pause_s
    assert out.max_gap_s < RESUME_WITHIN_S, f"no delivery for {out.max_gap_s:.1f}s"


async def run_stream(
    topo: ClusterTopology,
    relays: list[RelayProcess],
    fault: Callable[[], Awaitable[None]],
    name: str,
    *,
    after: int = 40,
) -> Outcome:
    """Stream ~1 s, run `fault()`, stream until `after` more acks; the harness's checks,
    plus a fresh joiner on each relay agreeing with the history."""
    stream = Stream([r.url for r in relays])
    shard = cast(Topology, RoomShard(topo))
    try:
        await stream.start()
        await asyncio.sleep(1.0)
        stream.fault_at = time.monotonic()
        await fault()
        await stream.wait_acks_after(time.monotonic(), after, 30)
        out = await stream.finish(shard)
    finally:
        await stream.cancel()
    print(
        f"\n[{name}] acked={out.acked} last_seq={out.last_seq} lost={len(out.lost)} "
        f"dup={len(out.duplicated)} diverged={len(out.diverged)} resets={out.resets} "
        f"unavailable={out.unavailable} pause={out.pause_s} max_gap={out.max_gap_s:.2f}s"
    )
    assert_safe(out)
    last, ops = await read_history(shard)
    for r in relays:
        assert await fresh_join_state(r.url) == (last, state_of(ops)), f"joiner on {r.url}"
    # Compaction (its lock, snapshot and trim on the room's shard) caught up with it all.
    seq, snap_state, expect = await snapshot_agrees(shard)
    assert seq == last and snap_state == expect
    return out


def room_primary(topo: ClusterTopology) -> Node:
    return topo.primary_of_slot(room_slot(ROOM))


async def test_sigkill_of_the_rooms_primary_under_load(cluster: ClusterTopology) -> None:
    async with two_relays(cluster) as relays:
        old = room_primary(cluster)

        async def fault() -> None:
            cluster.signal(old, signal.SIGKILL)
            await asyncio.to_thread(cluster.wait_primary_change, room_slot(ROOM), old.addr)
            # The promoted replica acknowledges nothing at `--ack replica` until it has a
            # replica again: the killed node comes back as one (as a supervisor would).
            await asyncio.to_thread(cluster.restart_node, old)
            await asyncio.to_thread(cluster.wait_cluster_ok, 30.0, 1)
            await wait_healthy([r.url for r in relays], None, 15)

        await run_stream(cluster, relays, fault, "cluster-sigkill")


async def test_sigstop_sigcont_of_the_rooms_primary_under_load(cluster: ClusterTopology) -> None:
    async with two_relays(cluster) as relays:
        old = room_primary(cluster)

        async def fault() -> None:
            # Thawed after the failover, it rejoins as the promoted replica's replica.
            cluster.signal(old, signal.SIGSTOP)
            await asyncio.to_thread(cluster.wait_primary_change, room_slot(ROOM), old.addr)
            cluster.signal(old, signal.SIGCONT)
            await wait_healthy([r.url for r in relays], None, 15)

        await run_stream(cluster, relays, fault, "cluster-sigstop")
        # The old primary came back as a replica of the promoted one.
        async with asyncio.timeout(15):
            while cluster.role(old) != "slave":  # noqa: ASYNC110
                await asyncio.sleep(0.2)


async def test_slot_migration_under_load(cluster: ClusterTopology) -> None:
    async with two_relays(cluster) as relays:
        source = room_primary(cluster)
        target = next(p for p in cluster.primaries() if p is not source)

        async def fault() -> None:
            moved = await asyncio.to_thread(
                cluster.migrate_slot, room_slot(ROOM), target, dwell_s=0.3
            )
            assert moved >= 3  # seq, ops, sizes, keys...
            assert room_primary(cluster) is target

        await run_stream(cluster, relays, fault, "cluster-migration")
        r = redis.Redis("127.0.0.1", target.port)
        try:
            assert int(r.get(room_keys(ROOM)["seq"]) or 0) > 40
        finally:
            r.close()


async def test_password_and_a_wrong_one(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "pw", password="clusterpw") as topo:
        b = ClusterBackend([topo.servers[0].addr], password="clusterpw", op_timeout_s=5.0)
        await b.start()
        try:
            assert await b.publish("pw", "merge", b'{"a":1}') == 1
            assert (await b.health())["ok"] is True
        finally:
            await b.close()
        bad = ClusterBackend([topo.servers[0].addr], password="wrong", op_timeout_s=5.0)
        with pytest.raises(AuthenticationError):
            await bad.start()
        await bad.close()


async def test_a_primary_that_lost_the_library_gets_it_again(cluster: ClusterTopology) -> None:
    """A primary without the `kasagi` library (a node replaced, FUNCTION FLUSH): the first
    FCALL on it fails with "Function not found", the link loads the library and retries."""
    b = ClusterBackend([cluster.servers[0].addr], op_timeout_s=5.0)
    await b.start()
    try:
        room = "lib"
        node = cluster.primary_of_slot(room_slot(room))
        client = cluster.client(node)
        try:
            client.execute_command("FUNCTION", "FLUSH")  # type: ignore[no-untyped-call]
            assert await b.publish(room, "merge", b'{"a":1}') == 1
            assert client.fcall_ro("kasagi_version", 0) == FUNCTION_VERSION.encode()
        finally:
            client.close()
    finally:
        await b.close()
