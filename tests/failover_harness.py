"""The failover harness under the name the tests import: it lives in testkit/failover.py
(shared with benches/failover_pause.py), whose docstring describes it."""

from testkit.failover import (
    ROOM,
    SNAPSHOT_WITHIN_S,
    Member,
    Outcome,
    RelayProcess,
    Stream,
    Writer,
    fresh_join_state,
    health,
    lost_keys,
    read_history,
    relay_args,
    relay_process,
    snapshot_agrees,
    state_of,
    wait_healthy,
)

__all__ = [
    "ROOM",
    "SNAPSHOT_WITHIN_S",
    "Member",
    "Outcome",
    "RelayProcess",
    "Stream",
    "Writer",
    "fresh_join_state",
    "health",
    "lost_keys",
    "read_history",
    "relay_args",
    "relay_process",
    "snapshot_agrees",
    "state_of",
    "wait_healthy",
]
