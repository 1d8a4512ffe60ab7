"""Room ordering on a real memory backend: duplicates, gaps, backfill, reset, batching.

The room's state (what a joiner would be served) is checked against the sequential
application of the backend's history."""

from __future__ import annotations

import asyncio
import json
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kasagi_relay import delta
from kasagi_relay.backends.base import Op
from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.compaction import compact_room
from kasagi_relay.domain import delta_doc
from kasagi_relay.metrics import Metrics
from kasagi_relay.room import GROWTH, MEMORY_GROWTH, Room, _merge_fits
from testkit.wait import until
from tests.test_delta_properties import MERGE_PATCHES, SETTINGS, dumps, histories


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
    # A tick long enough that the check "still inside the tick" holds on a loaded machine.
    b, room, _ = await make(tick_s=0.5)
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
    await until(lambda: room.state is not None and room.state.seq == 7)
    assert len(room.queue) == 0
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


async def test_merge_patches_far_from_the_limits_are_not_checked_near_them_they_are() -> None:
    """A merge patch can only be refused for the state's size: far from --max-state-bytes
    and --max-state-memory it is taken without a check and without the copy of the state
    that checks behind queued ops use (`_head`); near them it is checked against that copy
    and refused as it would be after the queued ops."""
    b = MemoryBackend()
    fwd = Forward()
    b.set_listener(fwd)
    room = Room("r", b, Metrics(), tick_s=0.5, max_bytes=2_000, max_memory=1_000_000)
    fwd.room = room
    await room.ensure_loaded()
    await b.publish("r", "patch", add(0))  # the first after a quiet tick goes at once
    await settle()
    for i in range(1, 4):
        await b.publish("r", "patch", add(i))
    assert len(room.queue) == 3
    assert room.check_now(delta_doc("merge", b'{"m":1}'))
    assert room._head is None
    # 1,975 bytes fit in 2,000 with the state, not with the queued ops: refused on the copy.
    big = delta_doc("merge", b'{"big":"' + b"x" * 1_975 + b'"}')
    with pytest.raises(delta.TooLarge):
        room.check_now(big)
    assert room._head is not None and room._head.seq == 4
    # A patch is always checked: its paths must exist.
    with pytest.raises(delta.DeltaError):
        room.check_now(delta_doc("patch", b'[{"op":"remove","path":"/k9"}]'))
    assert room.check_now(delta_doc("patch", b'[{"op":"remove","path":"/k3"}]'))


# Merge patches near the bounds' worst cases: many nodes per byte (NODE_BYTES each), and
# numbers the engine writes back longer (`1e15` is `1000000000000000.0`).
DENSE_MERGES = st.sampled_from(
    [
        b"[" + b",".join([b"0"] * 1_000) + b"]",
        b"[" + b",".join([b"[]"] * 500) + b"]",
        b'{"a":[' + b",".join([b"{}"] * 500) + b"]}",
        b"[" + b",".join([b"1e15"] * 500) + b"]",
        b'{"a":1e15,"b":-1E15,"c":[1e9,1e-7]}',
    ]
)


@SETTINGS
@given(
    history=histories(),
    body=st.one_of(MERGE_PATCHES.map(dumps), DENSE_MERGES),
    limits=st.sampled_from(["bytes", "memory", "both"]),
)
def test_a_merge_patch_said_to_fit_passes_its_check(
    engines: ModuleType, history: tuple[bytes, list[bytes]], body: bytes, limits: str
) -> None:
    """`_merge_fits`'s bounds hold for any state, queued ops (no `copy`, as check_now
    requires) and merge patch, with the limits set at the least values they allow: the
    check on the state with the queued ops applied passes."""
    state_doc, queued = history
    queued = [d for d in queued if d.find(b'"copy"') < 0]
    doc = delta_doc("merge", body)
    total = len(doc) + sum(len(d) for d in queued)
    probe = engines.RoomState(state_doc, 0)
    size, memory = probe.json_size(), probe.memory_size()
    max_bytes = size + GROWTH * total if limits != "memory" else 0
    max_memory = memory + MEMORY_GROWTH * total if limits != "bytes" else 0
    state = engines.RoomState(state_doc, 0, max_bytes, max_memory)
    assert _merge_fits(state, size, total, max_bytes, max_memory)
    head = state.copy()
    for seq, d in enumerate(queued, 1):
        head.apply(d, seq)
    head.check(doc)
