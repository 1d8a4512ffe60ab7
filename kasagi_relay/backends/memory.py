"""The embedded backend: everything in this process, no Redis.

It keeps the whole storage contract (base.py) so the relay behaves the same as on Redis: a
seq per room, a trimmed history for resumes, snapshots written only when newer, idempotency
keys with the digest of their delta for IDEMPOTENCY_TTL_S, short locks, and delivery of
each delta to the listener in order. Nothing survives a restart.

Its memory is bounded the way Redis bounds a room's keys (docs/operations.md, limits):
- a room nobody wrote to nor read for `room_ttl_s`, and no relay is subscribed to, is
  forgotten as a whole, as if its keys had expired (a later join finds an empty room);
- idempotency keys expire after `key_ttl_s`, all rooms' keys in one queue in expiry order;
- a room's history is kept within `history_bytes` of delta bodies (0: no limit) on every
  publish, as far as the snapshot covers it (the Compactor trims the rest by count, age
  and bytes);
- locks, subscriptions and rooms with nothing stored leave no entry behind.
Expiry is amortized: each call pops what has expired from the front of the queues.

The roles (`MemoryLog`, `MemorySnapshots`, `MemoryFeed`) share one `RoomTable`;
`MemoryPresence` (the fourth role) keeps each room's entries with their expiry, as the
Redis backends do (an entry not refreshed within its time to live is taken out, its leave
announced, by the next refresh or read of the room).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter

from kasagi_relay.backends.base import (
    IDEMPOTENCY_TTL_S,
    Backend,
    DeltaKind,
    KeyConflict,
    Listener,
    Op,
    PresenceListener,
    PresenceOp,
    Snapshot,
)
from kasagi_relay.domain import LIVE_DIGESTS, delta_digest, delta_doc, op_digest

__all__ = [
    "MemoryBackend",
    "MemoryFeed",
    "MemoryLog",
    "MemoryPresence",
    "MemorySnapshots",
    "RoomTable",
]

logger = logging.getLogger("kasagi_relay.backends.memory")

MiB = 1024 * 1024
DEFAULT_HISTORY_BYTES = 16 * MiB
DEFAULT_ROOM_TTL_S = 86_400.0
# Ops dropped one by one at most; more are dropped by copying the rest (_Room.drop_before).
_POP_MOST = 16
# Rooms looked at per call when forgetting: bounded work, more than one per call so
# expired rooms go faster than new ones arrive.
_SWEEP_STEPS = 8


@dataclass(slots=True)
class _Room:
    seq: int = 0
    # (op, size of its body): the sizes are what `history_bytes` counts.
    ops: deque[tuple[Op, int]] = field(default_factory=deque)
    history_bytes: int = 0
    snapshot: Snapshot | None = None
    # Which incarnation of the name: keys of a forgotten room do not answer for a new one.
    gen: int = 0

    def covered(self) -> int:
        return self.snapshot.seq if self.snapshot is not None else 0

    def drop_before(self, cut: int) -> None:
        """Drop the ops before seq `cut`, never past the snapshot."""
        ops = self.ops
        if not ops:
            return
        # The ops' seqs are consecutive (appended one by one, dropped from the front).
        n = min(cut, self.covered() + 1, self.seq + 1) - ops[0][0].seq
        if n <= _POP_MOST:
            for _ in range(n):
                self.history_bytes -= ops.popleft()[1]
            return
        # Many (a compaction pass drops what came in since the last one): what stays is
        # copied in C instead of a `popleft` per op. At memory ingest (py-spy, 30 s of
        # steady load) dropping took 5.6 % of the loop thread's samples one by one, 4.3 %
        # this way: most of it is freeing the dropped ops.
        self.ops = ops = deque(islice(ops, n, None))
        self.history_bytes = sum(map(itemgetter(1), ops))

    def drop_bytes(self, max_bytes: int) -> None:
        """Drop the oldest ops until the history fits `max_bytes`, never past the snapshot."""
        covered = self.covered()
        while self.history_bytes > max_bytes and self.ops and self.ops[0][0].seq <= covered:
            self.history_bytes -= self.ops.popleft()[1]


class RoomTable:
    """The rooms, their idempotency keys and locks, each forgotten when it expires."""

    def __init__(
        self,
        *,
        key_ttl_s: float,
        room_ttl_s: float,
        history_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key_ttl_s = key_ttl_s
        self.room_ttl_s = room_ttl_s
        self.history_bytes = history_bytes
        # Least recently used first: the front is the next to expire.
        self.rooms: OrderedDict[str, _Room] = OrderedDict()
        self._used: dict[str, float] = {}
        self._next_expiry = 0.0  # nothing expires before this (see expire)
        # (room, key) -> (seq, expiry, digest, room gen). One TTL for all, so insertion
        # order is expiry order and expired keys are always at the front.
        self.keys: OrderedDict[tuple[str, str], tuple[int, float, str, int]] = OrderedDict()
        self._gens = 0
        self.locks: dict[str, tuple[str, float]] = {}
        self.subscribed: set[str] = set()
        self.listener: Listener | None = None
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def expire(self, now: float) -> None:
        # Called per publish: nothing to look at before the earliest expiry, kept as keys
        # and rooms come and go (`add_key`, `_touch`); taking one out leaves it early,
        # which only costs a look.
        if now < self._next_expiry:
            return
        while self.keys:
            expiry = next(iter(self.keys.values()))[1]
            if expiry > now:
                break
            self.keys.popitem(last=False)
        for _ in range(_SWEEP_STEPS):
            if not self.rooms:
                break
            name = next(iter(self.rooms))
            if now - self._used[name] < self.room_ttl_s:
                break
            if name in self.subscribed or name in self.locks:
                # In use by a relay: not idle. Looked at again one TTL later.
                self._touch(name, now)
                continue
            del self.rooms[name], self._used[name]
        nxt = float("inf")
        if self.keys:
            nxt = next(iter(self.keys.values()))[1]
        if self.rooms:
            nxt = min(nxt, self._used[next(iter(self.rooms))] + self.room_ttl_s)
        self._next_expiry = nxt

    def _touch(self, name: str, now: float) -> None:
        self._used[name] = now
        self.rooms.move_to_end(name)
        if now + self.room_ttl_s < self._next_expiry:
            self._next_expiry = now + self.room_ttl_s

    def add_key(self, name: str, key: str, seq: int, digest: str, gen: int) -> None:
        """Store `key`'s answer until the key TTL from now."""
        self.keys.pop((name, key), None)  # re-inserted at the back: expiry order holds
        expiry = self.now() + self.key_ttl_s
        self.keys[(name, key)] = (seq, expiry, digest, gen)
        if expiry < self._next_expiry:
            self._next_expiry = expiry

    def get(self, name: str) -> _Room | None:
        """The room if it exists; reading it counts as a use."""
        now = self.now()
        self.expire(now)
        room = self.rooms.get(name)
        if room is not None:
            self._touch(name, now)
        return room

    def create(self, name: str) -> _Room:
        now = self.now()
        self.expire(now)
        room = self.rooms.get(name)
        if room is None:
            self._gens += 1
            room = self.rooms[name] = _Room(gen=self._gens)
        self._touch(name, now)
        return room

    def seen(self, name: str, key: str, digest: str) -> int | None:
        """The seq `key` got in `name` for this delta, or None; KeyConflict for another."""
        self.expire(self.now())
        entry = self.keys.get((name, key))
        room = self.rooms.get(name)
        if entry is None or room is None or entry[3] != room.gen:
            return None
        seq, _, stored, _ = entry
        if stored != digest:
            raise KeyConflict(key, seq)
        return seq


class MemoryLog:
    def __init__(self, table: RoomTable) -> None:
        self._t = table

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        return self._publish(room, kind, body, key)

    def publish_now(
        self,
        room: str,
        kind: DeltaKind,
        body: bytes,
        key: str | None = None,
        doc: bytes | None = None,
    ) -> int | None:
        """`publish` without a coroutine or a task (it never waits): the room service
        calls it inline, so a delta is sequenced, delivered and answered in the turn it
        was handed over, as before connections pipelined their deltas; `doc`, the delta
        document (`delta_doc(kind, body)`) if the caller has it. None when a subclass
        serves `publish` itself (the tests' faulty logs): call `publish`."""
        if type(self).publish is not MemoryLog.publish:
            return None
        return self._publish(room, kind, body, key, doc)

    def _publish(
        self, room: str, kind: DeltaKind, body: bytes, key: str | None, doc: bytes | None = None
    ) -> int:
        t = self._t
        digest = delta_digest(kind, body) if key is not None else ""
        if key is not None and (first := t.seen(room, key, digest)) is not None:
            return first
        r = t.create(room)
        r.seq += 1
        op = Op(r.seq, delta_doc(kind, body) if doc is None else doc)
        r.ops.append((op, len(body)))
        r.history_bytes += len(body)
        if t.history_bytes > 0:
            r.drop_bytes(t.history_bytes)
        if key is not None:
            t.add_key(room, key, r.seq, digest, r.gen)
        if room in t.subscribed and t.listener is not None:
            # Synchronous delivery keeps publish order; a listener bug must not undo the
            # publish, which is already stored.
            try:
                t.listener.on_op(room, op)
            except Exception:
                logger.exception("listener failed on %s seq %d", room, op.seq)
        return op.seq

    async def seen_key(self, room: str, key: str, kind: DeltaKind, body: bytes) -> int | None:
        return self._t.seen(room, key, delta_digest(kind, body))

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        r = self._t.get(room)
        if r is None or after >= r.seq:
            return []
        first = r.ops[0][0].seq if r.ops else r.seq + 1
        if after + 1 < first:
            return None
        start = after + 1 - first
        stop = len(r.ops) if limit is None else min(len(r.ops), start + limit)
        return [r.ops[i][0] for i in range(start, stop)]

    async def last_seq(self, room: str) -> int:
        r = self._t.get(room)
        return 0 if r is None else r.seq


class MemorySnapshots:
    def __init__(self, table: RoomTable) -> None:
        self._t = table

    async def read_snapshot(self, room: str) -> Snapshot | None:
        r = self._t.get(room)
        return None if r is None else r.snapshot

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        r = self._t.get(room)
        seq = 0 if r is None else r.seq
        if snapshot.seq > seq:
            raise ValueError(f"snapshot seq {snapshot.seq} is past the room seq {seq}")
        if r is None or (r.snapshot is not None and snapshot.seq <= r.snapshot.seq):
            # r is None only for a snapshot at seq 0 of an empty room: nothing to keep.
            return False
        r.snapshot = snapshot
        return True

    async def snapshot_seq(self, room: str) -> int:
        r = self._t.get(room)
        return 0 if r is None or r.snapshot is None else r.snapshot.seq

    async def write_live_snapshot(
        self, room: str, snapshot: Snapshot, ops: Sequence[str]
    ) -> bool | None:
        # Nothing here can lose a delta, but the rule is the store's (base.Snapshots), so
        # it is checked as on Redis: a caller's bug shows the same on both.
        r = self._t.get(room)
        if not 1 <= len(ops) <= min(LIVE_DIGESTS, snapshot.seq):
            raise ValueError(f"expected 1 to {LIVE_DIGESTS} op digests, one per op")
        if r is None or snapshot.seq > r.seq:
            return None
        if r.snapshot is not None and snapshot.seq <= r.snapshot.seq:
            return False
        first = r.ops[0][0].seq if r.ops else r.seq + 1
        for i, digest in enumerate(ops):
            seq = snapshot.seq - i
            if seq < first or op_digest(seq, r.ops[seq - first][0].delta) != digest:
                return None
        tick = r.snapshot.tick if r.snapshot is not None else 0
        r.snapshot = Snapshot(snapshot.seq, snapshot.data, tick)
        return True

    async def trim(self, room: str, keep_from: int, max_len: int, max_bytes: int = 0) -> None:
        r = self._t.get(room)
        if r is None or not r.ops:
            return
        r.drop_before(max(keep_from, r.seq - max_len + 1))
        if max_bytes > 0:
            r.drop_bytes(max_bytes)

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        now = self._t.now()
        held = self._t.locks.get(room)
        if held is not None and held[1] > now:
            return None
        token = secrets.token_hex(8)
        self._t.locks[room] = (token, now + ttl_ms / 1000)
        return token

    async def release_lock(self, room: str, token: str) -> None:
        held = self._t.locks.get(room)
        if held is not None and held[0] == token:
            del self._t.locks[room]


class MemoryFeed:
    def __init__(self, table: RoomTable) -> None:
        self._t = table

    def set_listener(self, listener: Listener) -> None:
        self._t.listener = listener

    async def subscribe(self, room: str) -> None:
        self._t.subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._t.subscribed.discard(room)
        # The room's idle time starts now, not when it was last written.
        self._t.get(room)


class MemoryPresence:
    """The presence role in process: per room, conn -> (entry, expiry on `clock`); events
    go to the listener at once, for subscribed rooms."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.rooms: dict[str, dict[str, tuple[bytes, float]]] = {}
        self.subscribed: set[str] = set()
        self.listener: PresenceListener | None = None

    def set_listener(self, listener: PresenceListener) -> None:
        self.listener = listener

    def _announce(self, room: str, kind: str, entry: bytes) -> None:
        if self.listener is not None and room in self.subscribed:
            self.listener.on_presence(room, kind, entry)

    async def write(self, ops: Sequence[PresenceOp], ttl_s: float) -> None:
        expiry = self._clock() + ttl_s
        for room, conn, entry, add in ops:
            if add:
                self.rooms.setdefault(room, {})[conn] = (entry, expiry)
            else:
                entries = self.rooms.get(room)
                if entries is not None:
                    entries.pop(conn, None)
                    if not entries:
                        del self.rooms[room]
            self._announce(room, "join" if add else "leave", entry)

    async def add(self, room: str, conn: str, entry: bytes, ttl_s: float) -> None:
        await self.write([(room, conn, entry, True)], ttl_s)

    async def remove(self, room: str, conn: str, entry: bytes) -> None:
        await self.write([(room, conn, entry, False)], 0.0)

    async def refresh(self, room: str, entries: dict[str, bytes], ttl_s: float) -> None:
        expiry = self._clock() + ttl_s
        stored = self.rooms.setdefault(room, {})
        for conn, entry in entries.items():
            old = stored.get(conn)
            stored[conn] = (entry, expiry)
            if old is None or old[0] != entry:
                self._announce(room, "join", entry)
        self._reap(room)

    async def members(self, room: str) -> list[bytes]:
        self._reap(room)
        return [entry for entry, _ in self.rooms.get(room, {}).values()]

    def _reap(self, room: str) -> None:
        entries = self.rooms.get(room)
        if entries is None:
            return
        now = self._clock()
        gone = [conn for conn, (_, expiry) in entries.items() if expiry <= now]
        for conn in gone:
            entry, _ = entries.pop(conn)
            self._announce(room, "leave", entry)
        if not entries:
            self.rooms.pop(room, None)

    async def subscribe(self, room: str) -> None:
        self.subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self.subscribed.discard(room)


class MemoryBackend(Backend):
    name = "memory"

    def __init__(
        self,
        key_ttl_s: float = IDEMPOTENCY_TTL_S,
        *,
        room_ttl_s: float = DEFAULT_ROOM_TTL_S,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Every expiry here (rooms, keys, locks, presence entries) reads `clock`, so a test
        # can step time instead of sleeping through TTLs, which a loaded machine overshoots
        # (a CI run once expired a room the test was about to read).
        self.table = RoomTable(
            key_ttl_s=key_ttl_s, room_ttl_s=room_ttl_s, history_bytes=history_bytes, clock=clock
        )
        super().__init__(
            MemoryLog(self.table),
            MemorySnapshots(self.table),
            MemoryFeed(self.table),
            MemoryPresence(clock),
        )

    @property
    def _listener(self) -> Listener | None:
        # The attribute the earlier single-class backend had (a test mutes delivery by it).
        return self.table.listener

    @_listener.setter
    def _listener(self, listener: Listener | None) -> None:
        self.table.listener = listener

    async def close(self) -> None:
        self.table.subscribed.clear()

    async def health(self) -> dict[str, object]:
        self.table.expire(self.table.now())
        return {"ok": True, "backend": self.name, "rooms": len(self.table.rooms)}
