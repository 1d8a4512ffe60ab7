"""Prometheus metrics, one registry per relay so several relays can share a test process;
and `ThrottledLog`, so that what clients cause can be logged without letting them flood
the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
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
        self.deltas_in = Counter(
            "kasagi_deltas_in", "Deltas received from clients and acknowledged.", registry=r
        )
        self.ops_in = Counter(
            "kasagi_ops_in", "Sequenced deltas received from the backend.", registry=r
        )
        self.frames_out = Counter(
            "kasagi_frames_out", "WebSocket frames written to clients.", registry=r
        )
        self.bytes_out = Counter("kasagi_bytes_out", "Bytes written to clients.", registry=r)
        self.broadcasts = Counter(
            "kasagi_broadcasts", "Delta frames fanned out to a room.", registry=r
        )
        self.deltas_per_frame = Histogram(
            "kasagi_deltas_per_frame",
            "Deltas merged into one broadcast frame.",
            buckets=_BATCH_BUCKETS,
            registry=r,
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
        self.ack_latency = Histogram(
            "kasagi_ack_latency_seconds",
            "Time from receiving a delta to sending its ack.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Set by kasagi_relay.workers in a worker of --workers N: renders every worker's
        # values (prometheus-client's multiprocess mode) instead of this registry's.
        self.multiprocess: Callable[[], bytes] | None = None

        self.presence_entries = Gauge(
            "kasagi_presence_entries",
            "Presence entries this relay holds (its members' memberships, every room).",
            registry=r,
        )
        self.presence_events = Counter(
            "kasagi_presence_events",
            "presence_join and presence_leave messages sent to members.",
            registry=r,
        )

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
