"""The server HTTP API (docs/protocol.md, "HTTP API"): backends publish deltas and read a
room's state over plain HTTP/1.1, on the relay's port, with `Authorization: Bearer <key>`.

    POST /api/rooms/{R}/deltas   {"patch": [...]} | {"merge": {...}}, optional "key"
                                 -> 200 {"seq": N}, at the durability of an `ack`
    GET  /api/rooms/{R}          -> 200 {"seq": N, "state": {...}}
    GET  /api/rooms/{R}/presence -> {"room","members","count","users"} (docs/protocol.md, presence)

Transport: websockets' server parses only GET requests without a body. A connection whose
first request line names a path under /api/ is therefore taken over before websockets
reads it (session.RelayConnection asks `ApiServer.claims`, then hands the transport to
`ApiServer.take_over`) and served here: h11 (a Sans-I/O HTTP/1.1 parser) over asyncio
streams, with keep-alive, Content-Length and chunked bodies, `Expect: 100-continue`, and
pipelined requests served one at a time. Nothing else on the port changes.

This module is transport only: the routes call the room service (service.py), which
authorizes, checks and publishes exactly as for a WebSocket `delta`; a body is parsed by
protocol.parse_delta_body, the `delta` message's own validation.

Bounded cost (docs/operations.md, "Limits"):
- a request must arrive whole (line, headers, body) within --api-timeout of the connection
  opening or of the previous response; an idle keep-alive connection is closed then too,
  and a response the client does not read within it aborts the connection;
- headers at most 16 KiB (h11's bound), a body at most --max-message-bytes: a larger
  Content-Length is refused (413) before one byte of the body is read, and a chunked body
  is refused as soon as it passes the limit; either way the connection is closed;
- at most --api-max-requests requests served at once, body reading included (so the
  bodies held are at most that many times the limit); past it 503 `unavailable`;
- a connection takes a place in --max-connections(-per-address) (admission.py) from its
  first request to its end, as a WebSocket connection does.

The key is compared in constant time (SHA-256 digests, hmac.compare_digest against every
configured key) and never logged: neither is any request header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http
import json
import logging
from collections.abc import Sequence
from typing import Final

import h11

from kasagi_relay import protocol
from kasagi_relay.admission import Admission
from kasagi_relay.config import Config
from kasagi_relay.domain import Identity, valid_room
from kasagi_relay.metrics import Metrics, ThrottledLog
from kasagi_relay.protocol import BadRequest
from kasagi_relay.service import RoomService
from kasagi_relay.session import PRESENCE_INLINE_MEMBERS

__all__ = ["API_IDENTITY", "ApiServer", "claims"]

logger = logging.getLogger("kasagi_relay.api")
_refusal_log = ThrottledLog(logger)

# Who an API call acts as: every right on every room (the key is the credential), and no
# user. Idempotency keys are scoped by `sub`, so the API's keys share the scope of `sub`
# null: the API's own, which it shares only with anonymous WebSocket clients of a relay
# without JWT keys (docs/protocol.md, "HTTP API").
API_IDENTITY: Final = Identity(sub=None, rooms=None)

PREFIX: Final = b"/api/"
# The longest request line looked at to decide who serves a connection; websockets refuses
# longer lines itself (its MAX_LINE_LENGTH).
MAX_REQUEST_LINE: Final = 8192
MAX_HEADER_BYTES: Final = 16 * 1024
READ_CHUNK: Final = 64 * 1024
WRITE_SLICE: Final = 256 * 1024
# A body larger than this is parsed in a worker thread (as the WebSocket session does).
PARSE_IN_THREAD_BYTES: Final = 16 * 1024

# After an error response that left the body unread, what the client still sends is read
# and dropped (up to this much, for up to LINGER_S) before closing, so that the client reads
# the response rather than a reset.
LINGER_BYTES: Final = 256 * 1024
LINGER_S: Final = 1.0

# The HTTP status of each error code (docs/protocol.md, "HTTP API").
STATUS: Final[dict[str, int]] = {
    "bad_message": 400,
    "bad_room": 400,
    "bad_patch": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "key_conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
}


def claims(head: bytes | bytearray) -> bool | None:
    """Whether a connection whose first bytes are `head` is the API's (its first request's
    path is under /api/); None while the request line is incomplete."""
    end = head.find(b"\n")
    if end < 0:
        return None if len(head) <= MAX_REQUEST_LINE else False
    _method, _, rest = head[:end].partition(b" ")
    path = bytes(rest.partition(b" ")[0].partition(b"?")[0])
    return path == PREFIX[:-1] or path.startswith(PREFIX)


class _Reply(Exception):
    """An error response, raised from anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)
        self.close = close  # the connection's last response

    @classmethod
    def of(cls, exc: BadRequest) -> _Reply:
        return cls(STATUS.get(exc.code, 500), exc.code, exc.message)


class _Timeout(Exception):
    """The request did not arrive whole, or the response was not read, in time."""


class ApiServer:
    """The HTTP API of one relay: `claims` and `take_over` for session.RelayConnection,
    `close` at shutdown."""

    def __init__(
        self,
        config: Config,
        service: RoomService,
        metrics: Metrics,
        admission: Admission | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics
        # API connections take places in --max-connections(-per-address) as WebSocket
        # connections do, counted from their first request (X-Forwarded-For needs headers).
        self.admission = admission
        self.enabled = bool(config.api_keys)
        self._digests = [_digest(key.encode()) for key in config.api_keys]
        self.timeout_s = config.api_timeout_s
        self.max_body = config.max_message_bytes
        self.max_requests = config.api_max_requests
        self.busy = 0  # requests being served (body reading included)
        self.closing = False
        self._connections: set[_Connection] = set()

    claims = staticmethod(claims)

    def take_over(self, transport: asyncio.Transport, head: bytes) -> None:
        """Serve the connection of `transport` from now on; `head` is what it sent so far."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        streams = asyncio.StreamReaderProtocol(reader)
        transport.set_protocol(streams)
        streams.connection_made(transport)
        writer = asyncio.StreamWriter(transport, streams, reader, loop)
        reader.feed_data(head)
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        conn.task = loop.create_task(conn.run())
        conn.task.add_done_callback(lambda _: self._connections.discard(conn))

    async def close(self, timeout_s: float) -> None:
        """Close every connection: idle ones at once, the others after their response
        (within `timeout_s`, then they are cut)."""
        self.closing = True
        tasks = []
        for conn in list(self._connections):
            if conn.task is None:
                continue
            if conn.idle:
                conn.task.cancel()
            tasks.append(conn.task)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def authorized(self, request: h11.Request) -> bool:
        given: bytes | None = None
        for name, value in request.headers:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
        if not given:
            return False
        digest = _digest(given)
        ok = False
        for known in self._digests:  # every key, whichever matches: no early exit
            ok |= hmac.compare_digest(digest, known)
        return ok


def _digest(key: bytes) -> bytes:
    # Equal-length values, so that compare_digest's time tells nothing of a key's length.
    return hashlib.sha256(key).digest()


class _Connection:
    """One HTTP/1.1 connection of the API."""

    def __init__(
        self, api: ApiServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.api = api
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.task: asyncio.Task[None] | None = None
        self.idle = True  # waiting for the first byte of the next request
        self.deadline = 0.0
        self.address: str | None = None  # the place taken in the admission, if any
        self.head_only = False  # a HEAD request: its response has headers only
        peer = writer.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) else str(peer)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.api.closing:
                self.deadline = loop.time() + self.api.timeout_s
                try:
                    event = await self._next_event()
                except h11.RemoteProtocolError as exc:
                    # A malformed request: answered if h11 still lets us, then closed.
                    await self._error(
                        _Reply(exc.error_status_hint, "bad_message", "malformed HTTP request"),
                        "other",
                    )
                    break
                if not isinstance(event, h11.Request):
                    break  # the client closed (or switched protocols: not here)
                self.idle = False
                self.head_only = event.method == b"HEAD"
                await self._serve(event)
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    break  # a body left unread, or Connection: close
                self.h11.start_next_cycle()
                self.idle = True
        except _Timeout:
            pass  # closed without a word: the client was not reading or not sending
        except (OSError, h11.LocalProtocolError):
            pass
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.address is not None and self.api.admission is not None:
            self.api.admission.release(self.address)
            self.address = None
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > 0:
            transport.abort()  # a response the client does not read
            return
        if self.h11.their_state is h11.SEND_BODY and self.h11.our_state is h11.MUST_CLOSE:
            await self._linger()
        transport.close()

    async def _linger(self) -> None:
        """Drop what the client still sends of a body left unread, within bounds."""
        if self.writer.can_write_eof():
            self.writer.write_eof()
        dropped = 0
        try:
            async with asyncio.timeout(LINGER_S):
                while dropped < LINGER_BYTES:
                    data = await self.reader.read(READ_CHUNK)
                    if not data:
                        break
                    dropped += len(data)
        except (TimeoutError, OSError):
            pass

    # ------------------------------------------------------------------ reading

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type) or event is h11.PAUSED
                return event
            try:
                async with asyncio.timeout_at(self.deadline):
                    data = await self.reader.read(READ_CHUNK)
            except TimeoutError:
                raise _Timeout from None
            if data:
                self.idle = False
            self.h11.receive_data(data)  # b"": the end of the stream

    async def _body(self, request: h11.Request) -> bytes:
        """The request's body, within the size limit (413 `too_large` past it, before
        reading more than the limit)."""
        limit = self.api.max_body
        length = _content_length(request)
        if length is not None and length > limit:
            raise _Reply(413, "too_large", f"the body is over {limit} bytes")
        if self.h11.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            self.writer.write(self.h11.send(go_on) or b"")
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                raise _Reply(
                    exc.error_status_hint, "bad_message", "malformed request body"
                ) from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:  # a chunked body (a Content-Length one was checked)
                    raise _Reply(413, "too_large", f"the body is over {limit} bytes")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise _Reply(400, "bad_message", "the request body ended early")

    # ------------------------------------------------------------------ routing

    async def _serve(self, request: h11.Request) -> None:
        path = bytes(request.target).partition(b"?")[0]
        room, route = _route(path)
        api = self.api
        try:
            if not api.enabled:
                raise _Reply(404, "not_found", "no such route (the HTTP API is not enabled)")
            if self.address is None and api.admission is not None:
                self._admit(request, api.admission)
            if not api.authorized(request):
                _refusal_log.log(logging.INFO, "API request from %s: unauthorized", self.remote)
                raise _Reply(
                    401,
                    "unauthorized",
                    "an API key is needed: Authorization: Bearer <key>",
                    [(b"WWW-Authenticate", b"Bearer")],
                )
            if route == "other" or room is None:
                raise _Reply(404, "not_found", "no such route")
            if api.busy >= api.max_requests:
                raise _Reply(
                    503,
                    "unavailable",
                    f"the relay serves {api.max_requests} API requests at once; retry",
                    [(b"Retry-After", b"1")],
                )
            api.busy += 1
            try:
                if route == "deltas":
                    await self._deltas(request, room)
                elif route == "state":
                    await self._state(request, room)
                else:
                    await self._presence(request, room)
            finally:
                api.busy -= 1
        except _Reply as reply:
            await self._error(reply, route)
        except BadRequest as exc:
            await self._error(_Reply.of(exc), route)
        except (_Timeout, OSError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # A bug on one request must not touch the other connections.
            logger.exception("API request %s %s failed", request.method.decode(), route)
            failure = _Reply(500, "internal", f"internal error: {type(exc).__name__}")
            await self._error(failure, route)

    def _admit(self, request: h11.Request, admission: Admission) -> None:
        forwarded = [v.decode("latin-1") for n, v in request.headers if n == b"x-forwarded-for"]
        address = admission.address_of(self.remote, forwarded)
        reason = admission.admit(address)
        if reason is not None:
            self.api.metrics.connections_refused.labels(reason).inc()
            _refusal_log.log(
                logging.WARNING, "refusing an API connection from %s: %s", address, reason
            )
            raise _Reply(
                503,
                "unavailable",
                f"too many connections ({reason})",
                [(b"Retry-After", b"1")],
                close=True,
            )
        self.address = address

    def _method(self, request: h11.Request, allowed: bytes) -> None:
        if request.method != allowed:
            raise _Reply(
                405, "method_not_allowed", f"use {allowed.decode()}", [(b"Allow", allowed)]
            )

    async def _deltas(self, request: h11.Request, room: str) -> None:
        self._method(request, b"POST")
        if not valid_room(room):
            raise BadRequest("bad_room", f"invalid room name {room[:40]!r}")
        body = await self._body(request)
        if len(body) > PARSE_IN_THREAD_BYTES:
            delta = await asyncio.to_thread(protocol.parse_delta_body, body, room)
        else:
            delta = protocol.parse_delta_body(body, room)
        seq = await self.api.service.publish(room, delta.kind, delta.body, delta.key, API_IDENTITY)
        await self._respond(200, [b'{"seq":%d}\n' % seq], "deltas")

    async def _state(self, request: h11.Request, room: str) -> None:
        self._method(request, b"GET")
        if not valid_room(room):
            raise BadRequest("bad_room", f"invalid room name {room[:40]!r}")
        seq, payload = await self.api.service.read(room, API_IDENTITY)
        await self._respond(200, [b'{"seq":%d,"state":' % seq, *payload.parts, b"}\n"], "state")

    async def _presence(self, request: h11.Request, room: str) -> None:
        # The `presence` message's reply without `t` and `id` (docs/protocol.md, presence).
        self._method(request, b"GET")
        if not valid_room(room):
            raise BadRequest("bad_room", f"invalid room name {room[:40]!r}")
        reply = await self.api.service.presence(room, API_IDENTITY)
        members = reply.get("members")
        if isinstance(members, list) and len(members) > PRESENCE_INLINE_MEMBERS:
            body = await asyncio.to_thread(_compact_json, reply)
        else:
            body = _compact_json(reply)
        await self._respond(200, [body, b"\n"], "presence")

    # ------------------------------------------------------------------ writing

    async def _error(self, reply: _Reply, route: str) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response already began: nothing more can be said
        fields = {"code": reply.code, "message": reply.message}
        body = json.dumps(fields, separators=(",", ":")).encode() + b"\n"
        await self._respond(reply.status, [body], route, reply.headers, close=reply.close)

    def _request_read(self) -> bool:
        """Whether the request was read to its end (an empty body's end is read here, from
        what h11 holds): else the response is the connection's last."""
        if self.h11.their_state is h11.SEND_BODY:
            try:
                self.h11.next_event()  # no I/O: EndOfMessage when there is no body
            except h11.RemoteProtocolError:
                return False
        return self.h11.their_state is h11.DONE

    async def _respond(
        self,
        status: int,
        parts: list[bytes],
        route: str,
        extra: Sequence[tuple[bytes, bytes]] = (),
        *,
        close: bool = False,
    ) -> None:
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % sum(len(p) for p in parts)),
            (b"Cache-Control", b"no-store"),
            *extra,
        ]
        if close or self.api.closing or not self._request_read():
            # Refused, shutting down, or the body left unread: the connection's last.
            headers.append((b"Connection", b"close"))
        self.api.metrics.api_requests.labels(route, str(status)).inc()
        writer = self.writer
        h = self.h11
        phrase = http.HTTPStatus(status).phrase.encode()
        response = h11.Response(status_code=status, headers=headers, reason=phrase)
        out = [h.send(response) or b""]
        try:
            async with asyncio.timeout(self.api.timeout_s):
                for part in () if self.head_only else parts:
                    # Data passes through h11 as is: a big state is written a slice at a time
                    # as the client reads, never copied whole into the write buffer.
                    for data in h.send_with_data_passthrough(h11.Data(data=part)) or ():
                        if len(data) <= WRITE_SLICE:
                            out.append(data)
                            continue
                        writer.writelines(out)
                        out = []
                        view = memoryview(data)
                        for at in range(0, len(view), WRITE_SLICE):
                            writer.write(view[at : at + WRITE_SLICE])
                            await writer.drain()
                out.append(h.send(h11.EndOfMessage()) or b"")
                writer.writelines(out)
                await writer.drain()
        except TimeoutError:
            raise _Timeout from None


def _route(path: bytes) -> tuple[str | None, str]:
    """(room, route) of a path: /api/rooms/{R}[/deltas|/presence]. The room is as sent
    (the room service's checks judge it); None when the path has none."""
    if not path.startswith(b"/api/rooms/"):
        return None, "other"
    rest = path[len(b"/api/rooms/") :].split(b"/")
    room = rest[0].decode("latin-1")
    if len(rest) == 1:
        return room, "state"
    if len(rest) == 2 and rest[1] in (b"deltas", b"presence"):
        return room, rest[1].decode()
    return None, "other"


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 checked it is a number
    return None


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
