"""The presence role on Redis (one server, Sentinel; per shard in a Cluster).

Commands are the functions of the `kasagi_presence` library (presence.lua) on the room's
keys, through the master link: the adds and removes the relay queued while a write was
under way go as ONE pipeline (`write`, packed here as RESP: no per-command packing by
redis-py) of one `kasagi_presence_write` per room, each with that room's writes netted
(the last of each conn) and the message of their events, made here in the order they
were queued (one function call, not one per write), without WAIT (presence is
refreshed, not acknowledged: what a failover loses comes back with the next refresh,
which a re-subscription triggers at once). A refused pipeline or a lost connection sends
the whole pipeline again until the link's op timeout: every call is safe to repeat (it
stores and drops the same entries, and the relays drop the events it repeats: they
remember the members they know and the leaves they saw).
Events come on `room:{R}:presence-events` through a second `ChannelFeed`, never on the
rooms' delta channel (other KasagiEngine subscribers read that one as deltas only): one
message per function call, its events one per line, so a batch costs the server one
PUBLISH and this relay one read, not one per event.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

from redis.exceptions import AskError, ResponseError

from kasagi_relay.backends.base import PresenceListener, PresenceOp
from kasagi_relay.backends.redis_feed import ChannelFeed
from kasagi_relay.backends.redis_link import MasterLink

__all__ = ["RedisPresence", "presence_keys"]

_EVENTS: Final = re.compile(rb"room:\{(.+)\}:presence-events")
_JOIN: Final = b'{"e":"join","m":'
_LEAVE: Final = b'{"e":"leave","m":'
_HEAD: Final = {True: _JOIN, False: _LEAVE}
# Entries re-written per FCALL: bounds one call's arguments and time on the server.
REFRESH_BATCH: Final = 500
# Rooms whose packed keys are kept (a room's three keys as RESP bulk strings).
KEYS_CACHE: Final = 4096

logger = logging.getLogger("kasagi_relay.backends.redis")


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


_WRITE: Final = b"".join(map(_bulk, (b"FCALL", b"kasagi_presence_write", b"3")))


def presence_keys(room: str) -> tuple[str, str, str]:
    """docs/protocol.md: the presence hash, its expiry set and its event channel."""
    p = f"room:{{{room}}}:"
    return p + "presence", p + "presence-exp", p + "presence-events"


def events_channel(room: str) -> str:
    return presence_keys(room)[2]


class RedisPresence:
    def __init__(
        self,
        link: MasterLink,
        *,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
        sharded: bool = False,
        slot_moved: Callable[[str], None] | None = None,
    ) -> None:
        self.link = link
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self.listener: PresenceListener | None = None
        self.feed = ChannelFeed(
            link,
            probe_interval_s=probe_interval_s,
            probe_timeout_s=probe_timeout_s,
            sharded=sharded,
            slot_moved=slot_moved,
            channel=events_channel,
            channel_re=_EVENTS,
            on_message=self._message,
            on_resync=self._resync,
        )

    def set_listener(self, listener: PresenceListener) -> None:
        self.listener = listener

    def _message(self, room: str, data: bytes) -> None:
        """One message: the events of one function call, one per line (library version
        4; a version 3 message is one event, a line as well)."""
        listener = self.listener
        if listener is None:
            return
        mark = listener.own_mark
        if mark and data.count(mark) > data.count(b"\n"):
            # Every line is one of this relay's entries (a line holds one `j`; the mark
            # cannot stand inside a JSON string, where quotes are escaped): its own batch
            # come back, which it announced itself. Two counts, not a parse per line.
            return
        for line in data.split(b"\n"):
            # `{"e":"join","m":<entry>}` / `{"e":"leave","m":<entry>}`, told apart by their
            # heads (a regex per event cost as much as the rest of its reading).
            if line.startswith(_JOIN) and line.endswith(b"}"):
                listener.on_presence(room, "join", line[len(_JOIN) : -1])
            elif line.startswith(_LEAVE) and line.endswith(b"}"):
                listener.on_presence(room, "leave", line[len(_LEAVE) : -1])
            else:
                logger.warning("room %s: malformed presence event ignored", room)

    def _resync(self) -> None:
        if self.listener is not None:
            self.listener.on_presence_resync()

    def _packed_keys(self, room: str) -> bytes:
        held = self._keys.get(room)
        if held is None:
            held = self._keys[room] = b"".join(_bulk(k.encode()) for k in presence_keys(room))
            if len(self._keys) > KEYS_CACHE:
                self._keys.popitem(last=False)
        return held

    async def write(self, ops: Sequence[PresenceOp], ttl_s: float) -> None:
        redirected = await self.write_some(ops, ttl_s)
        if redirected:
            raise redirected[0][1]

    async def write_some(
        self, ops: Sequence[PresenceOp], ttl_s: float
    ) -> list[tuple[PresenceOp, AskError]]:
        """`write`; the calls a Cluster node sent elsewhere (MOVED, ASK: not run), in
        order, for the router to send to their room's shard."""
        if not ops:
            return []
        # One FCALL per room, its writes in the order queued (rooms are independent).
        rooms: dict[str, list[PresenceOp]] = {}
        for op in ops:
            held = rooms.get(op[0])
            if held is None:
                rooms[op[0]] = [op]
            else:
                held.append(op)
        ttl = _bulk(b"%d" % _ms(ttl_s))
        parts: list[bytes] = []
        for room, room_ops in rooms.items():
            message = b"}\n".join([_HEAD[op[3]] + op[2] for op in room_ops]) + b"}"
            if message.count(b"\n") >= len(room_ops):
                # Events travel one per line (relays never write one: `_entry`).
                logger.warning("room %s: presence entries with a newline not written", room)
                room_ops = [op for op in room_ops if b"\n" not in op[2]]
                message = b"}\n".join([_HEAD[op[3]] + op[2] for op in room_ops]) + b"}"
            # The writes netted, the last one of a conn standing (a leave and a join
            # again store the new entry); every one of them announced, in order.
            last = {op[1]: op for op in room_ops}
            kept = last.values() if len(last) < len(room_ops) else room_ops
            stored = [_bulk(op[1].encode()) + _bulk(op[2]) for op in kept if op[3]]
            dropped = [_bulk(op[1].encode()) for op in kept if not op[3]]
            parts += (
                b"*%d\r\n" % (9 + 2 * len(stored) + len(dropped)),
                _WRITE,
                self._packed_keys(room),
                ttl,
                _bulk(b"%d" % len(stored)),
                *stored,
                *dropped,
                _bulk(message if room_ops else b""),
            )
        replies = await self.link.pipeline("presence write", b"".join(parts), len(rooms))
        redirected: list[tuple[PresenceOp, AskError]] = []
        for reply, (room, room_ops) in zip(replies, rooms.items(), strict=True):
            if isinstance(reply, AskError):  # MovedError too
                redirected += ((op, reply) for op in room_ops)
            elif isinstance(reply, ResponseError):
                # Not a refusal (those were retried): a bug or a hostile store; the
                # other calls of the pipeline stand.
                logger.warning("room %s: presence write refused: %s", room, reply)
        return redirected

    async def add(self, room: str, conn: str, entry: bytes, ttl_s: float) -> None:
        await self.write([(room, conn, entry, True)], ttl_s)

    async def remove(self, room: str, conn: str, entry: bytes) -> None:
        await self.write([(room, conn, entry, False)], 1.0)

    async def refresh(self, room: str, entries: dict[str, bytes], ttl_s: float) -> None:
        keys = presence_keys(room)
        items = list(entries.items())
        # At least one call: it also takes out the room's expired entries.
        for start in range(0, max(len(items), 1), REFRESH_BATCH):
            args: list[str | bytes] = []
            for conn, entry in items[start : start + REFRESH_BATCH]:
                args += (conn, entry)
            await self.link.fcall(
                "presence refresh", "kasagi_presence_refresh", 3, *keys, _ms(ttl_s), *args
            )

    async def members(self, room: str) -> list[bytes]:
        reply = await self.link.fcall(
            "presence", "kasagi_presence_members", 3, *presence_keys(room)
        )
        return [bytes(e) for e in reply or ()]

    async def subscribe(self, room: str) -> None:
        await self.feed.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self.feed.unsubscribe(room)

    def start(self) -> None:
        self.feed.start()

    async def close(self) -> None:
        await self.feed.close()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
