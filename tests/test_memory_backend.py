"""The embedded backend keeps the whole Backend contract (base.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from kasagi_relay import delta
from kasagi_relay.backends.base import Op, Snapshot
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.compaction import RoomLocked, compact_room


class Recorder:
    def __init__(self) -> None:
        self.ops: list[tuple[str, Op]] = []
        self.resyncs: list[frozenset[str] | None] = []

    def on_op(self, room: str, op: Op) -> None:
        self.ops.append((room, op))

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs.append(rooms)


def add(i: int) -> bytes:
    return json.dumps([{"op": "add", "path": f"/k{i}", "value": i}]).encode()


async def test_seq_history_and_delivery_in_order() -> None:
    b = MemoryBackend()
    rec = Recorder()
    b.set_listener(rec)
    await b.start()
    assert await b.publish("r", "patch", add(0)) == 1  # not subscribed: stored, not delivered
    await b.subscribe("r")
    seqs = await asyncio.gather(*(b.publish("r", "patch", add(i)) for i in range(1, 6)))
    assert sorted(seqs) == [2, 3, 4, 5, 6]
    assert [op.seq for _, op in rec.ops] == [2, 3, 4, 5, 6]
    assert await b.last_seq("r") == 6
    assert await b.last_seq("other") == 0
    ops = await b.read_ops("r", 0)
    assert ops is not None and [op.seq for op in ops] == [1, 2, 3, 4, 5, 6]
    assert ops[0].delta == b'{"patch":' + add(0) + b"}"
    assert [op.seq for op in await b.read_ops("r", 3, limit=2) or []] == [4, 5]
    assert await b.read_ops("r", 6) == []
    assert await b.read_ops("nowhere", 0) == []
    await b.unsubscribe("r")
    await b.publish("r", "merge", b'{"x":1}')
    assert len(rec.ops) == 5
    assert (await b.health())["ok"] is True
    await b.close()


async def test_idempotency_keys_per_room_and_expiry() -> None:
    b = MemoryBackend(key_ttl_s=0.2)
    rec = Recorder()
    b.set_listener(rec)
    await b.subscribe("r")
    assert await b.publish("r", "merge", b'{"a":1}', key="k") == 1
    assert await b.publish("r", "merge", b'{"a":2}', key="k") == 1
    assert await b.publish("s", "merge", b'{"a":2}', key="k") == 1  # another room
    assert len(rec.ops) == 1
    assert (await b.seen_key("r", "k"), await b.seen_key("r", "other")) == (1, None)
    assert await b.seen_key("nowhere", "k") is None
    assert len(rec.ops) == 1  # asking publishes nothing
    await asyncio.sleep(0.25)
    assert await b.seen_key("r", "k") is None  # expired
    assert await b.publish("r", "merge", b'{"a":3}', key="k") == 2


async def test_snapshot_trim_and_compaction() -> None:
    b = MemoryBackend()
    for i in range(10):
        await b.publish("r", "patch", add(i))
    # Trim never drops what no snapshot covers.
    await b.trim("r", keep_from=8, max_len=2)
    assert len(await b.read_ops("r", 0) or []) == 10
    snap = await compact_room(b, "r", history=3)
    assert snap is not None and snap.seq == 10
    assert json.loads(snap.data) == {f"k{i}": i for i in range(10)}
    # History now keeps 3 entries: resumes from 7 on work, older ones cannot.
    assert await b.read_ops("r", 6) is None
    assert [op.seq for op in await b.read_ops("r", 7) or []] == [8, 9, 10]
    # Only newer snapshots are stored.
    assert not await b.write_snapshot("r", Snapshot(5, b"{}"))
    assert (await b.read_snapshot("r")) == snap
    with pytest.raises(ValueError):
        await b.write_snapshot("r", Snapshot(11, b"{}"))
    # Nothing new: no snapshot written.
    assert await compact_room(b, "r", history=3) is None
    # The state rebuilt from snapshot + ops equals the sequential one.
    await b.publish("r", "patch", b'[{"op":"remove","path":"/k0"}]')
    await b.publish("r", "patch", b'[{"op":"remove","path":"/missing"}]')  # a no-op
    snap2 = await compact_room(b, "r", history=3)
    assert snap2 is not None and snap2.seq == 12
    assert json.loads(snap2.data) == {f"k{i}": i for i in range(1, 10)}
    assert delta.RoomState(snap2.data, snap2.seq).seq == 12


async def test_locks() -> None:
    b = MemoryBackend()
    token = await b.acquire_lock("r", 100)
    assert token is not None
    assert await b.acquire_lock("r", 100) is None
    with pytest.raises(RoomLocked):  # locked elsewhere: not done
        await compact_room(b, "r", history=10)
    await b.release_lock("r", "not-the-token")
    assert await b.acquire_lock("r", 100) is None
    await b.release_lock("r", token)
    again = await b.acquire_lock("r", 50)
    assert again is not None
    await asyncio.sleep(0.07)  # expired
    assert await b.acquire_lock("r", 50) is not None


async def test_compactor_retries_a_room_whose_lock_was_held() -> None:
    """A lock left by a compaction that died (say, with the old master) only delays the room.

    The room gets no new ops after the lock is taken, so a compactor that took "locked" for
    "done" would never write its snapshot.
    """
    from kasagi_relay.compaction import Compactor
    from kasagi_relay.metrics import Metrics

    b = MemoryBackend()
    seqs = {"r": 0}
    for i in range(3):
        seqs["r"] = await b.publish("r", "patch", add(i))
    assert await b.acquire_lock("r", 100) is not None  # its holder never releases it
    compactor = Compactor(
        b, lambda: seqs.items(), Metrics(), interval_s=0, history=1000, history_age_s=60
    )
    assert await compactor.run_once() == 0
    assert await b.read_snapshot("r") is None
    await asyncio.sleep(0.15)  # the lock expires
    assert await compactor.run_once() == 1
    snap = await b.read_snapshot("r")
    assert snap is not None and snap.seq == 3


async def test_compactor_trims_history_by_age() -> None:
    from kasagi_relay.compaction import Compactor
    from kasagi_relay.metrics import Metrics

    b = MemoryBackend()
    seqs = {"r": 0}
    compactor = Compactor(
        b, lambda: seqs.items(), Metrics(), interval_s=0, history=1000, history_age_s=0.1
    )
    for i in range(5):
        seqs["r"] = await b.publish("r", "patch", add(i))
    assert await compactor.run_once() == 1  # snapshot at 5, nothing old enough to trim
    assert len(await b.read_ops("r", 0) or []) == 5
    await asyncio.sleep(0.15)
    for i in range(5, 8):
        seqs["r"] = await b.publish("r", "patch", add(i))
    assert await compactor.run_once() == 1
    # Ops 1..5 are older than the age limit: gone; 6..8 stay for resumes.
    assert await b.read_ops("r", 4) is None
    assert [op.seq for op in await b.read_ops("r", 5) or []] == [6, 7, 8]
    snap = await b.read_snapshot("r")
    assert snap is not None and snap.seq == 8
