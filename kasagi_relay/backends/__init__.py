"""Backends: the store of record behind the relay (memory, redis, sentinel)."""

from kasagi_relay.backends.base import (
    AckLevel,
    Backend,
    BackendUnavailable,
    DeltaKind,
    Listener,
    Op,
    Snapshot,
    valid_room,
)

__all__ = [
    "AckLevel",
    "Backend",
    "BackendUnavailable",
    "DeltaKind",
    "Listener",
    "Op",
    "Snapshot",
    "valid_room",
]
