"""The relay helpers under the name the tests import: they live in testkit/relay.py (shared
with the benchmarks), whose docstring shows their use."""

from testkit.relay import (
    JSON,
    MSGPACK,
    REPO,
    TIMEOUT,
    Client,
    Message,
    RelayProcess,
    connect_client,
    parse_frames,
    raw_member,
    read_frames,
    relay_env,
    relay_process,
    start_relay,
)

__all__ = [
    "JSON",
    "MSGPACK",
    "REPO",
    "TIMEOUT",
    "Client",
    "Message",
    "RelayProcess",
    "connect_client",
    "parse_frames",
    "raw_member",
    "read_frames",
    "relay_env",
    "relay_process",
    "start_relay",
]
