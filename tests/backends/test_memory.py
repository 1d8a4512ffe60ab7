"""What only the embedded backend does; the storage contract is tests/test_storage_contract.py.

The memory backend forgets as Redis expires keys (#11 item 6): rooms nobody uses, expired
idempotency keys, locks and subscriptions leave nothing behind, and a room's history stays
within its byte budget as far as the snapshot covers it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasagi_relay.backends.base import KeyConflict, Op, Snapshot
from kasagi_relay.backends.factory import build_backend
from kasagi_relay.backends.memory import MemoryBackend, _Room
from kasagi_relay.config import Config


class Recorder:
    def __init__(self) -> None:
        self.ops: list[tuple[str, Op]] = []
        self.resyncs: list[frozenset[str] | None] = []

    def on_op(self, room: str, op: Op) -> None:
        self.ops.append((room, op))

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        self.resyncs.append(rooms)


class Clock:
    """Time the test steps by hand: TTL tests that slept were at the mercy of a loaded
    machine (300 publishes once took long enough to expire the room about to be read)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def step(self, seconds: float) -> None:
        self.t += seconds


def add(i: int) -> bytes:
    return json.dumps([{"op": "add", "path": f"/k{i}", "value": i}]).encode()


async def test_idempotency_keys_expire() -> None:
    clock = Clock()
    b = MemoryBackend(key_ttl_s=0.2, clock=clock)
    assert await b.log.publish("r", "merge", b'{"a":1}', key="k") == 1
    with pytest.raises(KeyConflict):
        await b.log.publish("r", "merge", b'{"a":2}', key="k")
    clock.step(0.25)
    assert await b.log.seen_key("r", "k", "merge", b'{"a":1}') is None  # expired
    assert await b.log.publish("r", "merge", b'{"a":2}', key="k") == 2  # a new delta now
    # Expired keys of every room are dropped, not only those of the room written to.
    for i in range(50):
        await b.log.publish(f"room{i}", "merge", b"{}", key="once")
    assert len(b.table.keys) == 51
    clock.step(0.25)
    await b.log.last_seq("any")
    assert len(b.table.keys) == 0


async def test_rooms_nobody_uses_are_forgotten() -> None:
    """300 rooms written once are gone after room_ttl_s (they stayed forever before);
    a room read meanwhile, or one a relay is subscribed to, stays."""
    clock = Clock()
    b = MemoryBackend(room_ttl_s=0.3, clock=clock)
    rec = Recorder()
    b.set_listener(rec)
    for i in range(300):
        await b.log.publish(f"room{i}", "merge", b'{"a":1}', key="k")
    await b.snapshots.write_snapshot("room0", Snapshot(1, b'{"a":1}'))
    await b.feed.subscribe("room1")
    assert (await b.health())["rooms"] == 300
    clock.step(0.2)
    assert await b.log.last_seq("room2") == 1  # read: used
    clock.step(0.2)
    # Expiry is amortized over calls: a few calls let it catch up with 300 rooms.
    for _ in range(40):
        await b.log.last_seq("nowhere")
    assert (await b.health())["rooms"] == 2
    assert await b.log.last_seq("room1") == 1  # subscribed: kept
    assert await b.log.last_seq("room2") == 1
    # A forgotten room starts over, as after its Redis keys expired: empty, with no
    # snapshot, and its idempotency keys do not answer for the new room.
    assert await b.log.last_seq("room0") == 0
    assert await b.snapshots.read_snapshot("room0") is None
    assert await b.log.publish("room0", "merge", b'{"b":2}', key="k") == 1
    assert await b.log.read_ops("room0", 0) == [Op(1, b'{"merge":{"b":2}}')]
    # Unsubscribed, room1 becomes idle from then on.
    await b.feed.unsubscribe("room1")
    clock.step(0.35)
    for _ in range(5):
        await b.log.last_seq("nowhere")
    assert await b.log.last_seq("room1") == 0


async def test_join_leave_churn_leaves_no_entries() -> None:
    """What a join and a leave of an empty room do (subscribe, read snapshot and ops,
    compaction's lock, unsubscribe) stores nothing."""
    b = MemoryBackend()
    b.set_listener(Recorder())
    for i in range(200):
        room = f"churn{i}"
        await b.feed.subscribe(room)
        assert await b.snapshots.read_snapshot(room) is None
        assert await b.log.read_ops(room, 0) == []
        assert await b.log.last_seq(room) == 0
        assert await b.log.seen_key(room, "k", "merge", b"{}") is None
        token = await b.snapshots.acquire_lock(room, 10_000)
        assert token is not None
        await b.snapshots.trim(room, 0, 10, 100)
        assert not await b.snapshots.write_snapshot(room, Snapshot(0, b"{}"))
        await b.snapshots.release_lock(room, token)
        await b.feed.unsubscribe(room)
    t = b.table
    assert (len(t.rooms), len(t.keys), len(t.locks), len(t.subscribed)) == (0, 0, 0, 0)


async def test_history_bytes_bound_each_publish() -> None:
    """#11 item 6: 400 deltas of 90 KB to a room whose state stays small. Between
    compactions the history grows, but once a snapshot covers it, every publish keeps the
    room within history_bytes (plus what the snapshot does not cover yet)."""
    budget = 1024 * 1024
    b = MemoryBackend(history_bytes=budget)
    body = json.dumps({"v": "x" * 90_000}).encode()
    peak = 0
    for i in range(1, 401):
        await b.log.publish("big", "merge", body)
        if i % 20 == 0:  # a compaction every 20 deltas
            assert await b.snapshots.write_snapshot("big", Snapshot(i, body))
        ops = await b.log.read_ops("big", (await b.log.last_seq("big")) - 1000) or []
        held = sum(len(op.delta) for op in ops)
        if i > 20:
            peak = max(peak, held)
    # At most the budget (covered) plus the 20 deltas after the last snapshot.
    assert peak <= budget + 20 * (len(body) + 20)
    assert b.table.rooms["big"].history_bytes <= budget + 20 * len(body)
    # Trimmed as the Compactor does after its snapshot at 400, the history is what fits:
    # the newest deltas, gapless.
    await b.snapshots.trim("big", 0, 1000, budget)
    fit = budget // len(body)
    assert await b.log.read_ops("big", 400 - fit - 1) is None
    kept = await b.log.read_ops("big", 400 - fit)
    assert kept is not None and [op.seq for op in kept] == list(range(401 - fit, 401))


async def test_factory_passes_the_limits() -> None:
    b = build_backend(Config(room_ttl_s=12.5, history_bytes=4096))
    assert isinstance(b, MemoryBackend)
    assert (b.table.room_ttl_s, b.table.history_bytes) == (12.5, 4096)


@settings(max_examples=300, deadline=None)
@given(
    first=st.integers(1, 50),
    sizes=st.lists(st.integers(0, 100), max_size=60),
    covered=st.integers(0, 120),
    cut=st.integers(-5, 130),
)
def test_trimming_keeps_exactly_the_ops_from_the_cut_and_their_bytes(
    first: int, sizes: list[int], covered: int, cut: int
) -> None:
    """`drop_before` drops the ops before `cut` but none the snapshot does not cover,
    whether it drops them one by one or, for many, by copying what stays."""
    room = _Room(seq=first + len(sizes) - 1)
    for i, size in enumerate(sizes):
        room.ops.append((Op(first + i, b"{}"), size))
    room.history_bytes = sum(sizes)
    if covered:
        room.snapshot = Snapshot(covered, b"{}")
    room.drop_before(cut)
    keep_from = min(cut, covered + 1)
    want = [(first + i, size) for i, size in enumerate(sizes) if first + i >= keep_from]
    assert [(op.seq, size) for op, size in room.ops] == want
    assert room.history_bytes == sum(size for _, size in want)
