"""The `redis` backend (one server by URL), and the composition the `sentinel` one reuses.

A Redis backend is four parts, composed (docs/design.md, storage):
- a **locator** says where the master is: `UrlLocator` (one URL, here) or
  `SentinelLocator` (sentinel.py);
- the **master link** (redis_link.py) connects to it, fences writes during a failover,
  retries refused commands and makes each FCALL durable to the ack level (WAIT);
- the **channel feed** (redis_feed.py) is the `Feed` role: one subscription for every
  room, its liveness probe, and the backfill signal after any doubt;
- the **store** (redis_store.py) is the `Log` and `Snapshots` roles: the commands of the
  `kasagi` Function library (kasagi.lua) and the reads, through the link;
- the **presence** (redis_presence.py) is the fourth role: the `kasagi_presence` library
  (presence.lua) through the same link, its events on a second channel feed.

Errors: whatever cannot be promised raises BackendUnavailable; nothing is acknowledged
that did not commit at the configured level. A Cluster router would hold one link per
shard and hand the store and the feed the link of each room's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.exceptions import AuthenticationError, AuthorizationError

from kasagi_relay.backends.base import AckLevel, Backend
from kasagi_relay.backends.redis_feed import ChannelFeed
from kasagi_relay.backends.redis_link import (
    FUNCTION_VERSION,
    LIBRARY,
    Addr,
    Locator,
    MasterLink,
)
from kasagi_relay.backends.redis_presence import RedisPresence
from kasagi_relay.backends.redis_store import RedisLog, RedisSnapshots, channel_key, room_keys

__all__ = [
    "FUNCTION_VERSION",
    "LIBRARY",
    "RedisBackend",
    "RedisBase",
    "UrlLocator",
    "channel_key",
    "room_keys",
]

logger = logging.getLogger("kasagi_relay.backends.redis")


class RedisBase(Backend):
    """The link, the feed and the store over a locator."""

    name = "redis"

    def __init__(
        self,
        locator: Locator,
        *,
        ack: AckLevel = "leader",
        wait_timeout_ms: int = 1000,
        op_timeout_s: float = 10.0,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
    ) -> None:
        self.locator = locator
        self.link = MasterLink(
            locator,
            ack=ack,
            wait_timeout_ms=wait_timeout_ms,
            op_timeout_s=op_timeout_s,
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
        )
        self.channel_feed = ChannelFeed(
            self.link, probe_interval_s=probe_interval_s, probe_timeout_s=probe_timeout_s
        )
        self.store_log = RedisLog(self.link, self.channel_feed.take_divergence)
        self.redis_presence = RedisPresence(
            self.link, probe_interval_s=probe_interval_s, probe_timeout_s=probe_timeout_s
        )
        super().__init__(
            self.store_log, RedisSnapshots(self.link), self.channel_feed, self.redis_presence
        )

    # Views of the parts that tests and /healthz read.

    @property
    def ack(self) -> AckLevel:
        return self.link.ack

    @ack.setter
    def ack(self, level: AckLevel) -> None:
        self.link.ack = level

    @property
    def switches(self) -> int:
        return self.link.switches

    @property
    def _addr(self) -> Addr | None:
        return self.link.addr

    async def _seen_any(self, room: str, key: str) -> int | None:
        return await self.store_log.seen_any(room, key)

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self.link.op_timeout_s):
                await self.link.connect_current(force_load=True)
        except (AuthenticationError, AuthorizationError):
            raise
        except Exception as exc:
            # Not fatal: the feed keeps trying and /healthz says 503 meanwhile.
            logger.warning("%s backend: no master at start-up (%s); retrying", self.name, exc)
        connected = self.link.addr is not None
        await self.locator.watch(self.link, self._moved)
        self.channel_feed.start()
        self.redis_presence.start()
        if connected:
            # Ready means subscribed too: the relay's first join must not miss a delta.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.link.op_timeout_s):
                    await self.channel_feed.ready.wait()

    def _moved(self, reason: str) -> None:
        self.channel_feed.doubt(reason)
        self.redis_presence.feed.doubt(reason)

    async def close(self) -> None:
        await self.channel_feed.close()
        await self.redis_presence.close()
        await self.locator.close()
        await self.link.close()

    async def health(self) -> dict[str, object]:
        link, feed = self.link, self.channel_feed
        out: dict[str, object] = {
            "ok": False,
            "backend": self.name,
            "ack": link.ack,
            "master": None if link.addr is None else f"{link.addr[0]}:{link.addr[1]}",
            "subscribed": feed.ready.is_set(),
            "rooms": len(feed.rooms),
            "switches": link.switches,
            "fenced": link.fenced_since is not None,
            **self.locator.health_details(),
        }
        try:
            is_master = await link.is_master()
            out["ok"] = (
                is_master and feed.ready.is_set() and feed.caught_up and link.fenced_since is None
            )
            if not is_master:
                out["error"] = "the server is not a master"
                self.locator.check_master()
        except Exception as exc:
            out["error"] = str(exc) or type(exc).__name__
            self.locator.check_master()
        return out


class UrlLocator:
    """One Redis server by URL: the master is always there."""

    def __init__(
        self, url: str, *, password: str | None = None, username: str | None = None
    ) -> None:
        self.url = url
        self.password = password
        self.username = username
        kw = ConnectionPool.from_url(url).connection_kwargs
        self._addr: Addr = (str(kw.get("host", "localhost")), int(kw.get("port", 6379)))

    async def resolve(self) -> Addr:
        return self._addr

    def make_pool(self, addr: Addr, options: dict[str, Any]) -> ConnectionPool:
        extra: dict[str, Any] = {}
        if self.password is not None:
            extra["password"] = self.password
        if self.username is not None:
            extra["username"] = self.username
        return BlockingConnectionPool.from_url(self.url, **options, **extra)

    def check_master(self) -> None:
        pass

    async def watch(self, link: MasterLink, moved: Callable[[str], None]) -> None:
        pass

    async def close(self) -> None:
        pass

    def health_details(self) -> dict[str, object]:
        return {}


class RedisBackend(RedisBase):
    """One Redis server by URL (`redis://[user:password@]host:port/db`, `rediss://`...)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        username: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(UrlLocator(url, password=password, username=username), **options)
        self.url = url
