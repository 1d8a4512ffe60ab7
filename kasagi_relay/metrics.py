"""Prometheus metrics, one registry per relay so several relays can share a test process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "Metrics"]

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
        self.connections = Gauge("kasagi_connections", "Open WebSocket connections.", registry=r)
        self.rooms = Gauge("kasagi_rooms", "Rooms cached by this relay.", registry=r)
        self.members = Gauge("kasagi_members", "Room memberships on this relay.", registry=r)
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
        self.resets = Counter("kasagi_resets", "Room resets sent to members.", registry=r)
        self.ack_latency = Histogram(
            "kasagi_ack_latency_seconds",
            "Time from receiving a delta to sending its ack.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def track_send_queue(self, total: Callable[[], float]) -> None:
        """Computed at scrape time: summing every buffer on each write would cost more."""
        self.send_queue_bytes.set_function(total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
