"""Faults under kasagi_relay.client, with real relays, real Redis and real sockets:

- the relay process SIGKILLed (1006) or stopped (SIGTERM, 1001) and started again on the same
  port, over one Redis: every delta acknowledged once, none missed or duplicated in the
  client's stream, its state equal to a fresh join's;
- the client held away until the history no longer reaches its seq: the rejoin gets the full
  state, seen as a "reset" change;
- the client stops reading until the relay drops it with 1013: it reconnects and resumes;
- a Sentinel failover under `--ack replica`: every acknowledged delta is kept.

Holding the client away and making it stop reading is done by a TCP proxy between the client
and the relay (real sockets on both sides), as a network or a stalled reader would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import redis
from kasagi_relay.client import Change, Client, Room
from kasagi_relay.client.protocol import Format
from testkit.failover import ROOM, read_history, relay_args, state_of, wait_healthy
from testkit.redis import Topology, free_port, running_topology
from testkit.relay import RelayProcess, relay_process, start_relay
from testkit.wait import until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis_one(tmp_path: Path) -> Iterator[Topology]:
    with running_topology(tmp_path / "redis", sentinels=False) as topo:
        yield topo


class Recorder:
    """Follows a room through `async for`, keeping every change."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.changes: list[Change] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for change in self.room:
            self.changes.append(change)

    def gaps(self, start: int) -> list[str]:
        """Violations of docs/protocol.md's stream rule: each delta's `from` is the previous
        seq + 1; a reset starts again from its seq."""
        out = []
        seq = start
        for c in self.changes:
            if c.kind == "delta" and c.from_seq != seq + 1:
                out.append(f"from {c.from_seq} after {seq}")
            seq = c.seq
        return out

    async def stop(self) -> None:
        """Once every change the room applied so far has come out of `async for` (the room's
        seq moves first: stopping at once lost the last changes, one CI run in a few)."""
        await until(
            lambda: bool(self.changes) and self.changes[-1].seq >= self.room.seq,
            10,
            f"the changes up to seq {self.room.seq} out of the room's iterator",
        )
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def fresh(url: str, room: str) -> tuple[int, Any]:
    async with Client(url) as c:
        r = await c.join(room)
        return r.seq, r.state


# --------------------------------------------------------------------------- a TCP proxy


class Proxy:
    """127.0.0.1:port -> the relay. `cut()` drops every connection and refuses new ones
    until `heal()`; `pause()` stops reading from the relay (the client reads nothing, the
    relay's send queue grows) until `resume()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def cut(self) -> None:
        self._refusing = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def heal(self) -> None:
        self._refusing = False

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_w.transport.abort()
            return
        # A small receive buffer towards the relay: while paused, the relay's own send
        # queue fills after little data, as behind a slow reader.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.target_port))
        except OSError:
            sock.close()
            client_w.transport.abort()
            return
        relay_r, relay_w = await asyncio.open_connection(sock=sock)
        self._writers |= {client_w, relay_w}
        up = asyncio.create_task(self._pump(client_r, relay_w, paused=False))
        down = asyncio.create_task(self._pump(relay_r, client_w, paused=True))
        self._tasks |= {up, down}
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (client_w, relay_w):
                w.transport.abort()
                self._writers.discard(w)
            for t in (up, down):
                t.cancel()
                self._tasks.discard(t)

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, paused: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                if paused:
                    await self._flowing.wait()
                data = await r.read(1 << 16)
                if not data:
                    return
                w.write(data)
                await w.drain()


@contextlib.asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# --------------------------------------------------------------------------- the tests


def ops_by_key(port: int, room: str) -> dict[str, list[int]]:
    """Every merge key in the room's history on Redis, with the seqs that wrote it."""
    r = redis.Redis(port=port)
    try:
        entries: list[Any] = r.xrange(f"room:{{{room}}}:ops")  # type: ignore[assignment]
    finally:
        r.close()
    where: dict[str, list[int]] = {}
    for eid, fields in entries:
        for key in json.loads(fields[b"d"]):
            where.setdefault(key, []).append(int(eid.split(b"-")[0]))
    return where


@pytest.mark.parametrize(
    ("sig", "fmt", "code"),
    [
        pytest.param(signal.SIGKILL, "json", 1006, id="sigkill-json"),
        pytest.param(signal.SIGKILL, "msgpack", 1006, id="sigkill-msgpack"),
        pytest.param(signal.SIGTERM, "msgpack", 1001, id="sigterm-msgpack"),
    ],
)
async def test_a_relay_restarted_under_the_client_loses_and_repeats_nothing(
    redis_one: Topology, sig: int, fmt: Format, code: int
) -> None:
    redis_port = redis_one.servers[0].port
    args = ("--redis", f"redis://127.0.0.1:{redis_port}/0", "--rate-limit", "0")
    port = free_port()
    total = 80
    acked: dict[str, int] = {}
    relay: RelayProcess
    async with relay_process(*args, port=str(port)) as relay:
        url = relay.url
        async with Client(url, format=fmt, min_delay=0.05, max_delay=0.5) as client:
            room = await client.join("game")
            rec = Recorder(room)

            async def write() -> None:
                for i in range(total):
                    key = f"k{i}"
                    acked[key] = await room.send(merge={key: i}, key=key)
                    await asyncio.sleep(0.01)

            writer = asyncio.create_task(write())
            await until(lambda: len(acked) >= 20, 20, "20 acks before the fault")
            await relay.terminate(sig)
            # While it is down the writer's delta waits; the client retries connecting.
            async with relay_process(*args, port=str(port)) as again:
                await asyncio.wait_for(writer, 60)
                last, state = await fresh(again.url, "game")
                await until(lambda: room.seq == last, 20, f"the client to reach seq {last}")
                await rec.stop()
                assert client.disconnects == [code]
                # The delta waiting during the outage went again, with its key.
                assert client.resent >= 1
                assert client.gaps == []
                assert last == total
                assert sorted(acked.values()) == list(range(1, total + 1))  # one seq each
                assert ops_by_key(redis_port, "game") == {k: [s] for k, s in acked.items()}
                assert room.state == state == {f"k{i}": i for i in range(total)}
                # Resumed with `since`: every delta arrived once, in order, no reset.
                assert rec.gaps(0) == []
                assert [c.kind for c in rec.changes] == ["delta"] * len(rec.changes)
                assert rec.changes[-1].seq == total
                assert rec.changes[-1].state == state


async def test_with_two_relays_it_moves_to_the_other_when_one_dies(redis_one: Topology) -> None:
    redis_port = redis_one.servers[0].port
    args = ("--redis", f"redis://127.0.0.1:{redis_port}/0", "--rate-limit", "0")
    async with (
        relay_process(*args) as a,
        relay_process(*args) as b,
        Client([a.url, b.url], format="msgpack", min_delay=0.05) as client,
    ):
        assert client.url == a.url
        room = await client.join("game")
        rec = Recorder(room)
        for i in range(10):
            await room.send(merge={f"k{i}": i})
        await a.terminate(signal.SIGKILL)
        for i in range(10, 20):
            await room.send(merge={f"k{i}": i})
        last, state = await fresh(b.url, "game")
        await until(lambda: room.seq == last, 20, f"the client to reach seq {last}")
        await rec.stop()
        assert client.url == b.url and client.disconnects == [1006]
        assert last == 20 and room.state == state == {f"k{i}": i for i in range(20)}
        assert ops_by_key(redis_port, "game") == {f"k{i}": [i + 1] for i in range(20)}
        assert rec.gaps(0) == [] and client.gaps == []
        assert [c.kind for c in rec.changes] == ["delta"] * len(rec.changes)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_held_away_past_the_history_the_rejoin_replaces_the_state(fmt: Format) -> None:
    async with (
        start_relay(history=5, compaction_interval_s=0.2, rate_limit=0) as relay,
        proxy_to(relay.port) as proxy,
        Client(relay.url) as writer,
        Client(proxy.url, format=fmt, min_delay=0.05, max_delay=0.2) as client,
    ):
        room = await client.join("r")
        rec = Recorder(room)
        for i in range(3):
            await writer.send("r", merge={"n": i})
        await until(lambda: room.seq == 3, 10, "seq 3")
        proxy.cut()
        # More than the relay keeps in memory (256 deltas) and than --history 5.
        for i in range(3, 303):
            await writer.send("r", merge={"n": i, f"k{i % 7}": i})
        await asyncio.sleep(1.0)  # compaction trims the history meanwhile
        proxy.heal()
        last, state = await fresh(relay.url, "r")
        await until(lambda: room.seq == last, 20, f"the client to reach seq {last}")
        await until(lambda: rec.changes != [] and rec.changes[-1].seq == last, 5, "the last change")
        await rec.stop()
        assert client.disconnects == [1006]
        assert client.gaps == []  # a full joined is a replacement, not a broken stream
        assert room.state == state and state["n"] == 302
        kinds = [(c.kind, c.seq) for c in rec.changes]
        assert kinds[:3] == [("delta", 1), ("delta", 2), ("delta", 3)]
        assert kinds[3] == ("reset", last)
        assert rec.changes[3].state == state
        assert rec.gaps(0) == []


async def test_a_client_that_stops_reading_is_dropped_with_1013_and_resumes() -> None:
    async with (
        start_relay(
            send_queue_bytes=64 * 1024, close_timeout_s=10, rate_limit=0, rate_bytes=0
        ) as relay,
        proxy_to(relay.port) as proxy,
        Client(relay.url) as writer,
        Client(proxy.url, format="msgpack", min_delay=0.05, max_delay=0.2) as client,
    ):
        room = await client.join("r")
        rec = Recorder(room)
        await writer.send("r", merge={"n": 0})
        await until(lambda: room.seq == 1, 10, "seq 1")
        proxy.pause()
        blob = "x" * 32_000
        n = 1
        async with asyncio.timeout(30):
            while not relay.metrics.dropped_members._value.get():
                n += 1
                await writer.send("r", merge={"blob": blob, "n": n})
        assert n < 400, n
        proxy.resume()
        for _ in range(5):
            n += 1
            await writer.send("r", merge={"n": n})
        last, state = await fresh(relay.url, "r")
        await until(lambda: room.seq == last, 20, f"the client to reach seq {last}")
        await rec.stop()
        assert client.disconnects == [1013]
        assert client.gaps == []
        assert room.state == state and state["n"] == n
        # It resumed with `since`: nothing missed, nothing twice, no reset needed.
        assert rec.gaps(0) == []
        assert [c.kind for c in rec.changes] == ["delta"] * len(rec.changes)
        assert rec.changes[-1].seq == last


async def test_a_sentinel_failover_keeps_every_acknowledged_delta(tmp_path: Path) -> None:
    with running_topology(tmp_path / "topology") as topo:
        async with relay_process(*relay_args(topo, "replica")) as relay:
            await wait_healthy([relay.url], topo.master_addr(), 15)
            async with Client(relay.url, min_delay=0.05, max_delay=0.5) as client:
                room = await client.join(ROOM)
                rec = Recorder(room)
                acked: dict[str, int] = {}
                stop = asyncio.Event()

                async def write() -> None:
                    i = 0
                    while not stop.is_set():
                        key = f"f{i}"
                        acked[key] = await room.send(merge={key: i}, key=key)
                        i += 1
                        await asyncio.sleep(0.02)

                writer = asyncio.create_task(write())
                await until(lambda: len(acked) >= 20, 20, "20 acks before the failover")
                old = topo.master_addr()
                await asyncio.to_thread(topo.failover)
                await asyncio.to_thread(topo.wait_master_change, old)
                before = len(acked)
                await until(lambda: len(acked) >= before + 20, 30, "20 acks after the failover")
                stop.set()
                await asyncio.wait_for(writer, 30)
                last, ops = await read_history(topo)
                await until(lambda: room.seq == last, 20, f"the client to reach seq {last}")
                await rec.stop()
                where: dict[str, list[int]] = {}
                for seq, doc in ops:
                    for key in doc.get("merge", {}):
                        where.setdefault(key, []).append(seq)
                assert where == {k: [s] for k, s in acked.items()}  # kept, once, at its seq
                assert room.state == state_of(ops) == {k: int(k[1:]) for k in acked}
                assert room.state == (await fresh(relay.url, ROOM))[1]
                assert rec.gaps(0) == []
