"""The `redis` backend (one server by URL), and the machinery the `sentinel` backend reuses.

Writes go through the Redis Function library `kasagi` (kasagi.lua): one FCALL assigns the
seq, appends the `ops` stream entry `<seq>-0`, publishes `{"seq":N,...}` on the room's
channel and records the idempotency key, atomically. The ack level decides what follows
on the SAME connection, pipelined with the FCALL: nothing (`leader`), `WAIT 1` (`replica`)
or `WAIT n` for every connected replica (`all`). WAIT counts replicas that acknowledged
this connection's own last write, which is why it must share the FCALL's connection (and
why the function writes something even when it finds the idempotency key: see kasagi.lua).

Pub/sub is a doorbell, the `ops` stream is the truth. One pub/sub connection carries every
active room plus a private probe channel; a supervisor task owns it. A subscriber on a
frozen master hangs silently (no error, no EOF), so the supervisor PINGs on the
subscription whenever it has been quiet and declares it dead when no reply comes in time.
On any doubt it reconnects (to the master the subclass resolves now), re-subscribes every
room, waits for the confirmations, and only then tells the listener to resync, so the
relay backfills each room from `ops` with nothing falling between the two.

Errors: a command that was refused (READONLY, NOREPLICAS, LOADING, function missing...) or
never sent (connection refused) is retried with backoff against the current master until
`op_timeout_s`; a publish whose outcome is unknown (connection lost after sending) is
retried only with an idempotency key, which makes the retry safe. Whatever cannot be
promised raises BackendUnavailable: nothing is acknowledged that did not commit at the
configured level.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from kasagi_relay.backends.base import (
    AckLevel,
    Backend,
    BackendUnavailable,
    DeltaKind,
    Op,
    Snapshot,
)

__all__ = [
    "FUNCTION_VERSION",
    "LIBRARY",
    "RedisBackend",
    "RedisBase",
    "channel_key",
    "room_keys",
]

logger = logging.getLogger("kasagi_relay.backends.redis")

T = TypeVar("T")
Addr = tuple[str, int]

LIBRARY = resources.files("kasagi_relay.backends").joinpath("kasagi.lua").read_text()
_VERSION = re.search(r"^local VERSION = '([^']+)'", LIBRARY, re.MULTILINE)
assert _VERSION is not None, "kasagi.lua must define VERSION"
FUNCTION_VERSION: str = _VERSION.group(1)

_CHANNEL = re.compile(rb"room:\{(.+)\}:channel")
_MSG_SEQ = re.compile(rb'\{"seq":(\d+),')
# Errors the server sends for a command it did NOT run: safe to retry as is.
_REFUSED = ("READONLY", "NOREPLICAS", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
_RECENT = 64  # delivered deltas remembered per room to detect a lossy failover
_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def room_keys(room: str) -> dict[str, str]:
    """PROTOCOL.md's keys of a room (`{R}` is a hash tag: one shard per room)."""
    p = f"room:{{{room}}}:"
    return {
        "seq": p + "seq",
        "ops": p + "ops",
        "channel": p + "channel",
        "keys": p + "keys",
        "snapshot": p + "snapshot",
        "tick": p + "tick",
        "lock": p + "lock",
    }


def channel_key(room: str) -> str:
    return f"room:{{{room}}}:channel"


async def _command(client: Redis, *args: Any) -> Any:
    """One command (redis-py leaves execute_command untyped)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _function_missing(exc: BaseException) -> bool:
    text = str(exc)
    return "Function not found" in text or "NOSCRIPT" in text


def _refused(exc: BaseException) -> bool:
    if isinstance(exc, ResponseError):
        text = str(exc)
        return text.startswith(_REFUSED) or _function_missing(exc)
    return False


class _NotSent(Exception):
    """The connection failed before the command was written: it certainly did not run."""


class _Fenced(Exception):
    """A write's reply came back after a failover began: its WAIT proves nothing."""


class _Doubt(Exception):
    """The subscription may have missed messages (or the master moved)."""


def _digest(data: bytes) -> bytes:
    # Deltas can be large: remember a digest of each recent one, not its bytes.
    return hashlib.blake2b(data, digest_size=16).digest()


def _entry_op(entry_id: bytes, fields: dict[bytes, bytes]) -> Op:
    seq = int(entry_id.split(b"-", 1)[0])
    kind = fields.get(b"k", b"patch")
    return Op(seq, b'{"' + kind + b'":' + fields.get(b"d", b"null") + b"}")


class RedisBase(Backend):
    """Everything but finding the master: subclasses say where it is (`_resolve`)."""

    name = "redis"

    def __init__(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        ack: AckLevel = "leader",
        wait_timeout_ms: int = 1000,
        op_timeout_s: float = 10.0,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.password = password
        self.username = username
        self.ack: AckLevel = ack
        self.wait_timeout_ms = wait_timeout_ms
        self.op_timeout_s = op_timeout_s
        # A command on a frozen server fails after this; WAIT must fit inside it.
        self.socket_timeout_s = max(socket_timeout_s, wait_timeout_ms / 1000 + 1.0)
        self.connect_timeout_s = connect_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s

        self._addr: Addr | None = None
        self._pool: ConnectionPool | None = None
        self._client: Redis | None = None
        self._rooms: set[str] = set()
        # Last deltas delivered per room, and the first seq found lost after a failover.
        self._recent: dict[str, deque[tuple[int, bytes]]] = {}
        self._diverged: dict[str, int] = {}
        self._pubsub: PubSub | None = None
        self._sub_ready = asyncio.Event()
        self._confirmed: set[bytes] = set()
        self._confirm_pulse = asyncio.Event()
        self._doubt_event = asyncio.Event()
        self._doubt_reason = ""
        self._wakeup = asyncio.Event()
        # Set while a failover is under way (subclass): writes wait, in-flight replies
        # are not trusted.
        self._fenced_since: float | None = None
        self._fence_gen = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._cleanup: set[asyncio.Future[None]] = set()
        self._closing = False
        self._probe_channel = f"kasagi:probe:{secrets.token_hex(8)}"
        self._replicas_cache: tuple[float, int] = (0.0, 0)
        self.switches = 0  # master changes seen (tests and /healthz)
        self.subscriptions = 0  # successful (re)subscriptions
        self.resyncs = 0

    # ------------------------------------------------------------------ subclass hooks

    async def _resolve(self) -> Addr:
        """The address of the master to use now."""
        raise NotImplementedError

    def _make_pool(self, addr: Addr) -> ConnectionPool:
        return BlockingConnectionPool(
            host=addr[0],
            port=addr[1],
            password=self.password,
            username=self.username,
            **self._pool_options(),
        )

    def _pool_options(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
            # No hidden retries: a retried FCALL without a key could publish twice, and
            # every retry here must go to the master the subclass names now.
            "retry": Retry(NoBackoff(), 0),
            # Every publish holds a connection through its WAIT: past this many in
            # flight, publishes queue for a connection (bounded by the op timeout).
            "max_connections": 128,
            "timeout": self.op_timeout_s,
        }

    def _check_master(self) -> None:
        """A command failed in a way that suggests the master moved (subclass: look now)."""

    async def _start_watch(self) -> None:
        """Start whatever watches the master's address (subclass)."""

    def _health_details(self) -> dict[str, object]:
        return {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._closing = False
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await self._connect(await self._resolve(), force_load=True)
        except (AuthenticationError, AuthorizationError):
            raise
        except Exception as exc:
            # Not fatal: the supervisor keeps trying and /healthz says 503 meanwhile.
            logger.warning("%s backend: no master at start-up (%s); retrying", self.name, exc)
        await self._start_watch()
        self._spawn(self._supervise(), "kasagi-redis-subscriber")
        if self._pool is not None:
            # Ready means subscribed too: the relay's first join must not miss a delta.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.op_timeout_s):
                    await self._sub_ready.wait()

    def _background(self, aw: Awaitable[Any]) -> None:
        """Clean-up that nobody waits for (bounded, errors ignored)."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await aw

        task = asyncio.ensure_future(run())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._tasks.append(asyncio.ensure_future(coro))
        self._tasks[-1].set_name(name)

    async def close(self) -> None:
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._rooms.clear()
        await self._drop_pool()
        if self._cleanup:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*self._cleanup, return_exceptions=True)

    async def _drop_pool(self) -> None:
        pool, self._pool, self._client = self._pool, None, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()

    # ------------------------------------------------------------------ the master

    async def _connect(self, addr: Addr, *, force_load: bool = False) -> None:
        """Use `addr` as the master: check its role, make sure it has the library."""
        if addr == self._addr and self._pool is not None and not force_load:
            return
        pool = self._make_pool(addr)
        client = Redis(connection_pool=pool)
        try:
            role = await _command(client, "ROLE")
            if not role or role[0] not in (b"master", "master"):
                raise BackendUnavailable(f"{addr[0]}:{addr[1]} is not a master yet")
            await self._ensure_library(client, force=force_load)
        except BaseException:
            with contextlib.suppress(Exception):
                await pool.disconnect()
            raise
        old = self._pool
        if self._addr is not None and addr != self._addr:
            self.switches += 1
            self._unfence()
            logger.warning("%s backend: master is now %s:%d", self.name, *addr)
        self._addr, self._pool, self._client = addr, pool, client
        if old is not None and old is not pool:
            # In the background: closing sockets to a frozen server can take a while.
            self._background(old.disconnect())

    async def _ensure_library(self, client: Redis, *, force: bool = False) -> None:
        """Load kasagi.lua unless this server already runs our version."""
        if not force:
            try:
                have = await _command(client, "FCALL_RO", "kasagi_version", 0)
                if (have.decode() if isinstance(have, bytes) else str(have)) == FUNCTION_VERSION:
                    return
            except ResponseError as exc:
                if not _function_missing(exc):
                    raise
        await _command(client, "FUNCTION", "LOAD", "REPLACE", LIBRARY)
        logger.info("loaded the kasagi function library v%s", FUNCTION_VERSION)

    def _current(self) -> tuple[ConnectionPool, Redis]:
        if self._pool is None or self._client is None:
            raise _NotSent("no master")
        return self._pool, self._client

    async def _retrying(self, what: str, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """fn(master client) with backoff until op_timeout_s, for idempotent commands."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout_s
        delay = 0.02
        while True:
            try:
                if self._fenced_since is not None:
                    # Reads too: the old master may still serve writes that the failover
                    # is about to discard.
                    raise _NotSent("the master is being replaced (failover in progress)")
                _, client = self._current()
                return await fn(client)
            except ResponseError as exc:
                if _function_missing(exc):
                    await self._reload_library()
                elif not _refused(exc):
                    raise
                last: BaseException = exc
            except (_NotSent, *_NETWORK_ERRORS) as exc:
                last = exc
            self._check_master()
            if loop.time() + delay > deadline:
                raise BackendUnavailable(f"{what}: no master answered ({last})") from None
            await self._nap(delay)
            delay = min(delay * 2, 0.25)

    async def _reload_library(self) -> None:
        with contextlib.suppress(_NotSent, *_NETWORK_ERRORS, ResponseError):
            _, client = self._current()
            await self._ensure_library(client)

    # ------------------------------------------------------------------ publish

    async def _needed_replicas(self, client: Redis) -> int:
        if self.ack == "leader":
            return 0
        if self.ack == "replica":
            return 1
        now = asyncio.get_running_loop().time()
        at, count = self._replicas_cache
        if now - at > 1.0:
            info = await client.info("replication")
            count = int(info.get("connected_slaves", 0))
            self._replicas_cache = (now, count)
        # "all" never means "none": with no replica connected, nothing is durable beyond
        # the master, so the write must not be acknowledged as if it were.
        return max(1, count)

    async def _roundtrip(
        self, pool: ConnectionPool, commands: Sequence[Sequence[Any]]
    ) -> list[Any]:
        """Pipelined commands on ONE connection; error replies come back as exceptions."""
        try:
            conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise _NotSent(str(exc) or type(exc).__name__) from exc
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # Unknown state (timeout, cancel): never hand this connection to anyone else.
            # nowait: closing a socket to a frozen server must not wait for its FIN.
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        k = room_keys(room)
        fcall: list[Any] = [
            "FCALL", "kasagi_publish", 4, k["seq"], k["ops"], k["channel"], k["keys"], kind, body,
        ]  # fmt: skip
        if key is not None:
            fcall.append(key)
        return int(await self._durable_fcall(fcall, key))

    async def seen_key(self, room: str, key: str) -> int | None:
        fcall = ["FCALL", "kasagi_seen", 1, room_keys(room)["keys"], key]
        # Read-only when the key is unknown; retried like a keyed publish (safe: it stores
        # nothing new), and durable like one when the key is known.
        seq = await self._durable_fcall(fcall, key)
        return None if seq is None else int(seq)

    async def _durable_fcall(self, fcall: Sequence[Any], key: str | None) -> Any:
        """`fcall` on the master followed by WAIT for the ack level, retried against the
        current master until op_timeout_s; its reply once durable. Without `key`, a call
        whose outcome is unknown (connection lost after sending) is not retried."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout_s
        delay = 0.02
        while True:
            try:
                if self._fenced_since is not None:
                    raise _NotSent("the master is being replaced (failover in progress)")
                pool, client = self._current()
                needed = await self._needed_replicas(client)
                commands: list[Sequence[Any]] = [fcall]
                if needed:
                    commands.append(("WAIT", needed, self.wait_timeout_ms))
                fence_gen = self._fence_gen
                replies = await self._roundtrip(pool, commands)
                if fence_gen != self._fence_gen:
                    # A failover started while this write was in flight: the replica that
                    # confirmed it may not be the one being promoted. Not acknowledged.
                    raise _Fenced("a failover started during the write")
                result = replies[0]
                if isinstance(result, ResponseError):
                    raise result
                if needed and result is not None:  # None: nothing stored, nothing to wait for
                    confirmed = replies[1]
                    if isinstance(confirmed, Exception) or int(confirmed) < needed:
                        raise BackendUnavailable(
                            f"seq {result} reached {confirmed} of {needed} replica(s) within "
                            f"{self.wait_timeout_ms} ms: not acknowledged, retry with the key"
                        )
                return result
            except ResponseError as exc:
                if _function_missing(exc):
                    await self._reload_library()
                elif not _refused(exc):
                    raise
                last: BaseException = exc
            except _NotSent as exc:
                last = exc
            except (_Fenced, *_NETWORK_ERRORS) as exc:
                # Sent, outcome unknown: only an idempotency key makes a retry safe.
                if key is None:
                    self._check_master()
                    raise BackendUnavailable(
                        f"connection lost during publish ({exc}); it may or may not be "
                        "stored: resend with an idempotency key"
                    ) from None
                last = exc
            self._check_master()
            if loop.time() + delay > deadline:
                raise BackendUnavailable(f"no writable master ({last})") from None
            await self._nap(delay)
            delay = min(delay * 2, 0.25)

    # ------------------------------------------------------------------ history, snapshots

    async def read_ops(self, room: str, after: int, limit: int | None = None) -> list[Op] | None:
        k = room_keys(room)

        async def read(client: Redis) -> tuple[list[Any], Any]:
            pipe = client.pipeline(transaction=True)  # one consistent view of ops and seq
            pipe.xrange(k["ops"], min=f"{after + 1}-0", max="+", count=limit)
            pipe.get(k["seq"])
            entries, last = await pipe.execute()
            return entries, last

        entries, last_raw = await self._retrying("read_ops", read)
        last = int(last_raw or 0)
        bad = self._diverged.get(room)
        if bad is not None and after >= bad:
            # The caller holds a delta this master stores differently or not at all.
            del self._diverged[room]
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
        raw = await self._retrying("last_seq", lambda c: c.get(k["seq"]))
        return int(raw or 0)

    async def read_snapshot(self, room: str) -> Snapshot | None:
        k = room_keys(room)
        data, seq, tick = await self._retrying(
            "read_snapshot", lambda c: c.hmget(k["snapshot"], ["data", "seq", "tick"])
        )
        if seq is None or data is None:
            return None
        raw = data if isinstance(data, bytes) else str(data).encode()
        return Snapshot(int(seq), raw, int(tick or 0))

    async def _fcall(self, what: str, *args: Any) -> Any:
        return await self._retrying(what, lambda c: _command(c, "FCALL", *args))

    async def write_snapshot(self, room: str, snapshot: Snapshot) -> bool:
        k = room_keys(room)
        try:
            written = await self._fcall(
                "write_snapshot", "kasagi_snapshot", 2, k["snapshot"], k["seq"],
                snapshot.seq, snapshot.data, snapshot.tick,
            )  # fmt: skip
        except ResponseError as exc:
            if "past the room seq" in str(exc):
                raise ValueError(str(exc)) from None
            raise
        return bool(int(written))

    async def trim(self, room: str, keep_from: int, max_len: int) -> None:
        k = room_keys(room)
        await self._fcall(
            "trim", "kasagi_trim", 3, k["seq"], k["ops"], k["snapshot"], keep_from, max_len
        )

    async def acquire_lock(self, room: str, ttl_ms: int) -> str | None:
        k = room_keys(room)
        token = secrets.token_hex(12)
        ok = await self._retrying(
            "acquire_lock", lambda c: c.set(k["lock"], token, nx=True, px=ttl_ms)
        )
        return token if ok else None

    async def release_lock(self, room: str, token: str) -> None:
        k = room_keys(room)
        await self._fcall("release_lock", "kasagi_unlock", 1, k["lock"], token)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, room: str) -> None:
        """Returns once the room's channel is subscribed (so a read of the history after
        this misses nothing); BackendUnavailable when that cannot happen in time."""
        self._rooms.add(room)
        channel = channel_key(room).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout_s
        sent_on: PubSub | None = None
        while room in self._rooms:
            if self._sub_ready.is_set() and channel in self._confirmed:
                return
            left = deadline - loop.time()
            if left <= 0:
                raise BackendUnavailable(f"cannot subscribe to {room}: no master")
            ps = self._pubsub
            if self._sub_ready.is_set() and ps is not None and sent_on is not ps:
                sent_on = ps
                try:
                    await ps.subscribe(channel)
                except Exception as exc:
                    self._doubt(f"subscribe failed: {exc}")
            pulse = self._confirm_pulse
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.25)):
                    await pulse.wait()

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        self._recent.pop(room, None)
        channel = channel_key(room).encode()
        self._confirmed.discard(channel)
        ps = self._pubsub
        if ps is not None and self._sub_ready.is_set():
            with contextlib.suppress(Exception):
                await ps.unsubscribe(channel)

    def _doubt(self, reason: str) -> None:
        if not self._doubt_event.is_set():
            self._doubt_reason = reason
            self._doubt_event.set()
        self._wake()

    def _fence(self, reason: str) -> None:
        """Stop trusting the current master: a failover began. Writes wait for the new
        master; replies to writes in flight are not acknowledged (retried with their key).
        WAIT 1 alone cannot protect against a coordinated failover: the old master keeps
        taking writes after a replica is chosen, and its OTHER replica confirms them."""
        if self._fenced_since is None:
            logger.warning("%s backend: fenced (%s)", self.name, reason)
            self._fenced_since = asyncio.get_running_loop().time()
        self._fence_gen += 1

    def _unfence(self) -> None:
        if self._fenced_since is not None:
            logger.info("%s backend: unfenced", self.name)
            self._fenced_since = None
        self._wake()

    def _wake(self) -> None:
        """End every backoff nap now: the master moved (or may have)."""
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def _nap(self, delay: float) -> None:
        """A backoff sleep that a master change cuts short: retries hit the new master at
        once instead of up to one backoff step later."""
        wakeup = self._wakeup
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wakeup.wait()

    def _pulse(self) -> None:
        self._confirm_pulse.set()
        self._confirm_pulse = asyncio.Event()

    async def _supervise(self) -> None:
        delay = 0.02
        while not self._closing:
            ready_before = self.subscriptions
            try:
                await self._connect(await self._resolve())
                await self._run_subscription()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    logger.warning("%s backend: subscription lost: %s", self.name, exc)
            self._sub_ready.clear()
            self._confirmed.clear()
            self._pulse()
            if self._closing:
                return
            # Back off while nothing works; a subscription that was up retries at once.
            delay = 0.02 if self.subscriptions != ready_before else min(delay * 2, 0.25)
            await self._nap(delay)

    async def _run_subscription(self) -> None:
        _, client = self._current()
        ps = client.pubsub()
        self._doubt_event.clear()
        self._confirmed.clear()
        try:
            self._pubsub = ps
            channels = [self._probe_channel.encode()] + [
                channel_key(r).encode() for r in sorted(self._rooms)
            ]
            loop = asyncio.get_running_loop()

            async def setup() -> None:
                await ps.subscribe(*channels)
                # Every channel confirmed before anyone reads history: nothing falls between.
                while not all(c in self._confirmed for c in channels):
                    self._handle(await ps.get_message(timeout=0.1))

            # Connecting to a frozen server blocks in the handshake until the socket
            # timeout: let a doubt (the Sentinels named another master) cut it short.
            async with asyncio.timeout(self.probe_timeout_s + self.socket_timeout_s):
                await self._or_doubt(setup())
            self._sub_ready.set()
            self.subscriptions += 1
            self._pulse()
            if self._rooms and self._listener is not None:
                with contextlib.suppress(Exception):
                    await self._check_history()
                # Anything published while we were not subscribed is in `ops` only.
                self.resyncs += 1
                self._listener.on_resync(None)
            last_rx = loop.time()
            ping_at: float | None = None
            while not self._closing:
                if self._doubt_event.is_set():
                    raise _Doubt(self._doubt_reason)
                now = loop.time()
                if ping_at is None and now - last_rx >= self.probe_interval_s:
                    async with asyncio.timeout(self.probe_timeout_s):
                        await ps.ping()
                    ping_at = now
                elif ping_at is not None and now - ping_at > self.probe_timeout_s:
                    raise _Doubt(f"no reply on the subscription for {self.probe_timeout_s}s")
                message = await ps.get_message(timeout=0.1)
                if message is not None:
                    last_rx = loop.time()
                    ping_at = None
                    self._handle(message)
        finally:
            self._sub_ready.clear()
            self._pubsub = None
            self._background(ps.aclose())  # type: ignore[no-untyped-call]

    async def _check_history(self) -> None:
        """After a re-subscription: did this master lose deltas we already delivered?

        A delta is published to subscribers before it reaches any replica; if the master
        dies in between, relays hold it while the new master reuses its seq for another
        delta (or has not reached it yet). Compare the last deltas delivered with what is
        stored; the first mismatch makes read_ops return None once for a caller at or past
        it, so the relay resets that room from what is stored instead of diverging."""
        rooms = [(r, list(q)) for r, q in self._recent.items() if q and r in self._rooms]
        if not rooms:
            return
        _, client = self._current()
        pipe = client.pipeline(transaction=False)
        for room, recent in rooms:
            k = room_keys(room)
            pipe.xrange(k["ops"], min=f"{recent[0][0]}-0", max=f"{recent[-1][0]}-0")
            pipe.get(k["seq"])
        replies = await pipe.execute()
        for i, (room, recent) in enumerate(rooms):
            entries, last_raw = replies[2 * i], replies[2 * i + 1]
            last = int(last_raw or 0)
            stored = {}
            for entry_id, fields in entries:
                seq = int(entry_id.split(b"-", 1)[0])
                kind, d = fields.get(b"k", b""), fields.get(b"d", b"")
                stored[seq] = _digest(b'{"seq":%d,"%s":%s}' % (seq, kind, d))
            for seq, data in recent:
                have = stored.get(seq)
                # Missing below `last` is trimming, not loss; only beyond it is loss.
                if (have is not None and have != data) or (have is None and seq > last):
                    logger.warning("room %s: seq %d was lost in the failover: reset", room, seq)
                    self._diverged[room] = seq
                    self._recent.pop(room, None)
                    break

    async def _or_doubt(self, aw: Awaitable[None]) -> None:
        """Await `aw`, unless a doubt comes first (then cancel it and raise _Doubt)."""
        task = asyncio.ensure_future(aw)
        doubt = asyncio.ensure_future(self._doubt_event.wait())
        try:
            await asyncio.wait({task, doubt}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
                return
            raise _Doubt(self._doubt_reason)
        finally:
            for t in (task, doubt):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t

    def _handle(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return
        kind = message.get("type")
        if kind in ("message", b"message"):
            self._deliver(message["channel"], message["data"])
        elif kind in ("subscribe", b"subscribe"):
            channel = message["channel"]
            self._confirmed.add(channel if isinstance(channel, bytes) else str(channel).encode())
            self._pulse()

    def _deliver(self, channel: bytes, data: bytes) -> None:
        m = _CHANNEL.fullmatch(channel)
        if m is None or self._listener is None:
            return
        room = m.group(1).decode()
        if room not in self._rooms:
            return
        seq_m = _MSG_SEQ.match(data)
        try:
            seq = int(seq_m.group(1)) if seq_m else int(json.loads(data)["seq"])
        except (ValueError, KeyError, TypeError):
            # Not from kasagi_publish: unordered, so skip it; the next op's gap backfills.
            logger.warning("room %s: channel message without a seq ignored", room)
            return
        recent = self._recent.get(room)
        if recent is None:
            recent = self._recent[room] = deque(maxlen=_RECENT)
        recent.append((seq, _digest(data)))
        try:
            self._listener.on_op(room, Op(seq, bytes(data)))
        except Exception:
            logger.exception("listener failed on %s seq %d", room, seq)

    # ------------------------------------------------------------------ health

    async def health(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ok": False,
            "backend": self.name,
            "ack": self.ack,
            "master": None if self._addr is None else f"{self._addr[0]}:{self._addr[1]}",
            "subscribed": self._sub_ready.is_set(),
            "rooms": len(self._rooms),
            "switches": self.switches,
            "fenced": self._fenced_since is not None,
            **self._health_details(),
        }
        try:
            _, client = self._current()
            async with asyncio.timeout(1.0):
                role = await _command(client, "ROLE")
            is_master = bool(role) and role[0] in (b"master", "master")
            out["ok"] = is_master and self._sub_ready.is_set() and self._fenced_since is None
            if not is_master:
                out["error"] = "the server is not a master"
                self._check_master()
        except Exception as exc:
            out["error"] = str(exc) or type(exc).__name__
            self._check_master()
        return out


class RedisBackend(RedisBase):
    """One Redis server by URL (`redis://[user:password@]host:port/db`, `rediss://`...)."""

    name = "redis"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(**options)
        self.url = url
        probe = ConnectionPool.from_url(url)
        kw = probe.connection_kwargs
        self._url_addr: Addr = (str(kw.get("host", "localhost")), int(kw.get("port", 6379)))

    async def _resolve(self) -> Addr:
        return self._url_addr

    def _make_pool(self, addr: Addr) -> ConnectionPool:
        extra: dict[str, Any] = {}
        if self.password is not None:
            extra["password"] = self.password
        if self.username is not None:
            extra["username"] = self.username
        return BlockingConnectionPool.from_url(self.url, **self._pool_options(), **extra)
