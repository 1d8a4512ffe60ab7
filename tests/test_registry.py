"""The room registry (registry.py) on a real MemoryBackend: least-recently-used unload within
max_loaded, rooms in use never unloaded, `unavailable` when every room is in use."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from kasagi_relay.backends.memory import MemoryBackend
from kasagi_relay.metrics import Metrics
from kasagi_relay.protocol import BadRequest
from kasagi_relay.registry import RoomRegistry


@contextlib.asynccontextmanager
async def registry(max_loaded: int) -> AsyncIterator[RoomRegistry]:
    backend = MemoryBackend()
    reg = RoomRegistry(backend, Metrics(), max_loaded=max_loaded, idle_s=60, tick_s=0)
    backend.set_listener(reg)
    await backend.start()
    try:
        yield reg
    finally:
        await reg.close()
        await backend.close()


async def test_the_least_recently_used_idle_room_is_unloaded() -> None:
    async with registry(max_loaded=2) as reg:
        a = await reg.load("a")
        await reg.load("b")
        a.last_active = time.monotonic() + 1  # used after b
        await reg.load("c")
        assert sorted(reg.rooms) == ["a", "c"]
        assert await reg.load("a") is a  # loaded rooms are returned as they are


async def test_rooms_in_use_stay_and_a_new_room_is_unavailable() -> None:
    async with registry(max_loaded=2) as reg:
        a = await reg.load("a")
        b = await reg.load("b")
        a._joining = b._joining = 1  # a join under way in each: in use
        with pytest.raises(BadRequest) as info:
            await reg.load("c")
        assert info.value.code == "unavailable" and "2 rooms" in info.value.message
        assert sorted(reg.rooms) == ["a", "b"]
        b._joining = 0
        await reg.load("c")
        assert sorted(reg.rooms) == ["a", "c"]
        assert reg.metrics.rooms._value.get() == 2


async def test_ops_reach_only_loaded_rooms() -> None:
    async with registry(max_loaded=0) as reg:
        room = await reg.load("r")
        await room.ensure_loaded()
        await reg.backend.publish("r", "merge", b'{"a":1}')
        await reg.backend.publish("elsewhere", "merge", b'{"a":1}')
        assert room.last_seq == 1 and sorted(reg.rooms) == ["r"]
        assert reg.room_seqs() == [("r", 1)]
