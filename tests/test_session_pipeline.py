"""Pipelined publishes of one connection (issue 15), on a real relay over a real
redis-server: deltas sent back to back are handed to Redis without waiting for each other's
round trip, and still get seqs in the order sent, with their acks and errors in request order.

Redis' `CLIENT PAUSE <ms> WRITE` holds every FCALL the relay sends for a while: deltas are
then certainly in flight together, which is when the order of replies, the checks of
dependent deltas and the bound on deltas in flight matter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from kasagi_relay.backends.memory import MemoryBackend, MemoryLog, RoomTable
from kasagi_relay.config import Config
from kasagi_relay.domain import DeltaKind
from kasagi_relay.server import Relay
from kasagi_relay.session import PIPELINE_DEPTH
from testkit.redis import Topology, redis_server  # noqa: F401
from testkit.relay import Client, connect_client, start_relay

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def redis_relay(topo: Topology) -> AsyncIterator[tuple[Relay, aioredis.Redis]]:
    port = topo.servers[0].port
    admin = aioredis.Redis(port=port)
    try:
        async with start_relay(Config(redis=f"redis://127.0.0.1:{port}/0")) as relay:
            yield relay, admin
    finally:
        await admin.aclose()


def merge(i: int) -> dict[str, Any]:
    return {"t": "delta", "room": "r", "merge": {f"k{i}": i}, "id": i}


async def replies(client: Client, n: int) -> list[dict[str, Any]]:
    """The next `n` acks and errors (delta frames of rooms joined are skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        m = await client.recv(10.0)
        if m["t"] in ("ack", "error"):
            out.append(m)
    return out


async def pause_writes(admin: aioredis.Redis, ms: int) -> None:
    await admin.execute_command("CLIENT", "PAUSE", ms, "WRITE")  # type: ignore[no-untyped-call]


async def test_burst_acked_in_order_with_seqs_in_order(redis_server: Topology) -> None:  # noqa: F811
    n = 3 * PIPELINE_DEPTH
    async with redis_relay(redis_server) as (relay, admin), connect_client(relay.url) as c:
        for i in range(n):
            await c.send(merge(i))
        acks = await replies(c, n)
        assert [a["t"] for a in acks] == ["ack"] * n
        assert [(a["id"], a["seq"]) for a in acks] == [(i, i + 1) for i in range(n)]
        ops: list[tuple[bytes, dict[bytes, bytes]]] = await admin.xrange("room:{r}:ops")  # type: ignore[assignment]
        assert [entry_id for entry_id, _ in ops] == [f"{i + 1}-0".encode() for i in range(n)]
        assert [fields[b"d"] for _, fields in ops] == [b'{"k%d":%d}' % (i, i) for i in range(n)]


async def test_deltas_are_in_flight_together_up_to_the_bound(
    redis_server: Topology,  # noqa: F811
) -> None:
    """While Redis holds the writes, one connection has PIPELINE_DEPTH deltas handed over
    (not one, not more); when Redis goes on, all of them are acked in order."""
    n = PIPELINE_DEPTH + 8
    async with redis_relay(redis_server) as (relay, admin), connect_client(relay.url) as c:
        await c.delta("r", merge={"warm": 1}, id="warm")  # the room is loaded, the link up
        await pause_writes(admin, 1500)
        for i in range(n):
            await c.send(merge(i))
        most = 0
        for _ in range(80):  # 0.8 s of the 1.5 s pause
            most = max(most, relay.service.inflight)
            await asyncio.sleep(0.01)
        assert most == PIPELINE_DEPTH
        acks = await replies(c, n)
        assert [(a["t"], a["id"], a["seq"]) for a in acks] == [("ack", i, i + 2) for i in range(n)]


async def test_dependent_delta_in_flight_is_not_bad_patch(redis_server: Topology) -> None:  # noqa: F811
    """`add /a` then `add /a/b` back to back: the second is checked while the first is still
    in Redis (paused), waits for it to come back, and applies."""
    async with redis_relay(redis_server) as (relay, admin), connect_client(relay.url) as c:
        await c.join("r")
        await c.delta("r", merge={"warm": 1}, id="warm")
        await pause_writes(admin, 300)
        await c.send(
            {
                "t": "delta",
                "room": "r",
                "patch": [{"op": "add", "path": "/a", "value": {}}],
                "id": 1,
            }
        )
        await c.send(
            {
                "t": "delta",
                "room": "r",
                "patch": [{"op": "add", "path": "/a/b", "value": 2}],
                "id": 2,
            }
        )
        got = await replies(c, 2)
        assert [(m["t"], m["id"], m.get("seq")) for m in got] == [("ack", 1, 2), ("ack", 2, 3)]
    async with redis_relay(redis_server) as (relay, _), connect_client(relay.url) as late:
        joined = await late.join("r")
        assert joined["state"] == {"warm": 1, "a": {"b": 2}}


async def test_errors_come_back_in_position(redis_server: Topology) -> None:  # noqa: F811
    """An error decided at once (a malformed delta), one decided after a wait (a patch that
    does not apply) and one from Redis (key_conflict) are answered between the acks of the
    deltas sent around them, although the deltas before them are still in Redis."""
    async with redis_relay(redis_server) as (relay, admin), connect_client(relay.url) as c:
        await c.delta("r", merge={"warm": 1}, id="warm", key="used")
        await pause_writes(admin, 300)
        burst: list[dict[str, Any]] = [
            merge(1),
            merge(2),
            {"t": "delta", "room": "r", "id": 3},  # neither patch nor merge: bad_message
            merge(4),
            {"t": "delta", "room": "r", "patch": [{"op": "remove", "path": "/nope"}], "id": 5},
            merge(6),
            {**merge(7), "key": "used"},  # the key of another delta: key_conflict from Redis
            merge(8),
        ]
        for message in burst:
            await c.send(message)
        got = await replies(c, len(burst))
        assert [(m["t"], m["id"], m.get("seq"), m.get("code")) for m in got] == [
            ("ack", 1, 2, None),
            ("ack", 2, 3, None),
            ("error", 3, None, "bad_message"),
            ("ack", 4, 4, None),
            ("error", 5, None, "bad_patch"),
            ("ack", 6, 5, None),
            ("error", 7, None, "key_conflict"),
            ("ack", 8, 6, None),
        ]


async def test_join_after_a_burst_sees_all_of_it(redis_server: Topology) -> None:  # noqa: F811
    """A join sent right behind deltas still in Redis waits for them: its `joined` comes
    after their acks, and the joiner sees all of them."""
    n = 10
    async with redis_relay(redis_server) as (relay, admin), connect_client(relay.url) as c:
        await c.delta("r", merge={"warm": 1}, id="warm")
        await pause_writes(admin, 300)
        for i in range(n):
            await c.send(merge(i))
        await c.send({"t": "join", "room": "r", "id": "j"})
        got = [await c.recv(10.0) for _ in range(n + 1)]
        assert [(m["t"], m["id"]) for m in got] == [("ack", i) for i in range(n)] + [
            ("joined", "j")
        ]
        # The state at `joined`, then the room's frames from there: every delta of the burst
        # (acked means stored; one may reach the room through the channel after the join).
        joined = got[-1]
        state, seq = joined["state"], joined["seq"]
        while seq < n + 1:
            frame = await c.expect("delta")
            assert frame["from"] == seq + 1
            state.update(frame["merge"])
            seq = frame["seq"]
        assert state == {"warm": 1, **{f"k{i}": i for i in range(n)}}


class SlowLog(MemoryLog):
    """The memory log answering each publish after a delay (a slow backend's round trip);
    a delta whose body holds "bug" fails as a bug would (not an error of the protocol)."""

    def __init__(self, table: RoomTable) -> None:
        super().__init__(table)
        self.delays: list[float] = []

    async def publish(self, room: str, kind: DeltaKind, body: bytes, key: str | None = None) -> int:
        # Stored at once, in the order handed over; answered after this publish's delay.
        seq = None if b"bug" in body else await super().publish(room, kind, body, key)
        await asyncio.sleep(self.delays.pop(0) if self.delays else 0.0)
        if seq is None:
            raise RuntimeError("a bug in the backend")
        return seq


class SlowBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.log = self.slow = SlowLog(self.table)


async def test_internal_error_comes_back_in_position(caplog: pytest.LogCaptureFixture) -> None:
    """A publish that fails with a bug is answered `internal` at its position, although the
    deltas after it were answered before it failed."""
    backend = SlowBackend()
    backend.slow.delays = [0.2, 0.3, 0.0, 0.0]
    async with start_relay(backend=backend) as relay, connect_client(relay.url) as c:
        await c.send(merge(1))
        await c.send({"t": "delta", "room": "r", "merge": {"bug": 1}, "id": 2})
        await c.send(merge(3))
        await c.send(merge(4))
        got = await replies(c, 4)
        assert [(m["t"], m["id"], m.get("seq"), m.get("code")) for m in got] == [
            ("ack", 1, 1, None),
            ("error", 2, None, "internal"),
            ("ack", 3, 2, None),
            ("ack", 4, 3, None),
        ]
    assert "a bug in the backend" in caplog.text
