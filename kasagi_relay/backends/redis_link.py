"""The master link: the connections to the Redis master a locator names, and how every
command reaches it (docs/design.md, storage).

- Connect: check the server's ROLE, make sure it runs our version of the `kasagi` Function
  library (kasagi.lua), and switch the pool over when the locator names another master.
- Fence: while a failover is under way (the Sentinel locator says so), writes wait for the
  new master and replies to writes in flight are not trusted.
- Retry: a command that was refused (READONLY, NOREPLICAS, LOADING, function missing...)
  or never sent (connection refused) is retried with backoff against the current master
  until `op_timeout_s`; what cannot be done raises BackendUnavailable.
- Durable FCALL: the ack level decides what follows the FCALL on the SAME connection,
  pipelined with it: nothing (`leader`), `WAIT 1` (`replica`) or `WAIT n` for every
  connected replica (`all`). WAIT counts replicas that acknowledged this connection's own
  last write, which is why it must share the FCALL's connection (and why the library writes
  something even when it finds an idempotency key: see kasagi.lua). The durable FCALLs of
  one loop turn share the pipeline and its one WAIT (`_join`): one round trip, not one per
  publish. A call whose outcome is unknown (connection lost after sending) is retried only
  when it is idempotent (keyed). Each FCALL comes packed as RESP (the store packs its
  publishes itself), a batch is written straight to its connection as one buffer and its
  replies read from the connection's hiredis reader: a publisher waits for this round trip,
  and every loop turn or Python object it costs shows per delta. A publish joins the batch
  synchronously (`submit`: no task, no coroutine) and hears back from a callback. What must
  wait (a failover, an unknown replica count) or retry waits in its place on the slow path,
  and one task joins the waiting calls to a batch in order (`_drain`).
- Order: every batch goes out on one connection (`_Pipe`), written while the earlier ones
  still wait for their replies. Redis runs one connection's commands in the order they
  arrive, but not those of several: batches written one after the other on two connections
  were run in the other order (a connection's later delta got the lower seq). With WAIT in
  the batches (`replica`, `all`), a batch waits for the one in flight and takes every FCALL
  meanwhile (group commit), since WAIT holds the connection's later commands in Redis.

A Cluster router would hold one link per shard and pick it by the room's hash slot; the
store and the feed only ask a link for commands.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Protocol, TypeVar

from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, SSLConnection
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kasagi_relay.domain import AckLevel, BackendUnavailable
from kasagi_relay.loops import running_loop

__all__ = [
    "FUNCTION_VERSION",
    "LIBRARY",
    "NETWORK_ERRORS",
    "PRESENCE_LIBRARY",
    "PRESENCE_VERSION",
    "Addr",
    "Locator",
    "MasterLink",
    "NotSent",
    "addr_pool",
    "command",
    "function_missing",
    "pack",
    "quick_client",
]

logger = logging.getLogger("kasagi_relay.backends.redis")


def addr_pool(
    addr: Addr,
    options: dict[str, Any],
    password: str | None,
    username: str | None = None,
    tls: dict[str, Any] | None = None,
) -> ConnectionPool:
    """The pool of a master link to a node found by address (a Sentinel's or a Cluster's
    answer), with the link's options (MasterLink.pool_options); `tls`: SSLConnection's
    options (ssl_ca_certs, ...) to speak TLS to the node."""
    if tls is not None:
        options = {**options, **tls, "connection_class": SSLConnection}
    return BlockingConnectionPool(
        host=addr[0], port=addr[1], password=password, username=username, **options
    )


def quick_client(
    addr: Addr,
    timeout_s: float,
    password: str | None,
    username: str | None = None,
    tls: dict[str, Any] | None = None,
) -> Redis:
    """A client for asking a node (a Sentinel, a Cluster node) a question: short timeouts
    and no retries, so that one silent node costs one timeout and the others are asked."""
    return Redis(
        host=addr[0],
        port=addr[1],
        password=password,
        username=username,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        **({"ssl": True, **tls} if tls is not None else {}),
    )


T = TypeVar("T")
Addr = tuple[str, int]

LIBRARY = resources.files("kasagi_relay.backends").joinpath("kasagi.lua").read_text()
_VERSION = re.search(r"^local VERSION = '([^']+)'", LIBRARY, re.MULTILINE)
assert _VERSION is not None, "kasagi.lua must define VERSION"
FUNCTION_VERSION: str = _VERSION.group(1)
# The presence library (presence.lua), loaded beside `kasagi` the same way.
PRESENCE_LIBRARY = resources.files("kasagi_relay.backends").joinpath("presence.lua").read_text()
_PRESENCE_VERSION = re.search(r"^local VERSION = '([^']+)'", PRESENCE_LIBRARY, re.MULTILINE)
assert _PRESENCE_VERSION is not None, "presence.lua must define VERSION"
PRESENCE_VERSION: str = _PRESENCE_VERSION.group(1)

# Errors the server sends for a command it did NOT run: safe to retry as is.
_REFUSED = ("READONLY", "NOREPLICAS", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
_REFUSED_TYPES = (ReadOnlyError, BusyLoadingError, MasterDownError, TryAgainError, ClusterDownError)
NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def transport_closed(exc: BaseException) -> bool:
    """uvloop's error for a write on a transport closed under it: redis-py connecting on a
    connection that the link's pool disconnected meanwhile (a master change during a
    failover; MagicStack/uvloop#506). A lost connection, not a bug."""
    return isinstance(exc, RuntimeError) and "the handler is closed" in str(exc)


async def command(client: Redis, *args: Any) -> Any:
    """One command (redis-py leaves execute_command untyped)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def function_missing(exc: BaseException) -> bool:
    text = str(exc)
    return "Function not found" in text or "NOSCRIPT" in text


def _refused(exc: BaseException) -> bool:
    # redis-py maps some of these codes to their own exception types and strips the code
    # from the message (a READONLY reply is a ReadOnlyError whose text has no "READONLY"),
    # so both the type and the text are checked.
    if isinstance(exc, _REFUSED_TYPES):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).startswith(_REFUSED) or function_missing(exc)
    return False


def pack(commands: Sequence[Sequence[Any]]) -> bytes | None:
    """`commands` in RESP, one buffer (None for an argument type this does not know:
    the caller then lets redis-py pack them). redis-py's packer costs about as much per
    FCALL as the rest of the publish path in the link; this is one join."""
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if isinstance(arg, bytes):
                b = arg
            elif isinstance(arg, str):
                b = arg.encode()
            elif isinstance(arg, int) and not isinstance(arg, bool):
                b = b"%d" % arg
            elif isinstance(arg, float):
                b = repr(arg).encode()
            else:
                return None
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
    return b"".join(out)


class NotSent(Exception):
    """The connection failed before the command was written: it certainly did not run."""


class _Fenced(Exception):
    """A write's reply came back after a failover began: its WAIT proves nothing."""


# The most FCALLs one pipeline carries: past it a batch goes out at once and the next
# one starts (bounds one round trip's bytes and its reply time), except while the batch
# waits behind a WAIT in flight (see `_Batch.held`).
MAX_BATCH = 256

# What a durable FCALL's caller is told, once: (its reply, None) or (None, the error).
Done = Callable[[Any, BaseException | None], None]


class _Batch:
    """Durable FCALLs that go out together (MasterLink._join), each packed as RESP, with
    its `done`, whether it may be retried on its own (`idempotent`) and its place among
    every call submitted (`orders`: a call that must try again waits in that place)."""

    __slots__ = ("dones", "fence_gen", "held", "idempotent", "needed", "orders", "packed", "pool")

    def __init__(self, pool: ConnectionPool, needed: int, fence_gen: int) -> None:
        self.pool = pool
        self.needed = needed
        # Waiting behind the WAIT in flight (group commit): it takes every FCALL meanwhile.
        self.held = False
        # Replies to a batch sent across the start of a failover are not trusted.
        self.fence_gen = fence_gen
        self.packed: list[bytes] = []
        self.dones: list[Done] = []
        self.idempotent: list[bool] = []
        self.orders: list[int] = []


class _Waiting:
    """A durable FCALL on the slow path (MasterLink._wait): `order` is its place among every
    call submitted, `last` how its latest attempt failed (None: it waits for the link, not
    for a retry), `delay` its next backoff nap, `deadline` when it gives up. Joined to a
    batch, it is that call's `done`, so that a failed attempt keeps its deadline."""

    __slots__ = ("deadline", "delay", "done", "fcall", "idempotent", "last", "order")

    def __init__(
        self,
        order: int,
        fcall: bytes,
        idempotent: bool,
        done: Done,
        last: BaseException | None,
        deadline: float,
    ) -> None:
        self.order = order
        self.fcall = fcall
        self.idempotent = idempotent
        self.done = done
        self.last = last
        self.deadline = deadline
        self.delay = 0.02

    def __call__(self, reply: Any, exc: BaseException | None) -> None:
        self.done(reply, exc)


def _order_of(waiting: _Waiting) -> int:
    return waiting.order


class _Pipe:
    """The connection every batch of one pool goes out on (see Order above). `waiting`: the
    batches written and not yet answered, in write order (how many replies each expects,
    and the future that gets them); one `reader` task reads the replies for all of them
    (a task per batch, each waiting for the one before, cost a loop turn per batch: 0.34x
    the acks per second)."""

    __slots__ = ("broken", "conn", "pool", "reader", "waiting")

    def __init__(self, pool: ConnectionPool, conn: AbstractConnection) -> None:
        self.pool = pool
        self.conn = conn
        self.waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self.reader: asyncio.Future[None] | None = None
        self.broken = False


def _resolve(fut: asyncio.Future[Any], reply: Any, exc: BaseException | None) -> None:
    """`done` of an attempt that a coroutine awaits (durable_fcall)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(reply)
    elif isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)


class Locator(Protocol):
    """Where the master is: one URL, or what the Sentinels say."""

    async def resolve(self) -> Addr:
        """The address of the master to use now (BackendUnavailable when unknown)."""
        ...

    def make_pool(self, addr: Addr, options: dict[str, Any]) -> ConnectionPool:
        """A pool of connections to `addr` with the link's `options`."""
        ...

    def check_master(self) -> None:
        """A command failed in a way that suggests the master moved: look now."""
        ...

    async def watch(self, link: MasterLink, moved: Callable[[str], None]) -> None:
        """Start whatever watches the master's address: it fences and unfences `link`
        around a failover and calls `moved(reason)` when the master changed."""
        ...

    async def close(self) -> None: ...

    def health_details(self) -> dict[str, object]: ...


class MasterLink:
    def __init__(
        self,
        locator: Locator,
        *,
        ack: AckLevel = "leader",
        wait_timeout_ms: int = 1000,
        op_timeout_s: float = 10.0,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
    ) -> None:
        self.locator = locator
        self.ack: AckLevel = ack
        self.wait_timeout_ms = wait_timeout_ms
        self.op_timeout_s = op_timeout_s
        # A command on a frozen server fails after this; WAIT must fit inside it.
        self.socket_timeout_s = max(socket_timeout_s, wait_timeout_ms / 1000 + 1.0)
        self.connect_timeout_s = connect_timeout_s
        self.addr: Addr | None = None
        self._pool: ConnectionPool | None = None
        self._client: Redis | None = None
        self._wakeup = asyncio.Event()
        # Set while a failover is under way: writes wait, in-flight replies are not trusted.
        self.fenced_since: float | None = None
        self._fence_gen = 0
        self._cleanup: set[asyncio.Future[None]] = set()
        # When the replicas were last counted, and how many there were (`ack="all"`).
        self._replicas_cache: tuple[float, int] = (0.0, 0)
        # Held while a batch is written: batches are written in the order they were
        # closed, even when one of them waits for the pipe's connection (`_pipelined`).
        self._batch_order = asyncio.Lock()
        self._pipe: _Pipe | None = None
        # The durable FCALLs of this loop turn, per (pool, replicas to wait for).
        self._batches: dict[tuple[int, int], _Batch] = {}
        # Durable FCALLs submitted so far: each call's place in the order they go out.
        self._order = 0
        # The slow path (`_wait`): calls waiting for the link or for a retry, sorted by
        # their place. While any waits, every new call waits behind it, and one task
        # (`_drain`) joins them to a batch in that order.
        self._waiting: list[_Waiting] = []
        self._drainer: asyncio.Future[None] | None = None
        self.switches = 0  # master changes seen (tests and /healthz)

    # ------------------------------------------------------------------ connections

    def pool_options(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
            # No hidden retries: a retried FCALL without a key could publish twice, and
            # every retry here must go to the master the locator names now.
            "retry": Retry(NoBackoff(), 0),
            # Publishes share one connection (`_Pipe`); reads, presence and the feed's
            # commands take their own: past this many in flight they queue for one
            # (bounded by the op timeout).
            "max_connections": 128,
            "timeout": self.op_timeout_s,
        }

    async def connect(self, addr: Addr, *, force_load: bool = False) -> None:
        """Use `addr` as the master: check its role, make sure it has the library."""
        if addr == self.addr and self._pool is not None and not force_load:
            return
        pool = self.locator.make_pool(addr, self.pool_options())
        client = Redis(connection_pool=pool)
        try:
            role = await command(client, "ROLE")
            if not role or role[0] not in (b"master", "master"):
                raise BackendUnavailable(f"{addr[0]}:{addr[1]} is not a master yet")
            await self._ensure_library(client, force=force_load)
        except BaseException:
            with contextlib.suppress(Exception):
                await pool.disconnect()
            raise
        old = self._pool
        if self.addr is not None and addr != self.addr:
            self.switches += 1
            self.unfence()
            logger.warning("redis link: master is now %s:%d", *addr)
        self.addr, self._pool, self._client = addr, pool, client
        if old is not None and old is not pool:
            # In the background: closing sockets to a frozen server can take a while.
            self.background(old.disconnect())

    async def connect_current(self, *, force_load: bool = False) -> None:
        await self.connect(await self.locator.resolve(), force_load=force_load)

    async def _ensure_library(self, client: Redis, *, force: bool = False) -> None:
        """Load kasagi.lua (and presence.lua) unless this server already runs our version."""
        for name, library, version in (
            ("kasagi", LIBRARY, FUNCTION_VERSION),
            ("kasagi_presence", PRESENCE_LIBRARY, PRESENCE_VERSION),
        ):
            if not force:
                try:
                    have = await command(client, "FCALL_RO", f"{name}_version", 0)
                    if (have.decode() if isinstance(have, bytes) else str(have)) == version:
                        continue
                except ResponseError as exc:
                    if not function_missing(exc):
                        raise
            await command(client, "FUNCTION", "LOAD", "REPLACE", library)
            logger.info("loaded the %s function library v%s", name, version)

    async def _reload_library(self) -> None:
        with contextlib.suppress(NotSent, *NETWORK_ERRORS, ResponseError):
            await self._ensure_library(self.client())

    def client(self) -> Redis:
        """The client of the master in use (NotSent when there is none)."""
        if self._client is None:
            raise NotSent("no master")
        return self._client

    def background(self, aw: Awaitable[Any]) -> None:
        """Clean-up that nobody waits for (bounded, errors ignored)."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await aw

        task = asyncio.ensure_future(run())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def close(self) -> None:
        pool, self._pool, self._client = self._pool, None, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()
        if self._cleanup:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*self._cleanup, return_exceptions=True)

    async def is_master(self) -> bool:
        """Whether the server in use answers ROLE as a master (raises when it does not
        answer within a second)."""
        async with asyncio.timeout(1.0):
            role = await command(self.client(), "ROLE")
        return bool(role) and role[0] in (b"master", "master")

    # ------------------------------------------------------------------ fence and naps

    def fence(self, reason: str) -> None:
        """Stop trusting the current master: a failover began. Writes wait for the new
        master; replies to writes in flight are not acknowledged (retried with their key).
        WAIT 1 alone cannot protect against a coordinated failover: the old master keeps
        taking writes after a replica is chosen, and its OTHER replica confirms them."""
        if self.fenced_since is None:
            logger.warning("redis link: fenced (%s)", reason)
            self.fenced_since = asyncio.get_running_loop().time()
        self._fence_gen += 1
        # Batches still open keep the generation they started with: a call that joins
        # after this (once unfenced) starts a batch of the new one.
        self._batches.clear()

    def unfence(self) -> None:
        if self.fenced_since is not None:
            logger.info("redis link: unfenced")
            self.fenced_since = None
        self.wake()

    def wake(self) -> None:
        """End every backoff nap now: the master moved (or may have)."""
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def nap(self, delay: float) -> None:
        """A backoff sleep that a master change cuts short: retries hit the new master at
        once instead of up to one backoff step later."""
        wakeup = self._wakeup
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wakeup.wait()

    # ------------------------------------------------------------------ commands

    async def retrying(self, what: str, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """fn(master client) with backoff until op_timeout_s, for idempotent commands."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout_s
        delay = 0.02
        while True:
            try:
                if self.fenced_since is not None:
                    # Reads too: the old master may still serve writes that the failover
                    # is about to discard.
                    raise NotSent("the master is being replaced (failover in progress)")
                return await fn(self.client())
            except ResponseError as exc:
                if function_missing(exc):
                    await self._reload_library()
                elif not _refused(exc):
                    raise
                last: BaseException = exc
            except (NotSent, *NETWORK_ERRORS) as exc:
                last = exc
            except RuntimeError as exc:
                if not transport_closed(exc):
                    raise
                last = exc
            self.locator.check_master()
            if loop.time() + delay > deadline:
                raise BackendUnavailable(f"{what}: no master answered ({last})") from None
            await self.nap(delay)
            delay = min(delay * 2, 0.25)

    async def fcall(self, what: str, *args: Any) -> Any:
        """FCALL `args` (idempotent functions), retried like `retrying`."""
        return await self.retrying(what, lambda c: command(c, "FCALL", *args))

    async def pipeline(self, what: str, packed: bytes, count: int) -> list[Any]:
        """`count` idempotent commands, already packed as RESP (presence: many small
        FCALLs of one batch), in one round trip on one connection, without WAIT; their
        replies in order. The whole pipeline goes again, against the current master, when
        one of them was refused or the connection failed, until op_timeout_s (each command
        must be safe to repeat). Error replies that are not refusals come back in the list."""

        async def one(client: Redis) -> list[Any]:
            pool = self._pool
            if pool is None:
                raise NotSent("no master")
            replies = await self._roundtrip_packed(pool, packed, count)
            for reply in replies:
                if isinstance(reply, ResponseError) and (
                    function_missing(reply) or _refused(reply)
                ):
                    raise reply
            return replies

        return await self.retrying(what, one)

    async def _count_replicas(self, client: Redis) -> int:
        """The replicas an `ack="all"` write waits for, asked of the master (one INFO)."""
        asked = running_loop().time()
        info = await client.info("replication")
        count = int(info.get("connected_slaves", 0))
        self._replicas_cache = (asked, count)
        # "all" never means "none": with no replica connected, nothing is durable beyond
        # the master, so the write must not be acknowledged as if it were.
        return max(1, count)

    async def _roundtrip_packed(
        self,
        pool: ConnectionPool,
        packed: bytes | None,
        count: int,
        commands: Sequence[Sequence[Any]] = (),
    ) -> list[Any]:
        """`count` commands pipelined on ONE connection, already packed as RESP (presence's
        writes), or `commands` redis-py must pack (`packed` None); their replies in order,
        error replies as the exceptions they are."""
        try:
            conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise NotSent(str(exc) or type(exc).__name__) from exc
        try:
            lean = _lean(conn) if packed is not None else None
            if lean is not None and packed is not None:
                # The lean path: one write and the replies straight from hiredis, within
                # one socket timeout. redis-py's send wraps every write in wait_for (a
                # task, and a loop turn, per round trip) and its reads cost per reply.
                writer, parser = lean
                async with asyncio.timeout(self.socket_timeout_s):
                    writer.write(packed)
                    await writer.drain()
                    return await self._read_replies(parser, count)
            await conn.send_packed_command(
                conn.pack_commands(commands) if packed is None else packed, check_health=False
            )
            return await _read_responses(conn, count)
        except BaseException:
            # Unknown state (timeout, cancel): never hand this connection to anyone else.
            # nowait: closing a socket to a frozen server must not wait for its FIN.
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _pipelined(self, pool: ConnectionPool, packed: bytes, count: int) -> list[Any]:
        """`count` commands packed as RESP (a batch) on the pool's pipe, written after
        every batch written before and without waiting for their replies; their replies
        in order, error replies as the exceptions they are. A failure of the connection
        (a timeout, a lost connection) drops it: the batches written on it and not yet
        answered fail too, outcome unknown, as with any lost connection."""
        async with self._batch_order:
            pipe = self._pipe
            if pipe is None or pipe.pool is not pool or pipe.broken or not pipe.conn.is_connected:
                if pipe is not None and not pipe.broken and pipe.conn.is_connected:
                    # Another master's pool: its batches in flight still get their replies
                    # (their reader goes on); the old pool's disconnect closes it.
                    self._pipe = None
                elif pipe is not None:
                    self._drop(pipe, RedisConnectionError("connection closed"))
                pipe = await self._open_pipe(pool)
            elif not pipe.waiting and _stale(pipe.conn):
                # Idle and closed by the server (a restart): connect again rather than
                # fail the batch. redis-py 8.1's own check (ensure_connection) skips this
                # while its maintenance notifications are "auto", the default.
                try:
                    await pipe.conn.disconnect()
                    await pipe.conn.connect()  # type: ignore[no-untyped-call]
                except Exception as exc:
                    self._drop(pipe, exc)
                    raise NotSent(str(exc) or type(exc).__name__) from exc
            conn = pipe.conn
            answer: asyncio.Future[list[Any]] = running_loop().create_future()
            lean = _lean(conn)
            try:
                if lean is not None:
                    lean[0].write(packed)  # no await from the lock to here: written in order
                else:
                    await conn.send_packed_command(packed, check_health=False)
            except BaseException as exc:
                self._drop(pipe, exc)
                raise
            pipe.waiting.append((count, answer))
            if pipe.reader is None:
                pipe.reader = asyncio.ensure_future(self._read_pipe(pipe))
        if lean is not None:
            try:
                async with asyncio.timeout(self.socket_timeout_s):
                    await lean[0].drain()
            except BaseException as exc:
                self._drop(pipe, exc)
                raise
        # Cancelled: the reader still takes this batch's replies off the connection.
        return await answer

    async def _read_pipe(self, pipe: _Pipe) -> None:
        """Read the replies of the batches waiting on `pipe`, in order, until none waits."""
        conn = pipe.conn
        waiting = pipe.waiting
        try:
            while waiting and not pipe.broken:
                count, answer = waiting[0]
                lean = _lean(conn)
                async with asyncio.timeout(self.socket_timeout_s):
                    if lean is not None:
                        replies = await self._read_replies(lean[1], count)
                    else:
                        replies = await _read_responses(conn, count)
                if pipe.broken:
                    return  # dropped meanwhile (a failed write): its batches were answered
                waiting.popleft()
                if not answer.done():
                    answer.set_result(replies)
        except BaseException as exc:
            self._drop(pipe, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            pipe.reader = None

    async def _open_pipe(self, pool: ConnectionPool) -> _Pipe:
        """The pool's pipe: a connection of its own (the caller holds `_batch_order`)."""
        try:
            conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise NotSent(str(exc) or type(exc).__name__) from exc
        pipe = self._pipe = _Pipe(pool, conn)
        return pipe

    def _drop(self, pipe: _Pipe, exc: BaseException) -> None:
        """`pipe` failed with `exc`: the batches waiting on it fail (the first with `exc`,
        the later ones as a lost connection), the next batch opens another pipe, and its
        connection is closed, then given back to the pool once its reader has stopped."""
        first = True
        while pipe.waiting:
            _, answer = pipe.waiting.popleft()
            if not answer.done():
                if first and isinstance(exc, Exception):
                    answer.set_exception(exc)
                else:
                    answer.set_exception(
                        RedisConnectionError(
                            f"the connection failed under an earlier batch ({exc!r})"
                        )
                    )
            first = False
        if pipe.broken:
            return
        pipe.broken = True
        if self._pipe is pipe:
            self._pipe = None

        async def close() -> None:
            # nowait: closing a socket to a frozen server must not wait for its FIN.
            with contextlib.suppress(Exception):
                await pipe.conn.disconnect(nowait=True)
            reader = pipe.reader
            if reader is not None and reader is not asyncio.current_task():
                await asyncio.wait((reader,))
            with contextlib.suppress(Exception):
                await pipe.pool.release(pipe.conn)

        self.background(close())

    async def _read_replies(self, parser: _AsyncHiredisParser, n: int) -> list[Any]:
        """`n` replies straight from the connection's hiredis reader (the caller bounds
        the wait). Error replies come back as the exceptions redis-py would raise
        (hiredis builds them with redis-py's parse_error)."""
        reader = parser._reader
        assert reader is not None
        replies: list[Any] = []
        while len(replies) < n:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                await parser.read_from_socket()
                continue
            if isinstance(reply, RedisConnectionError):
                raise reply
            replies.append(reply)
        return replies

    def submit(self, fcall: bytes, *, idempotent: bool, done: Done) -> None:
        """`fcall` (one FCALL packed as RESP, see `pack`) on the master followed by WAIT for
        the ack level: `done(reply, None)` or `done(None, error)` is called once (an error
        reply that is not a refusal as the ResponseError it is; a CancelledError when the
        loop goes away). Calls submitted one after the other go out in that order, retries
        included. The fast path is the common case: the master known, no failover under
        way, the replicas to wait for known, no call waiting; the call joins this loop
        turn's batch at once (no task, no coroutine, no loop turn of its own). Otherwise it
        waits on the slow path (`_wait`)."""
        self._order += 1
        pool = self._pool
        needed = 0 if self.ack == "leader" else self._needed_now()
        if self._waiting or self.fenced_since is not None or pool is None or needed is None:
            deadline = running_loop().time() + self.op_timeout_s
            self._wait(_Waiting(self._order, fcall, idempotent, done, None, deadline))
            return
        self._join(pool, needed, self._order, fcall, idempotent, done)

    def _needed_now(self) -> int | None:
        """The replicas a write waits for, when known without asking (None: ask)."""
        if self.ack == "leader":
            return 0
        if self.ack == "replica":
            return 1
        at, count = self._replicas_cache
        if running_loop().time() - at > 1.0:
            return None
        return max(1, count)

    def _wait(self, waiting: _Waiting) -> None:
        """`waiting` on the slow path, in its place: a retry goes back before the calls
        submitted after it (a delta that depends on an earlier one of its room must not
        get the lower seq)."""
        queue = self._waiting
        if not queue or queue[-1].order < waiting.order:
            queue.append(waiting)
        else:
            bisect.insort(queue, waiting, key=_order_of)
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        """The slow path's one task: joins every waiting call to a batch, in order, once
        the link can take them (a master known and not fenced, the replicas to wait for
        counted); before a retry, naps the calls' backoff; answers what failed for good or
        ran out of time. One task for all: a task per call, each asking on its own, let a
        later call that found the count known join before an earlier one still asking."""
        queue = self._waiting
        try:
            while queue:
                if any(w.last is not None for w in queue):
                    await self._back_off(queue)
                    continue
                try:
                    if self.fenced_since is not None:
                        raise NotSent("the master is being replaced (failover in progress)")
                    pool, client = self._pool, self.client()
                    assert pool is not None
                    needed = self._needed_now()
                    if needed is None:
                        needed = await self._count_replicas(client)
                except Exception as exc:
                    # Nothing was sent: a failed INFO must not read as "outcome unknown".
                    unsent = isinstance(exc, (NotSent, *NETWORK_ERRORS, ResponseError))
                    last = NotSent(str(exc) or type(exc).__name__) if unsent else exc
                    for w in queue:
                        w.last = last
                    continue
                if self.fenced_since is not None or pool is not self._pool:
                    continue  # it changed while the replicas were counted: look again
                joining = queue[:]
                queue.clear()
                for w in joining:
                    self._join(pool, needed, w.order, w.fcall, w.idempotent, w)
        except BaseException as exc:
            joining, queue[:] = queue[:], []
            for w in joining:
                _call(w.done, None, exc)
            raise
        finally:
            self._drainer = None

    async def _back_off(self, queue: list[_Waiting]) -> None:
        """Before the failed calls in `queue` try again: answer those that must not (their
        error is final, or the backoff would end past their deadline), then nap the
        longest backoff among the others (cut short by a master change)."""
        failed = [w for w in queue if w.last is not None]
        if any(isinstance(w.last, ResponseError) and function_missing(w.last) for w in failed):
            await self._reload_library()
        self.locator.check_master()
        now = running_loop().time()
        delay = 0.0
        for w in failed:
            assert w.last is not None
            final = self._final(w.last, w.idempotent)
            if final is None and now + w.delay > w.deadline:
                final = BackendUnavailable(f"no writable master ({w.last})")
            if final is not None:
                queue.remove(w)
                _call(w.done, None, final)
            else:
                delay = max(delay, w.delay)
        if delay:
            await self.nap(delay)
        for w in failed:
            w.delay = min(w.delay * 2, 0.25)
            w.last = None

    def _join(
        self,
        pool: ConnectionPool,
        needed: int,
        order: int,
        fcall: bytes,
        idempotent: bool,
        done: Done,
    ) -> None:
        """`fcall` in this loop turn's batch for (`pool`, `needed`): every durable FCALL
        issued in one turn of the loop goes out as ONE pipeline on one connection, followed
        by one `WAIT needed` that covers them all (WAIT waits for the replication offset
        of the connection's last write). A failure of the round trip is each call's own to
        retry or not (`_settle`, durable_fcall)."""
        key = (id(pool), needed)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(pool, needed, self._fence_gen)
            # The task's first step runs in the next loop turn, after every FCALL of this
            # one joined the batch: it closes the batch and sends it at once (a callback
            # that then started the task cost one more turn per round trip, and with it
            # the whole turn's work: a broadcast to a large room, for instance).
            task = asyncio.ensure_future(self._run_batch(key, batch))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)
        batch.packed.append(fcall)
        batch.dones.append(done)
        batch.idempotent.append(idempotent)
        batch.orders.append(order)
        if len(batch.packed) >= MAX_BATCH and not batch.held:
            # Not while held: Redis holds what follows the WAIT in flight anyway, and
            # capped batches behind it would each wait for a WAIT of their own in turn
            # (one WAIT timeout each when a replica is missing).
            self._close(key, batch)

    def _close(self, key: tuple[int, int], batch: _Batch) -> None:
        """No more FCALLs join `batch`: the next ones start another."""
        if self._batches.get(key) is batch:
            del self._batches[key]

    async def _run_batch(self, key: tuple[int, int], batch: _Batch) -> None:
        needed = batch.needed
        try:
            pipe = self._pipe
            if needed and pipe is not None and pipe.pool is batch.pool and pipe.waiting:
                # Group commit: the WAIT in flight holds the pipe's later commands in Redis
                # anyway; meanwhile this batch stays open and takes every FCALL.
                batch.held = True
                await asyncio.wait((pipe.waiting[-1][1],))
                batch.held = False
            self._close(key, batch)
            if needed:
                wait = pack((("WAIT", needed, self.wait_timeout_ms),))
                assert wait is not None
                batch.packed.append(wait)
            replies = await self._pipelined(batch.pool, b"".join(batch.packed), len(batch.packed))
        except BaseException as exc:
            self._close(key, batch)
            for i in range(len(batch.dones)):  # the FCALLs (`packed` may end with WAIT)
                self._settle(batch, i, None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        error: BaseException | None = None
        if batch.fence_gen != self._fence_gen:
            # A failover started while these writes were in flight: the replica that
            # confirmed them may not be the one being promoted. Not acknowledged.
            error = _Fenced("a failover started during the write")
        confirmed: Any = replies[-1] if needed else None
        short = bool(needed) and (isinstance(confirmed, Exception) or int(confirmed) < needed)
        dones = batch.dones
        for i in range(len(dones)):
            reply = replies[i]
            failed = error
            if failed is None:
                if isinstance(reply, ResponseError):
                    failed = reply
                elif short and reply is not None:  # None: nothing stored, nothing to wait for
                    failed = BackendUnavailable(
                        f"seq {reply} reached {confirmed} of {needed} replica(s) within "
                        f"{self.wait_timeout_ms} ms: not acknowledged, retry with the key"
                    )
            if failed is not None:
                self._settle(batch, i, None, failed)
                continue
            # The common case, inline (`_call`): one call per FCALL.
            try:
                dones[i](reply, None)
            except Exception:
                logger.exception("redis link: a durable FCALL's caller failed on its answer")

    def _settle(self, batch: _Batch, i: int, reply: Any, exc: BaseException | None) -> None:
        """Hand FCALL `i` of `batch` its outcome: a call that failed in a way it may retry
        goes back to the slow path, in its place."""
        done = batch.dones[i]
        if exc is None or isinstance(exc, asyncio.CancelledError):
            _call(done, reply, exc)
            return
        idempotent = batch.idempotent[i]
        final = self._final(exc, idempotent)
        if final is not None:
            _call(done, None, final)
        elif isinstance(done, _Waiting):  # retried before: it keeps its deadline
            done.last = exc
            self._wait(done)
        else:
            deadline = running_loop().time() + self.op_timeout_s
            self._wait(_Waiting(batch.orders[i], batch.packed[i], idempotent, done, exc, deadline))

    def _final(self, exc: BaseException, idempotent: bool) -> BaseException | None:
        """What a durable FCALL whose attempt failed with `exc` raises; None: retry it."""
        if isinstance(exc, ResponseError):
            return None if function_missing(exc) or _refused(exc) else exc
        if isinstance(exc, NotSent):
            return None
        if isinstance(exc, (_Fenced, *NETWORK_ERRORS)):
            # Sent, outcome unknown: only an idempotency key makes a retry safe.
            if idempotent:
                return None
            self.locator.check_master()
            return BackendUnavailable(
                f"connection lost during publish ({exc}); it may or may not be "
                "stored: resend with an idempotency key"
            )
        return exc

    async def durable_fcall(self, fcall: Sequence[Any] | bytes, *, idempotent: bool) -> Any:
        """`submit` for a coroutine: `fcall` (its arguments, or packed as RESP) on the master
        followed by WAIT for the ack level, retried against the current master until
        op_timeout_s; its reply once durable. A call whose outcome is unknown (connection
        lost after sending) is retried only when `idempotent`."""
        packed = fcall if isinstance(fcall, bytes) else pack((fcall,))
        if packed is None:
            raise TypeError(f"cannot pack {fcall!r}")
        fut: asyncio.Future[Any] = running_loop().create_future()
        self.submit(packed, idempotent=idempotent, done=functools.partial(_resolve, fut))
        return await fut


def _lean(conn: AbstractConnection) -> tuple[asyncio.StreamWriter, _AsyncHiredisParser] | None:
    """The connection's writer and hiredis parser, when a batch can be written and its
    replies read without redis-py's per-command path (None: use it)."""
    parser = getattr(conn, "_parser", None)
    writer = getattr(conn, "_writer", None)
    if (
        writer is not None
        and conn.is_connected
        and isinstance(parser, _AsyncHiredisParser)
        and parser._reader is not None
    ):
        return writer, parser
    return None


def _stale(conn: AbstractConnection) -> bool:
    """An idle connection the server closed, or that holds bytes nobody asked for."""
    reader = getattr(conn, "_reader", None)
    if not conn.is_connected or not isinstance(reader, asyncio.StreamReader):
        return False  # connected again by its next command
    parser = getattr(conn, "_parser", None)
    hiredis = getattr(parser, "_reader", None)
    return reader.at_eof() or bool(hiredis is not None and hiredis.has_data())


async def _read_responses(conn: AbstractConnection, count: int) -> list[Any]:
    """`count` replies through redis-py, error replies as the exceptions they are."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def _call(done: Done, reply: Any, exc: BaseException | None) -> None:
    # One caller's bug must not keep the other calls of a batch from their answers.
    try:
        done(reply, exc)
    except Exception:
        logger.exception("redis link: a durable FCALL's caller failed on its answer")
