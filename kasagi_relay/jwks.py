"""The relay's token checks on the event loop: `Authenticator` wraps auth.Verifier and,
with `--jwks`, keeps its key set.

The JWKS (a file, or an https URL; http only on a loopback host) is read off the event loop
(a worker thread, bounded in time and in bytes), cached, and read again when a token names
an unknown `kid`, at most once per REFETCH_INTERVAL_S for the whole relay, one fetch at a
time. A fetch that fails, hangs past its timeout or returns garbage keeps the last good
set (docs/operations.md, "Identity").
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import urllib.parse
import urllib.request
from typing import Final

from kasagi_relay.auth import AuthError, Verifier, parse_jwks
from kasagi_relay.config import ConfigError
from kasagi_relay.domain import Identity

__all__ = ["MAX_JWKS_BYTES", "REFETCH_INTERVAL_S", "Authenticator"]

logger = logging.getLogger("kasagi_relay.jwks")

REFETCH_INTERVAL_S: Final = 10.0
FETCH_TIMEOUT_S: Final = 5.0
MAX_JWKS_BYTES: Final = 1024 * 1024


def _check_source(source: str) -> None:
    parsed = urllib.parse.urlsplit(source)
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http":
        host = parsed.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
        raise ConfigError("--jwks: a URL must be https (http only on a loopback host)")
    if parsed.scheme not in ("", "file") and len(parsed.scheme) > 1:
        raise ConfigError(f"--jwks: unsupported URL scheme {parsed.scheme!r}")


def _fetch(source: str, timeout_s: float) -> bytes:
    """The JWKS document's bytes (a worker thread runs this)."""
    if "://" not in source:
        with open(source, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    else:
        request = urllib.request.Request(source, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            data = reply.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return data


class Authenticator:
    """`await authenticate(token)`: the identity, or AuthError."""

    def __init__(
        self,
        verifier: Verifier,
        jwks: str | None = None,
        *,
        timeout_s: float = FETCH_TIMEOUT_S,
        refetch_interval_s: float = REFETCH_INTERVAL_S,
    ) -> None:
        self.verifier = verifier
        self.jwks = jwks
        self.timeout_s = timeout_s
        self.refetch_interval_s = refetch_interval_s
        self.fetches = 0  # attempts, for tests and logs
        self._last_fetch = -float("inf")
        self._fetching: asyncio.Future[bytes] | None = None
        if jwks is not None:
            _check_source(jwks)

    async def start(self) -> None:
        """The first fetch. A file that does not load is a ConfigError (the relay does not
        start); a URL that does not answer is logged, and fetched again on demand."""
        if self.jwks is None:
            return
        if "://" not in self.jwks:
            try:
                keys = parse_jwks(await asyncio.to_thread(_fetch, self.jwks, self.timeout_s))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--jwks {self.jwks}: {exc}") from None
            self.verifier.set_jwks(keys)
            self._last_fetch = time.monotonic()
            return
        await self.refresh()

    async def authenticate(self, token: str) -> Identity:
        try:
            return self.verifier.verify(token)
        except AuthError as exc:
            if exc.reason != "unknown_kid" or self.jwks is None:
                raise
        if await self.refresh():
            return self.verifier.verify(token)
        raise AuthError("unknown_kid", "no key with this kid")

    async def refresh(self) -> bool:
        """Fetch the set again unless one was fetched within the interval (or is under
        way: then wait for it); True when a new set was installed."""
        if self._fetching is not None:
            try:
                await asyncio.shield(self._fetching)
            except Exception:
                return False
            return True
        now = time.monotonic()
        if now - self._last_fetch < self.refetch_interval_s:
            return False
        self._last_fetch = now
        self.fetches += 1
        assert self.jwks is not None
        loop = asyncio.get_running_loop()
        # The thread is bounded by urlopen's timeout; the wait by ours, also for a file.
        fetching = loop.run_in_executor(None, _fetch, self.jwks, self.timeout_s)
        self._fetching = fetching
        try:
            async with asyncio.timeout(self.timeout_s + 1):
                data = await asyncio.shield(fetching)
            keys = parse_jwks(data)
        except (OSError, ValueError, TimeoutError) as exc:
            logger.warning("JWKS fetch from %s failed, keeping the last keys: %s", self.jwks, exc)
            return False
        finally:
            self._fetching = None
            if not fetching.done():
                fetching.add_done_callback(_consume)
        self.verifier.set_jwks(keys)
        logger.info("JWKS from %s: %d keys", self.jwks, len(keys))
        return True


def _consume(future: asyncio.Future[bytes]) -> None:
    """A hung fetch that ends after we stopped waiting: its outcome is not an error."""
    if not future.cancelled():
        future.exception()
