"""One WebSocket connection of a client: its guards, its dispatch, its writer.

`RelayConnection` is websockets' server connection with the relay's guards on the bytes
coming in (docs/operations.md lists each limit):
- control frames (pings, pongs) count in the connection's rate limit, as messages and
  by their bytes;
- input is parsed a slice at a time, yielding to the event loop between slices, so a
  write of thousands of tiny frames cannot hold the loop (websockets parses a 256 KiB
  read of 2-byte frames in about 180 ms at once);
- a frame (or fragmented message) whose bytes stay incomplete for --frame-timeout
  closes the connection with 1008, which frees what it buffered;
- whatever websockets writes by itself (pongs) counts against the member's send queue;
- after a close that discards the peer's input, a peer that keeps sending is cut off;
- complete, unfragmented, masked text and binary frames at the start of the input are
  read here (header and unmask only), not by websockets' generator-based parser (~11 % of
  the loop's time at ingest load); whatever else comes (control frames, fragments, close,
  a partial frame, anything websockets refuses) goes to websockets from that byte on, so
  that close codes and limits stay websockets' own;
- a connection whose first request websockets does not serve (the HTTP API: websockets
  parses only GET requests without a body) is handed, transport and bytes, to the server
  that claims it (`HttpTakeover`, api.py) before websockets reads anything.

`Session` reads the messages, checks the rate limit before decoding anything, parses each
request (protocol.parse; a big one in a worker thread) and hands it to the room service
(service.py). It holds a
`fanout.Member`, the writer the rooms broadcast to. Messages of one connection are served
in order, yielding to the loop every few messages. Deltas are pipelined: each is checked
and handed to the backend in order (so one client's deltas get seqs in the order it sent
them), and the next message is served while the backend's answers are awaited, up to
PIPELINE_DEPTH deltas in flight; replies (acks and errors) go out in request order, and
any other request first waits for the deltas in flight. Nothing a client sends raises
out of a session: every failure becomes an `error` reply or a close code, and other
connections never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Final, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State
from websockets.protocol import Protocol as WsProtocol
from websockets.streams import StreamReader

from kasagi_relay import delta, protocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets built without its C speedups
    from websockets.utils import apply_mask
from kasagi_relay.auth import AuthError
from kasagi_relay.config import Config
from kasagi_relay.domain import ANONYMOUS, Identity
from kasagi_relay.fanout import CLOSE_TOO_SLOW, OP_BINARY, OP_TEXT, Member
from kasagi_relay.jwks import Authenticator
from kasagi_relay.metrics import Metrics, ThrottledLog
from kasagi_relay.protocol import BadRequest, Codec
from kasagi_relay.ratelimit import ALLOW, CLOSE, RateLimiter
from kasagi_relay.service import RoomService

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_TOKEN_EXPIRED",
    "HttpTakeover",
    "MemberFactory",
    "RelayConnection",
    "Session",
]

logger = logging.getLogger("kasagi_relay.session")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011
# v1.1: the token expired without a refresh; reconnect with a fresh one.
CLOSE_TOKEN_EXPIRED: Final = 4001
# `auth` messages per connection: a burst, then one per this many seconds (rate_limited).
AUTH_BURST: Final = 5
AUTH_REFILL_S: Final = 10.0
# A message refused by the rate limit is answered with its id only when finding the id is
# cheap: larger messages are answered without one, never decoded.
PEEK_MAX_BYTES: Final = 4096
# A connection yields to the event loop after this many messages, bytes or seconds served in
# a row. Small, because another connection's delta on the Redis backend waits for several
# loop turns (its frame, the publish's reply, the task's wake-up), and each turn includes
# whatever a flooding connection does in it: with 32 messages a turn and 16 KiB fed to the
# parser at a time, a member sending a delta every 10 ms fell behind during a flood of
# pipelined refused messages and waited 0.35-2.2 s for acks; with 4 and 4 KiB, 21-117 ms
# (benches/hostile class 4, Redis, a loaded 2-core machine; docs/benchmarks.md). With the
# 4 KiB feed slices and YIELD_S, 16 messages a turn kept that class's stall at 5-34 ms
# (against 6-96 ms with 4 in the same runs), and a lone publisher's pipelined deltas merge
# about twice as many per frame on Redis (one batch per turn, one frame per batch).
YIELD_MESSAGES: Final = 16
YIELD_BYTES: Final = 256 * 1024
YIELD_S: Final = 0.001
# Input handed to websockets' parser at a time (at most ~700 frames: ~4 ms of parsing).
FEED_SLICE: Final = 4 * 1024
# A message larger than this is parsed in a worker thread: protocol.parse reads big messages
# with the engine, the GIL released, so the event loop serves the other connections meanwhile.
PARSE_IN_THREAD_BYTES: Final = 16 * 1024
# After a close that discards the peer's input (1008 for a flood, 1013), what it still sends
# is read and thrown away; past this much the TCP connection is aborted rather than read on.
DISCARD_MAX_BYTES: Final = 1024 * 1024
_CONTROL: Final = (Opcode.PING, Opcode.PONG)
# Enum members read per message, as module constants: Python 3.11's EnumType defines
# `__getattr__`, which puts every `State.OPEN` on the slow attribute path (0.13 us against
# 0.03 us for a global; ~6 reads per delta).
_OPEN: Final = State.OPEN
_CLOSED: Final = State.CLOSED
_TEXT: Final = Opcode.TEXT
# websockets' Frame of a queued data frame, by the opcode `_data_frames` gives.
_OPCODES: Final = {OP_TEXT: Opcode.TEXT, OP_BINARY: Opcode.BINARY}
# Deltas of one connection handed to the backend and not answered yet: past this many the
# session waits for the oldest before it reads on. One backend round trip per delta was the
# limit of a publisher that keeps several deltas unacknowledged (the peers benchmark keeps
# 16): with the Redis backend a 1,000-member room got about one delta per frame.
PIPELINE_DEPTH: Final = 16
# A presence reply listing more members than this is encoded in a worker thread.
PRESENCE_INLINE_MEMBERS: Final = 500
# Failures of encoding a reply field a client chose (an id of 2**70, a lone surrogate in
# MessagePack): the client's doing, not a bug.
_ENCODE_ERRORS: Final = (OverflowError, ValueError, TypeError, UnicodeEncodeError)

# Error codes that say nothing about what the client sent (the others count as bad input).
_NOT_INPUT: Final = frozenset({"unavailable", "internal"})

MemberFactory = Callable[[ServerConnection, Codec, Callable[[Member], None]], Member]

_input_log = ThrottledLog(logger)


class HttpTakeover(Protocol):
    """Another HTTP server on the relay's port (api.ApiServer)."""

    def claims(self, head: bytes | bytearray) -> bool | None:
        """Whether a connection whose first bytes are `head` is its own (None: not known
        yet, wait for more)."""
        ...

    def take_over(self, transport: asyncio.Transport, head: bytes) -> None:
        """Serve the connection from now on; `head` is what it sent so far."""
        ...


class _Reply:
    """A reply held back until the replies before it went out: a delta in flight (its
    `pending` publish), a delta's `seq` already known, or an error."""

    __slots__ = ("error", "pending", "received", "request", "seq")

    def __init__(
        self,
        pending: asyncio.Future[int] | None,
        request: protocol.Request | None,
        received: float,
        error: BadRequest | None = None,
        seq: int | None = None,
    ) -> None:
        self.pending = pending
        self.request = request
        self.received = received
        self.error = error
        self.seq = seq


class Guard:
    """The relay's state of one connection, in one object: websockets' connection has ~27
    attributes, and past 30 CPython stops sharing the keys of instance dicts (1.3 KiB more
    per connection, measured)."""

    __slots__ = (
        "backlog",
        "discarding",
        "feeding",
        "frame_timeout_s",
        "frame_timer",
        "head",
        "identity",
        "on_lost",
        "partial_since",
        "session",
    )

    def __init__(self) -> None:
        self.session: Session | None = None
        # Called once when the connection ends: gives back its place (admission.py).
        self.on_lost: Callable[[], None] | None = None
        self.frame_timeout_s = 0.0
        self.backlog = bytearray()  # input not yet handed to websockets' parser
        self.discarding: int | None = None  # bytes thrown away since a failing close
        self.feeding: asyncio.Handle | None = None
        self.partial_since: float | None = None
        self.frame_timer: asyncio.TimerHandle | None = None
        # Who the handshake's Authorization header authenticated (http.py), if it did.
        self.identity: Identity | None = None
        # The first bytes, until they say whether websockets or an HttpTakeover serves the
        # connection; None once decided.
        self.head: bytearray | None = None


class RelayConnection(ServerConnection):
    """websockets' ServerConnection with the relay's input guards (module docstring)."""

    # Set on the relay's subclass (server.py): who serves the connections whose first
    # request websockets does not. None: websockets reads every connection.
    takeover: ClassVar[HttpTakeover | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = Guard()
        if self.takeover is not None:
            self.guard.head = bytearray()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)
        if self.transport.get_protocol() is not self:
            # An HttpTakeover has the transport (_first_bytes): end websockets' handler
            # task here, as a cancellation, since its other ways out abort the transport.
            # The transport no longer calls connection_lost here: its cycles go now.
            self._cut_cycles()
            raise asyncio.CancelledError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The frame queue resumes reading when the session has caught up; with input of
        # ours still waiting to be parsed, that input goes first.
        self.recv_messages.resume = self._queue_resumed

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.backlog.clear()
        for handle in (self.guard.feeding, self.guard.frame_timer):
            if handle is not None:
                handle.cancel()
        if self.guard.on_lost is not None:
            on_lost, self.guard.on_lost = self.guard.on_lost, None
            on_lost()
        super().connection_lost(exc)
        self._cut_cycles()

    def _cut_cycles(self) -> None:
        """Cut the connection's reference cycles once it has ended, so that reference
        counting frees it when its handler ends: the relay freezes long-lived objects
        (gcpolicy.py), and a cycle among frozen objects waits for a full collection, which
        under member churn took seconds of every room's time."""
        # Ours: the frame queue's resume callback, bound to this connection.
        self.recv_messages.resume = _nothing
        # websockets': its handshake's subprotocol selector, a closure over this
        # connection, stays on the protocol for good; and when a connection ends without
        # a closing handshake (a reset, a protocol error), the parser's exception holds
        # the parser's frame, and so the protocol, in its traceback (never logged).
        vars(self.protocol).pop("select_subprotocol", None)
        if self.protocol.parser_exc is not None:
            self.protocol.parser_exc.__traceback__ = None

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self.guard.head is not None:
            data = self._first_bytes(data)
            if not data:
                return
        if self.guard.discarding is not None:
            self.guard.discarding += len(data)
            if self.guard.discarding > DISCARD_MAX_BYTES:
                self.transport.abort()
                return
        if self.guard.backlog:  # earlier input still being parsed: keep the order
            self.guard.backlog += data
            return
        self._feed(data)

    def _first_bytes(self, data: bytes) -> bytes:
        """What websockets is to read of the connection's first bytes: nothing while the
        request line is incomplete, nor once an HttpTakeover took the connection."""
        head, takeover = self.guard.head, self.takeover
        assert head is not None and takeover is not None
        head += data
        claimed = takeover.claims(head)
        if claimed is None:
            return b""
        self.guard.head = None
        if not claimed:
            return bytes(head)
        takeover.take_over(self.transport, bytes(head))
        # websockets' handshake waits for a request it will never parse: wake it, it finds
        # none, and `handshake` ends its task.
        if not self.request_rcvd.done():
            self.request_rcvd.set_result(None)
        return b""

    def _feed(self, data: bytes | bytearray) -> None:
        if len(data) > FEED_SLICE:
            self.guard.backlog += memoryview(data)[FEED_SLICE:]
            data = data[:FEED_SLICE]
            self.transport.pause_reading()
        self._receive(bytes(data))
        self._after_input()
        if self.guard.backlog:
            self._schedule_feed()

    def _receive(self, data: bytes) -> None:
        """Hand `data` to websockets, the data frames at its start read here (`_data_frames`)."""
        proto = self.protocol
        if _FAST_FRAMES and _at_frame_start(proto):
            size = proto.max_message_size
            if proto.max_fragment_size is not None:
                size = (
                    proto.max_fragment_size if size is None else min(size, proto.max_fragment_size)
                )
            frames, used = _data_frames(data, size)
            if frames:
                self._take(frames)
            if used == len(data):
                return
            if used:
                data = data[used:]
        super().data_received(data)

    def _take(self, frames: list[tuple[int, bytes]]) -> None:
        """Serve the first of `frames` here while the session can (`Session.serve_now`),
        up to YIELD_MESSAGES; queue the rest, in order, as websockets does with such
        frames (recv_frame records nothing for a final data frame outside a fragmented
        message, there is nothing to send, and process_event queues it)."""
        put = self.recv_messages.put
        session = self.guard.session
        if session is None or not session.reading or self.recv_messages.frames:
            for opcode, data in frames:
                put(Frame(_OPCODES[opcode], data))
            return
        for i, (opcode, data) in enumerate(frames):
            message: str | bytes = data
            if opcode == OP_TEXT:
                try:
                    message = data.decode()
                except UnicodeDecodeError:
                    message = ""  # `recv()` closes with 1007, as websockets does
            if not message or i == YIELD_MESSAGES or self.protocol.state is not _OPEN:
                served = False
            else:
                try:
                    served = session.serve_now(message)
                except Exception:
                    # A bug, in a callback of the transport: end this connection as
                    # websockets ends one whose handler raised, not the transport abruptly.
                    logger.exception("connection %s: serving a message failed", session.remote)
                    self.close_now(CLOSE_INTERNAL_ERROR, "internal error", fail=True)
                    return
            if not served:
                for opcode, data in frames[i:]:
                    put(Frame(_OPCODES[opcode], data))
                break
        if session.member._pending is not None:
            session.member.flush_pending()  # the acks of what was served, in one write

    def _schedule_feed(self) -> None:
        if self.guard.feeding is None and not self.recv_messages.paused:
            self.guard.feeding = self.loop.call_soon(self._feed_backlog)

    def _feed_backlog(self) -> None:
        self.guard.feeding = None
        if self.protocol.state is _CLOSED:
            self.guard.backlog.clear()
            return
        chunk = bytes(self.guard.backlog[:FEED_SLICE])
        del self.guard.backlog[:FEED_SLICE]
        self._receive(chunk)
        self._after_input()
        if self.guard.backlog:
            self._schedule_feed()
        elif not self.recv_messages.paused:
            self.transport.resume_reading()

    def _queue_resumed(self) -> None:
        if self.guard.backlog:
            self._schedule_feed()
        else:
            self.transport.resume_reading()

    def process_event(self, event: Event) -> None:
        session = self.guard.session
        if session is not None and isinstance(event, Frame) and event.opcode in _CONTROL:
            session.control_frame(len(event.data))
        super().process_event(event)

    def _after_input(self) -> None:
        session = self.guard.session
        if session is not None:
            session.check_send_queue()
        if self.guard.frame_timeout_s > 0:
            self._track_partial_frame()

    # ------------------------------------------------------------------ frame timeout

    def _partial(self) -> bool:
        """Bytes of an incomplete frame or message are held."""
        proto = self.protocol
        return proto.state is _OPEN and (
            bool(proto.reader.buffer) or proto.current_size is not None
        )

    def _track_partial_frame(self) -> None:
        if not self._partial():
            self.guard.partial_since = None
            return
        if self.guard.partial_since is None:
            self.guard.partial_since = self.loop.time()
            if self.guard.frame_timer is None:
                self.guard.frame_timer = self.loop.call_later(
                    self.guard.frame_timeout_s, self._frame_due
                )

    def _frame_due(self) -> None:
        self.guard.frame_timer = None
        since = self.guard.partial_since
        if since is None or not self._partial():
            self.guard.partial_since = None
            return
        now = self.loop.time()
        if self.guard.backlog or self.recv_messages.paused:
            # Reading is held back by us, not by the client: its frame cannot complete.
            since = self.guard.partial_since = now
        if now - since >= self.guard.frame_timeout_s:
            self.guard.partial_since = None
            if self.guard.session is not None:
                self.guard.session.input_refused("frame_timeout")
            self.close_now(CLOSE_POLICY, "frame not completed in time", fail=True)
            return
        self.guard.frame_timer = self.loop.call_later(
            since + self.guard.frame_timeout_s - now, self._frame_due
        )

    # ------------------------------------------------------------------ closing

    def close_now(self, code: int, reason: str, *, fail: bool, timeout_s: float = 5.0) -> None:
        """Start the closing handshake without waiting on the write buffer (a stalled peer
        would block websockets' close() forever); abort the TCP connection after
        `timeout_s` if the peer does not finish it. `fail`: discard whatever the peer
        sends from now on and end our side of TCP at once (websockets' fail)."""
        proto = self.protocol
        if proto.state is _OPEN:
            if fail:
                proto.fail(code, reason)
                self.guard.discarding = 0
            else:
                proto.send_close(code, reason)
            self.send_data()
            self.guard.backlog.clear()
        self.loop.call_later(timeout_s, self._abort)

    def _abort(self) -> None:
        if self.protocol.state is not _CLOSED:
            self.transport.abort()


class Session:
    """The relay side of one client connection."""

    __slots__ = (
        "_admitted",
        "_auth_credit",
        "_auth_timer",
        "_expiry_timer",
        "_idle_since",
        "_idle_timer",
        "_replied",
        "_replies",
        "auth",
        "authed",
        "codec",
        "config",
        "conn",
        "conn_id",
        "identity",
        "limiter",
        "member",
        "metrics",
        "reading",
        "rooms",
        "service",
    )

    def __init__(
        self,
        conn: ServerConnection,
        codec: Codec,
        service: RoomService,
        config: Config,
        metrics: Metrics,
        make_member: MemberFactory,
        auth: Authenticator | None = None,
    ) -> None:
        self.conn = conn
        self.codec: Codec = codec
        self.service = service
        self.config = config
        self.metrics = metrics
        self.member = make_member(conn, codec, self._on_slow)
        self.rooms: set[str] = set()
        # Who the connection acts as (auth replaces it) and its random id, which presence
        # shows and `joined` gives the connection itself.
        self.identity: Identity = ANONYMOUS
        self.conn_id = secrets.token_urlsafe(12)
        # With JWT keys (`auth`), nothing but `auth` is served until a token was accepted.
        self.auth = auth
        self.authed = auth is None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        # A token check costs 0.1-0.6 ms of CPU: `auth` messages have their own budget
        # (AUTH_BURST at once, then one per AUTH_REFILL_S), so a refresh flood costs little.
        now = time.monotonic()
        self._auth_credit = (float(AUTH_BURST), now)
        self.limiter = RateLimiter(
            rate=config.rate_limit,
            burst=config.rate_burst,
            rate_bytes=config.rate_bytes,
            rate_bytes_burst=config.rate_bytes_burst,
            close_after_s=config.rate_close_after_s,
            now=now,
        )
        # No room and no delta since this moment: idle (--idle-timeout).
        self._idle_since = now
        self._idle_timer: asyncio.TimerHandle | None = None
        # Replies in request order behind a delta in flight (at most PIPELINE_DEPTH), and
        # who waits for some of them to go out.
        self._replies: deque[_Reply] = deque()
        self._replied: asyncio.Future[None] | None = None
        # True while `run` waits for the next message with none queued: the connection's
        # callback may then serve what arrives itself (`serve_now`).
        self.reading = False
        # Messages queued for `run` that `serve_now` already admitted (rate limit).
        self._admitted = 0

    @property
    def remote(self) -> str:
        address = self.conn.remote_address
        return str(address[0]) if isinstance(address, tuple) else str(address)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection's messages until it ends, then leave every room."""
        conn = self.conn
        if isinstance(conn, RelayConnection):
            conn.guard.session = self
            conn.guard.frame_timeout_s = self.config.frame_timeout_s
            if conn.guard.identity is not None:
                self._authenticated(conn.guard.identity)
                conn.guard.identity = None
        if not self.authed:
            self._auth_timer = asyncio.get_running_loop().call_later(
                self.config.auth_timeout_s, self._auth_due
            )
        self._arm_idle(self.config.idle_timeout_s)
        served = 0
        served_bytes = 0
        since = time.perf_counter()
        ready = _ready_message if _queue_readable(conn) else _never_ready
        try:
            while True:
                message = ready(conn)
                if message is None:
                    self.reading = True
                    try:
                        message = await conn.recv()
                    except ConnectionClosedOK:
                        break  # as `async for message in conn` ends
                    finally:
                        self.reading = False
                if len(self._replies) >= PIPELINE_DEPTH:
                    await self._wait_replies(PIPELINE_DEPTH - 1)
                await self.handle(message)
                if self.member._pending is not None and not conn.recv_messages.frames:
                    # Nothing more to read now: the acks held so far go out at once, not
                    # one loop iteration later (which a busy loop makes long).
                    self.member.flush_pending()
                served += 1
                served_bytes += len(message)
                now = time.perf_counter()
                if (
                    served >= YIELD_MESSAGES
                    or served_bytes >= YIELD_BYTES
                    or now - since >= YIELD_S
                ):
                    # Pipelined messages are served without awaiting anything that
                    # suspends: let the other connections have the loop.
                    served = served_bytes = 0
                    await asyncio.sleep(0)
                    since = time.perf_counter()
        except ConnectionClosed:
            pass
        finally:
            self.forget()
            for timer in (self._idle_timer, self._auth_timer, self._expiry_timer):
                if timer is not None:
                    timer.cancel()
            self.metrics.closes.labels(_ended_with(conn)).inc()
            self._release()

    def _release(self) -> None:
        """Cut the references that make a finished session a cycle (the connection's guard
        and the member's slow callback point back at it): reference counting then frees
        it, rather than a full collection of the frozen heap (gcpolicy.py)."""
        if isinstance(self.conn, RelayConnection):
            self.conn.guard.session = None
        self.member.detach()
        self._idle_timer = self._auth_timer = self._expiry_timer = None

    def forget(self) -> None:
        """Leave every room (the connection is ending or being dropped)."""
        for name in self.rooms:
            self.service.leave(self.member, name)
        self.rooms.clear()

    def close(self, code: int, reason: str, *, fail: bool = False) -> None:
        self.member.flush_pending()  # acks of this turn go before the close frame
        timeout = self.config.close_timeout_s
        conn = self.conn
        if isinstance(conn, RelayConnection):
            conn.close_now(code, reason, fail=fail, timeout_s=timeout)
            return
        # Not ours (a test's own connection class): the same steps by hand.
        proto = conn.protocol
        if proto.state is _OPEN:
            if fail:
                proto.fail(code, reason)
            else:
                proto.send_close(code, reason)
            conn.send_data()

    def _on_slow(self, member: Member) -> None:
        self.metrics.dropped_members.inc()
        logger.info(
            "dropping %s: send queue %d bytes over %d", self.remote, member.buffered(), member.limit
        )
        self.forget()
        self.close(CLOSE_TOO_SLOW, "send queue full", fail=True)

    # ------------------------------------------------------------------ guards

    def control_frame(self, nbytes: int) -> None:
        """A ping or pong from the client: it counts as a message in the rate limit."""
        verdict = self.limiter.admit(nbytes, time.monotonic())
        if verdict is ALLOW:
            return
        self.input_refused("rate_limited")
        if verdict is CLOSE:
            self._close_rate_limited()

    def check_send_queue(self) -> None:
        """After websockets wrote by itself (pongs to the client's pings): past the send
        queue limit the member is dropped like any other slow member (1013)."""
        if self.member.buffered() > self.member.limit:
            # A write of nothing applies Member.write's limit check to what is queued.
            self.member.write(b"")

    def input_refused(self, reason: str) -> None:
        self.metrics.bad_input.labels(reason).inc()
        _input_log.log(logging.INFO, "connection %s: %s", self.remote, reason)

    def _close_rate_limited(self) -> None:
        self.forget()
        self.close(CLOSE_POLICY, "rate limit exceeded for too long", fail=True)

    def _arm_idle(self, delay: float) -> None:
        if self.config.idle_timeout_s > 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(delay, self._idle_due)

    def _idle_due(self) -> None:
        self._idle_timer = None
        timeout = self.config.idle_timeout_s
        if self.rooms:
            self._arm_idle(timeout)
            return
        left = self._idle_since + timeout - time.monotonic()
        if left > 0:
            self._arm_idle(left)
            return
        self.input_refused("idle")
        self.close(CLOSE_POLICY, "idle: join a room or send a delta")

    # ------------------------------------------------------------------ dispatch

    async def handle(self, message: str | bytes) -> None:
        """Serve one message; never raises but ConnectionClosed and CancelledError."""
        received = time.perf_counter()
        if self._admitted:
            self._admitted -= 1  # by serve_now, which left the rest to us
        elif not self._admit(message):
            return
        try:
            if len(message) > PARSE_IN_THREAD_BYTES:
                request = await asyncio.to_thread(protocol.parse, message, self.codec)
            else:
                request = protocol.parse(message, self.codec)
        except BadRequest as exc:
            self.input_refused(exc.code)
            self._reply_error(exc)
            return
        try:
            self._check_reply_fields(request)
            await self._dispatch(request, received)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._failed(request, exc)

    def serve_now(self, message: str | bytes) -> bool:
        """Serve `message` at once, from the connection's callback, when that needs no
        wait: a small delta to a loaded room (most messages). It skips the frame queue,
        the task's wake-up and the coroutines of `handle`: memory ingest CPU per ack
        0.88-0.95x on a quiet machine, 0.67-0.74x on a busy one (docs/benchmarks.md).
        False: queue the message for `run` (and everything after it), which serves it as
        usual (admitted already, if it got that far). `run` must be waiting with nothing
        queued (`reading`), so that messages are served in order."""
        if len(self._replies) >= PIPELINE_DEPTH or len(message) > PARSE_IN_THREAD_BYTES:
            return False
        received = time.perf_counter()
        if not self._admit(message):
            return True
        try:
            request = protocol.parse(message, self.codec)
        except BadRequest as exc:
            self.input_refused(exc.code)
            self._reply_error(exc)
            return True
        if not self.authed or not isinstance(request, protocol.Delta):
            self._admitted += 1
            return False
        try:
            self._check_reply_fields(request)
            self._idle_since = time.monotonic()
            started = self.service.start_publish_now(
                request.room,
                request.kind,
                request.body,
                request.key,
                self.identity,
                self._answered,
            )
            if started is None:
                self._admitted += 1
                return False
            self._started(request, started, received)
        except Exception as exc:
            self._failed(request, exc)
        return True

    def _failed(self, request: protocol.Request, exc: Exception) -> None:
        """Answer `request`, whose serving raised `exc`, in its turn."""
        if not isinstance(exc, BadRequest):
            with contextlib.suppress(Exception):
                self._reply_error(self._internal(request, exc))
            return
        if exc.code not in _NOT_INPUT:
            self.input_refused(exc.code)
        exc.id = request.id
        exc.room = request.room
        self._reply_error(exc)

    def _admit(self, message: str | bytes) -> bool:
        """The rate limit's verdict on `message`, answered when refused."""
        # Before anything decodes the message (websockets only checked its UTF-8 if text).
        verdict = self.limiter.admit(len(message), time.monotonic())
        if verdict is ALLOW:
            return True
        self.input_refused("rate_limited")
        if verdict is CLOSE:
            self._close_rate_limited()
            return False
        rid = protocol.peek_id(message, self.codec) if len(message) <= PEEK_MAX_BYTES else None
        self._reply_error(BadRequest("rate_limited", "too many messages, slow down", rid))
        return False

    async def _dispatch(self, request: protocol.Request, received: float) -> None:
        if isinstance(request, protocol.Auth):
            if self._replies:
                await self._wait_replies(0)  # the deltas before it act as the old identity
            await self._auth(request)
            return
        if not self.authed:
            raise BadRequest("unauthorized", "authenticate first: send auth with a token")
        if isinstance(request, protocol.Delta):
            self._idle_since = time.monotonic()
            # Checked and handed to the backend now, in order; answered by `_answered`
            # when the backend's answer (and every reply before it) is in.
            started = await self.service.start_publish(
                request.room,
                request.kind,
                request.body,
                request.key,
                self.identity,
                self._answered,
            )
            self._started(request, started, received)
            return
        if self._replies:
            # Joins, leaves, presence and auth see the deltas sent before them answered.
            await self._wait_replies(0)
        if isinstance(request, protocol.Join):
            await self._join(request)
        elif isinstance(request, protocol.PresenceRequest):
            await self._presence(request)
        else:
            self._leave(request)

    # ------------------------------------------------------------------ replies in order

    def _started(
        self, request: protocol.Delta, started: int | asyncio.Future[int], received: float
    ) -> None:
        """A delta handed to the backend: its ack now, or in its turn."""
        if isinstance(started, int):
            if not self._replies:
                self._ack(request, started, received)
                return
            self._replies.append(_Reply(None, request, received, seq=started))
        else:
            self._replies.append(_Reply(started, request, received))
        self._answered()

    def _answered(self, _: object = None) -> None:
        """Send the replies whose turn came: the oldest ones, as far as their publishes
        are answered (a publish's done callback, and after each delta is handed over)."""
        replies = self._replies
        while replies:
            reply = replies[0]
            pending = reply.pending
            if pending is not None and not pending.done():
                break
            replies.popleft()
            if reply.error is not None:
                self._error(reply.error)
            elif pending is not None:
                self._answer(pending, reply)
            elif reply.seq is not None:
                assert isinstance(reply.request, protocol.Delta)
                self._ack(reply.request, reply.seq, reply.received)
        waiter = self._replied
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _answer(self, pending: asyncio.Future[int], reply: _Reply) -> None:
        request = reply.request
        assert isinstance(request, protocol.Delta)
        if pending.cancelled():
            return  # the loop is going away
        exc = pending.exception()
        if exc is None:
            self._ack(request, pending.result(), reply.received)
        elif isinstance(exc, BadRequest):
            if exc.code not in _NOT_INPUT:
                self.input_refused(exc.code)
            exc.id = request.id
            exc.room = request.room
            self._error(exc)
        else:
            self._error(self._internal(request, exc))  # its turn: at the head of the queue

    def _ack(self, request: protocol.Delta, seq: int, received: float) -> None:
        # Acks of one turn go out in one write (fanout.Member.send_soon).
        self.member.send_soon(protocol.encode_ack(self.codec, request.room, seq, request.id))
        self.metrics.ack_latency.observe(time.perf_counter() - received)

    async def _wait_replies(self, most: int) -> None:
        """Until at most `most` replies are held back."""
        while len(self._replies) > most:
            waiter = self._replied
            if waiter is None or waiter.done():
                waiter = self._replied = asyncio.get_running_loop().create_future()
            await waiter

    def _reply_error(self, exc: BadRequest) -> None:
        """Send `exc` now, or after the replies held back (in request order)."""
        if self._replies:
            self._replies.append(_Reply(None, None, 0.0, exc))
        else:
            self._error(exc)

    def _internal(self, request: protocol.Request, exc: BaseException) -> BadRequest:
        """The `internal` error answering `request`, which failed with `exc` (a bug): it must
        not end the connection, nor touch others."""
        logger.error("connection %s: request %r failed", self.remote, request, exc_info=exc)
        self.metrics.backend_errors.inc()
        return BadRequest(
            "internal", f"internal error: {type(exc).__name__}", request.id, request.room
        )

    async def _join(self, req: protocol.Join) -> None:
        rejoin = req.room in self.rooms
        limit = self.config.max_rooms
        if not rejoin and limit and len(self.rooms) >= limit:
            # Each membership holds a place in the room's fan-out and keeps the room loaded:
            # without a cap one connection could hold every room of the relay.
            raise BadRequest("forbidden", f"a connection may be a member of at most {limit} rooms")
        if await self.service.join(
            self.member,
            req.room,
            req.since,
            req.id,
            self.identity,
            conn=self.conn_id,
            presence=req.presence,
        ):
            self.rooms.add(req.room)
        else:
            self.rooms.discard(req.room)

    async def _presence(self, req: protocol.PresenceRequest) -> None:
        view = await self.service.presence_view(req.room, self.identity)
        args = (self.codec, req.room, view.members, view.count, view.users, req.id, view.truncated)
        if len(view.members) > PRESENCE_INLINE_MEMBERS:
            payload = await asyncio.to_thread(protocol.encode_presence, *args)
        else:
            payload = protocol.encode_presence(*args)
        # A big reply costs the relay what a big message would: it counts in the
        # connection's byte rate (--rate-bytes), so repeated requests are refused soon.
        self.limiter.charge(len(payload), time.monotonic())
        self.member.send(payload)

    def _leave(self, req: protocol.Leave) -> None:
        if req.room in self.rooms:
            self.rooms.discard(req.room)
            self.service.leave(self.member, req.room)
            if not self.rooms:
                self._idle_since = time.monotonic()
        # Held (`send_soon`) with what else this member is sent in the turn (the acks of
        # its pipelined publishes): one write.
        self.member.send_soon(protocol.encode_left(self.codec, req.room, req.id))

    # ------------------------------------------------------------------ identity

    async def _auth(self, req: protocol.Auth) -> None:
        """Authenticate, or refresh (docs/protocol.md, "Identity")."""
        if self.auth is None:
            raise BadRequest("bad_message", "this relay has no JWT key: connections are anonymous")
        if self.conn.protocol.state is not _OPEN:
            return  # closing (a failed token before it): nothing more is checked
        credit, since = self._auth_credit
        now = time.monotonic()
        credit = min(float(AUTH_BURST), credit + (now - since) / AUTH_REFILL_S)
        if credit < 1:
            self._auth_credit = (credit, now)
            raise BadRequest("rate_limited", f"at most one auth per {AUTH_REFILL_S:g} s")
        self._auth_credit = (credit - 1, now)
        try:
            identity = await self.auth.authenticate(req.token)
        except AuthError as exc:
            self._auth_failed(exc.reason, exc.message, req.id)
            return
        if self.authed and identity.sub != self.identity.sub:
            self._auth_failed("sub_changed", "a refresh must keep the sub", req.id)
            return
        if self.conn.protocol.state is not _OPEN:
            return  # closed while the token was checked (a JWKS fetch)
        self._authenticated(identity)
        self.member.send(
            protocol.encode_authed(self.codec, identity.sub or "", identity.exp or 0, req.id)
        )

    def _authenticated(self, identity: Identity) -> None:
        """Take `identity` on: leave the rooms it no longer reads, re-arm the expiry."""
        self.identity = identity
        self.authed = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        for name in sorted(self.rooms):
            if not identity.can("r", name):
                self.rooms.discard(name)
                self.service.leave(self.member, name)
                self.member.send(protocol.encode_left(self.codec, name, None, "forbidden"))
        hub = self.service.presence_hub
        if hub is not None:
            # A refreshed token may carry new `info`: the entries already written show it.
            hub.reidentify(self.member, self.conn_id, identity)
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if identity.exp is not None:
            assert self.auth is not None
            delay = identity.exp + self.auth.verifier.leeway_s - time.time()
            self._expiry_timer = asyncio.get_running_loop().call_later(
                max(0.0, delay), self._expired
            )

    def _auth_failed(self, reason: str, message: str, rid: protocol.RequestId | None) -> None:
        self.metrics.auth_failures.labels(reason).inc()
        _input_log.log(
            logging.INFO, "connection %s: authentication failed (%s)", self.remote, reason
        )
        self._error(BadRequest("unauthorized", message, rid))
        # Requests queued behind the token are not served with the identity held so far.
        self.authed = False
        for timer in (self._auth_timer, self._expiry_timer):
            if timer is not None:
                timer.cancel()
        self._auth_timer = self._expiry_timer = None
        self.forget()
        self.close(CLOSE_POLICY, "authentication failed")

    def _auth_due(self) -> None:
        self._auth_timer = None
        if self.authed:
            return
        self.metrics.auth_failures.labels("missing").inc()
        _input_log.log(logging.INFO, "connection %s: no token in time", self.remote)
        self.close(CLOSE_POLICY, "authentication timed out")

    def _expired(self) -> None:
        self._expiry_timer = None
        self.metrics.auth_failures.labels("expired").inc()
        self._error(BadRequest("unauthorized", "token expired"))
        self.authed = False
        self.forget()
        self.close(CLOSE_TOKEN_EXPIRED, "token expired")

    def _check_reply_fields(self, request: protocol.Request) -> None:
        """The reply echoes the request's id: one that cannot be encoded is refused before
        anything is done (a stored delta must never be answered `internal`)."""
        if request.id is None or self.codec == protocol.JSON:
            return  # JSON replies escape any string and write any integer
        try:
            protocol.encode_left(self.codec, request.room or "", request.id)
        except _ENCODE_ERRORS:
            request_id = request.id
            raise BadRequest(
                "bad_message", f"id {_short(request_id)} cannot be encoded in a reply"
            ) from None

    def _error(self, exc: BadRequest) -> None:
        self.metrics.errors_out.labels(exc.code).inc()
        try:
            payload = protocol.encode_error(self.codec, exc.code, exc.message, exc.id, exc.room)
        except _ENCODE_ERRORS:
            # An id or room of the client's that has no encoding (already counted as bad
            # input by whoever refused the message): answered without them.
            payload = protocol.encode_error(self.codec, exc.code, exc.message)
        self.member.send(payload)


def _nothing() -> None:
    pass


def _py_data_frames(data: bytes, max_size: int | None) -> tuple[list[tuple[int, bytes]], int]:
    """The complete final masked text and binary frames (no RSV bits, payload within
    `max_size`) at the start of `data`, as (opcode, payload unmasked as websockets' parser
    does), and how many bytes they take. Pairs, not websockets' Frame: most are served
    at once, and a Frame (a dataclass of six fields) is made only for those queued. It
    stops at the first byte that starts anything else, which websockets then parses (and
    refuses with the close code it always gave: 1002 unmasked, 1009 too big; invalid UTF-8
    is found by `recv()`, 1007, as before). The relay runs the native twin of this loop
    (`_native.read_frames`, rust/frames.rs) when it has one; this is the reference."""
    frames: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while end - pos >= 6:  # a masked frame's shortest header
        head1 = data[pos]
        if head1 == 0x81:
            opcode = OP_TEXT
        elif head1 == 0x82:
            opcode = OP_BINARY
        else:
            break
        head2 = data[pos + 1]
        if head2 < 0x80:
            break  # not masked
        length = head2 & 0x7F
        start = pos + 2
        if length == 126:
            length = int.from_bytes(data[start : start + 2], "big")
            start += 2
        elif length == 127:
            if end - start < 8:
                break
            length = int.from_bytes(data[start : start + 8], "big")
            start += 8
        if max_size is not None and length > max_size:
            break
        stop = start + 4 + length
        if stop > end:
            break
        payload = apply_mask(data[start + 4 : stop], data[start : start + 4])
        frames.append((opcode, payload))
        pos = stop
    return frames, pos


class _ReadFrames(Protocol):
    """`_py_data_frames`, or `_native.read_frames`: the same reading."""

    def __call__(
        self, data: bytes, max_size: int | None, /
    ) -> tuple[list[tuple[int, bytes]], int]: ...


def _frame_reader() -> _ReadFrames:
    """The native reading of data frames, else (the pure-Python engine) `_py_data_frames`."""
    if delta.IMPLEMENTATION != "native":
        return _py_data_frames
    from kasagi_relay import _native

    native: _ReadFrames | None = getattr(_native, "read_frames", None)
    return native if native is not None else _py_data_frames


# Replaced in tests (tests/test_frames_fast.py counts the frames the relay read).
_data_frames: _ReadFrames = _frame_reader()


def _at_frame_start(proto: WsProtocol) -> bool:
    """websockets' parser waits for the first byte of a frame outside any fragmented
    message, holding no input (between frames its generators rest in StreamReader.at_eof;
    a header read in part leaves them in read_exact, perhaps with an empty buffer)."""
    if proto.state is not _OPEN or proto.current_size is not None or proto.debug:
        return False
    if proto.reader.buffer or proto.extensions:  # an extension may rewrite any data frame
        return False
    gen: Any = proto.parser
    while (inner := gen.gi_yieldfrom) is not None:
        gen = inner
    return gen.gi_code is _AT_EOF


def _fast_frames_supported() -> bool:
    """Whether this websockets has what `_at_frame_start` reads (else websockets parses
    every frame)."""
    proto = WsProtocol.__init__.__code__.co_names
    return (
        getattr(StreamReader.at_eof, "__code__", None) is not None
        and all(
            name in proto
            for name in (
                "max_message_size",
                "max_fragment_size",
                "current_size",
                "parser",
                "extensions",
            )
        )
        and hasattr(Frame, "__dataclass_fields__")
    )


_AT_EOF: Final = StreamReader.at_eof.__code__
_FAST_FRAMES: Final = _fast_frames_supported()


def _ready_message(conn: ServerConnection) -> str | bytes | None:
    """The next message if websockets already holds all of it in one frame, taken as
    `conn.recv()` would take it but without its four coroutines (~3 % of the publish path,
    docs/benchmarks.md); None: call `conn.recv()`, which also handles what this does not
    (fragments, invalid UTF-8, the end of the connection)."""
    assembler = conn.recv_messages
    queue = assembler.frames.queue
    if not queue or assembler.get_in_progress:
        return None
    frame = queue[0]
    if not frame.fin:
        return None
    message: str | bytes
    if frame.opcode is _TEXT:
        try:
            message = bytes(frame.data).decode()
        except UnicodeDecodeError:
            return None  # recv() closes with 1007, as websockets does
    else:
        message = bytes(frame.data)
    queue.popleft()
    assembler.maybe_resume()
    return message


def _queue_readable(conn: ServerConnection) -> bool:
    """Whether `_ready_message` may read this connection's queue: the relay's own connection
    class, on a websockets whose assembler has the parts it uses (else `recv()` only)."""
    assembler = getattr(conn, "recv_messages", None)
    return (
        isinstance(conn, RelayConnection)
        and isinstance(getattr(getattr(assembler, "frames", None), "queue", None), deque)
        and isinstance(getattr(assembler, "get_in_progress", None), bool)
        and callable(getattr(assembler, "maybe_resume", None))
    )


def _never_ready(conn: ServerConnection) -> str | bytes | None:
    return None


def _ended_with(conn: ServerConnection) -> str:
    """The label of kasagi_closes_total for a connection that ended."""
    proto = conn.protocol
    if proto.close_rcvd_then_sent:
        return "peer"
    if proto.close_sent is not None:
        return str(proto.close_sent.code)
    if proto.close_rcvd is not None:
        return "peer"
    return "abnormal"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
