"""The backend interface: everything the relay needs from its store of record.

Three implementations: `memory` (embedded, one process), `redis` (one server) and
`sentinel` (discovery through Sentinels). The relay above this interface does not know which
it has. Per-room ordering, gap detection and backfill live in the relay (`room.py`), not here:
a backend delivers what its transport gives it and says when it may have missed something.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

# Re-exported while the backends move to the domain module.
from kasagi_relay.domain import (
    IDEMPOTENCY_TTL_S,
    ROOM_NAME,
    AckLevel,
    BackendUnavailable,
    DeltaKind,
    KeyConflict,
    Op,
    Snapshot,
    valid_room,
)

__all__ = [
    "IDEMPOTENCY_TTL_S",
    "ROOM_NAME",
    "AckLevel",
    "Backend",
    "BackendUnavailable",
    "DeltaKind",
    "KeyConflict",
    "Listener",
    "Op",
    "Snapshot",
    "valid_room",
]


class Listener(Protocol):
    def on_op(self, room: str, op: Op) -> None:
        """A delta arrived on a subscribed room. Per room in publish order, but duplicates
        and gaps are possible (after a reconnect): the relay drops and backfills."""

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        """The subscription of these rooms (None: all) may have missed messages: the relay
        must backfill each from its last seen seq."""


class Backend(ABC):
    name: str = "backend"

    def __init__(self) -> None:
        self._listener: Listener | None = None

    def set_listener(self, listener: Listener) -> None:
        self._listener = listener

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        """Assign the room's next seq, append to its history and publish, atomically.

        `body` is the compact JSON of the patch array or merge object. Returns the seq once
        durable to the configured ack level. With a `key` seen for this room within
        IDEMPOTENCY_TTL_S, returns that first seq and publishes nothing. Raises
        BackendUnavailable when it cannot promise the delta is stored."""

    @abstractmethod
    async def seen_key(self, room: str, key: str) -> int | None:
        """The seq `key` got in `room` within IDEMPOTENCY_TTL_S (durable to the ack level, as
        `publish` would return it for a retry), or None; publishes nothing. Asked before a
        keyed delta that no longer applies is refused: its first attempt may be stored
        although its ack was lost, even by another relay."""

    @abstractmethod
    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        """The ops with seq > `after`, ascending, gapless (at most `limit`). None when the
        history no longer reaches `after + 1` (trimmed): the caller must reset from a snapshot."""

    @abstractmethod
    async def last_seq(self, room: str) -> int: ...

    @abstractmethod
    async def read_snapshot(self, room: str) -> Snapshot | None: ...

    @abstractmethod
    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        """Store the snapshot only when its seq is newer than the stored one."""

    @abstractmethod
    async def trim(self, room: str, keep_from: int, max_len: int) -> None:
        """Drop history before seq `keep_from` (never past the snapshot's seq), keeping at most
        `max_len` entries."""

    @abstractmethod
    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        """A short exclusive lock (compaction); returns a token, or None when held elsewhere."""

    @abstractmethod
    async def release_lock(self, room: str, token: str) -> None: ...

    @abstractmethod
    async def subscribe(self, room: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, room: str) -> None: ...

    @abstractmethod
    async def health(self) -> dict[str, object]:
        """{"ok": bool, ...details}: ok is False while the backend cannot take writes."""
