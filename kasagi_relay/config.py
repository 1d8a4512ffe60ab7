"""The relay's settings: one dataclass, filled by the CLI (flags and KASAGI_* variables)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kasagi_relay.domain import AckLevel

__all__ = ["Config", "ConfigError"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(slots=True)
class Config:
    """Every knob of a relay. The defaults are the production defaults documented in --help."""

    host: str = "127.0.0.1"
    port: int = 8765
    # TLS on the relay's port: a PEM certificate chain, and its key (None: in the same file).
    tls_cert: str | None = None
    tls_key: str | None = None

    # Backend selection: memory unless a Redis URL, Sentinels or Cluster nodes are given.
    redis: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    # Redis Cluster seed nodes (any reachable node gives the whole map).
    cluster: tuple[tuple[str, int], ...] = ()
    master: str = "kasagi-master"
    redis_password: str | None = None
    sentinel_password: str | None = None
    # None means "the default for the backend": replica with Sentinels or a Cluster,
    # leader otherwise.
    ack: AckLevel | None = None

    # Fan-out: 0 sends as soon as possible (merging what queued meanwhile).
    tick_ms: int = 0

    # History kept for resumes, by count and by age.
    history: int = 1000
    history_age_s: float = 600.0
    compaction_interval_s: float = 5.0

    # Limits.
    max_message_bytes: int = 1 * MiB
    max_state_bytes: int = 8 * MiB
    send_queue_bytes: int = 1 * MiB
    rate_limit: float = 200.0  # messages per second per connection, sustained
    rate_burst: int = 400  # messages a connection may send at once
    max_rooms: int = 100  # rooms one connection may be a member of at once (0 = no limit)
    max_loaded_rooms: int = 10_000  # rooms this relay holds at once (0 = no limit)

    # Hostile-client limits (docs/operations.md lists each with what it protects).
    rate_bytes: int = 4 * MiB  # bytes per second per connection, sustained (0 = no limit)
    rate_bytes_burst: int = 8 * MiB  # bytes a connection may send at once
    # A connection refused by the rate limit without pause for this long is closed (1008).
    rate_close_after_s: float = 5.0
    # Every member's send queue together; past it the relay sheds the largest queues (1013).
    send_budget_bytes: int = 256 * MiB
    history_bytes: int = 16 * MiB  # history kept per room, by the size of its deltas
    # The memory backend forgets a room nobody wrote to for this long (as Redis keys expire).
    room_ttl_s: float = 86_400.0
    max_connections: int = 10_000  # per relay process; past it handshakes get 503 (0 = none)
    max_connections_per_address: int = 256  # per client address (0 = no limit)
    # Proxies whose X-Forwarded-For names the client address (CIDRs); none by default.
    trusted_proxies: tuple[str, ...] = ()
    # A connection that has not joined a room nor sent a delta within this is closed (1008).
    idle_timeout_s: float = 10.0
    # A frame whose bytes are not all in within this closes its connection (1008).
    frame_timeout_s: float = 10.0

    # Connection housekeeping.
    ping_interval_s: float | None = 20.0
    close_timeout_s: float = 5.0
    room_idle_s: float = 60.0
    shutdown_timeout_s: float = 10.0

    log_level: str = "info"
    log_format: str = "text"
    # The inspector page and /kasagi-client.js (kasagi_relay/inspector.py).
    inspector: bool = True

    @property
    def ack_level(self) -> AckLevel:
        if self.ack is not None:
            return self.ack
        return "replica" if self.sentinels or self.cluster else "leader"

    @property
    def backend_name(self) -> str:
        if self.sentinels:
            return "sentinel"
        if self.cluster:
            return "cluster"
        if self.redis:
            return "redis"
        return "memory"

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class ConfigError(Exception):
    """A setting that cannot work; the CLI prints it as one line and exits with status 2."""
