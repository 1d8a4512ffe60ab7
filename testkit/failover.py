"""A steady stream through real relays while something breaks, and the checks after it.

Used by tests/test_sentinel_failover.py (as `failover_harness`, its name in tests/) and
benches/failover_pause.py; the Redis/Sentinel topology comes from kit/topology.py. Relays run as
subprocesses (`python -m kasagi_relay --sentinels ...`: the real CLI, real signals); the
writers and members are real WebSocket clients spread over the relays:

- a Writer sends merge deltas `{"<writer>-<n>": n}` with idempotency key `<writer>-<n>`,
  one at a time; on `unavailable` it retries the same key, on a lost connection it
  reconnects (to the next relay) and retries the same key. It records every ack.
- a Member joins the room, applies every frame to its own copy of the state with the pure
  engine, records violations (a `from` that is not the previous seq + 1), resets and frame
  arrival times; when its relay dies it rejoins the next relay with `since`.

`check()` then compares everything with the history on the current master.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from kasagi_relay import _pydelta
from kasagi_relay.compaction import LOCK_TTL_MS
from kit.topology import Topology
from testkit.relay import Client, RelayProcess, connect_client, relay_process

ROOM = "arena"


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


def _reply_to(rid: int) -> Callable[[dict[str, Any]], bool]:
    def match(m: dict[str, Any]) -> bool:
        return m.get("id") == rid and m.get("t") in ("ack", "error")

    return match


@dataclass
class Writer:
    name: str
    urls: list[str]
    idx: int
    interval: float = 0.03
    acked: dict[str, int] = field(default_factory=dict)
    # (acked at, seq, first sent at) per acknowledged delta
    ack_times: list[tuple[float, int, float]] = field(default_factory=list)
    unavailable: int = 0
    reconnects: int = 0
    given_up: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _client: Client | None = None
    _stack: contextlib.AsyncExitStack | None = None

    async def _connect(self) -> Client:
        if self._client is None:
            self._stack = contextlib.AsyncExitStack()
            while True:
                try:
                    self._client = await self._stack.enter_async_context(
                        connect_client(self.urls[self.idx % len(self.urls)])
                    )
                    break
                except (OSError, InvalidHandshake, InvalidStatus, TimeoutError):
                    self.idx += 1
                    await asyncio.sleep(0.1)
        return self._client

    async def _drop(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def send_one(self, key: str, value: int, deadline: float) -> int | None:
        rid = 0
        sent_at = time.monotonic()
        while time.monotonic() < deadline:
            rid += 1
            client = await self._connect()
            try:
                await client.send(
                    {"t": "delta", "room": ROOM, "merge": {key: value}, "key": key, "id": rid}
                )
                reply, _ = await client.recv_until(_reply_to(rid), within=20)
            except (ConnectionClosed, OSError):
                self.reconnects += 1
                self.idx += 1
                await self._drop()
                continue
            if reply["t"] == "ack":
                seq = int(reply["seq"])
                self.acked[key] = seq
                self.ack_times.append((time.monotonic(), seq, sent_at))
                return seq
            if reply.get("code") == "unavailable":
                self.unavailable += 1
                await asyncio.sleep(0.05)
                continue
            self.errors.append(f"{key}: {reply}")
            return None
        self.given_up.append(key)
        return None

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        try:
            while not stop.is_set():
                await self.send_one(f"{self.name}-{n}", n, time.monotonic() + 30)
                n += 1
                await asyncio.sleep(self.interval)
        finally:
            await self._drop()


@dataclass
class Member:
    name: str
    urls: list[str]
    idx: int
    state: bytes = b"{}"
    seq: int = -1
    violations: list[str] = field(default_factory=list)
    resets: int = 0
    rejoins: int = 0
    full_rejoins: int = 0
    frame_times: list[float] = field(default_factory=list)
    joined: asyncio.Event = field(default_factory=asyncio.Event)

    def _apply(self, m: dict[str, Any]) -> None:
        if m["from"] != self.seq + 1:
            self.violations.append(f"from {m['from']} after seq {self.seq}")
        doc = {"patch": m["patch"]} if "patch" in m else {"merge": m["merge"]}
        # PROTOCOL.md: a delta that fails at its position is a no-op.
        with contextlib.suppress(_pydelta.DeltaError):
            self.state = _pydelta.apply(self.state, json.dumps(doc).encode())
        self.seq = m["seq"]
        self.frame_times.append(time.monotonic())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with connect_client(self.urls[self.idx % len(self.urls)]) as c:
                    since = self.seq if self.seq >= 0 else None
                    j = await c.join(ROOM, since=since)
                    if since is not None:
                        self.rejoins += 1
                    if j.get("resumed"):
                        if j["seq"] != self.seq:
                            self.violations.append(f"resumed at {j['seq']}, held {self.seq}")
                    else:
                        if since is not None:
                            self.full_rejoins += 1
                        self.state = json.dumps(j["state"]).encode()
                        self.seq = j["seq"]
                    self.joined.set()
                    while not stop.is_set():
                        try:
                            m = await c.recv(within=0.5)
                        except TimeoutError:
                            continue
                        if m["t"] == "delta":
                            self._apply(m)
                        elif m["t"] == "reset":
                            self.resets += 1
                            self.state = json.dumps(m["state"]).encode()
                            self.seq = m["seq"]
                            self.frame_times.append(time.monotonic())
            except (ConnectionClosed, OSError, InvalidHandshake, InvalidStatus, TimeoutError):
                self.idx += 1
                await asyncio.sleep(0.1)

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
        diverged = [
            f"{m.name}: seq {m.seq} vs {last}"
            for m in self.members
            if m.seq != last or json.loads(m.state) != expect
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
