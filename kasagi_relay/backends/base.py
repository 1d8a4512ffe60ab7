"""Storage by role: what the relay needs from its store of record, in three parts.

- The **log** (`Log`): a room's sequenced deltas. `publish` assigns the next seq, appends
  and announces atomically (with idempotency keys); `seen_key` answers a retry without
  publishing; `read_ops` and `last_seq` read the history back.
- The **snapshots** (`Snapshots`): the compacted state of a room, written only when newer
  (from a relay's live state only while the history still holds the op it ends with), the
  trim of the history it covers (by count, age and bytes; never past the snapshot), and
  the short lock one compaction at a time holds.
- The **feed** (`Feed`): live delivery of each delta to a `Listener`, per subscribed room,
  with a resync signal when the transport may have dropped something.
- The **presence** (`Presence`): who is in a room on every relay. Each relay writes its
  own members' entries (`add`, `remove`), re-writes them every refresh (`refresh`, which
  also takes out the entries nobody refreshed within their time to live: a dead relay's),
  reads a room's members in one round trip (`members`) and hears every room's join and
  leave events (`subscribe`, a `PresenceListener`). Entries are opaque JSON bytes to the
  backend (`{"conn","sub","info","j"}`, presence.py), keyed by connection id.

Three implementations: `memory` (embedded, one process), `redis` (one server) and
`sentinel` (discovery through Sentinels). Each composes the roles over shared parts (see
memory.py and redis.py) and hands them out as a `Backend`: the roles as attributes
(`.log`, `.snapshots`, `.feed`) plus the lifecycle (`start`, `close`, `health`, `name`).
`Backend` also keeps the earlier flat methods (`publish`, `read_ops`, `subscribe`...),
each delegating to its role, for the consumers that still call them.

Per-room ordering, gap detection and backfill live in the relay (`room.py`), not here:
the feed delivers what its transport gives it and says when it may have missed something.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kasagi_relay.domain import (
    IDEMPOTENCY_TTL_S,
    LIVE_DIGESTS,
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
    "LIVE_DIGESTS",
    "ROOM_NAME",
    "AckLevel",
    "Backend",
    "BackendUnavailable",
    "DeltaKind",
    "Feed",
    "KeyConflict",
    "Listener",
    "Log",
    "Op",
    "Presence",
    "PresenceListener",
    "PresenceOp",
    "Snapshot",
    "Snapshots",
    "valid_room",
]


class Listener(Protocol):
    def on_op(self, room: str, op: Op) -> None:
        """A delta arrived on a subscribed room. Per room in publish order, but duplicates
        and gaps are possible (after a reconnect): the relay drops and backfills."""

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        """The subscription of these rooms (None: all) may have missed messages: the relay
        must backfill each from its last seen seq."""


class Log(Protocol):
    """A room's sequenced deltas (docs/protocol.md: seq, idempotency keys, history)."""

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        """Assign the room's next seq, append to its history and publish, atomically.

        `body` is the compact JSON of the patch array or merge object. Returns the seq once
        durable to the configured ack level. With a `key` stored for this room within
        IDEMPOTENCY_TTL_S for the same delta (`domain.delta_digest(kind, body)`), returns
        that first seq and publishes nothing; for another delta raises KeyConflict and
        stores nothing. Raises BackendUnavailable when it cannot promise the delta is
        stored."""
        ...

    async def seen_key(self, room: str, key: str, kind: DeltaKind, body: bytes) -> int | None:
        """The seq `key` got in `room` within IDEMPOTENCY_TTL_S (durable to the ack level, as
        `publish` would return it for a retry), or None; publishes nothing. Raises
        KeyConflict when the key was stored with another delta. Asked before a keyed delta
        that no longer applies is refused: its first attempt may be stored although its
        ack was lost, even by another relay."""
        ...

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        """The ops with seq > `after`, ascending, gapless (at most `limit`). None when the
        history no longer reaches `after + 1` (trimmed): the caller must reset from a
        snapshot."""
        ...

    async def last_seq(self, room: str) -> int: ...


class Snapshots(Protocol):
    """Compacted state, the trim of the history it covers, and the compaction lock."""

    async def read_snapshot(self, room: str) -> Snapshot | None: ...

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        """Store the snapshot only when its seq is newer than the stored one; ValueError
        when it is past the room's seq."""
        ...

    async def snapshot_seq(self, room: str) -> int:
        """The stored snapshot's seq (0: none), without reading its data."""
        ...

    async def write_live_snapshot(
        self, room: str, snapshot: Snapshot, ops: Sequence[str]
    ) -> bool | None:
        """Store `snapshot` (a relay's live state; its tick is not stored: the stored one
        stays) only when it is newer and the history still holds the last ops the relay
        applied: `ops` are their `domain.op_digest`s, of seq `snapshot.seq`, the one before,
        and so on (1 to LIVE_DIGESTS). True written, False not newer, None refused (one of
        those ops is not stored there, or the seq is past the room's: the state holds a
        delta the store lost in a failover, and the caller compacts from the history)."""
        ...

    async def trim(self, room: str, keep_from: int, max_len: int, max_bytes: int = 0) -> None:
        """Drop history before seq `keep_from`, keeping at most `max_len` entries and at
        most `max_bytes` bytes of delta bodies (0: no byte limit), but never an entry the
        snapshot does not cover: the state is never lost."""
        ...

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        """A short exclusive lock (compaction); returns a token, or None when held elsewhere."""
        ...

    async def release_lock(self, room: str, token: str) -> None: ...


class Feed(Protocol):
    """Live delivery of the deltas of subscribed rooms to one listener."""

    def set_listener(self, listener: Listener) -> None: ...

    async def subscribe(self, room: str) -> None:
        """Returns once deltas of `room` published from now on will be delivered (so a read
        of the history after this misses nothing)."""
        ...

    async def unsubscribe(self, room: str) -> None: ...


class PresenceListener(Protocol):
    # Bytes that each entry its relay wrote holds and no other entry does (b"": none): a
    # backend may drop unread a message of such entries only (the relay tells its members
    # of its own members' joins and leaves itself).
    own_mark: bytes

    def on_presence(self, room: str, kind: str, entry: bytes) -> None:
        """A member of a subscribed room joined (`kind` "join") or left ("leave", also
        when its entry expired); `entry` is the JSON stored by `add`. Per room in the
        order the backend applied them; duplicates are possible (a refresh after a
        failover re-adds an entry the new master lacked): the relay drops them."""

    def on_presence_resync(self) -> None:
        """The event subscription may have missed events, or the master moved: the relay
        re-writes its entries at once (a new master may lack them)."""


# One presence write: (room, conn, entry, True to add / False to remove).
PresenceOp = tuple[str, str, bytes, bool]


class Presence(Protocol):
    """Who is in each room, across every relay (docs/protocol.md, presence)."""

    def set_listener(self, listener: PresenceListener) -> None: ...

    async def write(self, ops: Sequence[PresenceOp], ttl_s: float) -> None:
        """`add` / `remove` each op, in order, as one batch (one round trip on Redis;
        per shard in a Cluster). Every op is safe to repeat: a failed batch may have
        been applied in part, and is retried whole (its events announced again: the
        relays drop what they saw)."""
        ...

    async def add(self, room: str, conn: str, entry: bytes, ttl_s: float) -> None:
        """Store `conn`'s entry for `ttl_s` and announce its join (each time: an add of
        the stored entry too; the relays drop a join they know)."""
        ...

    async def remove(self, room: str, conn: str, entry: bytes) -> None:
        """Drop `conn`'s entry and announce the leave of `entry`, its last one (the hub
        orders a connection's writes, so a remove never meets a newer entry)."""
        ...

    async def refresh(self, room: str, entries: dict[str, bytes], ttl_s: float) -> None:
        """Re-write this relay's entries of `room` (announcing those the store lacked) for
        another `ttl_s`, and take out every entry of the room past its time to live,
        announcing its leave."""
        ...

    async def members(self, room: str) -> list[bytes]:
        """The entries of `room` (expired ones taken out first): one round trip."""
        ...

    async def subscribe(self, room: str) -> None: ...

    async def unsubscribe(self, room: str) -> None: ...


class Backend:
    """One store of record as its roles, with the lifecycle and the flat methods.

    Implementations build the roles in their constructor and pass them here; nothing
    below is meant to be overridden except `start`, `close` and `health`."""

    name: str = "backend"

    def __init__(
        self, log: Log, snapshots: Snapshots, feed: Feed, presence: Presence | None = None
    ) -> None:
        self.log = log
        self.snapshots = snapshots
        self.feed = feed
        if presence is None:
            # Late import: memory.py builds on this module.
            from kasagi_relay.backends.memory import MemoryPresence

            presence = MemoryPresence()
        self.presence: Presence = presence

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def health(self) -> dict[str, object]:
        """{"ok": bool, ...details}: ok is False while the backend cannot take writes."""
        return {"ok": True, "backend": self.name}

    # The flat methods, kept while the consumers move to the roles.

    def set_listener(self, listener: Listener) -> None:
        self.feed.set_listener(listener)

    async def subscribe(self, room: str) -> None:
        await self.feed.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self.feed.unsubscribe(room)

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        return await self.log.publish(room, kind, body, key)

    async def seen_key(
        self, room: str, key: str, kind: DeltaKind | None = None, body: bytes | None = None
    ) -> int | None:
        """`Log.seen_key`. Without `kind` and `body` (the earlier signature, for callers
        not yet moved) the digest is not compared: any delta stored with `key` counts."""
        if kind is None or body is None:
            return await self._seen_any(room, key)
        return await self.log.seen_key(room, key, kind, body)

    async def _seen_any(self, room: str, key: str) -> int | None:
        try:
            # The digest of no delta: a match is impossible, so a stored key conflicts
            # and names its seq, which is what the earlier signature answered.
            return await self.log.seen_key(room, key, "patch", b"\0")
        except KeyConflict as exc:
            return exc.seq

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        return await self.log.read_ops(room, after, limit)

    async def last_seq(self, room: str) -> int:
        return await self.log.last_seq(room)

    async def read_snapshot(self, room: str) -> Snapshot | None:
        return await self.snapshots.read_snapshot(room)

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        return await self.snapshots.write_snapshot(room, snapshot)

    async def trim(self, room: str, keep_from: int, max_len: int, max_bytes: int = 0) -> None:
        await self.snapshots.trim(room, keep_from, max_len, max_bytes)

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        return await self.snapshots.acquire_lock(room, ttl_ms)

    async def release_lock(self, room: str, token: str) -> None:
        await self.snapshots.release_lock(room, token)
