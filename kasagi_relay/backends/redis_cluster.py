"""The `cluster` backend: rooms spread over the shards of a Redis Cluster (docs/design.md,
storage; docs/operations.md, Redis Cluster).

A room's keys share the hash tag `{R}` (`room:{R}:seq`, `:ops`, ...), so every room lives
on one slot, hence on one shard. The backend is a router over shards, composed of the
same parts as the other Redis backends:

- a **shard** is one master link (redis_link.py) to the shard's current primary, one
  channel feed (redis_feed.py, `sharded`: SSUBSCRIBE on `room:{R}:channel`, its own
  liveness probe and backfill signal) and the store (redis_store.py) over that link. The
  link loads the `kasagi` library on the primary when it connects (at start, after a
  failover, on a new shard) and waits for the ack level on that shard (`WAIT`);
- the **router** holds the slot map from `CLUSTER SHARDS` (asked of every known node;
  the answer most of them give wins), refreshed every `poll_interval_s` and at once when
  a command fails in a way that suggests the map moved (MOVED, a dead primary, a
  `sunsubscribe` from the server). A shard keeps its identity across a failover (its
  promoted replica is recognised), so its link reconnects and its feed re-subscribes and
  signals a resync, as under Sentinel;
- the **roles** (`ClusterLog`, `ClusterSnapshots`, `ClusterFeed`, `ClusterPresence`: each
  shard also has the presence role of redis_presence.py, its events on SSUBSCRIBE) pick
  the shard of the
  room's slot for each call. MOVED (the slot moved for good) updates the map and retries
  on the new owner; ASK and TRYAGAIN (a slot being migrated) and CLUSTERDOWN retry with a
  short backoff until `op_timeout_s`. Neither reply means the command ran, so the retry
  is safe even for an unkeyed publish. The feed and presence roles each keep their rooms'
  subscriptions on the shards of their slots with one `Homing`: a room whose slot moved is
  subscribed on the new shard, then the feed tells the relay to backfill it from `ops` and
  presence to reconcile its lists.

Nothing is acknowledged that did not reach the ack level on the room's shard. What a
cluster cannot promise (a slot migrated and its new primary lost before its replica had
the keys) is in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    TryAgainError,
)

from kasagi_relay.backends.base import Backend, Listener, PresenceListener, PresenceOp
from kasagi_relay.backends.redis_feed import ChannelFeed
from kasagi_relay.backends.redis_link import Addr, MasterLink, addr_pool, command, quick_client
from kasagi_relay.backends.redis_presence import RedisPresence
from kasagi_relay.backends.redis_store import RedisLog, RedisSnapshots, room_keys
from kasagi_relay.domain import AckLevel, BackendUnavailable, DeltaKind, Op, Snapshot
from kasagi_relay.loops import cancel_and_wait

__all__ = [
    "ClusterBackend",
    "ClusterFeed",
    "ClusterLog",
    "ClusterPresence",
    "ClusterRouter",
    "ClusterSnapshots",
    "Shard",
    "room_slot",
]

logger = logging.getLogger("kasagi_relay.backends.cluster")

T = TypeVar("T")
SLOTS = 16384

# Replies that say "not here, not now": the command did not run.
_REDIRECTS = (AskError, TryAgainError, ClusterDownError, ReadOnlyError)


def room_slot(room: str) -> int:
    """The hash slot of every key of `room` (docs/protocol.md: the `{R}` hash tag)."""
    return int(key_slot(room_keys(room)["seq"].encode()))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fields(reply: Any) -> dict[str, Any]:
    """A RESP2 flat [k, v, ...] list (or a RESP3 map) as a dict with str keys."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(k): v for k, v in zip(reply[::2], reply[1::2], strict=False)}


@dataclass(frozen=True)
class ShardView:
    """One shard as a node describes it: its slot ranges, primary and replicas."""

    ranges: tuple[tuple[int, int], ...]
    primary_id: str
    primary: Addr
    node_ids: frozenset[str]
    replicas: tuple[Addr, ...]


# redis-py's connect timeout includes the TLS handshake, and a burst of new pooled
# connections (many rooms' first writes at once) queues its handshakes on a busy host: three
# test processes at once on 2 CPUs went past 1 s (tests/backends/test_redis_cluster_tls.py).
TLS_CONNECT_TIMEOUT_S = 3.0


def parse_shards(reply: Any, tls: bool = False) -> list[ShardView]:
    """CLUSTER SHARDS (Redis >= 7.0) as views; shards without slots or a primary are left
    out (a node being added, a shard whose primary failed and has no replica). `tls`: the
    nodes' `tls-port`, where they have one (a node with both lists both)."""
    out: list[ShardView] = []
    for raw in reply:
        shard = _fields(raw)
        flat = [int(x) for x in shard.get("slots", [])]
        ranges = tuple(zip(flat[::2], flat[1::2], strict=False))
        primary: tuple[str, Addr] | None = None
        ids: set[str] = set()
        replicas: list[Addr] = []
        for rawnode in shard.get("nodes", []):
            node = _fields(rawnode)
            nid = _text(node.get("id", ""))
            ids.add(nid)
            port = (node.get("tls-port") if tls else None) or node.get("port", 0)
            addr = (_text(node.get("ip") or node.get("endpoint")), int(port))
            if _text(node.get("role", "")) == "master":
                if _text(node.get("health", "online")) != "fail" or primary is None:
                    primary = (nid, addr)
            else:
                replicas.append(addr)
        if ranges and primary is not None:
            out.append(ShardView(ranges, primary[0], primary[1], frozenset(ids), tuple(replicas)))
    return out


def _signature(views: list[ShardView]) -> tuple[tuple[tuple[tuple[int, int], ...], str], ...]:
    return tuple(sorted((v.ranges, v.primary_id) for v in views))


def _answer_key(views: list[ShardView]) -> object:
    """What two answers must share to be the same map: slots, primaries, members."""
    return (_signature(views), tuple(sorted(tuple(sorted(v.node_ids)) for v in views)))


class ShardLocator:
    """Where one shard's primary is: what the router's slot map says now."""

    def __init__(self, router: ClusterRouter, shard: Shard) -> None:
        self.router = router
        self.shard = shard

    async def resolve(self) -> Addr:
        return self.shard.primary

    def make_pool(self, addr: Addr, options: dict[str, Any]) -> ConnectionPool:
        return self.router.make_pool(addr, options)

    def check_master(self) -> None:
        self.router.refresh_soon()

    async def watch(self, link: MasterLink, moved: Callable[[str], None]) -> None:
        self.shard.moved = moved

    async def close(self) -> None:
        pass

    def health_details(self) -> dict[str, object]:
        return {"slots": [f"{a}-{b}" for a, b in self.shard.ranges]}


@dataclass(eq=False)
class Shard:
    """One shard: its link, its feed, and the store over the link."""

    name: str
    primary: Addr
    primary_id: str
    node_ids: frozenset[str]
    ranges: tuple[tuple[int, int], ...]
    link: MasterLink = field(init=False)
    feed: ChannelFeed = field(init=False)
    log: RedisLog = field(init=False)
    snapshots: RedisSnapshots = field(init=False)
    presence: RedisPresence = field(init=False)
    moved: Callable[[str], None] = field(default=lambda reason: None, init=False)


class ClusterRouter:
    """The slot map and the shards; hands each room's calls to its shard."""

    def __init__(
        self,
        seeds: Sequence[Addr],
        *,
        password: str | None = None,
        username: str | None = None,
        ack: AckLevel = "replica",
        wait_timeout_ms: int = 1000,
        op_timeout_s: float = 10.0,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float | None = None,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
        poll_interval_s: float = 1.0,
        node_timeout_s: float = 0.5,
        tls: dict[str, Any] | None = None,
    ) -> None:
        if not seeds:
            raise ValueError("at least one cluster node address is needed")
        self.seeds = [(str(h), int(p)) for h, p in seeds]
        self.password = password
        self.username = username
        # SSLConnection options (--redis-tls-ca): TLS to every node, on its tls-port.
        self.tls = tls
        self.ack: AckLevel = ack
        self.link_options: dict[str, Any] = {
            "wait_timeout_ms": wait_timeout_ms,
            "op_timeout_s": op_timeout_s,
            "socket_timeout_s": socket_timeout_s,
            "connect_timeout_s": connect_timeout_s or (TLS_CONNECT_TIMEOUT_S if tls else 1.0),
        }
        self.op_timeout_s = op_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.poll_interval_s = poll_interval_s
        self.node_timeout_s = node_timeout_s
        self.shards: list[Shard] = []
        self._slots: list[Shard | None] = [None] * SLOTS
        self._known: set[Addr] = set(self.seeds)
        self._last_answer: object = None
        self._clients: dict[Addr, Redis] = {}
        self._look_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._started = False
        self._counter = 0
        self.refreshes = 0  # slot maps that changed something (tests and /healthz)
        # Called after every change of the map; each role's Homing chains itself on.
        self.on_remap: Callable[[], None] = lambda: None
        self.listener: Callable[[Shard], Listener] | None = None
        self.presence_listener: PresenceListener | None = None

    # ------------------------------------------------------------------ connections

    def make_pool(self, addr: Addr, options: dict[str, Any]) -> ConnectionPool:
        return addr_pool(addr, options, self.password, self.username, self.tls)

    def _node_client(self, addr: Addr) -> Redis:
        client = self._clients.get(addr)
        if client is None:
            client = self._clients[addr] = quick_client(
                addr, self.node_timeout_s, self.password, self.username, self.tls
            )
        return client

    # ------------------------------------------------------------------ the slot map

    def shard_for(self, room: str) -> Shard | None:
        return self._slots[room_slot(room)]

    def refresh_soon(self) -> None:
        self._look_now.set()

    async def _ask(self, addr: Addr) -> list[ShardView] | None:
        try:
            reply = await command(self._node_client(addr), "CLUSTER", "SHARDS")
            return parse_shards(reply, tls=self.tls is not None)
        except (AuthenticationError, AuthorizationError):
            raise  # a wrong password is a configuration error: say so
        except Exception as exc:
            logger.debug("cluster node %s:%d: %s", *addr, exc)
            return None

    async def refresh(self) -> bool:
        """Ask every known node for the map and apply the answer most of them give (a node
        that has not heard of a failover yet is outvoted). False when none answered."""
        addrs = sorted(self._known)
        answers = [a for a in await asyncio.gather(*map(self._ask, addrs)) if a]
        if not answers:
            return False
        votes = Counter(_answer_key(a) for a in answers)
        top = votes.most_common(1)[0][0]
        if top == self._last_answer:
            return True  # nothing changed since the last map
        views = next(a for a in answers if _answer_key(a) == top)
        for v in views:
            self._known.add(v.primary)
            self._known.update(v.replicas)
        self._apply(views)
        self._last_answer = top
        return True

    def _apply(self, views: list[ShardView]) -> None:
        changed = False
        slots: list[Shard | None] = [None] * SLOTS
        live: set[int] = set()
        for v in views:
            shard = self._match(v)
            if shard is None:
                shard = self._new_shard(v)
                changed = True
            elif shard.primary != v.primary or shard.ranges != v.ranges:
                moved_primary = shard.primary != v.primary
                shard.primary, shard.primary_id = v.primary, v.primary_id
                shard.ranges = v.ranges
                changed = True
                if moved_primary:
                    logger.warning("cluster shard %s: primary is now %s:%d", shard.name, *v.primary)
                    shard.moved(f"the cluster promoted {v.primary[0]}:{v.primary[1]}")
            shard.node_ids = v.node_ids | {v.primary_id}
            live.add(id(shard))
            for first, last in v.ranges:
                for slot in range(first, last + 1):
                    slots[slot] = shard
        for shard in self.shards:
            if id(shard) not in live and shard.ranges:
                # No slots any more (all migrated away, or its nodes left): idle.
                shard.ranges = ()
                changed = True
        if changed or slots != self._slots:
            self._slots = slots
            self.refreshes += 1
            self.on_remap()

    def _match(self, view: ShardView) -> Shard | None:
        """The shard `view` continues: same primary, or its primary was one of our nodes
        (a promoted replica)."""
        for shard in self.shards:
            if shard.primary_id == view.primary_id:
                return shard
        for shard in self.shards:
            if view.primary_id in shard.node_ids:
                return shard
        return None

    def _new_shard(self, view: ShardView) -> Shard:
        self._counter += 1
        shard = Shard(
            f"s{self._counter}", view.primary, view.primary_id, view.node_ids, view.ranges
        )
        locator = ShardLocator(self, shard)
        shard.link = MasterLink(locator, ack=self.ack, **self.link_options)
        shard.feed = ChannelFeed(
            shard.link,
            probe_interval_s=self.probe_interval_s,
            probe_timeout_s=self.probe_timeout_s,
            sharded=True,
            slot_moved=lambda reason: self.refresh_soon(),
        )
        shard.log = RedisLog(shard.link, shard.feed.take_divergence)
        shard.snapshots = RedisSnapshots(shard.link)
        shard.presence = RedisPresence(
            shard.link,
            probe_interval_s=self.probe_interval_s,
            probe_timeout_s=self.probe_timeout_s,
            sharded=True,
            slot_moved=lambda reason: self.refresh_soon(),
        )
        self.shards.append(shard)
        if self.listener is not None:
            shard.feed.set_listener(self.listener(shard))
        if self.presence_listener is not None:
            shard.presence.set_listener(self.presence_listener)
        if self._started:
            task = asyncio.ensure_future(self._start_shard(shard, wait=False))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        logger.info("cluster shard %s: primary %s:%d", shard.name, *view.primary)
        return shard

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Map the cluster, connect every shard (loading the library) and subscribe."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout_s
        while not await self.refresh():
            if loop.time() > deadline:
                logger.warning("cluster: no node of %s answered; retrying", self.seeds)
                break
            await asyncio.sleep(0.2)
        self._started = True
        await asyncio.gather(*(self._start_shard(s, wait=True) for s in list(self.shards)))
        self._task = asyncio.ensure_future(self._poll())
        self._task.set_name("kasagi-cluster-poll")

    async def _start_shard(self, shard: Shard, *, wait: bool) -> None:
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await shard.link.connect_current(force_load=True)
        except (AuthenticationError, AuthorizationError):
            raise
        except Exception as exc:
            logger.warning("cluster shard %s: no primary yet (%s); retrying", shard.name, exc)

        def moved(reason: str) -> None:
            shard.feed.doubt(reason)
            shard.presence.feed.doubt(reason)

        await shard.link.locator.watch(shard.link, moved)
        shard.feed.start()
        shard.presence.start()
        if wait and shard.link.addr is not None:
            # Ready means subscribed too: the relay's first join must not miss a delta.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.op_timeout_s):
                    await shard.feed.ready.wait()

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._look_now.wait()
            self._look_now.clear()
            try:
                await self.refresh()
            except Exception as exc:
                logger.warning("cluster: mapping the slots: %s", exc)
            # At most ~10 maps a second however many commands fail meanwhile.
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        for starting in list(self._starting):
            starting.cancel()
        for shard in self.shards:
            await shard.feed.close()
            await shard.presence.close()
            await shard.link.close()
        clients, self._clients = self._clients, {}
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()

    # ------------------------------------------------------------------ routing

    async def routed(self, room: str, fn: Callable[[Shard], Awaitable[T]]) -> T:
        """fn(the shard of `room`), again on the new owner after MOVED, and with backoff
        while the slot is migrating or its shard has no primary, until op_timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout_s
        delay = 0.01
        while True:
            shard = self.shard_for(room)
            if shard is not None:
                try:
                    return await fn(shard)
                except MovedError as exc:
                    self._follow(exc)
                    last: BaseException = exc
                except _REDIRECTS as exc:
                    last = exc
            else:
                last = BackendUnavailable(f"no shard serves the slot of room {room}")
            self.refresh_soon()
            if loop.time() + delay > deadline:
                raise BackendUnavailable(f"room {room}: no shard took the command ({last})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _follow(self, exc: MovedError) -> None:
        """MOVED <slot> <host:port>: the slot is served there now, for good."""
        addr = (str(exc.host), int(exc.port))
        for shard in self.shards:
            if shard.primary == addr:
                if self._slots[exc.slot_id] is not shard:
                    self._slots = list(self._slots)
                    self._slots[exc.slot_id] = shard
                    self.on_remap()
                return
        self._known.add(addr)


Done = Callable[[int | None, BaseException | None], None]


class _Detour:
    """A room's deltas on their way to a shard (ClusterLog.publish_soon): `inline` handed to
    a shard's batch and not answered yet; while `held` (a shard refused one of them, or the
    slot had no shard), `waiting` holds the room's deltas for the routed way by hand-over
    number, sent one at a time (`running`) once none is inline any more."""

    __slots__ = ("inline", "next", "running", "waiting")

    def __init__(self) -> None:
        self.inline = 0
        self.next = 0
        self.running = False
        self.waiting: list[tuple[int, DeltaKind, bytes, str | None, Done]] = []

    def number(self) -> int:
        n = self.next
        self.next += 1
        return n

    @property
    def held(self) -> bool:
        return self.running or bool(self.waiting)

    def hold(self, n: int, kind: DeltaKind, body: bytes, key: str | None, done: Done) -> None:
        bisect.insort(self.waiting, (n, kind, body, key, done), key=lambda w: w[0])


class ClusterLog:
    """The `Log` role: each call on the store of the room's shard."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router
        self._routing: set[asyncio.Future[None]] = set()
        # Rooms with deltas on their way (`publish_soon`); forgotten once none is.
        self._detours: dict[str, _Detour] = {}

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        return await self.router.routed(room, lambda s: s.log.publish(room, kind, body, key))

    def publish_soon(
        self, room: str, kind: DeltaKind, body: bytes, key: str | None, done: Done
    ) -> None:
        """`publish` without a coroutine (RedisLog.publish_soon on the shard of the room's
        slot): in the shard's batch now. A delta the shard did not take because the slot
        is elsewhere (MOVED, ASK: it did not run) and one whose slot has no shard yet go
        the `routed` way, which follows the slot; from then on the room's deltas, those
        still in a batch that the old shard refuses later included, go that way one at a
        time in the order they were handed over, until none is left (handed over in the
        turn the MOVED came back, one went to the new shard ahead of the refused ones)."""
        detour = self._detours.get(room)
        if detour is None:
            detour = self._detours[room] = _Detour()
        n = detour.number()
        shard = None if detour.held else self.router.shard_for(room)
        if shard is None:
            detour.hold(n, kind, body, key, done)
            self._pump(room, detour)
            return
        detour.inline += 1

        def answered(seq: int | None, exc: BaseException | None) -> None:
            detour.inline -= 1
            if isinstance(exc, MovedError):
                self.router._follow(exc)
            if isinstance(exc, _REDIRECTS):  # MovedError is an AskError
                self.router.refresh_soon()
                detour.hold(n, kind, body, key, done)
            else:
                done(seq, exc)
            self._pump(room, detour)

        shard.log.publish_soon(room, kind, body, key, answered)

    def _pump(self, room: str, detour: _Detour) -> None:
        """Send the room's held deltas the routed way once none is inline; forget the room
        once nothing of it is on its way."""
        if detour.running or detour.inline:
            return
        if not detour.waiting:
            if self._detours.get(room) is detour:
                del self._detours[room]
            return
        detour.running = True

        async def send() -> None:
            try:
                while detour.waiting:
                    _, kind, body, key, done = detour.waiting.pop(0)
                    try:
                        seq = await self.publish(room, kind, body, key)
                    except asyncio.CancelledError as exc:
                        done(None, exc)
                        for *_, rest in detour.waiting:  # the loop is going away
                            rest(None, exc)
                        detour.waiting.clear()
                        raise
                    except Exception as exc:
                        done(None, exc)
                    else:
                        done(seq, None)
            finally:
                detour.running = False
                self._pump(room, detour)

        task = asyncio.ensure_future(send())
        self._routing.add(task)
        task.add_done_callback(self._routing.discard)

    async def seen_key(self, room: str, key: str, kind: DeltaKind, body: bytes) -> int | None:
        return await self.router.routed(room, lambda s: s.log.seen_key(room, key, kind, body))

    async def seen_any(self, room: str, key: str) -> int | None:
        return await self.router.routed(room, lambda s: s.log.seen_any(room, key))

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        return await self.router.routed(room, lambda s: s.log.read_ops(room, after, limit))

    async def last_seq(self, room: str) -> int:
        return await self.router.routed(room, lambda s: s.log.last_seq(room))


class ClusterSnapshots:
    """The `Snapshots` role: each call on the store of the room's shard."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router

    async def read_snapshot(self, room: str) -> Snapshot | None:
        return await self.router.routed(room, lambda s: s.snapshots.read_snapshot(room))

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        return await self.router.routed(room, lambda s: s.snapshots.write_snapshot(room, snapshot))

    async def snapshot_seq(self, room: str) -> int:
        return await self.router.routed(room, lambda s: s.snapshots.snapshot_seq(room))

    async def write_live_snapshot(
        self, room: str, snapshot: Snapshot, ops: Sequence[str]
    ) -> bool | None:
        return await self.router.routed(
            room, lambda s: s.snapshots.write_live_snapshot(room, snapshot, ops)
        )

    async def trim(self, room: str, keep_from: int, max_len: int, max_bytes: int = 0) -> None:
        await self.router.routed(
            room, lambda s: s.snapshots.trim(room, keep_from, max_len, max_bytes)
        )

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        return await self.router.routed(room, lambda s: s.snapshots.acquire_lock(room, ttl_ms))

    async def release_lock(self, room: str, token: str) -> None:
        await self.router.routed(room, lambda s: s.snapshots.release_lock(room, token))


class _ShardListener:
    """What one shard's feed reports, for the relay: a resync of "everything" on one
    shard is a resync of that shard's rooms only."""

    def __init__(self, feed: ClusterFeed, shard: Shard) -> None:
        self.feed = feed
        self.shard = shard

    def on_op(self, room: str, op: Op) -> None:
        if self.feed.listener is not None:
            self.feed.listener.on_op(room, op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        if self.feed.listener is not None:
            self.feed.listener.on_resync(
                frozenset(self.shard.feed.rooms) if rooms is None else rooms
            )


class RoomSubscriptions(Protocol):
    """What a shard-local role offers the homing: a room's subscription on that shard."""

    async def subscribe(self, room: str) -> None: ...

    async def unsubscribe(self, room: str) -> None: ...


class Homing:
    """Which shard carries each subscribed room, for one shard-local role (`local(shard)`:
    the feed, the presence events). A room is subscribed on the shard of its slot; when
    the map moves the slot, it is unsubscribed there, subscribed on the new shard, and
    then `moved(room, new)` tells the role (to catch up on what it missed meanwhile)."""

    def __init__(
        self,
        router: ClusterRouter,
        role: str,
        local: Callable[[Shard], RoomSubscriptions],
        moved: Callable[[str, Shard], None],
    ) -> None:
        self.router = router
        self.role = role
        self.local = local
        self.moved = moved
        self.homes: dict[str, Shard] = {}  # room -> the shard whose subscription carries it
        self._moving: set[asyncio.Task[None]] = set()
        before = router.on_remap

        def on_remap() -> None:
            before()
            self._remap()

        router.on_remap = on_remap

    async def subscribe(self, room: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.router.op_timeout_s
        while True:
            shard = self.router.shard_for(room)
            if shard is None:
                if loop.time() > deadline:
                    raise BackendUnavailable(f"cannot subscribe to {room}: no shard serves it")
                self.router.refresh_soon()
                await asyncio.sleep(0.05)
                continue
            self.homes[room] = shard
            await self.local(shard).subscribe(room)
            if self.homes.get(room) is shard:
                return
            # Unsubscribed meanwhile: done. Re-homed meanwhile (a move task runs): once
            # more on the new home, so that the room is subscribed where its slot is when
            # this returns.
            if room not in self.homes:
                return

    async def unsubscribe(self, room: str) -> None:
        shard = self.homes.pop(room, None)
        if shard is not None:
            await self.local(shard).unsubscribe(room)

    def _remap(self) -> None:
        for room, shard in list(self.homes.items()):
            new = self.router.shard_for(room)
            if new is not None and new is not shard:
                self.homes[room] = new
                task = asyncio.ensure_future(self._move(room, shard, new))
                self._moving.add(task)
                task.add_done_callback(self._moving.discard)

    async def _move(self, room: str, old: Shard, new: Shard) -> None:
        logger.info(
            "room %s: slot moved from shard %s to %s (%s)", room, old.name, new.name, self.role
        )
        with contextlib.suppress(Exception):
            await self.local(old).unsubscribe(room)
        try:
            await self.local(new).subscribe(room)
        except BackendUnavailable as exc:
            logger.warning("room %s: %s on shard %s: %s", room, self.role, new.name, exc)
        self.moved(room, new)

    async def close(self) -> None:
        for task in list(self._moving):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._moving, return_exceptions=True)
        self.homes.clear()


class ClusterFeed:
    """The `Feed` role: each room subscribed on its shard's feed, moved with its slot."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router
        self.listener: Listener | None = None
        self.homing = Homing(router, "feed", lambda shard: shard.feed, self._moved)
        router.listener = lambda shard: _ShardListener(self, shard)

    def set_listener(self, listener: Listener) -> None:
        self.listener = listener
        for shard in self.router.shards:
            shard.feed.set_listener(_ShardListener(self, shard))

    async def subscribe(self, room: str) -> None:
        await self.homing.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self.homing.unsubscribe(room)

    def _moved(self, room: str, new: Shard) -> None:
        # What was published on `new` before the subscription is in its `ops`: backfill.
        if self.homing.homes.get(room) is new and self.listener is not None:
            self.listener.on_resync(frozenset({room}))

    async def close(self) -> None:
        await self.homing.close()


class ClusterPresence:
    """The `Presence` role: each room's calls and event subscription on its shard; a room
    whose slot moved is subscribed on the new shard, then the relay reconciles (resync)."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router
        self.listener: PresenceListener | None = None
        self.homing = Homing(router, "presence", lambda shard: shard.presence, self._moved)

    def set_listener(self, listener: PresenceListener) -> None:
        self.listener = listener
        self.router.presence_listener = listener
        for shard in self.router.shards:
            shard.presence.set_listener(listener)

    async def add(self, room: str, conn: str, entry: bytes, ttl_s: float) -> None:
        await self.router.routed(room, lambda s: s.presence.add(room, conn, entry, ttl_s))

    async def remove(self, room: str, conn: str, entry: bytes) -> None:
        await self.router.routed(room, lambda s: s.presence.remove(room, conn, entry))

    async def write(self, ops: Sequence[PresenceOp], ttl_s: float) -> None:
        """One pipeline per shard (the shards at once); a call a node redirected goes
        again, alone and in order, to its room's shard (a room's calls stay in order:
        they all share its slot, so the ones after a redirected one are redirected too)."""
        shards: dict[int, tuple[Shard, list[PresenceOp]]] = {}
        stray: list[PresenceOp] = []
        for op in ops:
            shard = self.router.shard_for(op[0])
            if shard is None:
                stray.append(op)
            else:
                shards.setdefault(id(shard), (shard, []))[1].append(op)

        async def one_by_one(left: list[PresenceOp]) -> None:
            for op in left:

                def alone(shard: Shard, op: PresenceOp = op) -> Awaitable[None]:
                    return shard.presence.write([op], ttl_s)

                await self.router.routed(op[0], alone)

        async def on(shard: Shard, shard_ops: list[PresenceOp]) -> None:
            redirected = await shard.presence.write_some(shard_ops, ttl_s)
            if redirected:
                for _, exc in redirected:
                    if isinstance(exc, MovedError):
                        self.router._follow(exc)
                self.router.refresh_soon()
                await one_by_one([op for op, _ in redirected])

        results = await asyncio.gather(
            *(on(shard, shard_ops) for shard, shard_ops in shards.values()),
            one_by_one(stray),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def refresh(self, room: str, entries: dict[str, bytes], ttl_s: float) -> None:
        await self.router.routed(room, lambda s: s.presence.refresh(room, entries, ttl_s))

    async def members(self, room: str) -> list[bytes]:
        return await self.router.routed(room, lambda s: s.presence.members(room))

    async def subscribe(self, room: str) -> None:
        await self.homing.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self.homing.unsubscribe(room)

    def _moved(self, room: str, new: Shard) -> None:
        # Events announced on `new` before the subscription are missed: reconcile.
        if self.listener is not None:
            self.listener.on_presence_resync()

    async def close(self) -> None:
        await self.homing.close()


class ClusterBackend(Backend):
    """A Redis Cluster from any of its nodes (`--cluster host:port,...`)."""

    name = "cluster"

    def __init__(
        self,
        nodes: Sequence[Addr],
        *,
        password: str | None = None,
        username: str | None = None,
        ack: AckLevel = "replica",
        **options: Any,
    ) -> None:
        self.router = ClusterRouter(nodes, password=password, username=username, ack=ack, **options)
        self.cluster_log = ClusterLog(self.router)
        self.cluster_feed = ClusterFeed(self.router)
        self.cluster_presence = ClusterPresence(self.router)
        super().__init__(
            self.cluster_log,
            ClusterSnapshots(self.router),
            self.cluster_feed,
            self.cluster_presence,
        )

    @property
    def ack(self) -> AckLevel:
        return self.router.ack

    async def _seen_any(self, room: str, key: str) -> int | None:
        return await self.cluster_log.seen_any(room, key)

    async def start(self) -> None:
        await self.router.start()

    async def close(self) -> None:
        await self.cluster_feed.close()
        await self.cluster_presence.close()
        await self.router.close()

    async def health(self) -> dict[str, object]:
        shards: list[dict[str, object]] = []
        ok = bool(self.router.shards)
        covered = sum(1 for s in self.router._slots if s is not None)
        for shard in self.router.shards:
            if not shard.ranges:
                continue
            link, feed = shard.link, shard.feed
            entry: dict[str, object] = {
                "shard": shard.name,
                "ok": False,
                "primary": None if link.addr is None else f"{link.addr[0]}:{link.addr[1]}",
                "slots": [f"{a}-{b}" for a, b in shard.ranges],
                "subscribed": feed.ready.is_set(),
                "rooms": len(feed.rooms),
                "switches": link.switches,
            }
            try:
                is_master = await link.is_master()
                entry["ok"] = is_master and feed.ready.is_set() and feed.caught_up
                if not is_master:
                    entry["error"] = "the server is not a primary"
            except Exception as exc:
                entry["error"] = str(exc) or type(exc).__name__
            if not entry["ok"]:
                ok = False
                self.router.refresh_soon()
            shards.append(entry)
        return {
            "ok": ok and covered == SLOTS,
            "backend": self.name,
            "ack": self.router.ack,
            "slots_covered": covered,
            "rooms": len(self.cluster_feed.homing.homes),
            "shards": shards,
        }
