"""The `sentinel` backend: the master found and followed through Redis Sentinel.

Everything that talks to the master is the master link's and the feed's (redis.py composes
them); this module is the locator: it only answers "where is the master now?" and notices
when the answer changes:

- Resolution asks every Sentinel at once (`SENTINEL MASTER <name>`) and trusts the answer
  with the highest config-epoch (the epoch of the failover that produced it), so one
  Sentinel that has not heard of a failover yet cannot send us back to the old master.
- A watch per Sentinel subscribes to `+switch-master` (the fast path), and a poll
  re-resolves every `poll_interval_s` and whenever a command failed in a way that suggests
  the master moved (READONLY, connection errors): pub/sub from Sentinels is best-effort,
  and a Sentinel can be down or partitioned.
- `+try-failover` fences the link (writes wait, in-flight replies are not trusted) until
  the new master is in use or the failover is aborted.
- When the answer differs from the master in use, the feed is told (`moved`): it
  reconnects the link to the new master (checking its ROLE and its function library),
  re-subscribes every room and tells the relay to backfill from `ops`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import AuthenticationError, AuthorizationError

from kasagi_relay.backends.base import AckLevel, BackendUnavailable
from kasagi_relay.backends.redis import RedisBase
from kasagi_relay.backends.redis_link import Addr, MasterLink, addr_pool, command, quick_client
from kasagi_relay.loops import cancel_and_wait

__all__ = ["SentinelBackend", "SentinelLocator"]

logger = logging.getLogger("kasagi_relay.backends.sentinel")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pairs(reply: Any) -> dict[str, str]:
    """A Sentinel reply as a dict (redis-py may or may not have parsed the flat list)."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    return {_text(k): _text(v) for k, v in zip(reply[::2], reply[1::2], strict=False)}


# Sentinel events watched: +try-failover comes from the Sentinel that leads a failover
# (automatic or SENTINEL FAILOVER) a few timer ticks (>= ~200 ms) BEFORE it promotes a
# replica, early enough to fence the old master; +switch-master ends it.
_EVENTS = (
    "+switch-master",
    "+try-failover",
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
)


class SentinelLocator:
    def __init__(
        self,
        sentinels: Sequence[Addr],
        master: str = "kasagi-master",
        *,
        password: str | None = None,
        username: str | None = None,
        sentinel_password: str | None = None,
        poll_interval_s: float = 1.0,
        sentinel_timeout_s: float = 0.5,
        fence_max_s: float = 10.0,
        fence: bool = True,
    ) -> None:
        if not sentinels:
            raise ValueError("at least one Sentinel address is needed")
        self.sentinels = [(str(h), int(p)) for h, p in sentinels]
        self.master_name = master
        self.password = password
        self.username = username
        self.sentinel_password = sentinel_password
        self.poll_interval_s = poll_interval_s
        self.sentinel_timeout_s = sentinel_timeout_s
        self.fence_max_s = fence_max_s
        # Off only to show what it protects against (tests): never in production.
        self.fence_enabled = fence
        self._sentinel_clients: dict[Addr, Redis] = {}
        self._look_now = asyncio.Event()
        self._announced: Addr | None = None
        self._last_answers: dict[str, object] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._link: MasterLink | None = None
        self._moved: Callable[[str], None] = lambda reason: None

    def make_pool(self, addr: Addr, options: dict[str, Any]) -> ConnectionPool:
        return addr_pool(addr, options, self.password, self.username)

    def _sentinel(self, addr: Addr) -> Redis:
        client = self._sentinel_clients.get(addr)
        if client is None:
            client = self._sentinel_clients[addr] = quick_client(
                addr, self.sentinel_timeout_s, self.sentinel_password
            )
        return client

    async def _ask(self, addr: Addr) -> tuple[int, Addr] | None:
        try:
            reply = await command(self._sentinel(addr), "SENTINEL", "MASTER", self.master_name)
        except (AuthenticationError, AuthorizationError):
            raise  # a wrong --sentinel-password is a configuration error: say so
        except Exception as exc:
            logger.debug("Sentinel %s:%d: %s", *addr, exc)
            return None
        fields = _pairs(reply)
        try:
            return int(fields.get("config-epoch", "0")), (fields["ip"], int(fields["port"]))
        except (KeyError, ValueError):
            return None

    async def _resolve(self) -> Addr:
        answers = [a for a in await asyncio.gather(*map(self._ask, self.sentinels)) if a]
        self._last_answers = {"sentinels_answering": len(answers)}
        if not answers:
            raise BackendUnavailable(
                f"no Sentinel of {len(self.sentinels)} knows master {self.master_name!r}"
            )
        top = max(epoch for epoch, _ in answers)
        votes = Counter(addr for epoch, addr in answers if epoch == top)
        return votes.most_common(1)[0][0]

    async def resolve(self) -> Addr:
        return await self._resolve()

    def check_master(self) -> None:
        self._look_now.set()

    def health_details(self) -> dict[str, object]:
        return {"master_name": self.master_name, **self._last_answers}

    async def watch(self, link: MasterLink, moved: Callable[[str], None]) -> None:
        self._link, self._moved = link, moved
        self._spawn(self._poll(link), "kasagi-sentinel-poll")
        for addr in self.sentinels:
            self._spawn(self._watch(addr), f"kasagi-sentinel-watch-{addr[0]}:{addr[1]}")

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.append(task)

    async def _poll(self, link: MasterLink) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._look_now.wait()
            self._look_now.clear()
            try:
                addr = await self._resolve()
            except Exception as exc:
                logger.warning("resolving %s: %s", self.master_name, exc)
                await asyncio.sleep(0.1)
                continue
            fenced = link.fenced_since
            now = asyncio.get_running_loop().time()
            if addr == link.addr and fenced is not None and now - fenced > self.fence_max_s:
                # A failover that never happened (aborted, events missed): same master.
                logger.warning("no failover after %.0fs: trusting %s:%d again", now - fenced, *addr)
                link.unfence()
            if addr != link.addr:
                if addr != self._announced:
                    self._announced = addr
                    logger.warning(
                        "Sentinels name %s:%d as %s (was %s)", *addr, self.master_name, link.addr
                    )
                self._moved(f"the Sentinels moved the master to {addr[0]}:{addr[1]}")
            # At most ~10 resolutions a second however many commands fail meanwhile.
            await asyncio.sleep(0.1)

    async def _watch(self, addr: Addr) -> None:
        """`+switch-master` from one Sentinel: a nudge to re-resolve at once."""
        delay = 0.1
        while True:
            ps = self._sentinel(addr).pubsub()
            try:
                await ps.subscribe(*_EVENTS)
                delay = 0.1
                while True:
                    # A long read timeout is fine: the poll covers a silent Sentinel.
                    message = await ps.get_message(timeout=self.poll_interval_s * 5)
                    if message is None:
                        async with asyncio.timeout(self.sentinel_timeout_s * 2):
                            await ps.ping()
                        continue
                    if message.get("type") in ("message", b"message"):
                        self._event(addr, _text(message["channel"]), _text(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("Sentinel %s:%d watch: %s", *addr, exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await ps.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _event(self, addr: Addr, event: str, data: str) -> None:
        words = data.split()
        if event == "+switch-master":
            ours = bool(words) and words[0] == self.master_name
        else:  # "master <name> <ip> <port>"
            ours = len(words) >= 2 and words[0] == "master" and words[1] == self.master_name
        if not ours:
            return
        logger.info("Sentinel %s:%d: %s %s", *addr, event, data)
        link = self._link
        if link is not None and event == "+try-failover" and self.fence_enabled:
            link.fence(f"Sentinel {addr[0]}:{addr[1]} started a failover")
        elif link is not None and event.startswith("-failover-abort"):
            link.unfence()
        self._look_now.set()

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            await cancel_and_wait(task)
        clients, self._sentinel_clients = self._sentinel_clients, {}
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()


class SentinelBackend(RedisBase):
    name = "sentinel"

    def __init__(
        self,
        sentinels: Sequence[Addr],
        master: str = "kasagi-master",
        *,
        password: str | None = None,
        username: str | None = None,
        sentinel_password: str | None = None,
        ack: AckLevel = "replica",
        poll_interval_s: float = 1.0,
        sentinel_timeout_s: float = 0.5,
        fence_max_s: float = 10.0,
        fence: bool = True,
        **options: Any,
    ) -> None:
        self.sentinel_locator = SentinelLocator(
            sentinels,
            master,
            password=password,
            username=username,
            sentinel_password=sentinel_password,
            poll_interval_s=poll_interval_s,
            sentinel_timeout_s=sentinel_timeout_s,
            fence_max_s=fence_max_s,
            fence=fence,
        )
        super().__init__(self.sentinel_locator, ack=ack, **options)
