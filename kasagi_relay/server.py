"""The relay's composition root: `Relay` builds the parts and runs their lifecycle.

The parts, one role each (docs/design.md):
- http.py: the HTTP routes (/healthz, /metrics) and the handshake's admission
  (admission.py: --max-connections, --max-connections-per-address);
- api.py: the HTTP API (/api/...), on connections session.RelayConnection hands over;
- session.py: one WebSocket connection: input guards, rate limit, dispatch; it holds a
  fanout.Member, the writer rooms broadcast to (built in `Relay._member`, one place);
- service.py: the transport-free room service (authorize, check, publish, join, leave,
  idempotency keys);
- registry.py: the rooms loaded on this relay (load, least-recently-used unload, sweep);
  it is the backend's listener, and room.py orders and merges each room's deltas;
- compaction.py: snapshots and history trimming;
- presence.py: this relay's members' presence entries and the presence events.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import NegotiationError
from websockets.typing import Subprotocol

from kasagi_relay import protocol, tls
from kasagi_relay.admission import Admission
from kasagi_relay.api import ApiServer
from kasagi_relay.auth import Verifier
from kasagi_relay.backends.base import Backend
from kasagi_relay.backends.factory import build_backend
from kasagi_relay.compaction import Compactor
from kasagi_relay.config import Config, ConfigError
from kasagi_relay.fanout import Member, SendBudget
from kasagi_relay.http import HttpRoutes
from kasagi_relay.inspector import Inspector
from kasagi_relay.jwks import Authenticator
from kasagi_relay.metrics import Metrics
from kasagi_relay.presence import PresenceHub
from kasagi_relay.protocol import JSON, SUBPROTOCOLS, Codec
from kasagi_relay.registry import RoomRegistry
from kasagi_relay.room import Room
from kasagi_relay.service import RoomService
from kasagi_relay.session import CLOSE_GOING_AWAY, RelayConnection, Session

__all__ = ["Relay"]

logger = logging.getLogger("kasagi_relay.server")


class Relay:
    """A running relay. `await relay.start()`, then `await relay.stop()` (or `async with`)."""

    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        config.check_access()
        self.config = config
        # Identity (auth.py, jwks.py): None on an anonymous relay.
        verifier = Verifier.from_config(config)
        self.auth = Authenticator(verifier, config.jwks) if verifier is not None else None
        self._tls = tls.server_context(config)
        self.backend = backend if backend is not None else build_backend(config)
        self.metrics = Metrics()
        self.registry = RoomRegistry(
            self.backend,
            self.metrics,
            max_loaded=config.max_loaded_rooms,
            idle_s=config.room_idle_s,
            tick_s=config.tick_ms / 1000,
            max_state_bytes=config.max_state_bytes,
            max_state_memory=config.max_state_memory,
        )
        self.presence = PresenceHub(
            self.backend.presence,
            self.metrics,
            refresh_s=config.presence_refresh_s,
            ttl_s=config.presence_ttl_s,
            max_members=config.max_presence_members,
            event_delay_s=config.presence_event_delay_s,
        )
        self.service = RoomService(
            self.registry,
            self.backend,
            self.metrics,
            self.presence if config.presence else None,
        )
        self.admission = Admission(
            config.max_connections, config.max_connections_per_address, config.trusted_proxies
        )
        self.routes = HttpRoutes(
            self.backend,
            self.metrics,
            self.admission,
            lambda: self.service.closing,
            auth=self.auth,
            allowed_origins=config.allowed_origins,
            inspector=Inspector() if config.inspector else None,
        )
        self.api = ApiServer(config, self.service, self.metrics, self.admission)
        self.sessions: set[Session] = set()
        self.server: Server | None = None
        self._stopped: asyncio.Event | None = None
        self.compactor = Compactor(
            self.backend,
            self.registry.room_seqs,
            self.metrics,
            interval_s=config.compaction_interval_s,
            history=config.history,
            history_age_s=config.history_age_s,
            history_bytes=config.history_bytes,
            max_state_bytes=config.max_state_bytes,
            max_state_memory=config.max_state_memory,
            live=self.registry.rooms.get,
        )
        # Every member's queue together: one bound for the relay (docs/operations.md).
        self.budget = SendBudget(config.send_budget_bytes)
        self.metrics.track_send_queue(self._send_queue_total)
        # Extra keyword arguments for websockets' serve() (a worker of --workers N passes
        # reuse_port and a process_response that names it: kasagi_relay/workers.py).
        self.serve_options: dict[str, Any] = {}

    @property
    def rooms(self) -> dict[str, Room]:
        """The rooms loaded on this relay, by name."""
        return self.registry.rooms

    @property
    def shutting_down(self) -> bool:
        return self.service.closing

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
        if self.auth is not None:
            await self.auth.start()
        self.backend.feed.set_listener(self.registry)
        await self.backend.start()
        cfg = self.config
        self.server = await serve(
            self._handler,
            cfg.host,
            cfg.port,
            create_connection=_connection_class(self.api),
            subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS],
            select_subprotocol=_select_subprotocol,
            process_request=self.routes.process_request,
            compression=None,  # fan-out writes pre-built frames: no per-connection extension
            max_size=cfg.max_message_bytes,
            ping_interval=cfg.ping_interval_s,
            close_timeout=cfg.close_timeout_s,
            ssl=self._tls,
            **self.serve_options,
        )
        self.compactor.start()
        self.registry.start()
        if self.config.presence:
            self.presence.start()

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
        cfg = self.config
        try:
            if self.server is not None:
                self.server.close(close_connections=False)  # stop listening
            left = await self.service.drain(cfg.shutdown_timeout_s)
            if left:
                logger.warning("shutdown: %d acks still in flight", left)
            await self.api.close(cfg.close_timeout_s)
            for session in list(self.sessions):
                session.close(CLOSE_GOING_AWAY, "relay shutting down")
            if self.server is not None:
                try:
                    async with asyncio.timeout(cfg.close_timeout_s + 1):
                        await self.server.wait_closed()
                except TimeoutError:
                    for session in list(self.sessions):
                        session.conn.transport.abort()
                    await self.server.wait_closed()
            # Every member is gone by now: their presence_leave goes out before the backend
            # closes (what does not make it in time expires with --presence-ttl).
            await self.presence.close()
            await self.compactor.stop()
            await self.registry.close()
            await self.backend.close()
        finally:
            self._stopped.set()

    # ------------------------------------------------------------------ connections

    def _member(
        self, conn: ServerConnection, codec: Codec, on_slow: Callable[[Member], None]
    ) -> Member:
        """The writer of one connection: the one place a Member is built."""
        return Member(conn, codec, self.config.send_queue_bytes, on_slow, budget=self.budget)

    def _send_queue_total(self) -> float:
        return float(sum(s.member.queued() for s in self.sessions))

    async def _handler(self, conn: ServerConnection) -> None:
        codec: Codec = protocol.MSGPACK if conn.subprotocol == protocol.MSGPACK else JSON
        # The handshake's header lists are about 4 KiB per connection that nothing reads once
        # the connection is open (measured with tracemalloc at 5,000 members); websockets keeps
        # the request/response objects themselves, so only their headers are dropped.
        if conn.request is not None:
            conn.request.headers = Headers()
        if conn.response is not None:
            conn.response.headers = Headers()
        session = Session(
            conn, codec, self.service, self.config, self.metrics, self._member, self.auth
        )
        self.sessions.add(session)
        self.metrics.connections.inc()
        try:
            await session.run()
        except Exception:
            logger.exception("connection %s failed", session.remote)
        finally:
            self.sessions.discard(session)
            self.metrics.connections.dec()


def _connection_class(api: ApiServer) -> type[RelayConnection]:
    """RelayConnection handing /api/ connections to this relay's `api`."""

    class Connection(RelayConnection):
        takeover = api

    return Connection


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
