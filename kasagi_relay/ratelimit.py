"""Per-connection rate limits, Sans-I/O: token buckets fed with a clock the caller passes.

A connection is limited in messages (`--rate-limit`/`--rate-burst`, control frames
included) and in bytes (`--rate-bytes`/`--rate-bytes-burst`, counted as they arrive off
the socket, before anything is decoded). Bytes are charged when they arrive, so a large
message can take the byte bucket below zero: the messages after it are refused until the
debt is paid back at the sustained rate. A connection refused without pause for
`--rate-close-after` is to be closed (1008). docs/operations.md lists the limits.
"""

from __future__ import annotations

import enum

__all__ = ["RateLimiter", "TokenBucket", "Verdict"]


class TokenBucket:
    """`rate` tokens per second sustained, at most `burst` at once; rate <= 0: unlimited."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp = now

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def charge(self, amount: float, now: float) -> None:
        """Spend `amount` whatever is left (the bucket may go into debt)."""
        if self.unlimited:
            return
        self._refill(now)
        self.tokens -= amount

    def take(self, amount: float, now: float) -> bool:
        """Spend `amount` if the bucket holds it; False (nothing spent) otherwise."""
        if self.unlimited:
            return True
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def in_debt(self, now: float) -> bool:
        if self.unlimited:
            return False
        self._refill(now)
        return self.tokens < 0


class Verdict(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse"  # answer rate_limited, without decoding the message
    CLOSE = "close"  # refused for --rate-close-after without pause: close with 1008


class RateLimiter:
    """The limits of one connection."""

    __slots__ = ("_bytes", "_messages", "close_after_s", "refused_since")

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        rate_bytes: int,
        rate_bytes_burst: int,
        close_after_s: float,
        now: float,
    ) -> None:
        self._messages = TokenBucket(rate, burst, now)
        self._bytes = TokenBucket(float(rate_bytes), rate_bytes_burst, now)
        self.close_after_s = close_after_s
        # When the current run of refusals began; None while the connection is within limits.
        self.refused_since: float | None = None

    def received(self, nbytes: int, now: float) -> None:
        """Bytes read off the socket (frames of any kind, before they are parsed)."""
        self._bytes.charge(nbytes, now)

    def admit(self, now: float) -> Verdict:
        """One message or control frame: may it be served?"""
        if not self._bytes.in_debt(now) and self._messages.take(1.0, now):
            self.refused_since = None
            return Verdict.ALLOW
        if self.refused_since is None:
            self.refused_since = now
        elif self.close_after_s > 0 and now - self.refused_since >= self.close_after_s:
            return Verdict.CLOSE
        return Verdict.REFUSE
