"""Room ordering on a real memory backend: duplicates, gaps, backfill, reset, batching.

The room's state (what a joiner would be served) is checked against the sequential
application of the backend's history."""

from __future__ import annotations

import asyncio
import json

from kasagi_relay import delta
from kasagi_relay.backends.base import Op
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.compaction import compact_room
from kasagi_relay.metrics import Metrics
from kasagi_relay.room import Room


def add(i: int) -> bytes:
    return json.dumps([{"op": "add", "path": f"/k{i}", "value": i}]).encode()


def expected(n: int, start: int = 0) -> dict[str, int]:
    return {f"k{i}": i for i in range(start, n)}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


class Forward:
    """Listener that forwards to a room, or holds ops back to make gaps on purpose."""

    def __init__(self) -> None:
        self.room: Room | None = None
        self.swallow = False

    def on_op(self, room: str, op: Op) -> None:
        if self.room is not None and not self.swallow:
            self.room.on_op(op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        if self.room is not None:
            self.room.start_backfill()


async def make(tick_s: float = 0.0) -> tuple[MemoryBackend, Room, Forward]:
    b = MemoryBackend()
    fwd = Forward()
    b.set_listener(fwd)
    room = Room("r", b, Metrics(), tick_s=tick_s)
    fwd.room = room
    return b, room, fwd


async def test_load_from_snapshot_and_ops() -> None:
    b, room, _ = await make()
    for i in range(5):
        await b.publish("r", "patch", add(i))
    await compact_room(b, "r", history=100)
    for i in range(5, 8):
        await b.publish("r", "patch", add(i))
    state = await room.ensure_loaded()
    assert state.seq == 8
    assert json.loads(state.to_json()) == expected(8)


async def test_a_loaded_room_keeps_its_ops_since_the_snapshot_judged() -> None:
    """Resumes after a load are served from memory, each op as members must get it: one that
    failed at its position as an empty patch (docs/protocol.md, effective changes)."""
    b, room, _ = await make()
    for i in range(3):
        await b.publish("r", "patch", add(i))
    await compact_room(b, "r", history=100)
    await b.publish("r", "patch", b'[{"op":"remove","path":"/nope"}]')
    await b.publish(
        "r", "patch", b'[{"op":"test","path":"/k0","value":0},{"op":"add","path":"/t","value":1}]'
    )
    state = await room.ensure_loaded()
    assert state.seq == 5
    assert [op.seq for op in room.recent] == [4, 5]
    assert room.recent[0].delta == b'{"patch":[]}'
    assert json.loads(room.recent[1].delta)["patch"][1] == {"op": "add", "path": "/t", "value": 1}
    assert json.loads(state.to_json()) == {**expected(3), "t": 1}


async def test_stream_duplicates_and_gap_backfill() -> None:
    b, room, fwd = await make()
    await room.ensure_loaded()
    await b.publish("r", "patch", add(0))
    fwd.swallow = True  # the transport loses 2 and 3
    await b.publish("r", "patch", add(1))
    await b.publish("r", "patch", add(2))
    fwd.swallow = False
    await b.publish("r", "patch", add(3))  # seq 4 arrives: gap -> backfill 2..3
    room.on_op(Op(1, b'{"patch":' + add(0) + b"}"))  # a duplicate: dropped
    await settle()
    assert room.state is not None and room.state.seq == 4
    assert json.loads(room.state.to_json()) == expected(4)


async def test_resync_catches_up_silently_lost_ops() -> None:
    b, room, fwd = await make()
    await room.ensure_loaded()
    fwd.swallow = True
    for i in range(3):
        await b.publish("r", "patch", add(i))
    fwd.swallow = False
    fwd.on_resync(None)
    await settle()
    assert room.state is not None and room.state.seq == 3


async def test_history_lost_resets_from_snapshot() -> None:
    b, room, fwd = await make()
    await room.ensure_loaded()
    fwd.swallow = True
    for i in range(20):
        await b.publish("r", "patch", add(i))
    await compact_room(b, "r", history=2)  # ops 1..18 are gone
    fwd.swallow = False
    await b.publish("r", "patch", add(20))
    await settle()
    assert room.state is not None and room.state.seq == 21
    assert json.loads(room.state.to_json()) == expected(21)


async def test_ops_during_load_are_kept() -> None:
    b, room, _ = await make()
    for i in range(3):
        await b.publish("r", "patch", add(i))
    loading = asyncio.create_task(room.ensure_loaded())
    await asyncio.sleep(0)
    for i in range(3, 6):
        await b.publish("r", "patch", add(i))
    await loading
    await settle()
    assert room.state is not None and room.state.seq == 6
    assert json.loads(room.state.to_json()) == expected(6)


async def test_batches_merge_within_tick_and_fail_as_noops() -> None:
    b, room, _ = await make(tick_s=0.1)
    await room.ensure_loaded()
    await b.publish("r", "patch", add(0))  # first after quiet: flushed at once
    await settle()
    assert room.state is not None and room.state.seq == 1
    for i in range(1, 5):
        await b.publish("r", "patch", add(i))
    await b.publish("r", "patch", b'[{"op":"remove","path":"/nope"}]')  # fails: a no-op
    await b.publish("r", "merge", b'{"k0":null}')
    await asyncio.sleep(0.02)
    assert room.state.seq == 1  # still inside the tick
    assert len(room.queue) == 6
    await asyncio.sleep(0.15)
    assert room.state.seq == 7
    assert json.loads(room.state.to_json()) == expected(5, 1)
    assert len(room.recent) == 7
    # The same as applying the history one by one.
    ops = await b.read_ops("r", 0) or []
    assert json.loads(delta.compact(b"{}", [op.delta for op in ops])) == expected(5, 1)


async def test_recent_ops_are_bounded_by_bytes_and_resumes_read_the_rest() -> None:
    """Big ops do not pile up in the room (count alone let 256 ops of 900 KB stay); resumes
    from before what it keeps read the backend (tests/test_room_offloop.py)."""
    b, room, _ = await make()
    room.recent_bytes = 256 * 1024
    await room.ensure_loaded()
    blob = "b" * 50_000
    for i in range(40):
        await b.publish("r", "merge", json.dumps({"n": i, "blob": blob}).encode())
        await settle()
    assert room.state is not None and room.state.seq == 40
    assert sum(len(op.delta) for op in room.recent) <= 256 * 1024
    assert 0 < len(room.recent) < 10
    assert room.recent[-1].seq == 40
