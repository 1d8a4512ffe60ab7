"""The asyncio relay: WebSocket endpoint, HTTP health/metrics, rooms, graceful shutdown.

`Relay` owns the backend, the rooms and the connections. Each connection's messages are
handled one at a time, in order (so one client's deltas get seqs in the order it sent
them); connections run concurrently. Nothing a client sends can raise out of its handler:
every failure becomes an `error` reply, and other connections never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import http
import json
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from kasagi_relay import delta, protocol, tls
from kasagi_relay.backends.base import IDEMPOTENCY_TTL_S, Backend, BackendUnavailable, Op
from kasagi_relay.backends.factory import build_backend
from kasagi_relay.compaction import Compactor
from kasagi_relay.config import Config, ConfigError
from kasagi_relay.fanout import CLOSE_TOO_SLOW, Member
from kasagi_relay.metrics import CONTENT_TYPE, Metrics
from kasagi_relay.protocol import JSON, SUBPROTOCOLS, BadRequest, Codec
from kasagi_relay.room import Room

__all__ = ["Client", "Relay"]

logger = logging.getLogger("kasagi_relay.server")

CLOSE_GOING_AWAY = 1001
# Keys this relay acknowledged, so that a retried delta whose patch no longer applies (it
# already did) still gets its first ack rather than bad_patch.
_KEY_CACHE_SIZE = 100_000


class Client(Member):
    """One WebSocket connection: its writer, its rooms and its rate limit."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate", "rooms")

    def __init__(self, conn: ServerConnection, codec: Codec, config: Config, relay: Relay) -> None:
        super().__init__(conn, codec, config.send_queue_bytes, relay._on_slow)
        self.rooms: set[str] = set()
        self.rate = config.rate_limit
        self.burst = float(config.rate_burst)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        """Token bucket: `rate` messages per second sustained, `burst` at once."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def close(self, code: int, reason: str, timeout: float) -> None:
        """Start the closing handshake without waiting on the write buffer (a stalled peer
        would block websockets' close() forever); abort the TCP connection after
        `timeout` if the peer does not finish it."""
        proto = self.protocol
        if proto.state is State.OPEN:
            if code == CLOSE_TOO_SLOW:
                # Fail: the server also ends its side of TCP at once after the close frame.
                proto.fail(code, reason)
            else:
                proto.send_close(code, reason)
            self.conn.send_data()
        loop = asyncio.get_running_loop()
        loop.call_later(timeout, self._abort)

    def _abort(self) -> None:
        if self.protocol.state is not State.CLOSED:
            self.transport.abort()


class Relay:
    """A running relay. `await relay.start()`, then `await relay.stop()` (or `async with`)."""

    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        self.config = config
        self._tls = tls.server_context(config)
        self.backend = backend if backend is not None else build_backend(config)
        self.metrics = Metrics()
        self.rooms: dict[str, Room] = {}
        self.clients: set[Client] = set()
        self.server: Server | None = None
        self.shutting_down = False
        self._inflight = 0
        self._inflight_done = asyncio.Event()
        self._keys: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self.compactor = Compactor(
            self.backend,
            self._room_seqs,
            self.metrics,
            interval_s=config.compaction_interval_s,
            history=config.history,
            history_age_s=config.history_age_s,
        )
        self.metrics.track_send_queue(self._send_queue_total)

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        assert self.server is not None, "relay not started"
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self._tls is not None else "ws"
        return f"{scheme}://{host}:{self.port}/ws"

    def reload_tls(self) -> bool:
        """Re-read --tls-cert/--tls-key for new connections; False (logged) if they do not
        load, keeping the certificate in use."""
        if self._tls is None:
            return False
        try:
            tls.reload(self._tls, self.config)
        except (ConfigError, ssl.SSLError, OSError) as exc:
            logger.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        logger.info("TLS certificate reloaded from %s", self.config.tls_cert)
        return True

    async def start(self) -> None:
        self.backend.set_listener(self)
        await self.backend.start()
        cfg = self.config
        self.server = await serve(
            self._handler,
            cfg.host,
            cfg.port,
            subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS],
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            compression=None,  # fan-out writes pre-built frames: no per-connection extension
            max_size=cfg.max_message_bytes,
            ping_interval=cfg.ping_interval_s,
            close_timeout=cfg.close_timeout_s,
            ssl=self._tls,
        )
        self.compactor.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="kasagi-room-sweeper")

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, finish in-flight acks, close members with 1001, release all."""
        if self._stopped is not None:
            await self._stopped.wait()
            return
        self._stopped = asyncio.Event()
        self.shutting_down = True
        cfg = self.config
        try:
            if self.server is not None:
                self.server.close(close_connections=False)  # stop listening
            if self._inflight:
                self._inflight_done.clear()
                try:
                    async with asyncio.timeout(cfg.shutdown_timeout_s):
                        await self._inflight_done.wait()
                except TimeoutError:
                    logger.warning("shutdown: %d acks still in flight", self._inflight)
            for client in list(self.clients):
                client.close(CLOSE_GOING_AWAY, "relay shutting down", cfg.close_timeout_s)
            if self.server is not None:
                try:
                    async with asyncio.timeout(cfg.close_timeout_s + 1):
                        await self.server.wait_closed()
                except TimeoutError:
                    for client in list(self.clients):
                        client.transport.abort()
                    await self.server.wait_closed()
            if self._sweeper is not None:
                self._sweeper.cancel()
            await self.compactor.stop()
            for room in list(self.rooms.values()):
                await room.close()
            self.rooms.clear()
            await self.backend.close()
        finally:
            self._stopped.set()

    # ------------------------------------------------------------------ backend listener

    def on_op(self, room: str, op: Op) -> None:
        r = self.rooms.get(room)
        if r is not None:
            r.on_op(op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        targets = (
            self.rooms.values()
            if rooms is None
            else [self.rooms[name] for name in rooms if name in self.rooms]
        )
        for r in list(targets):
            r.start_backfill()

    # ------------------------------------------------------------------ rooms

    async def _room(self, name: str) -> Room:
        """The room, loaded on this relay first if it is not (within --max-loaded-rooms)."""
        room = self.rooms.get(name)
        if room is not None:
            return room
        limit = self.config.max_loaded_rooms
        if limit and len(self.rooms) >= limit:
            # Without a limit, deltas to ever new rooms (which need no membership) would
            # load rooms faster than the sweeper frees them. Unload a batch, so that a flood
            # of new rooms does not scan every room each time.
            await self._unload_idle(max(1, limit // 100))
            room = self.rooms.get(name)  # loaded by another request meanwhile
            if room is not None:
                return room
            if len(self.rooms) >= limit:
                raise BadRequest(
                    "unavailable",
                    f"this relay holds its limit of {limit} rooms, all in use; "
                    "retry later or through another relay",
                )
        # No await from the check above to here: the limit holds.
        room = self.rooms[name] = Room(
            name, self.backend, self.metrics, tick_s=self.config.tick_ms / 1000
        )
        self.metrics.rooms.set(len(self.rooms))
        return room

    async def _unload_idle(self, count: int) -> None:
        """Unload up to `count` rooms without members or work, least recently used first."""
        now = time.monotonic()
        idle = [(room.last_active, name) for name, room in self.rooms.items() if room.idle(now, 0)]
        for _, name in heapq.nsmallest(count, idle):
            # Checked again: unloading the previous one awaited, and a join may have begun.
            room = self.rooms.get(name)
            if room is not None and room.idle(time.monotonic(), 0):
                await self._unload(name)

    async def _unload(self, name: str) -> None:
        room = self.rooms.pop(name, None)
        if room is not None:
            self.metrics.rooms.set(len(self.rooms))
            await room.close()

    def _room_seqs(self) -> list[tuple[str, int]]:
        return [(name, r.last_seq) for name, r in self.rooms.items() if r.loaded]

    async def _sweep(self) -> None:
        """Forget rooms nobody used for room_idle_s: unsubscribe, free the state."""
        idle_s = self.config.room_idle_s
        while True:
            await asyncio.sleep(max(1.0, idle_s / 4))
            now = time.monotonic()
            for name, room in list(self.rooms.items()):
                if room.idle(now, idle_s):
                    await self._unload(name)

    def _send_queue_total(self) -> float:
        return float(sum(c.buffered() for c in self.clients))

    # ------------------------------------------------------------------ HTTP

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            if self.shutting_down:
                return _response(503, b"relay shutting down\n", "text/plain; charset=utf-8")
            return None
        if path == "/healthz":
            try:
                async with asyncio.timeout(2.0):
                    health = await self.backend.health()
            except Exception as exc:
                self.metrics.backend_errors.inc()
                health = {"ok": False, "error": str(exc) or type(exc).__name__}
            health = {**health, "backend": health.get("backend", self.backend.name)}
            if self.shutting_down:
                health["ok"] = False
                health["shutting_down"] = True
            status = 200 if health.get("ok") else 503
            body = json.dumps(health, default=str).encode() + b"\n"
            return _response(status, body, "application/json")
        if path == "/metrics":
            return _response(200, self.metrics.render(), CONTENT_TYPE)
        return _response(404, b"not found: try /ws, /healthz or /metrics\n", "text/plain")

    # ------------------------------------------------------------------ WebSocket

    def _on_slow(self, member: Member) -> None:
        assert isinstance(member, Client)
        self.metrics.dropped_members.inc()
        logger.info(
            "dropping %s: send queue %d bytes over %d",
            member.conn.remote_address,
            member.buffered(),
            member.limit,
        )
        self._forget(member)
        member.close(CLOSE_TOO_SLOW, "send queue full", self.config.close_timeout_s)

    def _forget(self, client: Client) -> None:
        for name in client.rooms:
            room = self.rooms.get(name)
            if room is not None:
                room.leave(client)
                self.metrics.members.dec()
        client.rooms.clear()

    async def _handler(self, conn: ServerConnection) -> None:
        codec: Codec = protocol.MSGPACK if conn.subprotocol == protocol.MSGPACK else JSON
        # The handshake's header lists are about 4 KiB per connection that nothing reads once
        # the connection is open (measured with tracemalloc at 5,000 members); websockets keeps
        # the request/response objects themselves, so only their headers are dropped.
        if conn.request is not None:
            conn.request.headers = Headers()
        if conn.response is not None:
            conn.response.headers = Headers()
        client = Client(conn, codec, self.config, self)
        self.clients.add(client)
        self.metrics.connections.inc()
        try:
            async for message in conn:
                try:
                    await self._message(client, message)
                except Exception:
                    # A bug on one request must not end the connection, nor touch others.
                    logger.exception("connection %s: request failed", conn.remote_address)
                    with contextlib.suppress(Exception):
                        self._error(client, BadRequest("internal", "internal error"))
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection %s failed", conn.remote_address)
        finally:
            self._forget(client)
            self.clients.discard(client)
            self.metrics.connections.dec()

    def _error(self, client: Client, exc: BadRequest) -> None:
        self.metrics.errors_out.labels(exc.code).inc()
        client.send(protocol.encode_error(client.codec, exc.code, exc.message, exc.id, exc.room))

    async def _message(self, client: Client, message: str | bytes) -> None:
        received = time.perf_counter()
        if not client.allow():
            rid = protocol.peek_id(message, client.codec)
            self._error(client, BadRequest("rate_limited", "too many messages, slow down", rid))
            return
        try:
            request = protocol.parse(message, client.codec)
        except BadRequest as exc:
            self._error(client, exc)
            return
        try:
            if self.shutting_down:
                raise BadRequest("unavailable", "relay shutting down")
            if isinstance(request, protocol.Delta):
                await self._delta(client, request, received)
            elif isinstance(request, protocol.Join):
                await self._join(client, request)
            else:
                self._leave(client, request)
        except BadRequest as exc:
            exc.id = request.id
            exc.room = request.room
            self._error(client, exc)
        except BackendUnavailable as exc:
            self.metrics.backend_errors.inc()
            self._error(
                client,
                BadRequest(
                    "unavailable", str(exc) or "backend unavailable", request.id, request.room
                ),
            )
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("request %r failed", request)
            self.metrics.backend_errors.inc()
            self._error(
                client,
                BadRequest(
                    "internal", f"internal error: {type(exc).__name__}", request.id, request.room
                ),
            )

    async def _join(self, client: Client, req: protocol.Join) -> None:
        rejoin = req.room in client.rooms
        limit = self.config.max_rooms
        if not rejoin and limit and len(client.rooms) >= limit:
            # Each membership holds a place in the room's fan-out and keeps the room loaded:
            # without a cap one connection could hold every room of the relay.
            raise BadRequest("forbidden", f"a connection may be a member of at most {limit} rooms")
        room = await self._room(req.room)
        if rejoin:
            # A second join restarts the member's stream from the new `joined`.
            room.leave(client)
            client.rooms.discard(req.room)
            self.metrics.members.dec()
        await room.join(client, req.since, req.id)
        if client.is_open():
            client.rooms.add(req.room)
            self.metrics.members.inc()
        else:
            room.leave(client)

    def _leave(self, client: Client, req: protocol.Leave) -> None:
        room = self.rooms.get(req.room)
        if req.room in client.rooms:
            client.rooms.discard(req.room)
            self.metrics.members.dec()
            if room is not None:
                room.leave(client)
        client.send(protocol.encode_left(client.codec, req.room, req.id))

    async def _delta(self, client: Client, req: protocol.Delta, received: float) -> None:
        room = await self._room(req.room)
        room.last_active = time.monotonic()  # before any await: not idle, not evicted
        await room.ensure_loaded()
        try:
            await room.check(req.doc)
        except delta.DeltaError as exc:
            # A retry of a delta that was stored although its ack was lost (a dropped
            # connection, a failover, another relay) no longer applies: answer what the
            # first attempt got, as publish would, rather than bad_patch.
            seq = self._known_key(req.room, req.key)
            if seq is None and req.key is not None:
                seq = await self.backend.seen_key(req.room, req.key)
            if seq is None:
                raise BadRequest("bad_patch", str(exc)) from None
            self._ack(client, req, seq, received)
            return
        limit = self.config.max_state_bytes
        if room.state_too_large(len(req.body), limit):
            raise BadRequest("too_large", f"the room's state would pass {limit} bytes")
        self._inflight += 1
        try:
            seq = await self.backend.publish(req.room, req.kind, req.body, req.key)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._inflight_done.set()
        room.note_acked(seq)
        self.metrics.deltas_in.inc()
        if req.key is not None:
            self._remember_key(req.room, req.key, seq)
        self._ack(client, req, seq, received)

    def _ack(self, client: Client, req: protocol.Delta, seq: int, received: float) -> None:
        client.send(protocol.encode_ack(client.codec, req.room, seq, req.id))
        self.metrics.ack_latency.observe(time.perf_counter() - received)

    def _remember_key(self, room: str, key: str, seq: int) -> None:
        keys = self._keys
        keys[(room, key)] = (seq, time.monotonic() + IDEMPOTENCY_TTL_S)
        keys.move_to_end((room, key))
        while len(keys) > _KEY_CACHE_SIZE:
            keys.popitem(last=False)

    def _known_key(self, room: str, key: str | None) -> int | None:
        if key is None:
            return None
        hit = self._keys.get((room, key))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]


def _select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """The client's first supported choice; none offered means JSON (no header echoed)."""
    if not offered:
        return None
    for candidate in offered:
        if candidate in SUBPROTOCOLS:
            return candidate
    raise NegotiationError("unsupported subprotocol; supported: " + ", ".join(SUBPROTOCOLS))


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)
