"""Background compaction: fold each room's history into a snapshot, then trim the history.

Per room, under a short backend lock (one relay at a time), one of two ways:

- **from live state**, for a room this relay holds: its state is already the room's at its
  seq, so its compact JSON (the engine's encoding, made off the loop) is written if newer
  than the stored snapshot, guarded by the store (`Snapshots.write_live_snapshot`): only
  while the history still holds the last ops the room applied, at their seqs. After a
  failover a relay may hold a delta the new master lost, and a snapshot of that state
  would make every relay load it; the store refuses it and the pass falls back to:
- **from the history**: read the snapshot and the ops after it, `delta.compact` them in a
  worker thread (the native engine releases the GIL), write the snapshot only if it is
  newer. Rooms this relay has not loaded (or whose last op it no longer keeps) go this way.

Then trim the history to the configured count, age and bytes (`history_bytes`,
docs/operations.md) so that resumes keep working for recent members while a room of large
deltas cannot hold more than its byte budget. The trim never passes the snapshot (the
backend's rule), so the state is never lost.

The backend keeps no timestamps per op, so age is tracked here: each pass notes the room's
last seq with the time; ops older than `history_age_s` are those up to the newest mark older
than that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from kasagi_relay import delta
from kasagi_relay.backends.base import Backend, Snapshot
from kasagi_relay.loops import cancel_and_wait
from kasagi_relay.metrics import Metrics

__all__ = ["Compactor", "LiveRoom", "RoomLocked", "compact_room"]

logger = logging.getLogger("kasagi_relay.compaction")

LOCK_TTL_MS = 10_000


class RoomLocked(Exception):
    """Another compaction of the room holds its lock (maybe a relay that died holding it)."""


class LiveRoom(Protocol):
    """A room this relay holds (room.Room), as compaction sees it."""

    @property
    def seq(self) -> int:
        """The seq of the state, readable without touching it."""
        ...

    async def live_snapshot(self) -> tuple[int, bytes, list[str]] | None:
        """(seq, state as compact JSON, `domain.op_digest`s of the last ops the room applied
        as it received them, newest first: the op at seq, the one before...), the state
        exactly at that seq; None when the room cannot say (not loaded, or it no longer
        keeps the op at seq as stored)."""
        ...


class Stats:
    """How the passes went, per room compaction (tests and benches read them)."""

    __slots__ = ("live", "refused", "replayed")

    def __init__(self) -> None:
        self.live = 0  # snapshots written from live state
        self.refused = 0  # live states the store refused: compacted from the history
        self.replayed = 0  # compactions from the history (snapshot + ops)


async def compact_room(
    backend: Backend,
    room: str,
    *,
    history: int,
    keep_from: int = 0,
    history_bytes: int = 0,
    max_state_bytes: int = 0,
    max_state_memory: int = 0,
    live: LiveRoom | None = None,
    stats: Stats | None = None,
) -> Snapshot | None:
    """One compaction of `room`; the new snapshot, or None when there was nothing new.

    With `live` (the room as this relay holds it), from its state when the store takes it,
    else from the history (the module's docstring).

    `max_state_bytes` must be the relays' --max-state-bytes: a delta that would take the
    state past it is a no-op in the rooms, so it must be one in the snapshot too; the same
    for `max_state_memory` (--max-state-memory).

    Raises RoomLocked when the room's lock is held elsewhere: that is not the same as
    "nothing new", since the holder may have died before covering the history.
    """
    token = await backend.snapshots.acquire_lock(room, LOCK_TTL_MS)
    if token is None:
        raise RoomLocked(room)
    try:
        if live is not None:
            done, new = await _from_live(backend, room, live, stats)
            if done:
                await backend.snapshots.trim(room, keep_from, history, history_bytes)
                return new
        if stats is not None:
            stats.replayed += 1
        snap = await backend.snapshots.read_snapshot(room)
        base_seq, data = (snap.seq, snap.data) if snap is not None else (0, b"{}")
        ops = await backend.log.read_ops(room, base_seq)
        if not ops:  # None: trimmed past our snapshot (someone newer wrote one)
            await backend.snapshots.trim(room, keep_from, history, history_bytes)
            return None
        deltas = [op.delta for op in ops]
        data = await asyncio.to_thread(
            delta.compact, data, deltas, max_state_bytes, max_state_memory
        )
        new = Snapshot(ops[-1].seq, data, snap.tick if snap is not None else 0)
        written = await backend.snapshots.write_snapshot(room, new)
        await backend.snapshots.trim(room, keep_from, history, history_bytes)
        return new if written else None
    finally:
        await backend.snapshots.release_lock(room, token)


async def _from_live(
    backend: Backend, room: str, live: LiveRoom, stats: Stats | None
) -> tuple[bool, Snapshot | None]:
    """Compaction from `live` (the caller holds the lock): (True, the snapshot written or
    None when nothing is newer than the stored one), or (False, None) when it must be
    done from the history instead."""
    stored = await backend.snapshots.snapshot_seq(room)
    if live.seq <= stored:
        # Nothing newer here (another relay compacted as far, or further: the room here
        # lags behind it by at most what it has not applied yet).
        return True, None
    got = await live.live_snapshot()
    if got is None:
        return False, None
    seq, data, ops = got
    if seq <= stored:
        return True, None
    new = Snapshot(seq, data)
    written = await backend.snapshots.write_live_snapshot(room, new, ops)
    if written is None:
        if stats is not None:
            stats.refused += 1
        logger.warning(
            "room %s: the store no longer holds this relay's ops up to %d (lost in a "
            "failover?): compacting from the history",
            room,
            seq,
        )
        return False, None
    if stats is not None and written:
        stats.live += 1
    return True, (new if written else None)


class Compactor:
    def __init__(
        self,
        backend: Backend,
        rooms: Callable[[], Iterable[tuple[str, int]]],
        metrics: Metrics,
        *,
        interval_s: float,
        history: int,
        history_age_s: float,
        history_bytes: int = 0,
        max_state_bytes: int = 0,
        max_state_memory: int = 0,
        live: Callable[[str], LiveRoom | None] | None = None,
    ) -> None:
        """`rooms()` gives (name, last seq seen) of the rooms this relay holds;
        `history_bytes` bounds each room's history by bytes of deltas (0: no limit);
        `max_state_bytes` is the rooms' state limit (see compact_room); `live(name)` the
        room as this relay holds it, to compact from its state (None: from the history)."""
        self.backend = backend
        self.rooms = rooms
        self.metrics = metrics
        self.interval_s = interval_s
        self.history = history
        self.history_age_s = history_age_s
        self.history_bytes = history_bytes
        self.max_state_bytes = max_state_bytes
        self.max_state_memory = max_state_memory
        self.live = live
        self.stats = Stats()
        self._marks: dict[str, deque[tuple[float, int]]] = {}
        self._compacted: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        # Set by `stop`: the task ends at the next room or pass even when the cancellation
        # does not reach it (see `stop`).
        self._stopping = False

    def start(self) -> None:
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="kasagi-compaction")

    async def stop(self) -> None:
        """End the periodic passes: at once, or at the pass's next room. A cancellation
        can be lost in a pass's Redis calls (loops.cancel_and_wait): `cancel_and_wait`
        cancels again, and the flag ends the pass at its next room meanwhile. In one CI run
        a relay's graceful shutdown waited here for good, its compaction task "cancelling"
        and still running a pass every 0.2 s."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.interval_s)
            if not self._stopping:
                await self.run_once()

    def _keep_from(self, room: str, seq: int, now: float) -> int:
        marks = self._marks.setdefault(room, deque())
        if not marks or marks[-1][1] != seq:
            marks.append((now, seq))
        keep_from = 0
        while marks and now - marks[0][0] > self.history_age_s:
            keep_from = marks.popleft()[1] + 1
        return keep_from

    async def run_once(self) -> int:
        """Compact every room with new ops; returns how many snapshots were written."""
        written = 0
        now = time.monotonic()
        live = set()
        for room, seq in list(self.rooms()):
            # One room per turn of the loop, whatever the backend: nothing in a pass from
            # live state on the memory backend has to suspend, and a pass over 1,000 small
            # rooms takes 70-240 ms of the loop (docs/benchmarks.md, many rooms).
            await asyncio.sleep(0)
            if self._stopping:
                return written
            live.add(room)
            keep_from = self._keep_from(room, seq, now)
            if self._compacted.get(room) == seq:
                continue
            held = self.live(room) if self.live is not None else None
            try:
                snap = await compact_room(
                    self.backend,
                    room,
                    history=self.history,
                    keep_from=keep_from,
                    history_bytes=self.history_bytes,
                    max_state_bytes=self.max_state_bytes,
                    max_state_memory=self.max_state_memory,
                    live=held,
                    stats=self.stats,
                )
            except RoomLocked:
                # Not marked as done: after a failover the lock of a compaction that died
                # with the old master lives on for LOCK_TTL_MS, and if every relay took
                # that as done, a room that then went quiet would never be compacted.
                continue
            except Exception as exc:
                self.metrics.backend_errors.inc()
                logger.warning("room %s: compaction failed: %s", room, exc)
                continue
            if held is None or held.seq >= seq:
                # A live state behind `seq` (ops not applied yet) covered less: next pass.
                self._compacted[room] = seq
            if snap is not None:
                written += 1
        for gone in set(self._marks) - live:
            self._marks.pop(gone, None)
            self._compacted.pop(gone, None)
        return written
