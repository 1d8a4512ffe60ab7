"""The relay's HTTP routes, served on the WebSocket port before any upgrade.

/ws is the WebSocket endpoint: here it only decides whether the handshake may go on
(503 while shutting down or past --max-connections / --max-connections-per-address).
/healthz is the backend's health as JSON (503 when not ok), /metrics Prometheus text;
/, /inspector, /inspector.js and /kasagi-client.js the inspector page and the browser
client (inspector.py; 404 with --no-inspector); anything else is 404.
docs/operations.md documents the endpoints.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from kasagi_relay.admission import Admission
from kasagi_relay.backends.base import Backend
from kasagi_relay.inspector import Inspector
from kasagi_relay.metrics import CONTENT_TYPE, Metrics, ThrottledLog
from kasagi_relay.session import RelayConnection

__all__ = ["HttpRoutes", "response"]

logger = logging.getLogger("kasagi_relay.http")
_refusal_log = ThrottledLog(logger)


class HttpRoutes:
    """`process_request` for websockets' serve()."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        admission: Admission,
        shutting_down: Callable[[], bool],
        inspector: Inspector | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.admission = admission
        self.shutting_down = shutting_down
        self.inspector = inspector

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            return self._admit(connection, request)
        if path == "/healthz":
            return await self._health()
        if path == "/metrics":
            return response(200, self.metrics.render(), CONTENT_TYPE)
        if self.inspector is not None and (page := self.inspector.answer(path, request)):
            return page
        return response(404, b"not found: try /ws, /healthz or /metrics\n", "text/plain")

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """None lets the handshake go on, having taken the connection's place."""
        if self.shutting_down():
            return self._refuse("shutting_down", "relay shutting down")
        peer = connection.remote_address
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        address = self.admission.address_of(host, request.headers.get_all("X-Forwarded-For"))
        reason = self.admission.admit(address)
        if reason is not None:
            _refusal_log.log(logging.WARNING, "refusing a connection from %s: %s", address, reason)
            return self._refuse(reason, f"too many connections ({reason})")
        admission = self.admission
        if isinstance(connection, RelayConnection):
            connection.guard.on_lost = lambda: admission.release(address)
        else:  # pragma: no cover - serve() is always given RelayConnection
            admission.release(address)
        return None

    def _refuse(self, reason: str, text: str) -> Response:
        self.metrics.connections_refused.labels(reason).inc()
        return response(503, text.encode() + b"\n", "text/plain; charset=utf-8")

    async def _health(self) -> Response:
        try:
            async with asyncio.timeout(2.0):
                health = await self.backend.health()
        except Exception as exc:
            self.metrics.backend_errors.inc()
            health = {"ok": False, "error": str(exc) or type(exc).__name__}
        health = {**health, "backend": health.get("backend", self.backend.name)}
        if self.shutting_down():
            health["ok"] = False
            health["shutting_down"] = True
        status = 200 if health.get("ok") else 503
        body = json.dumps(health, default=str).encode() + b"\n"
        return response(status, body, "application/json")


def response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)
