"""Prometheus metrics, one registry per relay so several relays can share a test process;
and `ThrottledLog`, so that what clients cause can be logged without letting them flood
the log."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Final, Protocol, overload

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "ThrottledLog"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Increments(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Level(Protocol):
    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class Observations(Protocol):
    def observe(self, amount: float) -> None: ...


class _Tally:
    """A Counter's increments from the publish path (or a Gauge's changes), kept as a
    Python number and added to the metric when the registry is read: Counter.inc takes a
    lock, ~0.8 us, and the path made several per delta (docs/benchmarks.md, "Publish
    path")."""

    __slots__ = ("counter", "n")

    def __init__(self, counter: Counter | Gauge) -> None:
        self.counter = counter
        self.n: float = 0

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def dec(self, amount: float = 1) -> None:
        self.n -= amount

    def fold(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self.counter.inc(n)


class _HistogramTally:
    """A Histogram's observations kept as per-bucket counts and a sum, added to it when the
    registry is read (Histogram.observe: ~1.7 us, two locks)."""

    __slots__ = ("bounds", "counts", "histogram", "total")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.bounds = tuple(histogram._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount, as Histogram.observe picks it.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def fold(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        hist = self.histogram
        hist._sum.inc(self.total)
        for bucket, n in zip(hist._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        self.counts = [0] * len(counts)
        self.total = 0.0


class _Fold(Collector):
    """Registered first, so that reading the registry adds what the tallies hold before any
    metric is collected (/metrics shows the same values as with direct increments)."""

    def __init__(self) -> None:
        self.tallies: list[_Tally | _HistogramTally] = []

    def collect(self) -> Iterator[Metric]:
        for tally in self.tallies:
            tally.fold()
        return iter(())


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # In prometheus-client's multiprocess mode (--workers N) every increment is written
        # to a file another process reads: no tally there, the metrics are the real ones.
        self._fold: _Fold | None = None
        if values.ValueClass is values.MutexValue:
            self._fold = _Fold()
            r.register(self._fold)
        # `livesum`: with --workers N (prometheus-client's multiprocess mode) a gauge is the
        # sum over the running workers; outside that mode it is ignored.
        live: Final = "livesum"
        self.connections = Gauge(
            "kasagi_connections",
            "Open WebSocket connections.",
            registry=r,
            multiprocess_mode=live,
        )
        self.rooms = Gauge(
            "kasagi_rooms", "Rooms cached by this relay.", registry=r, multiprocess_mode=live
        )
        self.members = Gauge(
            "kasagi_members",
            "Room memberships on this relay.",
            registry=r,
            multiprocess_mode=live,
        )
        # Incremented once or more per delta: tallies (see _Tally).
        self.deltas_in = self._tally(
            Counter(
                "kasagi_deltas_in", "Deltas received from clients and acknowledged.", registry=r
            )
        )
        self.ops_in = self._tally(
            Counter("kasagi_ops_in", "Sequenced deltas received from the backend.", registry=r)
        )
        self.frames_out = Counter(
            "kasagi_frames_out", "WebSocket frames written to clients.", registry=r
        )
        self.bytes_out = Counter("kasagi_bytes_out", "Bytes written to clients.", registry=r)
        self.broadcasts = Counter(
            "kasagi_broadcasts", "Delta frames fanned out to a room.", registry=r
        )
        self.deltas_per_frame = self._histogram_tally(
            Histogram(
                "kasagi_deltas_per_frame",
                "Deltas merged into one broadcast frame.",
                buckets=_BATCH_BUCKETS,
                registry=r,
            )
        )
        self.send_queue_bytes = Gauge(
            "kasagi_send_queue_bytes",
            "Bytes waiting in the send buffers of all connections.",
            registry=r,
            multiprocess_mode=live,
        )
        self.dropped_members = Counter(
            "kasagi_dropped_members",
            "Connections closed with 1013 because their send queue passed the limit.",
            registry=r,
        )
        self.errors_out = Counter(
            "kasagi_errors_out", "Error replies sent, by code.", ["code"], registry=r
        )
        self.backend_errors = Counter(
            "kasagi_backend_errors", "Failed backend operations.", registry=r
        )
        self.forbidden = Counter(
            "kasagi_forbidden",
            "Requests refused with `forbidden` because the identity's grants lack the "
            "right, by action (join, publish, read).",
            ["action"],
            registry=r,
        )
        self.auth_failures = Counter(
            "kasagi_auth_failures",
            "Connections refused or closed because authentication failed, by reason "
            "(auth.REASONS: missing, malformed, algorithm, signature, unknown_kid, expired, "
            "not_yet_valid, audience, issuer, claims, sub_changed).",
            ["reason"],
            registry=r,
        )
        self.resets = Counter("kasagi_resets", "Room resets sent to members.", registry=r)
        self.bad_input = Counter(
            "kasagi_bad_input",
            "Messages and frames refused because of what a client sent, by reason "
            "(an error code such as bad_message or rate_limited, or a guard such as "
            "frame_timeout); none of them is logged with a traceback.",
            ["reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "kasagi_connections_refused",
            "WebSocket handshakes answered 503, by reason (max_connections, "
            "max_connections_per_address, shutting_down).",
            ["reason"],
            registry=r,
        )
        self.closes = Counter(
            "kasagi_closes",
            "WebSocket connections ended, by the close code the relay sent first "
            "(peer: the client closed first; abnormal: no close frame either way).",
            ["code"],
            registry=r,
        )
        self.api_requests = Counter(
            "kasagi_api_requests",
            "HTTP API requests answered, by route (deltas, state, presence, other) and "
            "HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.ack_latency = self._histogram_tally(
            Histogram(
                "kasagi_ack_latency_seconds",
                "Time from receiving a delta to sending its ack.",
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
        )
        # Set by kasagi_relay.workers in a worker of --workers N: renders every worker's
        # values (prometheus-client's multiprocess mode) instead of this registry's.
        self.multiprocess: Callable[[], bytes] | None = None

        # Tallies: a member's join and leave changed both, at ~0.8 us per change.
        self.presence_entries: Level = self._tally(
            Gauge(
                "kasagi_presence_entries",
                "Presence entries this relay holds (its members' memberships, every room).",
                registry=r,
            )
        )
        self.presence_events = self._tally(
            Counter(
                "kasagi_presence_events",
                "presence_join and presence_leave messages sent to members.",
                registry=r,
            )
        )
        # The relay's own full collections (gcpolicy.py, --gc freeze): each stops every
        # room for its duration, so operators see them here rather than only in a log.
        self.gc_full = Histogram(
            "kasagi_gc_full_collection_seconds",
            "Full garbage collections of the relay's heap (--gc freeze) and their duration.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    @overload
    def _tally(self, counter: Counter) -> Increments: ...

    @overload
    def _tally(self, counter: Gauge) -> Level: ...

    def _tally(self, counter: Counter | Gauge) -> Increments | Level:
        if self._fold is None:
            return counter
        tally = _Tally(counter)
        self._fold.tallies.append(tally)
        return tally

    def _histogram_tally(self, histogram: Histogram) -> Observations:
        if self._fold is None:
            return histogram
        tally = _HistogramTally(histogram)
        self._fold.tallies.append(tally)
        return tally

    def track_send_queue(self, total: Callable[[], float]) -> None:
        """Computed at scrape time: summing every buffer on each write would cost more."""
        self.send_queue_bytes.set_function(total)

    def render(self) -> bytes:
        if self.multiprocess is not None:
            return self.multiprocess()
        return generate_latest(self.registry)


class ThrottledLog:
    """At most `per_interval` lines per `interval_s` on `logger`; the lines dropped
    meanwhile are counted in the next line written."""

    def __init__(self, logger: logging.Logger, per_interval: int = 10, interval_s: float = 10.0):
        self.logger = logger
        self.per_interval = per_interval
        self.interval_s = interval_s
        self._window = 0.0
        self._written = 0
        self._dropped = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._window >= self.interval_s:
            self._window = now
            self._written = 0
        if self._written >= self.per_interval:
            self._dropped += 1
            return
        self._written += 1
        if self._dropped:
            msg += " (%d similar lines not logged)"
            args = (*args, self._dropped)
            self._dropped = 0
        self.logger.log(level, msg, *args)
