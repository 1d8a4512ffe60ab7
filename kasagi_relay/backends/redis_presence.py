"""The presence role on Redis (one server, Sentinel; per shard in a Cluster).

Commands are the functions of the `kasagi_presence` library (presence.lua) on the room's
keys, through the master link: adds and removes go in the pipeline of their loop turn
(`MasterLink.batched_fcall`: one round trip for all of a turn's writes, every room);
refused commands and a moved master are retried until the link's op timeout, without
WAIT (presence is refreshed, not acknowledged: what a failover loses comes back with the
next refresh, which a re-subscription triggers at once).
Events come on `room:{R}:presence-events` through a second `ChannelFeed`, never on the
rooms' delta channel (other KasagiEngine subscribers read that one as deltas only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from kasagi_relay.backends.base import PresenceListener
from kasagi_relay.backends.redis_feed import ChannelFeed
from kasagi_relay.backends.redis_link import MasterLink

__all__ = ["RedisPresence", "presence_keys"]

_EVENTS: Final = re.compile(rb"room:\{(.+)\}:presence-events")
_EVENT: Final = re.compile(rb'\{"e":"(join|leave)","m":(.*)\}', re.DOTALL)
# Entries re-written per FCALL: bounds one call's arguments and time on the server.
REFRESH_BATCH: Final = 500


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
        m = _EVENT.fullmatch(data)
        if m is None or self.listener is None:
            return
        self.listener.on_presence(room, m.group(1).decode(), m.group(2))

    def _resync(self) -> None:
        if self.listener is not None:
            self.listener.on_presence_resync()

    async def add(self, room: str, conn: str, entry: bytes, ttl_s: float) -> None:
        await self.link.batched_fcall(
            "presence add", "kasagi_presence_add", 3, *presence_keys(room), _ms(ttl_s), conn, entry
        )

    async def remove(self, room: str, conn: str, entry: bytes) -> None:
        await self.link.batched_fcall(
            "presence remove", "kasagi_presence_remove", 3, *presence_keys(room), conn, entry
        )

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
