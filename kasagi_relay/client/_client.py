"""The asyncio client: `Client` (one WebSocket connection, reconnected) and `Room`.

All protocol decisions are in `kasagi_relay.client.protocol` (Sans-I/O); this module does the
I/O around it: one connection from `websockets.asyncio.client`, one task reading it, and on
a close that docs/protocol.md says to retry (1001, 1006, 1011, 1012, 1013, or the
connection lost) a new connection after a full-jitter backoff, every room joined again with
`since`, and every delta not yet acknowledged sent again with its idempotency key.

With a token (`token=`, or `get_token=` called before every connection and every refresh)
the first message of each connection is `auth`; the token is refreshed with `auth` on the
same connection before it expires, and a close 4001 (token expired) reconnects with a
fresh one. A 1008 (authentication failed) is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from kasagi_relay import delta
from kasagi_relay.client import protocol
from kasagi_relay.client.errors import ClientClosed, ConnectionFailed, KasagiError, RelayError
from kasagi_relay.client.protocol import Format, RequestId

__all__ = [
    "RECONNECT_CODES",
    "Change",
    "Client",
    "Room",
    "backoff_delay",
]

logger = logging.getLogger("kasagi_relay.client")

# docs/protocol.md, client behaviour: reconnect and resume after these; never after 1008.
RECONNECT_CODES: Final = frozenset({1001, 1006, 1011, 1012, 1013})
CLOSE_POLICY: Final = 1008
# 4001 (token expired, v1.1) is retried only with a fresh token, i.e. when get_token is set.
TOKEN_EXPIRED: Final = 4001
MIN_DELAY_S: Final = 0.25
MAX_DELAY_S: Final = 10.0
# A joined state may be as big as the relay's --max-state-bytes (8 MiB by default).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

# A callable giving a fresh token: sync or async.
TokenSource = Callable[[], "str | Awaitable[str]"]
# A token is refreshed after this share of its remaining lifetime, at most this long before
# its exp (and never sooner than MIN_REFRESH_S after the last one).
REFRESH_AT: Final = 2 / 3
REFRESH_BEFORE_S: Final = 60.0
MIN_REFRESH_S: Final = 0.5


def backoff_delay(
    attempt: int,
    min_delay: float = MIN_DELAY_S,
    max_delay: float = MAX_DELAY_S,
    rand: Callable[[], float] = random.random,
) -> float:
    """Full jitter: random(0, min(max_delay, min_delay * 2**attempt))."""
    # Capped before the power so a long outage cannot overflow the float.
    ceiling = max_delay if attempt >= 64 else min(max_delay, min_delay * 2**attempt)
    return rand() * ceiling


class Change:
    """One step of a room's stream, as `async for change in room` yields it.

    `kind` is "delta" (deltas `from_seq`..`seq` applied; `delta` is the `{"patch": ...}` or
    `{"merge": ...}` document) or "reset" (the state was replaced: a `reset` from the
    relay, a full `joined` after a reconnect, or changes this iterator fell too far behind
    on; `delta` is None). `state` is the room's state right after this change."""

    __slots__ = ("_delta", "_doc", "_state", "_state_json", "from_seq", "kind", "room", "seq")

    def __init__(
        self,
        room: str,
        kind: Literal["delta", "reset"],
        from_seq: int,
        seq: int,
        doc: bytes | None,
        state_json: bytes,
    ) -> None:
        self.room = room
        self.kind = kind
        self.from_seq = from_seq
        self.seq = seq
        self._doc = doc
        self._state_json = state_json
        self._delta: dict[str, Any] | None = None
        self._state: Any = None

    @property
    def delta(self) -> dict[str, Any] | None:
        if self._doc is not None and self._delta is None:
            self._delta = json.loads(self._doc)
        return self._delta

    @property
    def state(self) -> Any:
        # Decoded on first use: a consumer that only looks at deltas never pays for it.
        if self._state is None:
            self._state = json.loads(self._state_json)
        return self._state

    def __repr__(self) -> str:
        return f"Change({self.room!r}, {self.kind}, {self.from_seq}..{self.seq})"


@dataclass(eq=False)
class _Outgoing:
    """A delta sent and not yet acknowledged: sent again, same key, until it is."""

    room: str
    patch: list[Any] | None
    merge: Any
    key: str
    future: asyncio.Future[int]
    unavailable: int = 0

    def encode(self, fmt: Format, rid: RequestId) -> str | bytes:
        return protocol.encode_delta(
            fmt, self.room, patch=self.patch, merge=self.merge, key=self.key, id=rid
        )


@dataclass(eq=False)
class _Pending:
    """A join or leave waiting for its reply on the current connection."""

    kind: Literal["join", "leave"]
    room: Room
    future: asyncio.Future[None] | None = None


@dataclass(eq=False)
class _PresenceFetch:
    """A `presence` request waiting for its reply on the current connection."""

    room: Room
    future: asyncio.Future[list[dict[str, Any]]]


class Room:
    """A joined room: `state`, `seq`, `async for change in room`, `send`, `leave`.

    Made by `Client.join`. Every change from the join on is kept for iteration, so none is
    missed by an `async for` that starts later; as deltas, not states, so a room nobody
    iterates costs their bytes only. Past `max_queue_bytes` of changes not yet taken, they
    are dropped and the iteration gets one "reset" change with the state of that moment.

    Presence (joined with `presence=True`): `presence` maps each member's `conn` to its
    `{"conn","sub","info"}`, read with `fetch_presence` after each `joined` (also after a
    reconnect) and kept current from the presence_join / presence_leave events; `conn` is
    this connection's own id (from `joined`)."""

    def __init__(
        self, client: Client, name: str, max_queue_bytes: int, presence: bool = False
    ) -> None:
        self._client = client
        self.name = name
        self.wants_presence = presence
        self.presence: dict[str, dict[str, Any]] = {}
        self.conn: str | None = None
        self._stream = protocol.RoomStream(name)
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The iteration's own copy of the state, behind `_stream` by the queued changes; it
        # gives each Change its state. Until the first step, `_base` (seq, JSON) instead.
        self._view: delta.RoomState | None = None
        self._base: tuple[int, bytes] | None = None
        self._queue: deque[_Step] = deque()
        self._queue_bytes = 0
        self._max_queue_bytes = max_queue_bytes
        self._stale = False  # the queue overflowed: the next step is a reset
        self._wakeup = asyncio.Event()
        self._ended: BaseException | None = None
        self._cache: tuple[int | None, int, Any] | None = None
        self._version = 0
        self._unavailable = 0  # joins answered `unavailable` in a row

    def __repr__(self) -> str:
        return f"Room({self.name!r}, seq={self._stream.seq})"

    @property
    def seq(self) -> int:
        """The seq of `state`: the last delta of the room applied here."""
        seq = self._stream.seq
        return 0 if seq is None else seq

    @property
    def state(self) -> Any:
        """The room's JSON document as Python objects (decoded once per change)."""
        if self._cache is None or self._cache[:2] != (self._stream.seq, self._version):
            state = json.loads(self._stream.state_json())
            self._cache = (self._stream.seq, self._version, state)
        return self._cache[2]

    @property
    def state_json(self) -> bytes:
        """The state as compact JSON bytes."""
        return self._stream.state_json()

    async def send(
        self, *, patch: list[Any] | None = None, merge: Any = None, key: str | None = None
    ) -> int:
        """Send a delta (exactly one of `patch`, RFC 6902, or `merge`, RFC 7396); return the
        seq the relay gave it once acknowledged. An idempotency key is made up unless given:
        after a reconnect, or an `unavailable`, the delta is sent again with the same key,
        so it ends with exactly one seq. Raises RelayError for a refusal (bad_patch,
        too_large, key_conflict, rate_limited, ...)."""
        return await self._client.send(self.name, patch=patch, merge=merge, key=key)

    async def leave(self) -> None:
        """Leave the room; iteration over it ends (after the changes already here)."""
        await self._client._leave(self)

    async def fetch_presence(self) -> list[dict[str, Any]]:
        """Every member of the room on every relay (`{"conn","sub","info"}` each), read
        now; `presence` is replaced by it. Raises RelayError (forbidden, unavailable)."""
        return await self._client._fetch_presence(self)

    def _on_presence(self, event: protocol.PresenceEvent) -> None:
        if event.joined:
            self.presence[event.conn] = event.member
        else:
            self.presence.pop(event.conn, None)

    def __aiter__(self) -> Room:
        return self

    async def __anext__(self) -> Change:
        if self._stale:
            self._stale = False
            seq, state = self.seq, self._stream.state_json()
            self._view = delta.RoomState(state, seq)
            return Change(self.name, "reset", seq, seq, None, state)
        while not self._queue:
            if self._ended is not None:
                if isinstance(self._ended, ClientClosed):
                    raise StopAsyncIteration
                raise self._ended
            self._wakeup.clear()
            await self._wakeup.wait()
        step = self._queue.popleft()
        self._queue_bytes -= len(step.data)
        if step.kind == "reset":
            self._view = delta.RoomState(step.data, step.seq)
            return Change(self.name, "reset", step.first, step.seq, None, step.data)
        view = self._view
        if view is None:
            assert self._base is not None
            view = self._view = delta.RoomState(self._base[1], self._base[0])
            self._base = None
        # The same engine on the same deltas in the same order: the stream's result.
        view.apply(step.data, step.seq)
        return Change(self.name, "delta", step.first, step.seq, step.data, view.to_json())

    # ------------------------------------------------------------ called by the client

    def _started(self, seq: int, state: bytes) -> None:
        self._base = (seq, state)

    def _changed(self, kind: Literal["delta", "reset"], first: int, seq: int, data: bytes) -> None:
        """A delta (`data` its document) or a replaced state (`data` the state)."""
        self._version += 1
        if self._stale:
            return  # the reset the iteration gets next is taken from the state then
        if self._queue_bytes + len(data) > self._max_queue_bytes:
            self._queue.clear()
            self._queue_bytes = 0
            self._view = None
            self._base = None
            self._stale = True
        else:
            self._queue.append(_Step(kind, first, seq, data))
            self._queue_bytes += len(data)
        self._wakeup.set()

    def _end(self, exc: BaseException) -> None:
        if self._ended is None:
            self._ended = exc
        if not self._ready.done():
            self._ready.set_exception(exc)
            self._ready.exception()  # retrieved: a join nobody awaits any more is no error
        self._wakeup.set()


@dataclass(frozen=True, slots=True)
class _Step:
    kind: Literal["delta", "reset"]
    first: int
    seq: int
    data: bytes


class Client:
    """One connection to a relay, reconnected as docs/protocol.md's client behaviour says.

        async with Client("ws://127.0.0.1:8765/ws") as c:
            room = await c.join("lobby")
            seq = await room.send(merge={"hp": 7})
            async for change in room:
                print(change.seq, change.delta, room.state)

    `url`: one relay, or several (relays sharing rooms through one Redis): the first
    connection takes the first that answers, each reconnect attempt the next one.
    `format`: "json" (kasagi.v1.json) or "msgpack" (kasagi.v1.msgpack). `token` or
    `get_token` (a callable, sync or async, called before every connection and before the
    token expires) for relays with JWT keys: sent as the first message (`auth`) of every
    connection and again to refresh it (`sub` and `token_exp` say what the relay
    accepted); with a `get_token`, a close 4001 (expired) reconnects. Reconnection: full-jitter
    backoff between `min_delay` and `max_delay`; `max_attempts` consecutive failed attempts
    (None: no limit; a connection closed before the relay answered anything counts as a
    failed attempt) end the client with ConnectionFailed. A delta answered `unavailable`
    is sent again with its key up to `unavailable_retries` times. `max_message_bytes`:
    the largest message accepted from the relay (a joined state can be as big as the
    relay's --max-state-bytes). `max_queue_bytes`: per room, the changes kept for
    `async for` before they collapse into one reset."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        format: Format = "json",
        token: str | None = None,
        get_token: TokenSource | None = None,
        min_delay: float = MIN_DELAY_S,
        max_delay: float = MAX_DELAY_S,
        max_attempts: int | None = None,
        unavailable_retries: int = 8,
        open_timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_queue_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if format not in protocol.FORMATS:
            raise ValueError(f"format must be one of {protocol.FORMATS}, not {format!r}")
        self.urls: tuple[str, ...] = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("no relay URL")
        self.url = self.urls[0]  # the relay of the current (or next) connection
        self.format: Format = format
        self._token = token
        self._get_token = get_token
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.unavailable_retries = unavailable_retries
        self.open_timeout = open_timeout
        self.max_message_bytes = max_message_bytes
        self.max_queue_bytes = max_queue_bytes
        self.rooms: dict[str, Room] = {}
        # Every close that led to a reconnect, by code (1006 for a lost connection).
        self.disconnects: list[int] = []
        # Every stream the client had to join again, and why (docs/protocol.md: a frame
        # whose `from` is not seq + 1, or a resume at a seq it does not hold).
        self.gaps: list[str] = []
        # Deltas sent again: after a reconnect, and after an `unavailable`.
        self.resent = 0
        self.unavailable = 0
        self._ws: ClientConnection | None = None
        self._live = False
        self._ids = itertools.count(1)
        self._requests: dict[RequestId, _Outgoing | _Pending | _PresenceFetch] = {}
        self._unacked: dict[str, _Outgoing] = {}
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._failed: BaseException | None = None
        self._attempt = 0
        # Closed while idle (1008 with nothing joined or pending): the next request connects.
        self._dormant = False
        self._waking: asyncio.Task[None] | None = None
        # Identity: what the relay accepted, the pending `auth` request, the refresh timer.
        self.sub: str | None = None
        self.token_exp: float | None = None
        self._auth_id: RequestId | None = None
        self._refresh: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._live

    async def connect(self) -> None:
        """Open the first connection; ConnectionFailed if it cannot be made."""
        if self._runner is not None:
            raise RuntimeError("already connected")
        failures = []
        for url in self.urls:
            self.url = url
            try:
                ws = await self._open()
            except _Retryable as exc:
                failures.append(f"{url}: {exc.__cause__}")
                continue
            self._start(ws)
            return
        raise ConnectionFailed("cannot connect to " + "; ".join(failures))

    def _start(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._live = True
        self._dormant = False
        self._runner = asyncio.create_task(self._run(ws), name=f"kasagi-client {self.url}")

    async def _ensure_connected(self) -> None:
        if not self._dormant:
            return
        if self._waking is None:
            self._waking = asyncio.create_task(self._wake())
        await asyncio.shield(self._waking)

    async def _wake(self) -> None:
        try:
            ws = await self._open()
        except _Retryable as exc:
            raise ConnectionFailed(f"cannot connect to {self.url}: {exc.__cause__}") from None
        finally:
            self._waking = None
        if self._closing:
            await ws.close()
            return
        self._start(ws)

    async def close(self) -> None:
        """Close the connection; pending calls raise ClientClosed, iterations end."""
        if self._closing:
            return
        self._closing = True
        self._live = False
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        tasks = [self._runner, self._waking, self._refresh, *self._tasks]
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        self._fail(ClientClosed("client closed"))

    async def join(self, room: str, *, presence: bool = False) -> Room:
        """Join `room` and return it once its state is here (a full `joined`). With
        `presence`, `Room.presence` is read and kept current too (it is read before this
        returns)."""
        self._check_usable()
        await self._ensure_connected()
        existing = self.rooms.get(room)
        if existing is None:
            protocol.encode_join(self.format, room)  # ValueError for a bad name, here
            existing = Room(self, room, self.max_queue_bytes, presence)
            self.rooms[room] = existing
            if self._live:
                await self._send_join(existing)
        await asyncio.shield(existing._ready)
        if presence and not existing.wants_presence:
            existing.wants_presence = True
            await self._send_join(existing)
        if existing.wants_presence:
            await existing.fetch_presence()
        return existing

    async def _fetch_presence(self, room: Room) -> list[dict[str, Any]]:
        self._check_usable()
        await self._ensure_connected()
        rid = next(self._ids)
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._requests[rid] = _PresenceFetch(room, future)
        await self._write(protocol.encode_presence(self.format, room.name, rid))
        return await asyncio.shield(future)

    # ------------------------------------------------------------------ requests

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closing or self._runner is None:
            raise ClientClosed("client is not connected (use `async with Client(url)`)")

    async def _write(self, data: str | bytes) -> None:
        ws = self._ws
        if ws is None or not self._live:
            return  # the next connection sends it (joins and unacknowledged deltas)
        # A write to a connection that just died is harmless: the reader sees the close
        # and the resume sends whatever still needs an answer.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(data)

    async def _send_join(self, room: Room) -> None:
        rid = next(self._ids)
        room._stream.rejoin_sent()
        self._requests[rid] = _Pending("join", room)
        await self._write(
            protocol.encode_join(
                self.format, room.name, room._stream.since(), rid, room.wants_presence
            )
        )

    async def send(
        self,
        room: str,
        *,
        patch: list[Any] | None = None,
        merge: Any = None,
        key: str | None = None,
    ) -> int:
        """`Room.send` without joining: a delta needs no membership (docs/protocol.md)."""
        self._check_usable()
        await self._ensure_connected()
        key = key if key is not None else uuid.uuid4().hex
        if key in self._unacked:
            raise ValueError(f"a delta with key {key!r} is already waiting for its ack")
        out = _Outgoing(room, patch, merge, key, asyncio.get_running_loop().create_future())
        out.encode(self.format, 0)  # ValueError for a malformed request, before anything
        self._unacked[key] = out
        try:
            await self._transmit(out)
            return await asyncio.shield(out.future)
        finally:
            # Also when the caller gave up (cancelled): no resend of what nobody waits for.
            self._unacked.pop(key, None)
            if not out.future.done():
                out.future.cancel()

    async def _transmit(self, out: _Outgoing) -> None:
        rid = next(self._ids)
        self._requests[rid] = out
        await self._write(out.encode(self.format, rid))

    async def _leave(self, room: Room) -> None:
        if self.rooms.get(room.name) is not room:
            return
        del self.rooms[room.name]
        try:
            if self._live:
                rid = next(self._ids)
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._requests[rid] = _Pending("leave", room, future)
                await self._write(protocol.encode_leave(self.format, room.name, rid))
                # A lost connection resolves it too: membership ends with the connection.
                await asyncio.shield(future)
        finally:
            room._end(ClientClosed(f"left {room.name}"))

    # ------------------------------------------------------------------ the connection

    async def _fetch_token(self) -> str | None:
        if self._get_token is None:
            return self._token
        token = self._get_token()
        if inspect.isawaitable(token):
            token = await token
        return token

    async def _open(self) -> ClientConnection:
        token = await self._fetch_token()
        subprotocol = protocol.SUBPROTOCOLS[self.format]
        try:
            ws = await connect(
                self.url,
                subprotocols=[Subprotocol(subprotocol)],
                open_timeout=self.open_timeout,
                max_size=self.max_message_bytes,
                # The relay encodes each frame once for every member: no per-connection
                # compression.
                compression=None,
            )
        except InvalidURI as exc:
            raise ValueError(str(exc)) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status >= 500 or status == 429:
                raise _Retryable() from exc
            raise ConnectionFailed(f"relay refused the handshake: HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise _Retryable() from exc
        if ws.subprotocol != subprotocol and self.format == "msgpack":
            await ws.close()
            raise ConnectionFailed(f"the relay did not accept {subprotocol}")
        if token:
            # First on the connection: the relay serves nothing else before it. Joins and
            # deltas may follow at once (one connection's requests are served in order).
            rid = next(self._ids)
            self._auth_id = rid
            with contextlib.suppress(ConnectionClosed):
                await ws.send(protocol.encode_auth(self.format, token, rid))
        return ws

    async def _run(self, ws: ClientConnection) -> None:
        try:
            while True:
                await self._read(ws)
                code = ws.close_code if ws.close_code is not None else 1006
                self._lost()
                if self._closing:
                    return
                retry = code in RECONNECT_CODES or (
                    code == TOKEN_EXPIRED and self._get_token is not None
                )
                reason = ws.close_reason or ""
                if (
                    code == CLOSE_POLICY
                    and not self.rooms
                    and not self._unacked
                    and not reason.startswith("authentication")
                ):
                    # Nothing joined, nothing waiting: the relay's idle timeout (docs/
                    # operations.md) closes such connections with 1008. Not retried; the
                    # next join or send opens a new connection.
                    logger.info(
                        "closed while idle (%d %s); connecting again on demand", code, reason
                    )
                    self._dormant = True
                    return
                if not retry:
                    self._fail(ConnectionFailed(f"relay closed with {code} {reason}".strip(), code))
                    return
                self.disconnects.append(code)
                logger.info("connection closed (%d); reconnecting", code)
                ws = await self._reconnect()
                await self._resume(ws)
        except KasagiError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must still release every waiter
            logger.exception("client stopped")
            self._fail(ConnectionFailed(f"client stopped: {exc!r}"))
            raise

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                self._attempt = 0
                try:
                    reply = protocol.parse(data)
                except protocol.ProtocolError as exc:
                    logger.warning("ignoring a malformed message from the relay: %s", exc)
                    continue
                await self._dispatch(reply)
        except ConnectionClosed:
            pass

    async def _reconnect(self) -> ClientConnection:
        # `_attempt` counts connections in a row that failed, or closed before the relay
        # answered anything: a relay that accepts and drops at once is backed off too.
        while True:
            attempt = self._attempt
            if self.max_attempts is not None and attempt >= self.max_attempts:
                raise ConnectionFailed(f"gave up reconnecting after {attempt} attempts")
            await asyncio.sleep(backoff_delay(attempt, self.min_delay, self.max_delay))
            self._attempt += 1
            # With several relays, each attempt goes to the next one.
            self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            try:
                return await self._open()
            except _Retryable as exc:
                logger.info("reconnect attempt %d failed: %r", attempt + 1, exc.__cause__)

    def _lost(self) -> None:
        self._live = False
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        for pending in self._requests.values():
            if isinstance(pending, _PresenceFetch):
                # Read again after the room is joined again; this caller learns it now.
                if not pending.future.done():
                    pending.future.set_exception(RelayError("unavailable", "connection lost"))
                    pending.future.exception()
                continue
            future = pending.future if isinstance(pending, _Pending) else None
            if future is not None and not future.done():
                future.set_result(None)
        self._requests.clear()
        for room in self.rooms.values():
            room._stream.rejoin_sent()

    async def _resume(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._live = True
        rooms = list(self.rooms.values())
        unacked = list(self._unacked.values())
        for room in rooms:
            await self._send_join(room)
        self.resent += len(unacked)
        for out in unacked:
            await self._transmit(out)

    def _fail(self, exc: BaseException) -> None:
        self._live = False
        if self._failed is None and not isinstance(exc, ClientClosed):
            self._failed = exc
        for pending in self._requests.values():
            future: asyncio.Future[Any] | None = pending.future
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()
        self._requests.clear()
        for out in self._unacked.values():
            if not out.future.done():
                out.future.set_exception(exc)
                out.future.exception()
        for room in self.rooms.values():
            room._end(exc)

    # ------------------------------------------------------------------ replies

    async def _dispatch(self, reply: protocol.Reply) -> None:
        if isinstance(reply, protocol.Authed):
            self._on_authed(reply)
        elif isinstance(reply, protocol.DeltaFrame):
            room = self.rooms.get(reply.room)
            if room is None:
                return
            step = room._stream.on_delta(reply)
            if isinstance(step, protocol.Applied):
                room._changed("delta", step.first, step.seq, step.doc)
            elif isinstance(step, protocol.Rejoin):
                logger.warning("room %s: %s; joining again", room.name, step.reason)
                self.gaps.append(f"{room.name}: {step.reason}")
                await self._send_join(room)
        elif isinstance(reply, protocol.Ack):
            request = self._requests.pop(reply.id, None) if reply.id is not None else None
            if isinstance(request, _Outgoing) and not request.future.done():
                request.future.set_result(reply.seq)
        elif isinstance(reply, protocol.Joined):
            if reply.id is not None:
                self._requests.pop(reply.id, None)
            room = self.rooms.get(reply.room)
            if room is None:
                return
            room.conn = reply.conn
            first = not room._ready.done()
            try:
                joined = room._stream.on_joined(reply)
            except delta.DeltaError as exc:
                room._end(RelayError("internal", f"joined state does not load: {exc}", room.name))
                self.rooms.pop(room.name, None)
                return
            if isinstance(joined, protocol.Rejoin):
                logger.warning("room %s: %s; joining again", room.name, joined.reason)
                self.gaps.append(f"{room.name}: {joined.reason}")
                await self._send_join(room)
                return
            if reply.state is not None:
                if first:
                    room._started(reply.seq, reply.state)
                else:
                    room._changed("reset", reply.seq, reply.seq, reply.state)
            room._unavailable = 0
            if first:
                room._ready.set_result(None)
            elif room.wants_presence:
                # Joined again (a reconnect): who is there now, events from here on.
                self._spawn(self._refetch(room))
        elif isinstance(reply, protocol.PresenceEvent):
            room = self.rooms.get(reply.room)
            if room is not None and room.wants_presence:
                room._on_presence(reply)
        elif isinstance(reply, protocol.Presence):
            request = self._requests.pop(reply.id, None) if reply.id is not None else None
            if isinstance(request, _PresenceFetch):
                request.room.presence = {m["conn"]: m for m in reply.members}
                if not request.future.done():
                    request.future.set_result(reply.members)
        elif isinstance(reply, protocol.Reset):
            room = self.rooms.get(reply.room)
            if room is None:
                return
            room._stream.on_reset(reply)
            room._changed("reset", reply.seq, reply.seq, reply.state)
        elif isinstance(reply, protocol.ErrorReply):
            self._on_error(reply)
        elif isinstance(reply, protocol.Left):
            request = self._requests.pop(reply.id, None) if reply.id is not None else None
            if isinstance(request, _Pending) and request.future is not None:
                if not request.future.done():
                    request.future.set_result(None)
            elif reply.code is not None:
                # Left by the relay (v1.1: a refreshed token lost the right to read).
                room = self.rooms.pop(reply.room, None)
                if room is not None:
                    room._end(RelayError(reply.code, "left by the relay", reply.room))

    def _on_authed(self, reply: protocol.Authed) -> None:
        if reply.id == self._auth_id:
            self._auth_id = None
        self.sub = reply.sub
        self.token_exp = reply.exp
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        if self._get_token is None:
            return  # a fixed token cannot be refreshed: the relay closes 4001 at its exp
        remaining = reply.exp - time.time()
        delay = max(MIN_REFRESH_S, remaining - min(REFRESH_BEFORE_S, remaining * (1 - REFRESH_AT)))
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_after(delay))

    async def _refresh_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            token = await self._fetch_token()
        except Exception:
            logger.exception("get_token failed; the relay closes 4001 at the token's exp")
            return
        if not token or not self._live:
            return
        self._refresh = None
        rid = next(self._ids)
        self._auth_id = rid
        await self._write(protocol.encode_auth(self.format, token, rid))

    def _on_error(self, reply: protocol.ErrorReply) -> None:
        if reply.id is not None and reply.id == self._auth_id:
            self._auth_id = None
            # unauthorized: the relay closes with 1008 next, and the client ends with it.
            # bad_message: a relay without JWT keys (anonymous): nothing to do.
            logger.warning("the relay refused the token: %s %s", reply.code, reply.message)
            return
        request = self._requests.pop(reply.id, None) if reply.id is not None else None
        error = RelayError(reply.code, reply.message, reply.room)
        if isinstance(request, _PresenceFetch):
            if not request.future.done():
                request.future.set_exception(error)
                request.future.exception()
            return
        if isinstance(request, _Outgoing):
            if request.future.done():
                return
            if reply.code == "unavailable" and request.unavailable < self.unavailable_retries:
                # Not stored, or not known to be: the same key again ends with one seq.
                request.unavailable += 1
                self.unavailable += 1
                self._spawn(self._retry(request))
                return
            request.future.set_exception(error)
        elif isinstance(request, _Pending):
            if request.kind == "join":
                room = request.room
                if reply.code == "unavailable" and room._unavailable < self.unavailable_retries:
                    room._unavailable += 1
                    self._spawn(self._retry_join(room))
                    return
                if self.rooms.get(request.room.name) is request.room:
                    del self.rooms[request.room.name]
                request.room._end(error)
            elif request.future is not None and not request.future.done():
                request.future.set_exception(error)
        else:
            logger.warning("relay error: %s", error)

    async def _retry(self, out: _Outgoing) -> None:
        await asyncio.sleep(backoff_delay(out.unavailable - 1, self.min_delay, self.max_delay))
        if self._unacked.get(out.key) is out and self._live:
            await self._transmit(out)

    async def _refetch(self, room: Room) -> None:
        with contextlib.suppress(KasagiError):
            await room.fetch_presence()

    async def _retry_join(self, room: Room) -> None:
        await asyncio.sleep(backoff_delay(room._unavailable - 1, self.min_delay, self.max_delay))
        if self.rooms.get(room.name) is room and self._live:
            await self._send_join(room)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Retryable(Exception):
    """A connection attempt that failed in a way worth trying again (its cause is set)."""
