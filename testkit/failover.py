"""A steady stream through real relays while something breaks, and the checks after it.

Used by tests/test_sentinel_failover.py (as `failover_harness`, its name in tests/) and
benches/failover_pause.py; the Redis/Sentinel topology comes from kit/topology.py. Relays run as
subprocesses (`python -m kasagi_relay --sentinels ...`: the real CLI, real signals); the
writers and members are the project's own client (`kasagi_relay.client.Client`) over real
WebSockets, spread over the relays:

- a Writer sends merge deltas `{"<writer>-<n>": n}` with idempotency key `<writer>-<n>`,
  one at a time, with `Client.send`: on `unavailable` and on a lost connection the client
  sends the same key again (to the next relay after a reconnect). It records every ack.
- a Member joins the room with `Client.join` and follows it with `async for`; the client
  resumes with `since` on the next relay when its relay dies.

The harness does not trust the client's bookkeeping: a Member applies every change's delta
to its own copy of the state with the pure engine (`_pydelta`, not the engine the client
uses), checks that each delta starts at its previous seq + 1, and adds the client's own
records (`gaps`, `disconnects`, "reset" changes) on top. `Stream.finish()` then compares the
writers' acks and both copies of every member's state with the history on the current master;
the tests compare that with a fresh join (a raw WebSocket client) and the compacted snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from kasagi_relay import _pydelta
from kasagi_relay.client import Change, Client, ConnectionFailed, KasagiError, RelayError
from kasagi_relay.client.protocol import json_bytes
from kasagi_relay.compaction import LOCK_TTL_MS
from kit.topology import Topology
from testkit.relay import RelayProcess, connect_client, relay_process

ROOM = "arena"
# The client's reconnect and `unavailable` backoff (full jitter): capped at 0.1 s, so the
# pause the harness measures is the relay's and Redis's, not a client waiting out a backoff
# (on average the 0.05-0.1 s the hand-written clients before it slept between attempts).
MIN_DELAY_S = 0.05
MAX_DELAY_S = 0.1
# `unavailable` is retried until the writer's own deadline (SEND_WITHIN_S), not a count.
UNAVAILABLE_RETRIES = 1_000_000
SEND_WITHIN_S = 30.0


def relay_args(topo: Topology, ack: str, *extra: str) -> list[str]:
    sentinels = ",".join(f"{h}:{p}" for h, p in topo.sentinel_addrs)
    return [
        "--sentinels", sentinels, "--master", topo.master_name, "--ack", ack,
        "--history", "100000", "--compaction-interval", "1", "--log-level", "info",
        "--rate-limit", "0", *extra,
    ]  # fmt: skip


def health(url: str) -> dict[str, Any]:
    http = url.replace("ws://", "http://").replace("/ws", "/healthz")
    try:
        with urllib.request.urlopen(http, timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        return body
    except Exception as exc:
        return {"ok": False, "error": repr(exc)}


async def wait_healthy(urls: list[str], master: tuple[str, int] | None, within: float) -> float:
    """Until every relay's /healthz is ok (on `master` when given); returns the wait."""
    t0 = time.monotonic()
    want = None if master is None else f"{master[0]}:{master[1]}"
    async with asyncio.timeout(within):
        while True:
            states = [await asyncio.to_thread(health, u) for u in urls]
            if all(s.get("ok") and (want is None or s.get("master") == want) for s in states):
                return time.monotonic() - t0
            await asyncio.sleep(0.1)


def new_client(urls: list[str], idx: int) -> Client:
    """A client whose first connection goes to relay `idx` (each reconnect to the next)."""
    n = idx % len(urls)
    return Client(
        [*urls[n:], *urls[:n]],
        min_delay=MIN_DELAY_S,
        max_delay=MAX_DELAY_S,
        unavailable_retries=UNAVAILABLE_RETRIES,
    )


@dataclass
class Writer:
    name: str
    urls: list[str]
    idx: int
    interval: float = 0.03
    acked: dict[str, int] = field(default_factory=dict)
    # (acked at, seq, first sent at) per acknowledged delta
    ack_times: list[tuple[float, int, float]] = field(default_factory=list)
    # The client's counters, summed over the clients this writer had (one unless one failed).
    unavailable: int = 0  # `unavailable` replies, each followed by a resend of the same key
    reconnects: int = 0  # connections lost and made again
    resent: int = 0  # deltas sent again (after a reconnect or an `unavailable`)
    given_up: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _client: Client | None = None

    async def _connect(self) -> Client:
        while self._client is None:
            client = new_client(self.urls, self.idx)
            try:
                await client.connect()
            except ConnectionFailed as exc:
                self.errors.append(f"connect: {exc}")
                self.idx += 1
                await asyncio.sleep(0.1)
                continue
            self._client = client
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
            self.unavailable += client.unavailable
            self.reconnects += len(client.disconnects)
            self.resent += client.resent

    async def send_one(self, key: str, value: int, deadline: float) -> int | None:
        sent_at = time.monotonic()
        while (left := deadline - time.monotonic()) > 0:
            client = await self._connect()
            try:
                async with asyncio.timeout(left):
                    seq = await client.send(ROOM, merge={key: value}, key=key)
            except TimeoutError:
                break
            except RelayError as exc:
                self.errors.append(f"{key}: {exc}")
                return None
            except KasagiError as exc:
                # The client gave up on its connection: a new client, the same key.
                self.errors.append(f"{key}: {exc!r}; a new client sends it again")
                await self._drop()
                self.idx += 1
                continue
            self.acked[key] = seq
            self.ack_times.append((time.monotonic(), seq, sent_at))
            return seq
        self.given_up.append(key)
        return None

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        try:
            while not stop.is_set():
                await self.send_one(f"{self.name}-{n}", n, time.monotonic() + SEND_WITHIN_S)
                n += 1
                await asyncio.sleep(self.interval)
        finally:
            await self._drop()


@dataclass
class Member:
    name: str
    urls: list[str]
    idx: int
    # The member's own copy: every change's delta applied with the pure engine.
    state: bytes = b"{}"
    seq: int = -1
    # The client's copy (`Room.state_json`, `Room.seq`) when the member stopped.
    client_state: bytes = b"{}"
    client_seq: int = -1
    violations: list[str] = field(default_factory=list)
    resets: int = 0  # states replaced by the relay (`reset`) while connected
    rejoins: int = 0  # joins with `since` after a lost connection
    full_rejoins: int = 0  # ... answered with a full state instead of the missed deltas
    frame_times: list[float] = field(default_factory=list)
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    _disconnects_seen: int = 0

    def _apply(self, change: Change, disconnects: int) -> None:
        self.frame_times.append(time.monotonic())
        if change.kind == "delta":
            if change.from_seq != self.seq + 1:
                self.violations.append(f"from {change.from_seq} after seq {self.seq}")
            assert change.delta is not None
            # docs/protocol.md: a delta that fails at its position is a no-op.
            with contextlib.suppress(_pydelta.DeltaError):
                self.state = _pydelta.apply(self.state, json_bytes(change.delta))
        elif disconnects > self._disconnects_seen:
            # The first change after a reconnect is a state: the resume was not possible.
            self.full_rejoins += 1
            self.state = json_bytes(change.state)
        else:
            self.resets += 1
            self.state = json_bytes(change.state)
        self.seq = change.seq
        self._disconnects_seen = disconnects

    async def _follow(self, client: Client, stop: asyncio.Event) -> None:
        room = await client.join(ROOM)
        if self.seq >= 0:
            # A new client after one failed: its join is a full one.
            self.full_rejoins += 1
        self.state, self.seq = room.state_json, room.seq
        self._disconnects_seen = 0
        self.joined.set()

        async def close_on_stop() -> None:
            await stop.wait()
            await client.close()  # ends the iteration below

        closer = asyncio.create_task(close_on_stop())
        try:
            async for change in room:
                self._apply(change, len(client.disconnects))
        finally:
            closer.cancel()
            self.client_state, self.client_seq = room.state_json, room.seq

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            client = new_client(self.urls, self.idx)
            try:
                async with client:
                    await self._follow(client, stop)
            except KasagiError as exc:
                # Reconnecting is the client's job: a client that gives up is a failure.
                self.violations.append(f"client failed: {exc!r}")
                self.idx += 1
                await asyncio.sleep(0.1)
            finally:
                self.rejoins += len(client.disconnects)
                self.violations += [f"client rejoined: {gap}" for gap in client.gaps]

    def max_gap(self, start: float, end: float) -> float:
        times = [start, *(t for t in self.frame_times if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


@dataclass
class Outcome:
    last_seq: int
    lost: list[str]  # acknowledged keys missing from the master's history
    duplicated: list[str]  # keys present more than once
    wrong_seq: list[str]  # acked seq differs from the key's position in history
    diverged: list[str]  # members whose state/seq differ from the history's
    violations: dict[str, list[str]]
    resets: int
    unavailable: int
    acked: int
    pause_s: float | None  # fault -> first ack of a delta sent after it
    max_gap_s: float  # worst time without frames for any member, from the fault on
    notes: list[str] = field(default_factory=list)


def lost_keys(acked: dict[str, int], ops: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """Acknowledged keys whose delta the history does not hold."""
    present = {k for _, doc in ops for k in doc.get("merge", {})}
    return [k for k in acked if k not in present]


async def read_history(topo: Topology) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
    host, port = topo.master_addr()
    r = aioredis.Redis(host=host, port=port, password=topo.password)
    try:
        last = int(await r.get(f"room:{{{ROOM}}}:seq") or 0)
        entries: list[Any] = await r.xrange(f"room:{{{ROOM}}}:ops")  # type: ignore[assignment]
        snap = await r.hgetall(f"room:{{{ROOM}}}:snapshot")
    finally:
        await r.aclose()
    ops = []
    for eid, fields in entries:
        doc = {fields[b"k"].decode(): json.loads(fields[b"d"])}
        ops.append((int(eid.split(b"-")[0]), doc))
    if snap and ops and ops[0][0] != 1:
        raise AssertionError("history was trimmed: raise --history for this test")
    return last, ops


def state_of(ops: list[tuple[int, dict[str, Any]]]) -> Any:
    data = _pydelta.compact(b"{}", [json.dumps(d).encode() for _, d in ops])
    return json.loads(data)


class Stream:
    """Writers and members over some relays; `fault_at` is set by the test."""

    def __init__(self, urls: list[str], writers: int = 4, members: int = 4) -> None:
        self.urls = urls
        self.writers = [Writer(f"w{i}", urls, i) for i in range(writers)]
        self.members = [Member(f"m{i}", urls, i) for i in range(members)]
        self.stop_writers = asyncio.Event()
        self.stop_members = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.fault_at = 0.0

    async def start(self) -> None:
        self.tasks += [asyncio.create_task(m.run(self.stop_members)) for m in self.members]
        async with asyncio.timeout(10):
            for m in self.members:
                await m.joined.wait()
        self.tasks += [asyncio.create_task(w.run(self.stop_writers)) for w in self.writers]

    def acked_count(self) -> int:
        return sum(len(w.acked) for w in self.writers)

    async def wait_acks_after(self, t: float, n: int, within: float) -> None:
        async with asyncio.timeout(within):
            while sum(1 for w in self.writers for at, _, _ in w.ack_times if at > t) < n:  # noqa: ASYNC110 (polls other tasks' records)
                await asyncio.sleep(0.05)

    async def finish(self, topo: Topology, *, settle: float = 15.0) -> Outcome:
        self.stop_writers.set()
        writer_tasks = self.tasks[len(self.members) :]
        await asyncio.gather(*writer_tasks)
        last, ops = await read_history(topo)
        # Members catch up to the end of the history (or time out and show divergence).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle):
                while any(m.seq < last for m in self.members):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        end = time.monotonic()
        self.stop_members.set()
        await asyncio.gather(*self.tasks[: len(self.members)])
        expect = state_of(ops)
        where: dict[str, list[int]] = {}
        for seq, doc in ops:
            for k in doc.get("merge", {}):
                where.setdefault(k, []).append(seq)
        lost: list[str] = []
        dup: list[str] = []
        wrong: list[str] = []
        for w in self.writers:
            for key, seq in w.acked.items():
                seqs = where.get(key, [])
                if not seqs:
                    lost.append(key)
                elif seqs != [seq]:
                    (dup if len(seqs) > 1 else wrong).append(f"{key}: acked {seq}, history {seqs}")
        dup += [f"{k}: {v}" for k, v in where.items() if len(v) > 1 and f"{k}: " not in str(dup)]
        # Both copies: the member's own (pure engine) and the client's.
        diverged = [
            f"{m.name}: seq {m.seq} (client {m.client_seq}) vs {last}"
            for m in self.members
            if m.seq != last
            or m.client_seq != last
            or json.loads(m.state) != expect
            or json.loads(m.client_state) != expect
        ]
        # The pause: from the fault to the ack of the first delta SENT after it (a delta in
        # flight at the fault may have been acked by the old master just before).
        first_after = [
            at for w in self.writers for at, _, sent in w.ack_times if sent >= self.fault_at
        ]
        pause = (min(first_after) - self.fault_at) if first_after else None
        return Outcome(
            last_seq=last,
            lost=lost,
            duplicated=dup,
            wrong_seq=wrong,
            diverged=diverged,
            violations={m.name: m.violations for m in self.members if m.violations},
            resets=sum(m.resets for m in self.members),
            unavailable=sum(w.unavailable for w in self.writers),
            acked=self.acked_count(),
            pause_s=pause,
            max_gap_s=max(m.max_gap(self.fault_at, end) for m in self.members),
        )

    async def cancel(self) -> None:
        self.stop_writers.set()
        self.stop_members.set()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t


async def fresh_join_state(url: str) -> tuple[int, Any]:
    async with connect_client(url) as c:
        j = await c.join(ROOM)
        return int(j["seq"]), j["state"]


# A compaction that was running when the master died leaves its lock on the new master until
# the lock expires; the relays compact every second after that.
SNAPSHOT_WITHIN_S = LOCK_TTL_MS / 1000 + 5.0


async def snapshot_agrees(
    topo: Topology, within: float = SNAPSHOT_WITHIN_S
) -> tuple[int, Any, Any]:
    """Wait for compaction to cover the whole history; (seq, snapshot state, history state)."""
    last, ops = await read_history(topo)
    expect = state_of(ops)
    host, port = topo.master_addr()
    r = aioredis.Redis(host=host, port=port, password=topo.password)
    snap: dict[Any, Any] = {}
    try:
        async with asyncio.timeout(within):
            while True:
                snap = await r.hgetall(f"room:{{{ROOM}}}:snapshot")
                if snap and int(snap[b"seq"]) == last:
                    return last, json.loads(snap[b"data"]), expect
                await asyncio.sleep(0.2)
    except TimeoutError:
        at = int(snap[b"seq"]) if snap else None
        raise AssertionError(
            f"no snapshot of the whole history after {within:.0f} s: snapshot at seq {at}, "
            f"history at seq {last}"
        ) from None
    finally:
        await r.aclose()


__all__ = [
    "ROOM",
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
