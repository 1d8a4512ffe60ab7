"""Per-connection rate limits, Sans-I/O: token buckets fed with a clock the caller passes.

A connection is limited in messages (`--rate-limit`/`--rate-burst`, control frames
included) and in bytes (`--rate-bytes`/`--rate-bytes-burst`), checked when a message is
taken off the connection and before anything decodes it. A message is admitted while the
byte bucket is not in debt, and then charged in full: one large message may take the
bucket below zero, and the messages after it are refused until the debt is paid back at
the sustained rate. Refused messages are charged too (reading them cost the relay the
same), so a client that keeps sending stays refused, and once refused without a pause of a second
for `--rate-close-after` it is to be closed (1008). docs/operations.md lists the limits.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["ALLOW", "CLOSE", "QUIET_S", "REFUSE", "RateLimiter", "TokenBucket", "Verdict"]

# A pause this long without a refused message ends a run of refusals.
QUIET_S: Final = 1.0


class TokenBucket:
    """`rate` tokens per second sustained, at most `burst` at once; rate <= 0: unlimited."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def charge(self, amount: float, now: float) -> None:
        """Spend `amount` whatever is left (the bucket may go into debt)."""
        if self.rate <= 0:  # unlimited
            return
        self._refill(now)
        self.tokens -= amount

    def take(self, amount: float, now: float) -> bool:
        """Spend `amount` if the bucket holds it; False (nothing spent) otherwise."""
        if self.rate <= 0:  # unlimited
            return True
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def in_debt(self, now: float) -> bool:
        if self.rate <= 0:  # unlimited
            return False
        self._refill(now)
        return self.tokens < 0


class Verdict(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse"  # answer rate_limited, without decoding the message
    CLOSE = "close"  # refused for --rate-close-after without pause: close with 1008


# As module constants: Python 3.11's EnumType defines `__getattr__`, which puts every
# `Verdict.ALLOW` on the slow attribute path (0.13 us against 0.03 us for a global).
ALLOW: Final = Verdict.ALLOW
REFUSE: Final = Verdict.REFUSE
CLOSE: Final = Verdict.CLOSE


class RateLimiter:
    """The limits of one connection."""

    __slots__ = ("_bytes", "_last_refused", "_messages", "close_after_s", "refused_since")

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
        self._last_refused = 0.0

    def charge(self, nbytes: int, now: float) -> None:
        """Count `nbytes` of work done for the connection (a big reply it asked for) in
        its byte rate: past the burst, its next messages are refused until it pays."""
        self._bytes.charge(nbytes, now)

    def admit(self, nbytes: int, now: float) -> Verdict:
        """One message or control frame of `nbytes`: may it be served?"""
        allowed = not self._bytes.in_debt(now) and self._messages.take(1.0, now)
        self._bytes.charge(nbytes, now)
        if allowed:
            return ALLOW
        # A flood gets a message through now and then as the buckets refill: the run of
        # refusals ends only after a pause without any.
        if self.refused_since is None or now - self._last_refused > QUIET_S:
            self.refused_since = now
        self._last_refused = now
        if self.close_after_s > 0 and now - self.refused_since >= self.close_after_s:
            return CLOSE
        return REFUSE
