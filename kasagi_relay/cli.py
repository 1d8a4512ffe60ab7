"""`kasagi-relay`: the command line. Every flag can also come from a KASAGI_* variable."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, TypeVar

from kasagi_relay._version import __version__
from kasagi_relay.backends.base import Backend
from kasagi_relay.config import Config, ConfigError
from kasagi_relay.gcpolicy import Collector

__all__ = ["build_parser", "main", "parse_config"]

logger = logging.getLogger("kasagi_relay")

T = TypeVar("T")
_D = Config()

# Exit status when a second SIGTERM/SIGINT cut the graceful shutdown short.
EXIT_FORCED = 1
# Below this many open files the relay warns at start-up: each connection is one descriptor.
LOW_OPEN_FILES = 4096
# --workers: a bound on what a typo can start (one process, one event loop each).
MAX_WORKERS = 256

_SIZE = re.compile(r"(?i)\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*")
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64KiB, 1MiB)")
    value = int(m.group(1)) * _UNITS[m.group(2)[:1].lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}")
        return value

    return parse


def _non_negative(unit: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not value >= 0:  # also refuses nan
            raise argparse.ArgumentTypeError("must be >= 0")
        return value

    return parse


_seconds = _non_negative("seconds")


def _size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _size(text)


def _cidrs(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an address or CIDR: {item!r}") from None
    return tuple(out)


def _sentinels(text: str) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"not host:port: {item!r}")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise argparse.ArgumentTypeError("expected host:port,host:port,...")
    return tuple(out)


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return _int_range(1, MAX_WORKERS)(text)


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= value <= hi:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}")
        return value

    return parse


def _origins(text: str) -> tuple[str, ...]:
    out = tuple(item.strip() for item in text.split(",") if item.strip())
    if not out:
        raise argparse.ArgumentTypeError("expected * or ORIGIN,ORIGIN,...")
    return out


def _secret_file(parser: argparse.ArgumentParser, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read --jwt-secret-file: {getattr(exc, 'strerror', None) or exc}")
    return text[:-1] if text.endswith("\n") else text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other error of the relay; --help has the details.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kasagi-relay",
        description=(
            "Real-time state-sync relay: WebSocket rooms at ws://HOST:PORT/ws, "
            "GET /healthz and /metrics on the same port. With no arguments it serves "
            "ws://127.0.0.1:8765/ws on the embedded in-memory backend (one process, "
            "nothing persisted). Every flag can also be set by the environment variable "
            "shown in brackets; a flag wins over its variable. SIGTERM or SIGINT stops "
            "gracefully; a second one exits at once with status 1. With TLS, SIGHUP reloads "
            "the certificate files for new connections."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def env(name: str, default: object) -> object:
        # argparse runs string defaults through the flag's type, so bad variables are
        # reported exactly like bad flags.
        return os.environ.get(name, default)

    add = p.add_argument
    add("--version", action="version", version=f"%(prog)s {__version__}")
    add("--host", default=env("KASAGI_HOST", _D.host), help="address to listen on [KASAGI_HOST]")
    add(
        "--port",
        type=_int_range(0, 65535),
        default=env("KASAGI_PORT", _D.port),
        help="TCP port (0: any free port) [KASAGI_PORT]",
    )
    add(
        "--tls-cert",
        metavar="PATH",
        default=env("KASAGI_TLS_CERT", None),
        help="serve wss:// (and https for /healthz, /metrics) with this PEM certificate "
        "chain [KASAGI_TLS_CERT]",
    )
    add(
        "--tls-key",
        metavar="PATH",
        default=env("KASAGI_TLS_KEY", None),
        help="the certificate's PEM private key, if not in the --tls-cert file [KASAGI_TLS_KEY]",
    )
    add(
        "--redis",
        metavar="URL",
        default=env("KASAGI_REDIS", None),
        help="use one Redis server, e.g. redis://localhost:6379/0 [KASAGI_REDIS]",
    )
    add(
        "--sentinels",
        metavar="HOST:PORT,...",
        type=_sentinels,
        default=env("KASAGI_SENTINELS", None),
        help="use Redis through these Sentinels (production) [KASAGI_SENTINELS]",
    )
    add(
        "--cluster",
        metavar="HOST:PORT,...",
        type=_sentinels,
        default=env("KASAGI_CLUSTER", None),
        help="use a Redis Cluster: any of its nodes (rooms are spread over its shards; "
        "docs/operations.md) [KASAGI_CLUSTER]",
    )
    add(
        "--master",
        metavar="NAME",
        default=env("KASAGI_MASTER", _D.master),
        help="the Sentinel master name [KASAGI_MASTER]",
    )
    add(
        "--redis-password",
        metavar="PASSWORD",
        default=env("KASAGI_REDIS_PASSWORD", None),
        help="password for Redis (prefer the variable: flags show in ps) [KASAGI_REDIS_PASSWORD]",
    )
    add(
        "--redis-tls-ca",
        metavar="PATH",
        default=env("KASAGI_REDIS_TLS_CA", None),
        help="with --cluster: connect to the nodes over TLS (their tls-port), verifying them "
        "with this PEM CA bundle (--redis takes a rediss:// URL instead) [KASAGI_REDIS_TLS_CA]",
    )
    add(
        "--sentinel-password",
        metavar="PASSWORD",
        default=env("KASAGI_SENTINEL_PASSWORD", None),
        help="password for the Sentinels [KASAGI_SENTINEL_PASSWORD]",
    )
    add(
        "--ack",
        choices=("leader", "replica", "all"),
        default=env("KASAGI_ACK", None),
        help=(
            "when a delta is acknowledged: leader = once the master stored it; replica = "
            "once a replica has it too (WAIT 1); all = once every replica has it. "
            "Default: replica with --sentinels or --cluster, leader otherwise [KASAGI_ACK]"
        ),
    )
    add(
        "--tick-ms",
        metavar="MS",
        type=_int_range(0, 60_000),
        default=env("KASAGI_TICK_MS", _D.tick_ms),
        help=(
            "send at most one frame per room every MS milliseconds, merging the deltas "
            "of the tick; 0 = as soon as possible (deltas that queue meanwhile are still "
            "merged) [KASAGI_TICK_MS]"
        ),
    )
    add(
        "--history",
        metavar="N",
        type=_int_range(1),
        default=env("KASAGI_HISTORY", _D.history),
        help="deltas kept per room so that reconnecting clients resume [KASAGI_HISTORY]",
    )
    add(
        "--history-age",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_HISTORY_AGE", _D.history_age_s),
        help="and no older than this (the --history count still applies) [KASAGI_HISTORY_AGE]",
    )
    add(
        "--compaction-interval",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_COMPACTION_INTERVAL", _D.compaction_interval_s),
        help="how often rooms are compacted into snapshots; 0 = never [KASAGI_COMPACTION_INTERVAL]",
    )
    add(
        "--max-message-bytes",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_MAX_MESSAGE_BYTES", _D.max_message_bytes),
        help="largest incoming message; a bigger frame closes the connection with 1009 "
        "[KASAGI_MAX_MESSAGE_BYTES]",
    )
    add(
        "--max-state-bytes",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_MAX_STATE_BYTES", _D.max_state_bytes),
        help="a delta is refused with too_large when the room's state JSON plus the delta "
        "would pass this [KASAGI_MAX_STATE_BYTES]",
    )
    add(
        "--max-state-memory",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_MAX_STATE_MEMORY", None),
        help="a delta is refused with too_large when the engine's memory estimate of the "
        "room's state (JSON plus 72 bytes per node, 48 per object member) would pass this; "
        "default 8x --max-state-bytes [KASAGI_MAX_STATE_MEMORY]",
    )
    add(
        "--send-queue-bytes",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_SEND_QUEUE_BYTES", _D.send_queue_bytes),
        help="a member whose unsent data passes this is closed with 1013 (too slow) "
        "[KASAGI_SEND_QUEUE_BYTES]",
    )
    add(
        "--rate-limit",
        metavar="PER_S",
        type=_non_negative("messages per second"),
        default=env("KASAGI_RATE_LIMIT", _D.rate_limit),
        help="messages per second per connection, sustained; past it requests get "
        "rate_limited; 0 = no limit [KASAGI_RATE_LIMIT]",
    )
    add(
        "--rate-burst",
        metavar="N",
        type=_int_range(1),
        default=env("KASAGI_RATE_BURST", _D.rate_burst),
        help="messages a connection may send at once before the rate applies [KASAGI_RATE_BURST]",
    )
    add(
        "--max-rooms",
        metavar="N",
        type=_int_range(0),
        default=env("KASAGI_MAX_ROOMS", _D.max_rooms),
        help="rooms one connection may be a member of at once; a join past it gets "
        "forbidden; 0 = no limit [KASAGI_MAX_ROOMS]",
    )
    add(
        "--max-loaded-rooms",
        metavar="N",
        type=_int_range(0),
        default=env("KASAGI_MAX_LOADED_ROOMS", _D.max_loaded_rooms),
        help="rooms this relay holds at once; past it the least recently used rooms "
        "without members are unloaded, and if none can be, a join or delta for another "
        "room gets unavailable; 0 = no limit [KASAGI_MAX_LOADED_ROOMS]",
    )
    add(
        "--rate-bytes",
        metavar="SIZE",
        type=_size_or_zero,
        default=env("KASAGI_RATE_BYTES", _D.rate_bytes),
        help="bytes per second per connection, sustained, counted before a message is "
        "decoded; past it requests get rate_limited; 0 = no limit [KASAGI_RATE_BYTES]",
    )
    add(
        "--rate-bytes-burst",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_RATE_BYTES_BURST", _D.rate_bytes_burst),
        help="bytes a connection may send at once before --rate-bytes applies "
        "[KASAGI_RATE_BYTES_BURST]",
    )
    add(
        "--rate-close-after",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_RATE_CLOSE_AFTER", _D.rate_close_after_s),
        help="a connection that keeps sending past its rate limit for this long is closed "
        "with 1008 [KASAGI_RATE_CLOSE_AFTER]",
    )
    add(
        "--send-budget-bytes",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_SEND_BUDGET_BYTES", _D.send_budget_bytes),
        help="all members' unsent data together; past it the members with the most queued "
        "are closed with 1013 [KASAGI_SEND_BUDGET_BYTES]",
    )
    add(
        "--history-bytes",
        metavar="SIZE",
        type=_size,
        default=env("KASAGI_HISTORY_BYTES", _D.history_bytes),
        help="and no more than this many bytes of deltas per room [KASAGI_HISTORY_BYTES]",
    )
    add(
        "--room-ttl",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_ROOM_TTL", _D.room_ttl_s),
        help="memory backend: forget a room nobody wrote to or joined for this long "
        "[KASAGI_ROOM_TTL]",
    )
    add(
        "--max-connections",
        metavar="N",
        type=_int_range(0),
        default=env("KASAGI_MAX_CONNECTIONS", _D.max_connections),
        help="connections this relay serves at once; past it handshakes get 503; 0 = no "
        "limit [KASAGI_MAX_CONNECTIONS]",
    )
    add(
        "--max-connections-per-address",
        metavar="N",
        type=_int_range(0),
        default=env("KASAGI_MAX_CONNECTIONS_PER_ADDRESS", _D.max_connections_per_address),
        help="connections from one client address; past it handshakes get 503; 0 = no "
        "limit [KASAGI_MAX_CONNECTIONS_PER_ADDRESS]",
    )
    add(
        "--trusted-proxies",
        metavar="CIDR,...",
        type=_cidrs,
        default=env("KASAGI_TRUSTED_PROXIES", ""),
        help="proxies whose X-Forwarded-For header names the client address (for "
        "--max-connections-per-address); none by default [KASAGI_TRUSTED_PROXIES]",
    )
    add(
        "--idle-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_IDLE_TIMEOUT", _D.idle_timeout_s),
        help="a connection that neither joins a room nor sends a delta within this is "
        "closed with 1008; 0 = never [KASAGI_IDLE_TIMEOUT]",
    )
    add(
        "--frame-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_FRAME_TIMEOUT", _D.frame_timeout_s),
        help="a frame not received whole within this closes its connection with 1008; "
        "0 = never [KASAGI_FRAME_TIMEOUT]",
    )
    add(
        "--jwt-secret",
        metavar="SECRET",
        default=env("KASAGI_JWT_SECRET", None),
        help="HMAC key of connection tokens (HS256/384/512), at least 32 bytes; prefer the "
        "variable or --jwt-secret-file: flags show in ps [KASAGI_JWT_SECRET]",
    )
    add(
        "--jwt-secret-file",
        metavar="PATH",
        default=env("KASAGI_JWT_SECRET_FILE", None),
        help="read the HMAC key from this file (one trailing newline is dropped) "
        "[KASAGI_JWT_SECRET_FILE]",
    )
    add(
        "--jwt-public-key",
        metavar="PATH",
        default=env("KASAGI_JWT_PUBLIC_KEY", None),
        help="PEM public key of connection tokens: RSA (RS*/PS*), EC (ES*) or Ed25519/Ed448 "
        "(EdDSA) [KASAGI_JWT_PUBLIC_KEY]",
    )
    add(
        "--jwks",
        metavar="PATH|URL",
        default=env("KASAGI_JWKS", None),
        help="a JWKS file or https URL; keys chosen by kid, fetched again on an unknown kid "
        "at most every 10 s [KASAGI_JWKS]",
    )
    add(
        "--jwt-audience",
        metavar="AUD",
        default=env("KASAGI_JWT_AUDIENCE", None),
        help="tokens must carry this aud [KASAGI_JWT_AUDIENCE]",
    )
    add(
        "--jwt-issuer",
        metavar="ISS",
        default=env("KASAGI_JWT_ISSUER", None),
        help="tokens must carry this iss [KASAGI_JWT_ISSUER]",
    )
    add(
        "--jwt-leeway",
        metavar="SECONDS",
        type=_float_range(0, 10),
        default=env("KASAGI_JWT_LEEWAY", _D.jwt_leeway_s),
        help="clock leeway on exp, nbf and iat, at most 10 [KASAGI_JWT_LEEWAY]",
    )
    add(
        "--auth-timeout",
        metavar="SECONDS",
        type=_float_range(0.1, 300),
        default=env("KASAGI_AUTH_TIMEOUT", _D.auth_timeout_s),
        help="with a JWT key: a connection not authenticated within this is closed with "
        "1008 [KASAGI_AUTH_TIMEOUT]",
    )
    add(
        "--auth",
        choices=("none",),
        default=env("KASAGI_AUTH", None),
        help="none: serve anonymously on a non-loopback address (without a JWT key the "
        "relay refuses to, unless told so) [KASAGI_AUTH]",
    )
    add(
        "--allowed-origins",
        metavar="ORIGIN,...",
        type=_origins,
        default=env("KASAGI_ALLOWED_ORIGINS", "*"),
        help="browser origins allowed to connect, e.g. https://app.example.com; * any; "
        "other origins (null too) get 403; handshakes without Origin are allowed "
        "[KASAGI_ALLOWED_ORIGINS]",
    )
    add(
        "--presence",
        choices=("on", "off"),
        default=env("KASAGI_PRESENCE", "on"),
        help="off: no presence (no entry written per join, `presence` answered "
        "unavailable) [KASAGI_PRESENCE]",
    )
    add(
        "--presence-refresh",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_PRESENCE_REFRESH", _D.presence_refresh_s),
        help="how often the relay re-writes its members' presence entries "
        "[KASAGI_PRESENCE_REFRESH]",
    )
    add(
        "--presence-ttl",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_PRESENCE_TTL", _D.presence_ttl_s),
        help="a presence entry not refreshed within this is taken out (its relay died) and "
        "its presence_leave sent; more than --presence-refresh [KASAGI_PRESENCE_TTL]",
    )
    add(
        "--presence-event-delay",
        metavar="SECONDS",
        type=_float_range(0.0, 1.0),
        default=env("KASAGI_PRESENCE_EVENT_DELAY", _D.presence_event_delay_s),
        help="presence events go out at most once per this period, each member getting "
        "those of a period in one write; an event after a quiet period goes out at once. "
        "0: at the end of each loop turn; at most 1 [KASAGI_PRESENCE_EVENT_DELAY]",
    )
    add(
        "--max-presence-members",
        metavar="N",
        type=_int_range(0),
        default=env("KASAGI_MAX_PRESENCE_MEMBERS", _D.max_presence_members),
        help="members listed in one presence reply (count and users stay exact, the reply "
        "says truncated); 0 = no limit [KASAGI_MAX_PRESENCE_MEMBERS]",
    )
    add(
        "--api-key",
        metavar="KEY,...",
        default=None,
        help="enable the HTTP API (/api/...) for requests with `Authorization: Bearer KEY`; "
        "several keys, comma-separated, are all accepted (to rotate one out). Prefer the "
        "variable or --api-key-file: flags show in ps [KASAGI_API_KEY]",
    )
    add(
        "--api-key-file",
        metavar="PATH",
        default=env("KASAGI_API_KEY_FILE", None),
        help="read API keys from this file too: one per line (or comma-separated) "
        "[KASAGI_API_KEY_FILE]",
    )
    add(
        "--api-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=env("KASAGI_API_TIMEOUT", _D.api_timeout_s),
        help="an API request must arrive whole (headers and body) within this of the "
        "connection opening or of the previous response; an idle keep-alive connection is "
        "closed then [KASAGI_API_TIMEOUT]",
    )
    add(
        "--api-max-requests",
        metavar="N",
        type=_int_range(1),
        default=env("KASAGI_API_MAX_REQUESTS", _D.api_max_requests),
        help="API requests served at once (reading their bodies included); past it they "
        "get 503 [KASAGI_API_MAX_REQUESTS]",
    )
    add(
        "--workers",
        metavar="N",
        type=_workers,
        default=env("KASAGI_WORKERS", _D.workers),
        help="relay processes serving the port, each with its own event loop and backend "
        "connections, restarted if they die; auto = one per CPU. Needs --redis, --sentinels "
        "or --cluster (docs/operations.md) [KASAGI_WORKERS]",
    )
    add(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        type=str.lower,
        default=env("KASAGI_LOG_LEVEL", _D.log_level),
        help="[KASAGI_LOG_LEVEL]",
    )
    add(
        "--log-format",
        choices=("text", "json"),
        default=env("KASAGI_LOG_FORMAT", _D.log_format),
        help="json: one JSON object per line [KASAGI_LOG_FORMAT]",
    )
    add(
        "--no-inspector",
        dest="inspector",
        action="store_false",
        default=os.environ.get("KASAGI_NO_INSPECTOR", "") in ("", "0"),
        help="do not serve the inspector page (/, /inspector) nor /kasagi-client.js: 404 "
        "[KASAGI_NO_INSPECTOR=1]",
    )
    add(
        "--gc",
        choices=("freeze", "default"),
        default=env("KASAGI_GC", _D.gc),
        help="freeze: collect only what is new once a second, a full collection when the "
        "heap doubles (no 0.7 s pauses at 10,000 members; garbage of closed connections "
        "waits, up to about the live heap); default: CPython's own collections [KASAGI_GC]",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    a = parser.parse_args(argv)
    if sum(bool(x) for x in (a.redis, a.sentinels, a.cluster)) > 1:
        parser.error("--redis, --sentinels and --cluster are exclusive")
    if not 0 < a.presence_refresh < a.presence_ttl:
        parser.error("--presence-refresh must be positive and less than --presence-ttl")
    if not a.api_timeout > 0:
        parser.error("--api-timeout must be more than 0")
    try:
        api_keys = _api_keys(a.api_key, a.api_key_file)
    except ValueError as exc:
        parser.error(str(exc))
    if a.redis_tls_ca and not a.cluster:
        parser.error("--redis-tls-ca applies to --cluster (with --redis use a rediss:// URL)")
    if a.workers > 1 and not (a.redis or a.sentinels or a.cluster):
        parser.error(
            "--workers needs --redis, --sentinels or --cluster: with the memory backend "
            "each worker would hold its own rooms"
        )
    secret = a.jwt_secret or None
    if a.jwt_secret_file:
        if secret is not None:
            parser.error("--jwt-secret and --jwt-secret-file are exclusive")
        secret = _secret_file(parser, a.jwt_secret_file)
    config = Config(
        host=a.host,
        port=a.port,
        tls_cert=a.tls_cert or None,
        tls_key=a.tls_key or None,
        redis=a.redis or None,
        sentinels=a.sentinels or (),
        cluster=a.cluster or (),
        master=a.master,
        redis_password=a.redis_password,
        sentinel_password=a.sentinel_password,
        redis_tls_ca=a.redis_tls_ca or None,
        ack=a.ack,
        tick_ms=a.tick_ms,
        history=a.history,
        history_age_s=a.history_age,
        compaction_interval_s=a.compaction_interval,
        max_message_bytes=a.max_message_bytes,
        max_state_bytes=a.max_state_bytes,
        max_state_memory=(
            8 * a.max_state_bytes if a.max_state_memory is None else a.max_state_memory
        ),
        send_queue_bytes=a.send_queue_bytes,
        rate_limit=a.rate_limit,
        rate_burst=a.rate_burst,
        max_rooms=a.max_rooms,
        max_loaded_rooms=a.max_loaded_rooms,
        rate_bytes=a.rate_bytes,
        rate_bytes_burst=a.rate_bytes_burst,
        rate_close_after_s=a.rate_close_after,
        send_budget_bytes=a.send_budget_bytes,
        history_bytes=a.history_bytes,
        room_ttl_s=a.room_ttl,
        max_connections=a.max_connections,
        max_connections_per_address=a.max_connections_per_address,
        trusted_proxies=a.trusted_proxies,
        idle_timeout_s=a.idle_timeout,
        frame_timeout_s=a.frame_timeout,
        jwt_secret=secret,
        jwt_public_key=a.jwt_public_key or None,
        jwks=a.jwks or None,
        jwt_audience=a.jwt_audience or None,
        jwt_issuer=a.jwt_issuer or None,
        jwt_leeway_s=a.jwt_leeway,
        auth_timeout_s=a.auth_timeout,
        auth_none=a.auth == "none",
        allowed_origins=a.allowed_origins,
        presence=a.presence == "on",
        presence_refresh_s=a.presence_refresh,
        presence_ttl_s=a.presence_ttl,
        presence_event_delay_s=a.presence_event_delay,
        max_presence_members=a.max_presence_members,
        api_keys=api_keys,
        api_timeout_s=a.api_timeout,
        api_max_requests=a.api_max_requests,
        workers=a.workers,
        log_level=a.log_level,
        log_format=a.log_format,
        inspector=a.inspector,
        gc=a.gc,
    )
    try:
        config.check_access()
    except ConfigError as exc:
        parser.error(str(exc))
    return config


def _api_keys(flag: str | None, path: str | None) -> tuple[str, ...]:
    """The API keys of --api-key (else KASAGI_API_KEY) and --api-key-file. Kept out of
    argparse's defaults, which --help prints."""
    text = flag if flag is not None else os.environ.get("KASAGI_API_KEY", "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text += "," + f.read().replace("\n", ",")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file: cannot read {path}: {exc}") from None
    keys: list[str] = []
    for item in text.split(","):
        key = item.strip()
        if not key:
            continue
        # Sent as a header value: visible ASCII, no spaces (nor commas, the separator).
        if not all("!" <= c <= "~" for c in key):
            raise ValueError("an API key must be printable ASCII without spaces")
        if key not in keys:
            keys.append(key)
    return tuple(keys)


class _JsonFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RedactSecrets(logging.Filter):
    """Logs never carry a token (docs/operations.md, "Identity"): at debug level websockets
    logs request lines, headers and frames; query strings, Authorization values and
    anything shaped like a JWT are replaced before a line is written."""

    _PATTERNS: Final = (
        (re.compile(r"(?i)(authorization:\s*)[^\r\n'\"]+"), r"\1[redacted]"),
        (re.compile(r"(/[^\s?'\"]*)\?[^\s'\"]+"), r"\1?[redacted]"),
        (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[token]"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern, replacement in self._PATTERNS:
            redacted = pattern.sub(replacement, redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    if config.log_format == "json":
        formatter: logging.Formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # websockets logs every refused handshake at info; that is the client's problem.
    logging.getLogger("websockets").setLevel(
        max(logging.WARNING, root.level) if root.level > logging.DEBUG else logging.DEBUG
    )


async def serve(config: Config, backend: Backend) -> int:
    from kasagi_relay.server import Relay  # imports the engine: after the flags are good

    try:
        relay = Relay(config, backend)  # loads the TLS files, before the port is bound
    except ConfigError as exc:
        print(f"kasagi-relay: error: {exc}", file=sys.stderr)
        return 2
    open_files = raise_open_files_limit()
    if open_files < LOW_OPEN_FILES:
        logger.warning(
            "the open files limit is %d: at most about that many connections "
            "(raise it with `ulimit -n` or systemd's LimitNOFILE)",
            open_files,
        )
    try:
        await relay.start()
    except OSError as exc:
        await relay.stop()
        reason = exc.strerror or exc
        print(
            f"kasagi-relay: error: cannot listen on {config.host}:{config.port}: {reason}",
            file=sys.stderr,
        )
        return 1
    from kasagi_relay import delta

    ack = f", ack {config.ack_level}" if config.backend_name != "memory" else ""
    if config.jwt_secret is not None:
        identity = "tokens: --jwt-secret"
    elif config.jwt_public_key is not None:
        identity = "tokens: --jwt-public-key"
    elif config.jwks is not None:
        identity = "tokens: --jwks"
    else:
        identity = "anonymous"
    logger.info(
        "kasagi-relay %s serving %s (%s backend%s, tick %d ms, %s engine, %s)",
        __version__,
        relay.url,
        config.backend_name,
        ack,
        config.tick_ms,
        delta.IMPLEMENTATION,
        identity,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    collector = (  # gcpolicy.py
        Collector(observe=relay.metrics.gc_full.observe) if config.gc == "freeze" else None
    )
    if collector is not None:
        collector.start(loop)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if config.tls_cert is not None:
            # Renewed certificates are picked up without dropping anyone.
            loop.add_signal_handler(signal.SIGHUP, relay.reload_tls)
        await stop.wait()
        logger.info("shutting down (a second SIGTERM or SIGINT exits at once)")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _exit_now)
        await relay.stop()
    finally:
        if collector is not None:
            collector.stop()  # also when cancelled (serve run inside another program)
    logger.info("stopped")
    return 0


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the limit in effect.

    Every member is one descriptor, and the usual default soft limit (1024) would stop a
    relay at about a thousand connections while the hard limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an unlimited soft value for open files; 2**20 is its default nr_open.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.debug("cannot raise the open files limit to %d: %s", target, exc)
    return soft


def _exit_now() -> NoReturn:
    # The graceful stop waits up to shutdown_timeout_s for in-flight acks and close_timeout_s
    # for peers that do not answer the close; an operator who signals again wants out now.
    # os._exit, because unwinding would wait on the same peers.
    logger.warning("second signal: exiting without finishing the shutdown")
    logging.shutdown()
    os._exit(EXIT_FORCED)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config)
    try:
        from kasagi_relay.backends.factory import build_backend

        backend = build_backend(config)  # fail fast, before binding the port
    except (ConfigError, ImportError) as exc:
        print(f"kasagi-relay: error: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        from kasagi_relay.workers import supervise

        return supervise(config)
    import uvloop

    return uvloop.run(serve(config, backend))
