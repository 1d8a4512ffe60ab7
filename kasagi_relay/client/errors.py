"""The client's exceptions: what the relay refused, and why the client cannot go on."""

from __future__ import annotations

__all__ = ["ClientClosed", "ConnectionFailed", "KasagiError", "RelayError"]


class KasagiError(Exception):
    """Base of everything the client raises on purpose."""


class RelayError(KasagiError):
    """The relay answered a request with `error` (docs/protocol.md lists the codes:
    bad_message, bad_room, bad_patch, too_large, rate_limited, unauthorized, forbidden,
    unavailable, internal, key_conflict, ...)."""

    def __init__(self, code: str, message: str = "", room: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.room = room


class ConnectionFailed(KasagiError):
    """The client cannot (or must not) reconnect: the first connection failed, the relay
    refused the handshake, closed with a code that forbids a retry (1008), or the reconnect
    attempts ran out. `close_code` is the WebSocket close code when there was one."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class ClientClosed(KasagiError):
    """The client was closed (or its room left) while the call was waiting."""
