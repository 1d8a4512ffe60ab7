"""The relay's HTTP routes, served on the WebSocket port before any upgrade.

/ws is the WebSocket endpoint: here it only decides whether the handshake may go on
(503 while shutting down or past --max-connections / --max-connections-per-address; 403
for an Origin not in --allowed-origins; 401 for an invalid `Authorization: Bearer` token,
whose identity a valid one hands to the session).
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
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from kasagi_relay.admission import Admission
from kasagi_relay.auth import AuthError
from kasagi_relay.backends.base import Backend
from kasagi_relay.domain import Identity
from kasagi_relay.inspector import Inspector
from kasagi_relay.jwks import Authenticator
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
        auth: Authenticator | None = None,
        allowed_origins: tuple[str, ...] = ("*",),
        inspector: Inspector | None = None,
    ) -> None:
        self.auth = auth
        self.allowed_origins = frozenset(allowed_origins)
        self.backend = backend
        self.metrics = metrics
        self.admission = admission
        self.shutting_down = shutting_down
        self.inspector = inspector
        # Fields added to /healthz (kasagi_relay/workers.py: the whole relay's workers).
        self.health_extra: Callable[[dict[str, object]], dict[str, object]] | None = None

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            refusal, identity = await self._check_access(request)
            if refusal is not None:
                return refusal
            admitted = self._admit(connection, request)
            if (
                admitted is None
                and identity is not None
                and isinstance(connection, RelayConnection)
            ):
                connection.guard.identity = identity
            return admitted
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

    async def _check_access(self, request: Request) -> tuple[Response | None, Identity | None]:
        """The Origin rule, then the bearer token if the handshake carries one (the query
        string is never read: URLs end up in logs)."""
        try:
            origin = request.headers.get("Origin")
            authorization = request.headers.get("Authorization")
        except MultipleValuesError:
            return response(400, b"repeated Origin or Authorization header\n", _TEXT), None
        if (
            origin is not None
            and "*" not in self.allowed_origins
            and origin not in self.allowed_origins
        ):
            self.metrics.connections_refused.labels("origin").inc()
            _refusal_log.log(logging.INFO, "refusing a handshake from origin %.100r", origin)
            return response(403, b"origin not allowed\n", _TEXT), None
        if authorization is None or self.auth is None:
            return None, None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.metrics.auth_failures.labels("malformed").inc()
            return _unauthorized("Authorization must be: Bearer <token>"), None
        try:
            identity = await self.auth.authenticate(token.strip())
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            _refusal_log.log(logging.INFO, "refusing a handshake: token %s", exc.reason)
            return _unauthorized(exc.message), None
        return None, identity

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
        if self.health_extra is not None:
            health = self.health_extra(health)
        if self.shutting_down():
            health["ok"] = False
            health["shutting_down"] = True
        status = 200 if health.get("ok") else 503
        body = json.dumps(health, default=str).encode() + b"\n"
        return response(status, body, "application/json")


_TEXT = "text/plain; charset=utf-8"


def _unauthorized(message: str) -> Response:
    body = json.dumps({"code": "unauthorized", "message": message}).encode() + b"\n"
    reply = response(401, body, "application/json")
    reply.headers["WWW-Authenticate"] = 'Bearer realm="kasagi"'
    return reply


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
