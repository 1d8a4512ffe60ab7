"""The relay's settings: one dataclass, filled by the CLI (flags and KASAGI_* variables)."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field

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
    # --cluster over TLS: the CA bundle (PEM) that signed the nodes' certificates.
    redis_tls_ca: str | None = None
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
    # The engine's memory estimate of a room's state (its JSON plus 72 bytes per node and
    # 48 per object member; docs/operations.md). The CLI default is 8x --max-state-bytes.
    max_state_memory: int = 64 * MiB
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

    # Presence (docs/protocol.md): each relay re-writes its members' entries every
    # presence_refresh_s; an entry not refreshed within presence_ttl_s is taken out (its
    # relay died) and its presence_leave sent. A presence reply lists at most
    # max_presence_members members (count and users stay exact; 0 = no limit).
    # Presence events go out at most once per presence_event_delay_s (each member gets
    # those of one period in one write; the first after a quiet period at once): under
    # churn most of an event's cost was its own write (docs/benchmarks.md).
    # False: no presence entries nor events (`presence` is `unavailable`), no Redis write
    # per join.
    presence: bool = True
    presence_refresh_s: float = 20.0
    presence_ttl_s: float = 60.0
    presence_event_delay_s: float = 0.02
    max_presence_members: int = 10_000

    # The HTTP API (docs/protocol.md, "HTTP API"): off without a key; several keys let one
    # be rotated out. A request must arrive whole (headers and body), and an idle keep-alive
    # connection send its next one, within api_timeout_s; past api_max_requests requests
    # served at once, more get 503.
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never in a log line
    api_timeout_s: float = 10.0
    api_max_requests: int = 64

    # Connection housekeeping.
    ping_interval_s: float | None = 20.0
    close_timeout_s: float = 5.0
    room_idle_s: float = 60.0
    shutdown_timeout_s: float = 10.0

    # Relay processes serving the port (kasagi_relay/workers.py); 1 = this process alone.
    workers: int = 1

    # Identity (docs/protocol.md, "Identity"; docs/operations.md): one JWT key source. With
    # none the relay is anonymous, which cli.py allows only on loopback or with --auth none.
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # PEM file
    jwks: str | None = None  # a file, or an https URL
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 5.0
    # A connection that has not authenticated within this is closed (1008).
    auth_timeout_s: float = 5.0
    auth_none: bool = False  # --auth none: anonymous on any address, on purpose
    # Origins a browser handshake may come from; "*" any. No Origin header: always allowed.
    allowed_origins: tuple[str, ...] = ("*",)

    log_level: str = "info"
    log_format: str = "text"
    # The inspector page and /kasagi-client.js (kasagi_relay/inspector.py).
    inspector: bool = True
    # Garbage collection (gcpolicy.py): "freeze" scans only what is new once a second and runs
    # a full collection when the heap doubles; "default" leaves CPython's own collections.
    gc: str = "freeze"

    @property
    def ack_level(self) -> AckLevel:
        if self.ack is not None:
            return self.ack
        return "replica" if self.sentinels or self.cluster else "leader"

    @property
    def jwt_configured(self) -> bool:
        return any(k is not None for k in (self.jwt_secret, self.jwt_public_key, self.jwks))

    @property
    def backend_name(self) -> str:
        if self.sentinels:
            return "sentinel"
        if self.cluster:
            return "cluster"
        if self.redis:
            return "redis"
        return "memory"

    def check_access(self) -> None:
        """docs/operations.md, "Identity": anonymous only on loopback or when asked for;
        ConfigError (one line, exit 2) otherwise."""
        keys = [k for k in (self.jwt_secret, self.jwt_public_key, self.jwks) if k is not None]
        if len(keys) > 1:
            raise ConfigError("give only one of --jwt-secret, --jwt-public-key and --jwks")
        if keys and self.auth_none:
            raise ConfigError("--auth none and a JWT key contradict each other: drop one")
        if not keys and not self.auth_none and not _loopback(self.host):
            raise ConfigError(
                f"refusing to serve anonymously on {self.host}: give a JWT key "
                "(--jwt-secret, --jwt-public-key or --jwks), or --auth none to allow it"
            )

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """A setting that cannot work; the CLI prints it as one line and exits with status 2."""
