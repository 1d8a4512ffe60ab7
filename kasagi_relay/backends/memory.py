"""The embedded backend: everything in this process, no Redis.

It keeps the whole Backend contract so the relay behaves the same as on Redis: a seq per
room, a trimmed history for resumes, snapshots written only when newer, idempotency keys
for IDEMPOTENCY_TTL_S, short locks, and delivery of each delta to the listener in order.
Nothing survives a restart.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from kasagi_relay.backends.base import (
    IDEMPOTENCY_TTL_S,
    Backend,
    DeltaKind,
    Op,
    Snapshot,
)

__all__ = ["MemoryBackend"]

logger = logging.getLogger("kasagi_relay.backends.memory")


@dataclass(slots=True)
class _Room:
    seq: int = 0
    ops: deque[Op] = field(default_factory=deque)
    snapshot: Snapshot | None = None
    # key -> (seq, expiry), oldest first: expired keys are popped from the front.
    keys: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)
    lock: tuple[str, float] | None = None

    def seen(self, key: str, now: float) -> int | None:
        """The seq `key` got, unless it has expired by `now`."""
        entry = self.keys.get(key)
        return None if entry is None or entry[1] <= now else entry[0]


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, key_ttl_s: float = IDEMPOTENCY_TTL_S) -> None:
        super().__init__()
        self._rooms: dict[str, _Room] = {}
        self._subscribed: set[str] = set()
        self._key_ttl_s = key_ttl_s

    def _room(self, room: str) -> _Room:
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room()
        return r

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._subscribed.clear()

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        r = self._room(room)
        now = time.monotonic()
        while r.keys:
            oldest = next(iter(r.keys.values()))
            if oldest[1] > now:
                break
            r.keys.popitem(last=False)
        if key is not None and (first := r.seen(key, now)) is not None:
            return first
        r.seq += 1
        op = Op(r.seq, b'{"' + kind.encode() + b'":' + body + b"}")
        r.ops.append(op)
        if key is not None:
            r.keys[key] = (r.seq, now + self._key_ttl_s)
        if room in self._subscribed and self._listener is not None:
            # Synchronous delivery keeps publish order; a listener bug must not undo the
            # publish, which is already stored.
            try:
                self._listener.on_op(room, op)
            except Exception:
                logger.exception("listener failed on %s seq %d", room, op.seq)
        return op.seq

    async def seen_key(self, room: str, key: str) -> int | None:
        r = self._rooms.get(room)
        return None if r is None else r.seen(key, time.monotonic())

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        r = self._rooms.get(room)
        if r is None or after >= r.seq:
            return []
        first = r.ops[0].seq if r.ops else r.seq + 1
        if after + 1 < first:
            return None
        start = after + 1 - first
        stop = len(r.ops) if limit is None else min(len(r.ops), start + limit)
        return [r.ops[i] for i in range(start, stop)]

    async def last_seq(self, room: str) -> int:
        r = self._rooms.get(room)
        return 0 if r is None else r.seq

    async def read_snapshot(self, room: str) -> Snapshot | None:
        r = self._rooms.get(room)
        return None if r is None else r.snapshot

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        r = self._room(room)
        if r.snapshot is not None and snapshot.seq <= r.snapshot.seq:
            return False
        if snapshot.seq > r.seq:
            raise ValueError(f"snapshot seq {snapshot.seq} is past the room's seq {r.seq}")
        r.snapshot = snapshot
        return True

    async def trim(self, room: str, keep_from: int, max_len: int) -> None:
        r = self._rooms.get(room)
        if r is None or not r.ops:
            return
        # Never drop what no snapshot covers: the state would be lost.
        covered = r.snapshot.seq if r.snapshot is not None else 0
        cut = min(max(keep_from, r.seq - max_len + 1), covered + 1)
        while r.ops and r.ops[0].seq < cut:
            r.ops.popleft()

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        r = self._room(room)
        now = time.monotonic()
        if r.lock is not None and r.lock[1] > now:
            return None
        token = secrets.token_hex(8)
        r.lock = (token, now + ttl_ms / 1000)
        return token

    async def release_lock(self, room: str, token: str) -> None:
        r = self._rooms.get(room)
        if r is not None and r.lock is not None and r.lock[0] == token:
            r.lock = None

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    async def health(self) -> dict[str, object]:
        return {"ok": True, "backend": self.name, "rooms": len(self._rooms)}
