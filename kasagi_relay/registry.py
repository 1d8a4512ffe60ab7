"""The rooms this relay holds: load on first use, unload the least recently used past
--max-loaded-rooms, forget the idle ones (--room-idle). It is also the backend's listener:
sequenced ops arrive here and go to their room, where they are ordered (room.py).
"""

from __future__ import annotations

import asyncio
import heapq
import time

from kasagi_relay.backends.base import Backend
from kasagi_relay.domain import Op
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import BadRequest
from kasagi_relay.room import Room

__all__ = ["RoomRegistry"]


class RoomRegistry:
    """Room name -> loaded `Room`, within `max_loaded` (0: no limit)."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        *,
        max_loaded: int,
        idle_s: float,
        tick_s: float,
        max_state_bytes: int = 0,
        max_state_memory: int = 0,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_loaded = max_loaded
        self.idle_s = idle_s
        self.tick_s = tick_s
        self.max_state_bytes = max_state_bytes
        self.max_state_memory = max_state_memory
        self.rooms: dict[str, Room] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def get(self, name: str) -> Room | None:
        return self.rooms.get(name)

    async def load(self, name: str) -> Room:
        """The room, taken into the registry first if it is not (within max_loaded).

        Raises BadRequest("unavailable") when every loaded room is in use."""
        room = self.rooms.get(name)
        if room is not None:
            return room
        limit = self.max_loaded
        if limit and len(self.rooms) >= limit:
            # Without a limit, deltas to ever new rooms (which need no membership) would
            # load rooms faster than the sweeper frees them. Unload a batch, so that a flood
            # of new rooms does not scan every room each time.
            await self._unload_idle(max(1, limit // 100))
            room = self.rooms.get(name)  # loaded by another request meanwhile
            if room is not None:
                return room
            if len(self.rooms) >= limit:
                raise BadRequest(
                    "unavailable",
                    f"this relay holds its limit of {limit} rooms, all in use; "
                    "retry later or through another relay",
                )
        # No await from the check above to here: the limit holds.
        room = self.rooms[name] = Room(
            name,
            self.backend,
            self.metrics,
            tick_s=self.tick_s,
            max_bytes=self.max_state_bytes,
            max_memory=self.max_state_memory,
        )
        self.metrics.rooms.set(len(self.rooms))
        return room

    async def _unload_idle(self, count: int) -> None:
        """Unload up to `count` rooms without members or work, least recently used first."""
        now = time.monotonic()
        idle = [(room.last_active, name) for name, room in self.rooms.items() if room.idle(now, 0)]
        for _, name in heapq.nsmallest(count, idle):
            # Checked again: unloading the previous one awaited, and a join may have begun.
            room = self.rooms.get(name)
            if room is not None and room.idle(time.monotonic(), 0):
                await self._unload(name)

    async def _unload(self, name: str) -> None:
        room = self.rooms.pop(name, None)
        if room is not None:
            self.metrics.rooms.set(len(self.rooms))
            await room.close()

    def room_seqs(self) -> list[tuple[str, int]]:
        """(name, last seq) of every loaded room, for the compactor."""
        return [(name, r.last_seq) for name, r in self.rooms.items() if r.loaded]

    # ------------------------------------------------------------------ idle sweep

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="kasagi-room-sweeper")

    async def _sweep(self) -> None:
        """Forget rooms nobody used for idle_s: unsubscribe, free the state."""
        while True:
            await asyncio.sleep(max(1.0, self.idle_s / 4))
            now = time.monotonic()
            for name, room in list(self.rooms.items()):
                if room.idle(now, self.idle_s):
                    await self._unload(name)

    async def close(self) -> None:
        """Stop the sweep and close every room."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for room in list(self.rooms.values()):
            await room.close()
        self.rooms.clear()
        self.metrics.rooms.set(0)

    # ------------------------------------------------------------------ backend listener

    def on_op(self, room: str, op: Op) -> None:
        r = self.rooms.get(room)
        if r is not None:
            r.on_op(op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        targets = (
            self.rooms.values()
            if rooms is None
            else [self.rooms[name] for name in rooms if name in self.rooms]
        )
        for r in list(targets):
            r.start_backfill()
