"""The storage contract (kasagi_relay/backends/base.py), one suite for every backend.

Each test runs on the memory backend, on one real redis-server, on a real Sentinel
topology (1 master, 2 replicas, 3 Sentinels; ack `replica`) and on a real Redis Cluster
(3 primaries, 3 replicas; ack `replica`; the rooms spread over the shards), through the roles the
backend exposes (`.log`, `.snapshots`, `.feed`). The Redis processes are started once per
module and emptied (FLUSHALL, which keeps the function library) before each test.
What only one backend does is tested in test_memory_backend.py and test_backend_redis.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kasagi_relay import delta
from kasagi_relay.backends.base import Backend, KeyConflict, Op, Snapshot
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.backends.redis import RedisBackend
from kasagi_relay.backends.redis_cluster import ClusterBackend
from kasagi_relay.backends.sentinel import SentinelBackend
from kasagi_relay.compaction import Compactor, RoomLocked, compact_room
from kasagi_relay.domain import delta_digest, op_digest
from kasagi_relay.metrics import Metrics
from testkit.redis import ClusterTopology, Topology, running_cluster, running_topology
from testkit.wait import until

pytestmark = pytest.mark.timeout(120)

KINDS = ["memory", "redis", "sentinel", "cluster"]


class Recorder:
    def __init__(self) -> None:
        self.ops: dict[str, list[Op]] = {}
        self.resyncs: list[frozenset[str] | None] = []

    def on_op(self, room: str, op: Op) -> None:
        self.ops.setdefault(room, []).append(op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs.append(rooms)


def add(i: int) -> bytes:
    return json.dumps([{"op": "add", "path": f"/k{i}", "value": i}]).encode()


@pytest.fixture(scope="module")
def one_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    root: Path = tmp_path_factory.mktemp("contract-redis")
    with running_topology(root, sentinels=False) as topo:
        yield topo


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    root: Path = tmp_path_factory.mktemp("contract-sentinel")
    with running_topology(root) as topo:
        yield topo


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    root: Path = tmp_path_factory.mktemp("contract-cluster")
    with running_cluster(root) as topo:
        yield topo


@pytest.fixture(params=KINDS)
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend: Backend
    if request.param == "memory":
        backend = MemoryBackend()
    elif request.param == "cluster":
        ctopo: ClusterTopology = request.getfixturevalue("cluster")
        for node in ctopo.primaries():
            client = ctopo.client(node)
            try:
                client.flushall()
            finally:
                client.close()
        backend = ClusterBackend([ctopo.servers[0].addr], op_timeout_s=5.0)
    else:
        topo: Topology = request.getfixturevalue(
            "one_redis" if request.param == "redis" else "sentinels"
        )
        master = topo.master() if request.param == "sentinel" else topo.servers[0]
        client = topo.client(master)
        try:
            client.flushall()
        finally:
            client.close()
        if request.param == "redis":
            backend = RedisBackend(f"redis://127.0.0.1:{master.port}/0", op_timeout_s=5.0)
        else:
            backend = SentinelBackend(topo.sentinel_addrs, topo.master_name, op_timeout_s=5.0)
    backend.set_listener(Recorder())
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def recorder(storage: Backend) -> Recorder:
    rec = getattr(storage.feed, "listener", None) or getattr(storage, "_listener", None)
    assert isinstance(rec, Recorder)
    return rec


# --------------------------------------------------------------------------- the log


async def test_seq_history_and_delivery_in_order(storage: Backend) -> None:
    log, feed, rec = storage.log, storage.feed, recorder(storage)
    assert await log.publish("r", "patch", add(0)) == 1  # not subscribed: stored, not delivered
    await feed.subscribe("r")
    seqs = await asyncio.gather(*(log.publish("r", "patch", add(i)) for i in range(1, 6)))
    assert sorted(seqs) == [2, 3, 4, 5, 6]
    await until(lambda: len(rec.ops.get("r", [])) == 5)
    assert [op.seq for op in rec.ops["r"]] == [2, 3, 4, 5, 6]
    assert await log.last_seq("r") == 6
    assert await log.last_seq("other") == 0
    ops = await log.read_ops("r", 0)
    assert ops is not None and [op.seq for op in ops] == [1, 2, 3, 4, 5, 6]
    assert json.loads(ops[0].delta) == {"patch": json.loads(add(0))}
    assert [op.seq for op in await log.read_ops("r", 3, limit=2) or []] == [4, 5]
    assert await log.read_ops("r", 6) == []
    assert await log.read_ops("nowhere", 0) == []
    await feed.unsubscribe("r")
    await log.publish("r", "merge", b'{"x":1}')
    await log.publish("marker", "merge", b"{}")
    await asyncio.sleep(0.2)
    assert len(rec.ops["r"]) == 5
    assert (await storage.health())["ok"] is True


async def test_idempotency_key_answers_a_retry_with_the_first_seq(storage: Backend) -> None:
    log, feed, rec = storage.log, storage.feed, recorder(storage)
    await feed.subscribe("r")
    assert await log.publish("r", "merge", b'{"a":1}', key="k") == 1
    assert await log.publish("r", "merge", b'{"a":1}', key="k") == 1  # the retry
    assert await log.publish("s", "merge", b'{"a":2}', key="k") == 1  # keys are per room
    assert await log.publish("r", "merge", b'{"a":1}', key="k2") == 2
    assert await log.seen_key("r", "k", "merge", b'{"a":1}') == 1
    assert await log.seen_key("r", "other", "merge", b'{"a":1}') is None
    assert await log.seen_key("nowhere", "k", "merge", b'{"a":1}') is None
    assert await log.last_seq("r") == 2  # asking publishes nothing
    await until(lambda: len(rec.ops.get("r", [])) == 2)
    await asyncio.sleep(0.1)
    assert [op.seq for op in rec.ops["r"]] == [1, 2]


async def test_key_conflict_stores_nothing(storage: Backend) -> None:
    """docs/protocol.md: the same key with another delta is `key_conflict`, not the other
    delta's seq (#11 item 10: two clients numbering their keys 1, 2, 3)."""
    log, feed, rec = storage.log, storage.feed, recorder(storage)
    await feed.subscribe("r")
    assert await log.publish("r", "merge", b'{"a":1}', key="1") == 1
    with pytest.raises(KeyConflict) as info:
        await log.publish("r", "merge", b'{"b":2}', key="1")
    assert (info.value.key, info.value.seq) == ("1", 1)
    # The same body as another kind is another delta too.
    with pytest.raises(KeyConflict):
        await log.publish("r", "patch", b'{"a":1}', key="1")
    assert await log.last_seq("r") == 1
    ops = await log.read_ops("r", 0)
    assert ops is not None and [json.loads(op.delta) for op in ops] == [{"merge": {"a": 1}}]
    with pytest.raises(KeyConflict) as info:
        await log.seen_key("r", "1", "merge", b'{"b":2}')
    assert info.value.seq == 1
    # The retry of the first delta still gets its seq; a fresh key is stored.
    assert await log.publish("r", "merge", b'{"a":1}', key="1") == 1
    assert await log.publish("r", "merge", b'{"b":2}', key="2") == 2
    await until(lambda: len(rec.ops.get("r", [])) == 2)
    await asyncio.sleep(0.1)
    assert [op.seq for op in rec.ops["r"]] == [1, 2]


async def test_flat_methods_delegate_to_the_roles(storage: Backend) -> None:
    """The earlier flat interface keeps working while consumers move to the roles; its
    `seen_key(room, key)` (no delta given) answers the seq whatever the delta."""
    assert await storage.publish("f", "merge", b'{"a":1}', key="k") == 1
    assert await storage.seen_key("f", "k") == 1
    assert await storage.seen_key("f", "k", "merge", b'{"a":1}') == 1
    with pytest.raises(KeyConflict):
        await storage.seen_key("f", "k", "merge", b'{"a":2}')
    assert await storage.seen_key("f", "unknown") is None
    assert await storage.last_seq("f") == await storage.log.last_seq("f") == 1
    assert await storage.read_ops("f", 0) == await storage.log.read_ops("f", 0)
    assert await storage.write_snapshot("f", Snapshot(1, b'{"a":1}'))
    assert await storage.read_snapshot("f") == await storage.snapshots.read_snapshot("f")
    token = await storage.acquire_lock("f", 5_000)
    assert token is not None and await storage.snapshots.acquire_lock("f", 5_000) is None
    await storage.release_lock("f", token)
    await storage.trim("f", 2, 10)
    assert await storage.log.read_ops("f", 0) is None


# --------------------------------------------------------------------------- snapshots


async def test_snapshot_only_if_newer(storage: Backend) -> None:
    snaps = storage.snapshots
    assert await snaps.read_snapshot("s") is None
    for _ in range(5):
        await storage.log.publish("s", "merge", b'{"a":1}')
    assert await snaps.write_snapshot("s", Snapshot(3, b'{"v":3}', tick=7))
    assert not await snaps.write_snapshot("s", Snapshot(3, b'{"v":"again"}'))
    assert not await snaps.write_snapshot("s", Snapshot(2, b'{"v":2}'))
    assert await snaps.read_snapshot("s") == Snapshot(3, b'{"v":3}', 7)
    with pytest.raises(ValueError, match="past the room seq"):
        await snaps.write_snapshot("s", Snapshot(9, b"{}"))
    with pytest.raises(ValueError, match="past the room seq"):
        await snaps.write_snapshot("empty", Snapshot(1, b"{}"))


async def test_trim_by_count_and_age_never_past_the_snapshot(storage: Backend) -> None:
    log, snaps = storage.log, storage.snapshots
    for i in range(10):
        await log.publish("h", "merge", f'{{"i":{i}}}'.encode())
    await snaps.trim("h", keep_from=8, max_len=2)
    assert [op.seq for op in await log.read_ops("h", 0) or []] == list(range(1, 11))
    assert await snaps.write_snapshot("h", Snapshot(6, b'{"i":5}'))
    await snaps.trim("h", keep_from=8, max_len=100)
    assert await log.read_ops("h", 0) is None  # 1..6 gone: a reader must reset
    assert [op.seq for op in await log.read_ops("h", 6) or []] == [7, 8, 9, 10]
    assert await snaps.write_snapshot("h", Snapshot(10, b'{"i":9}'))
    await snaps.trim("h", keep_from=0, max_len=2)
    assert await log.read_ops("h", 7) is None
    assert [op.seq for op in await log.read_ops("h", 8) or []] == [9, 10]


async def test_history_bounded_by_bytes(storage: Backend) -> None:
    """#11 item 6: deltas of 1 KB with a 3.5 KB budget keep 3; never past the snapshot."""
    log, snaps = storage.log, storage.snapshots

    def body(i: int) -> bytes:
        return json.dumps({"v": str(i) * 1000}).encode()

    assert all(1000 < len(body(i)) < 1100 for i in range(10))
    for i in range(10):
        await log.publish("b", "merge", body(i))
    # Nothing covered by a snapshot yet: the budget cannot drop anything.
    await snaps.trim("b", keep_from=0, max_len=1000, max_bytes=3500)
    assert len(await log.read_ops("b", 0) or []) == 10
    assert await snaps.write_snapshot("b", Snapshot(5, b"{}"))
    await snaps.trim("b", keep_from=0, max_len=1000, max_bytes=3500)
    assert await log.read_ops("b", 4) is None
    assert [op.seq for op in await log.read_ops("b", 5) or []] == [6, 7, 8, 9, 10]
    assert await snaps.write_snapshot("b", Snapshot(10, b"{}"))
    await snaps.trim("b", keep_from=0, max_len=1000, max_bytes=3500)
    assert await log.read_ops("b", 6) is None
    kept = await log.read_ops("b", 7)
    assert kept is not None and [op.seq for op in kept] == [8, 9, 10]
    assert json.loads(kept[0].delta) == {"merge": json.loads(body(7))}
    # One delta larger than the budget: nothing of it is kept once covered.
    await log.publish("b", "merge", json.dumps({"v": "x" * 5000}).encode())
    assert await snaps.write_snapshot("b", Snapshot(11, b"{}"))
    await snaps.trim("b", keep_from=0, max_len=1000, max_bytes=3500)
    assert await log.read_ops("b", 10) is None
    assert await log.read_ops("b", 11) == []
    assert await log.last_seq("b") == 11


async def test_compaction_folds_history_into_the_snapshot(storage: Backend) -> None:
    log = storage.log
    for i in range(10):
        await log.publish("r", "patch", add(i))
    snap = await compact_room(storage, "r", history=3)
    assert snap is not None and snap.seq == 10
    assert json.loads(snap.data) == {f"k{i}": i for i in range(10)}
    assert await log.read_ops("r", 6) is None
    assert [op.seq for op in await log.read_ops("r", 7) or []] == [8, 9, 10]
    assert await compact_room(storage, "r", history=3) is None  # nothing new
    await log.publish("r", "patch", b'[{"op":"remove","path":"/k0"}]')
    await log.publish("r", "patch", b'[{"op":"remove","path":"/missing"}]')  # a no-op
    snap2 = await compact_room(storage, "r", history=3)
    assert snap2 is not None and snap2.seq == 12
    assert json.loads(snap2.data) == {f"k{i}": i for i in range(1, 10)}
    assert delta.RoomState(snap2.data, snap2.seq).seq == 12


async def test_live_snapshot_only_on_the_stored_ops(storage: Backend) -> None:
    """`write_live_snapshot` (compaction from a relay's state): newer, and only while the
    history holds the last ops the relay names, at their seqs; on a cluster, on the room's
    shard."""
    log, snaps = storage.log, storage.snapshots
    for i in range(4):
        await log.publish("v", "patch", add(i))
    ops = await log.read_ops("v", 0)
    assert ops is not None and await snaps.snapshot_seq("v") == 0
    state = delta.compact(b"{}", [op.delta for op in ops[:3]])
    digests = [op_digest(op.seq, op.delta) for op in ops]  # digests[i]: seq i + 1
    # The op at 3 as the feed delivers it and as the history gives it: one identity.
    assert op_digest(3, b'{"seq":3,' + ops[2].delta[1:]) == digests[2]
    refused = [
        (3, [digests[1]]),  # another op at 3
        (3, [digests[2], digests[2]]),  # the op before it differs
        (5, [digests[3]]),  # past the room's seq
    ]
    for seq, named in refused:
        assert await snaps.write_live_snapshot("v", Snapshot(seq, state), named) is None
    assert await snaps.read_snapshot("v") is None
    assert await snaps.write_live_snapshot("v", Snapshot(3, state), digests[2::-1])
    assert await snaps.snapshot_seq("v") == 3
    snap = await snaps.read_snapshot("v")
    assert snap is not None and (snap.seq, snap.data, snap.tick) == (3, state, 0)
    # Not newer (whatever the ops): False, nothing changed.
    assert await snaps.write_live_snapshot("v", Snapshot(3, b"{}"), ["0" * 40]) is False
    assert await snaps.write_live_snapshot("v", Snapshot(2, b"{}"), [digests[1]]) is False
    snap = await snaps.read_snapshot("v")
    assert snap is not None and snap.data == state
    # Once trimmed behind the snapshot, a live state of 4 naming op 3 is refused: the store
    # can no longer vouch for it (the relay falls back to the history).
    await snaps.trim("v", keep_from=4, max_len=1000)
    assert await snaps.write_live_snapshot("v", Snapshot(4, b"{}"), digests[3:1:-1]) is None
    assert await snaps.write_live_snapshot("v", Snapshot(4, b"{}"), [digests[3]])


async def test_compaction_trims_by_bytes(storage: Backend) -> None:
    """The Compactor passes `history_bytes`: a room of large deltas keeps what fits."""
    seqs = {"big": 0}
    for i in range(8):
        seqs["big"] = await storage.log.publish(
            "big", "merge", json.dumps({"v": str(i) * 2000}).encode()
        )
    compactor = Compactor(
        storage,
        lambda: seqs.items(),
        Metrics(),
        interval_s=0,
        history=1000,
        history_age_s=600,
        history_bytes=5000,
    )
    assert await compactor.run_once() == 1
    ops = await storage.log.read_ops("big", 6)
    assert ops is not None and [op.seq for op in ops] == [7, 8]
    assert await storage.log.read_ops("big", 5) is None
    snap = await storage.snapshots.read_snapshot("big")
    assert snap is not None and snap.seq == 8 and json.loads(snap.data) == {"v": "7" * 2000}


async def test_locks(storage: Backend) -> None:
    snaps = storage.snapshots
    token = await snaps.acquire_lock("l", 5_000)
    assert token is not None
    assert await snaps.acquire_lock("l", 5_000) is None
    with pytest.raises(RoomLocked):  # locked elsewhere: not done
        await compact_room(storage, "l", history=10)
    await snaps.release_lock("l", "not-the-token")
    assert await snaps.acquire_lock("l", 5_000) is None
    await snaps.release_lock("l", token)
    again = await snaps.acquire_lock("l", 100)
    assert again is not None
    await asyncio.sleep(0.2)  # expired
    assert await snaps.acquire_lock("l", 100) is not None


async def test_compactor_retries_a_room_whose_lock_was_held(storage: Backend) -> None:
    """A lock left by a compaction that died (say, with the old master) only delays the
    room. It gets no new ops after the lock is taken, so a compactor that took "locked"
    for "done" would never write its snapshot."""
    seqs = {"r": 0}
    for i in range(3):
        seqs["r"] = await storage.log.publish("r", "patch", add(i))
    assert await storage.snapshots.acquire_lock("r", 300) is not None  # never released
    compactor = Compactor(
        storage, lambda: seqs.items(), Metrics(), interval_s=0, history=1000, history_age_s=60
    )
    assert await compactor.run_once() == 0
    assert await storage.snapshots.read_snapshot("r") is None
    await asyncio.sleep(0.4)  # the lock expires
    assert await compactor.run_once() == 1
    snap = await storage.snapshots.read_snapshot("r")
    assert snap is not None and snap.seq == 3


async def test_compactor_trims_history_by_age(storage: Backend) -> None:
    seqs = {"r": 0}
    compactor = Compactor(
        storage, lambda: seqs.items(), Metrics(), interval_s=0, history=1000, history_age_s=0.2
    )
    for i in range(5):
        seqs["r"] = await storage.log.publish("r", "patch", add(i))
    assert await compactor.run_once() == 1  # snapshot at 5, nothing old enough to trim
    assert len(await storage.log.read_ops("r", 0) or []) == 5
    await asyncio.sleep(0.3)
    for i in range(5, 8):
        seqs["r"] = await storage.log.publish("r", "patch", add(i))
    assert await compactor.run_once() == 1
    # Ops 1..5 are older than the age limit: gone; 6..8 stay for resumes.
    assert await storage.log.read_ops("r", 4) is None
    assert [op.seq for op in await storage.log.read_ops("r", 5) or []] == [6, 7, 8]


def test_digest_is_sha1_of_kind_and_body() -> None:
    """The digest every backend stores with a key (kasagi.lua computes the same)."""
    import hashlib

    assert delta_digest("merge", b'{"a":1}') == hashlib.sha1(b'merge:{"a":1}').hexdigest()
