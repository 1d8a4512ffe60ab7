"""Backends: the store of record behind the relay (memory, redis, sentinel), by role:
the log, the snapshots and the feed (base.py)."""

from kasagi_relay.backends.base import (
    AckLevel,
    Backend,
    BackendUnavailable,
    DeltaKind,
    Feed,
    KeyConflict,
    Listener,
    Log,
    Op,
    Snapshot,
    Snapshots,
    valid_room,
)

__all__ = [
    "AckLevel",
    "Backend",
    "BackendUnavailable",
    "DeltaKind",
    "Feed",
    "KeyConflict",
    "Listener",
    "Log",
    "Op",
    "Snapshot",
    "Snapshots",
    "valid_room",
]
