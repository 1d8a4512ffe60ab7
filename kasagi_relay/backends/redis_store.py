"""The store: a room's log and snapshots as Redis commands (the `Log` and `Snapshots` roles).

Writes go through the Redis Function library `kasagi` (kasagi.lua) on the master link:
`kasagi_publish` assigns the seq, appends the `ops` stream entry `<seq>-0`, publishes
`{"seq":N,...}` on the room's channel, records the idempotency key with the digest of its
delta and the running byte total of the history (`sizes`, what `kasagi_trim` bounds the
history by), atomically; `kasagi_seen`, `kasagi_snapshot` (and `kasagi_snapshot_live`,
which guards a relay's live state against a delta lost in a failover), `kasagi_trim` and
`kasagi_unlock` do the rest. Reads are plain commands. Every command names the keys of
one room only (one hash tag), so a Cluster router can route it by the room alone.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from kasagi_relay.backends.redis_link import MasterLink, pack
from kasagi_relay.domain import DeltaKind, KeyConflict, Op, Snapshot, delta_digest

__all__ = ["RedisLog", "RedisSnapshots", "channel_key", "room_keys"]


def room_keys(room: str) -> dict[str, str]:
    """docs/protocol.md's keys of a room (`{R}` is a hash tag: one shard per room)."""
    p = f"room:{{{room}}}:"
    return {
        "seq": p + "seq",
        "ops": p + "ops",
        "channel": p + "channel",
        "keys": p + "keys",
        "snapshot": p + "snapshot",
        "tick": p + "tick",
        "lock": p + "lock",
        "sizes": p + "sizes",
    }


def channel_key(room: str) -> str:
    return f"room:{{{room}}}:channel"


def _entry_op(entry_id: bytes, fields: dict[bytes, bytes]) -> Op:
    seq = int(entry_id.split(b"-", 1)[0])
    kind = fields.get(b"k", b"patch")
    return Op(seq, b'{"' + kind + b'":' + fields.get(b"d", b"null") + b"}")


def _key_conflict(exc: ResponseError, key: str) -> KeyConflict | None:
    """kasagi.lua's `KEYCONFLICT <seq> ...` error as the domain's exception."""
    words = str(exc).split(maxsplit=2)
    if len(words) >= 2 and words[0] == "KEYCONFLICT" and words[1].isdigit():
        return KeyConflict(key, int(words[1]))
    return None


def _published(
    key: str,
    done: Callable[[int | None, BaseException | None], None],
    reply: Any,
    exc: BaseException | None,
) -> None:
    """The link's answer to a keyed `publish_soon` as `publish` would give it."""
    if exc is None:
        try:
            seq = int(reply)
        except (TypeError, ValueError) as bad:  # not kasagi_publish's answer
            done(None, bad)
        else:
            done(seq, None)
        return
    if isinstance(exc, ResponseError):
        exc = _key_conflict(exc, key) or exc
    done(None, exc)


# Rooms whose kasagi_publish head (the function and the room's four keys, as RESP) is kept.
_HEADS_MAX = 65536
_KINDS: dict[str, bytes] = {"patch": b"$5\r\npatch\r\n", "merge": b"$5\r\nmerge\r\n"}


# The relay passes the keys library version 2 took (the `sizes` key is derived inside,
# in the same hash slot): during a rolling upgrade a relay of either version may have
# loaded its library last, and each must keep publishing through the other's.


class RedisLog:
    def __init__(self, link: MasterLink, diverged: Callable[[str, int], bool]) -> None:
        """`diverged(room, after)`: the feed found that a reader at `after` holds a delta
        the master lost (read_ops then answers None once, so the reader resets)."""
        self.link = link
        self._diverged = diverged
        self._heads: dict[str, bytes] = {}

    def _publish_fcall(self, room: str, kind: DeltaKind, body: bytes, key: str | None) -> bytes:
        """`FCALL kasagi_publish 4 <the room's keys> kind body [key]` as RESP: the part
        that names the room is packed once per room, the rest is one format per delta."""
        head = self._heads.get(room)
        if head is None:
            k = room_keys(room)
            args = ("FCALL", "kasagi_publish", 4, k["seq"], k["ops"], k["channel"], k["keys"])
            packed = pack((args,))
            assert packed is not None
            head = packed[packed.index(b"\n") + 1 :]  # without the array's header
            if len(self._heads) >= _HEADS_MAX:
                self._heads.clear()
            self._heads[room] = head
        kind_arg = _KINDS.get(kind) or b"$%d\r\n%b\r\n" % (len(kind), kind.encode())
        if key is None:
            return b"*9\r\n%b%b$%d\r\n%b\r\n" % (head, kind_arg, len(body), body)
        k_bytes = key.encode()
        return b"*10\r\n%b%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            head, kind_arg, len(body), body, len(k_bytes), k_bytes,
        )  # fmt: skip

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        fcall = self._publish_fcall(room, kind, body, key)
        try:
            return int(await self.link.durable_fcall(fcall, idempotent=key is not None))
        except ResponseError as exc:
            conflict = _key_conflict(exc, key) if key is not None else None
            if conflict is not None:
                raise conflict from None
            raise

    def publish_soon(
        self,
        room: str,
        kind: DeltaKind,
        body: bytes,
        key: str | None,
        done: Callable[[int | None, BaseException | None], None],
    ) -> None:
        """`publish` without a coroutine: the delta joins the link's batch now (so deltas
        handed over one after the other get seqs in that order) and `done(seq, None)` or
        `done(None, error)` is called once, with what `publish` would return or raise
        (KeyConflict, BackendUnavailable, ...). The room service calls it inline: no task,
        no coroutine frames and no loop turn per delta (MasterLink.submit)."""
        fcall = self._publish_fcall(room, kind, body, key)
        if key is None:
            # Nothing to translate: kasagi_publish answers an integer (hiredis and redis-py
            # give it as an int) and a key conflict needs a key.
            self.link.submit(fcall, idempotent=False, done=done)
            return
        self.link.submit(fcall, idempotent=True, done=functools.partial(_published, key, done))

    async def seen_key(self, room: str, key: str, kind: DeltaKind, body: bytes) -> int | None:
        return await self._seen(room, key, delta_digest(kind, body))

    async def seen_any(self, room: str, key: str) -> int | None:
        """The seq `key` got whatever its delta (the earlier `seen_key`)."""
        return await self._seen(room, key, "")

    async def _seen(self, room: str, key: str, digest: str) -> int | None:
        fcall = ["FCALL", "kasagi_seen", 1, room_keys(room)["keys"], key, digest]
        # Read-only when the key is unknown; retried like a keyed publish (safe: it stores
        # nothing new), and durable like one when the key is known.
        try:
            seq = await self.link.durable_fcall(fcall, idempotent=True)
        except ResponseError as exc:
            conflict = _key_conflict(exc, key)
            if conflict is not None:
                raise conflict from None
            raise
        return None if seq is None else int(seq)

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        k = room_keys(room)

        async def read(client: Redis) -> tuple[list[Any], Any]:
            pipe = client.pipeline(transaction=True)  # one consistent view of ops and seq
            pipe.xrange(k["ops"], min=f"{after + 1}-0", max="+", count=limit)
            pipe.get(k["seq"])
            entries, last = await pipe.execute()
            return entries, last

        entries, last_raw = await self.link.retrying("read_ops", read)
        last = int(last_raw or 0)
        if self._diverged(room, after):
            # The caller holds a delta this master stores differently or not at all.
            return None
        if after > last:
            # The caller holds deltas this master never had (lost in a failover):
            # it must start over from what is stored.
            return None
        if after == last:
            return []
        ops: list[Op] = []
        expected = after + 1
        for entry_id, fields in entries:
            op = _entry_op(entry_id, fields)
            if op.seq != expected:
                break
            ops.append(op)
            expected += 1
        if not ops:
            return None  # trimmed past after + 1
        return ops

    async def last_seq(self, room: str) -> int:
        k = room_keys(room)
        raw = await self.link.retrying("last_seq", lambda c: c.get(k["seq"]))
        return int(raw or 0)


class RedisSnapshots:
    def __init__(self, link: MasterLink) -> None:
        self.link = link

    async def read_snapshot(self, room: str) -> Snapshot | None:
        k = room_keys(room)
        data, seq, tick = await self.link.retrying(
            "read_snapshot", lambda c: c.hmget(k["snapshot"], ["data", "seq", "tick"])
        )
        if seq is None or data is None:
            return None
        raw = data if isinstance(data, bytes) else str(data).encode()
        return Snapshot(int(seq), raw, int(tick or 0))

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        k = room_keys(room)
        try:
            written = await self.link.fcall(
                "write_snapshot", "kasagi_snapshot", 2, k["snapshot"], k["seq"],
                snapshot.seq, snapshot.data, snapshot.tick,
            )  # fmt: skip
        except ResponseError as exc:
            if "past the room seq" in str(exc):
                raise ValueError(str(exc)) from None
            raise
        return bool(int(written))

    async def snapshot_seq(self, room: str) -> int:
        k = room_keys(room)
        raw = await self.link.retrying("snapshot_seq", lambda c: c.hget(k["snapshot"], "seq"))
        return int(raw or 0)

    async def write_live_snapshot(
        self, room: str, snapshot: Snapshot, ops: Sequence[str]
    ) -> bool | None:
        # A function of library version 5: on a master still running an older library the
        # call fails "Function not found", and `retrying` loads ours before trying again.
        k = room_keys(room)
        written = await self.link.fcall(
            "write_live_snapshot", "kasagi_snapshot_live", 3, k["snapshot"], k["seq"], k["ops"],
            snapshot.seq, snapshot.data, *ops,
        )  # fmt: skip
        answer = int(written)
        return None if answer < 0 else bool(answer)

    async def trim(self, room: str, keep_from: int, max_len: int, max_bytes: int = 0) -> None:
        k = room_keys(room)
        await self.link.fcall(
            "trim", "kasagi_trim", 3, k["seq"], k["ops"], k["snapshot"],
            keep_from, max_len, max_bytes,
        )  # fmt: skip

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        k = room_keys(room)
        token = secrets.token_hex(12)
        ok = await self.link.retrying(
            "acquire_lock", lambda c: c.set(k["lock"], token, nx=True, px=ttl_ms)
        )
        return token if ok else None

    async def release_lock(self, room: str, token: str) -> None:
        k = room_keys(room)
        await self.link.fcall("release_lock", "kasagi_unlock", 1, k["lock"], token)
