"""Fan-out load harness: N members in one room, an open-loop publisher, three servers.

What it measures, per server (kasagi-relay, and two references on the same clients in the
same run: `floor_server.py`, the least a Python server can do per member, and
`plain_relay.py`, the idiomatic `websockets.broadcast` relay):

- N members over real TCP sockets to the server, all joined (docs/protocol.md `join`) to one
  room. They live in 1-2 client processes (`--clients`, uvloop, a raw WebSocket client that
  parses only the frame header and the numbers it needs), apart from the server, which runs
  as its own subprocess. With 2 CPUs the server is pinned to CPU 0 and the clients and the
  publisher to CPU 1 (`--no-pin` to let the kernel place them), so the server has one core
  to itself and client work never hides server cost; the table prints both CPU loads.
- An open-loop publisher: one more connection (not a member) sending
  `{"t":"delta","room":R,"merge":{"ts":<scheduled ns>,"n":<i>}}` on a fixed schedule
  (a SCHED_FIFO thread sleeping to each scheduled instant; a late send is never
  rescheduled, and the lateness is reported).
- A shared machine: before each step the harness waits (up to `--wait-quiet` s) for other
  processes to idle, and reports the CPU they took during each step ("other CPU").
- Latency of every delta at every member = receipt time of the frame covering it minus the
  delta's *scheduled* time (CLOCK_MONOTONIC, shared by all processes), so a server that
  falls behind is charged for it (no coordinated omission). A frame `from` A `seq` B may
  cover several deltas (the relay merges what queued during the previous broadcast); its
  `ts` is delta B's, and delta j's scheduled time is ts - (B - j) * period. Each covered
  delta counts as one delivery. Histograms at 1 µs up to 100 ms, 100 µs beyond.
- Correctness on every member: the first `from` after `joined` is the joined seq + 1 and
  every later `from` is the previous `seq` + 1 (gaps and duplicates are errors), every
  frame's `seq - n` stays constant (the frame carries the delta it claims), and every
  member receives the last delta of each step. Errors, resets and closes are counted.
- RSS per idle connection: VmRSS of the server (/proc/PID/status) with N joined, idle
  members, minus VmRSS before they connected (after one probe join, so the room exists and
  lazy imports are done), divided by N. Kernel socket buffers are not in RSS.

A ramp finds where each server stops keeping up: from `--start-rate` (default 10,000/N)
deltas/s, doubling while a step of `--duration` s "keeps up" (every member gets every delta
within `--drain` s after the step, no error, no member lost, p99 <= max(`--p99-bound-ms`,
default 100 ms, 3x the p99 of the server's first ramp step: with thousands of members one
broadcast alone takes tens of ms, and the bound is there to catch a backlog that grows
through the step, not to judge latency), and at most `--merge-limit` 1.05 deltas per
frame), then `--refine` bisection steps
between the last step kept up and the first not, then an overload step at `--overload` (2) x
that rate. Past its limit the floor and the plain relay fall behind (a backlog, drained after
the step); the relay merges the deltas that arrive while its previous broadcast is in flight
into one frame and stays on time. It merges some deltas well before it is saturated too, so
the merge limit only ends its ramp, it does not define its capacity:

- frames/s (saturation): the most member-frames/s any ramp or overload step delivered inside
  its window (frames received between the first scheduled send and the end of the schedule,
  divided by its length); deliveries/s likewise (deltas covered, higher with merging).
- capacity (deltas/s) = saturation frames/s / N: the delta rate the server can fan out one
  frame per delta. The same definition for all three servers, independent of merging and of
  the latency bound. Latency is measured at half of it, in a step twice as long.
- kept up: the highest ramp rate that kept up, as defined above.
- frames/CPU-s: member-frames per CPU-second of the server over the steps where it used at
  least half its core: its efficiency, whoever set the pace (on 2 cores the clients may).

Targets (issue 3): relay frames/s >= 0.8x floor and >= 1.5x plain; relay p99 <= tick + 5 ms at
half capacity; relay RSS <= 16 KiB per idle connection.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python -m benches.fanout.harness --members 5000
    .venv/bin/python -m benches.fanout.harness --members 200 --duration 1.5 --servers floor,relay
    .venv/bin/python -m benches.fanout.harness --members 5000 --rates 10,20,40   # fixed rates
    .venv/bin/python -m benches.fanout.harness --members 1000 --tick-ms 10  # relay's tick
    .venv/bin/python -m benches.fanout.harness --members 5000 --json run.json
    .venv/bin/python -m benches.fanout.harness --from-json run.json  # tables again, no run

Prints progress on stderr and the markdown tables on stdout (`--json PATH` also writes all
numbers). `--profile DIR` samples each server with py-spy (found on PATH or in $PY_SPY; run
non-blocking, on the clients' CPU) during its overload step, writes the collapsed stacks to
DIR/<server>.txt and prints each server's top functions.
The relay runs as `python -m kasagi_relay --rate-limit 0 --tick-ms T` (the publisher sends
faster than the default per-connection limit); `--relay-arg` adds flags (e.g.
`--relay-arg=--send-queue-bytes=4MiB`); `--relay-module M` runs `python -m M` instead, to
try a variant of the relay (a module on PYTHONPATH that patches it and calls
`kasagi_relay.cli.main`) under the same load. A full 5,000-member run takes ~4 minutes.
`pytest benches/test_fanout.py` runs a reduced configuration and asserts the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

try:  # websockets' C helper for masking client frames
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - pure-Python fallback
    from websockets.utils import apply_mask

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ROOM = "bench"
SUBPROTOCOL = "kasagi.v1.json"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SERVERS = ("floor", "relay", "plain")
monotonic_ns = time.monotonic_ns

# Latency histogram: 1 µs buckets below FINE_US, then COARSE_US-wide buckets.
FINE_US = 100_000
COARSE_US = 100

# The frames all three servers send for the publisher's deltas (compact JSON, this key
# order). Anything else takes the json.loads path, which is correct but slower.
DELTA_RE = re.compile(
    rb'\{"t":"delta","room":"[^"]*","from":(\d+),"seq":(\d+),"merge":\{"ts":(\d+),"n":(\d+)\}\}'
)


# Every member receives the same bytes for one delta: the parse of a frame (header included)
# is cached by its bytes, so only the first of N members pays for the regex.
_PARSED: dict[bytes, tuple[int, int, int, int]] = {}
_PARSED_MAX = 4096


def log(message: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """Soft fd limit up to the hard one: 5,000 sockets do not fit in the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A complete, final, masked frame (client to server, RFC 6455 5.2-5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


def handshake_request(host: str, port: int) -> tuple[bytes, bytes]:
    """(request bytes, the Sec-WebSocket-Accept value the server must answer)."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    request = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    ).encode()
    return request, accept


def check_handshake(head: bytes, accept: bytes) -> str | None:
    """None when `head` (the response up to the blank line) accepts our upgrade."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        return lines[0].decode("latin-1", "replace")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            return None if value.strip() == accept else "bad Sec-WebSocket-Accept"
    return "no Sec-WebSocket-Accept"


def split_url(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"ws://\[?([^\]/]+?)\]?:(\d+)/ws", url)
    if m is None:
        raise ValueError(f"not a ws://host:port/ws URL: {url}")
    return m.group(1), int(m.group(2))


# --------------------------------------------------------------------------- histograms


def percentiles_ms(counts: dict[int, int], qs: Sequence[float]) -> list[float | None]:
    """Percentiles (ms) of a {µs bucket: count} histogram."""
    total = sum(counts.values())
    if not total:
        return [None for _ in qs]
    keys = sorted(counts)
    out: list[float | None] = []
    for q in qs:
        rank = math.ceil(q * total)
        acc = 0
        for k in keys:
            acc += counts[k]
            if acc >= rank:
                out.append(k / 1000)
                break
    return out


def merge_counts(parts: Sequence[dict[int, int]]) -> dict[int, int]:
    out: Counter[int] = Counter()
    for p in parts:
        out.update(p)
    return dict(out)


# --------------------------------------------------------------------------- client side


class ClientError(Exception):
    pass


class Member(asyncio.Protocol):
    """One member: handshake, join, then every frame is checked and timed.

    `data_received` is the harness's hot path (one call per member per frame at most): the
    frame header is parsed inline, delta frames by one anchored regex match."""

    __slots__ = (
        "accept",
        "buf",
        "closing",
        "joined",
        "last",
        "offset",
        "request",
        "state",
        "transport",
        "w",
    )

    def __init__(self, w: Worker, joined: asyncio.Future[None]) -> None:
        self.w = w
        self.joined = joined
        self.request, self.accept = handshake_request(w.host, w.port)
        self.buf = b""
        self.state = 0  # 0: handshake, 1: joining, 2: member, 3: gone
        self.last = 0
        self.offset: int | None = None  # seq - n, constant for one publisher
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only compatible.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        w = self.w
        if self.state == 2 and not self.closing:
            w.lost += 1
        self.state = 3
        if not self.joined.done():
            self.joined.set_exception(ClientError(f"connection lost: {exc}"))
        w.gone(self)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(0x8, (1000).to_bytes(2, "big")))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        else:
            # The common case: exactly one delta frame, parsed already for another member.
            hit = _PARSED.get(data)
            if hit is not None:
                self.delta(hit[0], hit[1], hit[2], hit[3], monotonic_ns())
                return
        if self.state == 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            problem = check_handshake(data[:end], self.accept)
            if problem is not None:
                self.joined.set_exception(ClientError(f"handshake refused: {problem}"))
                assert self.transport is not None
                self.transport.close()
                return
            data = data[end + 4 :]
            self.state = 1
            assert self.transport is not None
            self.transport.write(
                client_frame(0x1, b'{"t":"join","room":"%s"}' % self.w.room.encode())
            )
        now = monotonic_ns()
        pos, n = 0, len(data)
        match = DELTA_RE.match
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            stop = start + length
            if stop > n:
                break
            if data[pos] == 0x81:  # final text frame
                m = match(data, start, stop)
                if m is not None:
                    parsed = (int(m[1]), int(m[2]), int(m[3]), int(m[4]))
                    if len(_PARSED) >= _PARSED_MAX:
                        _PARSED.clear()
                    _PARSED[data[pos:stop] if pos or stop < n else data] = parsed
                    self.delta(parsed[0], parsed[1], parsed[2], parsed[3], now)
                else:
                    self.message(data[start:stop], now)
            else:
                self.control(data[pos] & 0x0F, data[start:stop])
            pos = stop
        if pos < n:
            self.buf = data[pos:]

    def delta(self, first: int, seq: int, ts: int, n: int, now: int) -> None:
        w = self.w
        if first != self.last + 1:
            if first <= self.last:
                w.dups += 1
            else:
                w.gaps += 1
        self.last = seq
        offset = seq - n
        if offset != self.offset:
            if self.offset is not None:
                w.mismatches += 1
            self.offset = offset
        k = seq - first + 1
        w.frames += 1
        w.deliveries += k
        if now <= w.t_end:
            w.frames_in += 1
            w.deliveries_in += k
        lat = now - ts
        fine = w.fine
        if k == 1:
            us = lat // 1000
            if 0 <= us < FINE_US:
                fine[us] += 1
            else:
                w.slow_bucket(us)
            return
        period = w.period
        for j in range(k):
            us = (lat + j * period) // 1000
            if 0 <= us < FINE_US:
                fine[us] += 1
            else:
                w.slow_bucket(us)

    def message(self, payload: bytes, now: int) -> None:
        """Every text message that is not a publisher delta in the usual shape."""
        w = self.w
        try:
            msg = json.loads(payload)
            t = msg["t"]
        except (ValueError, KeyError, TypeError):
            w.unexpected["unparsable"] += 1
            return
        if t == "delta":
            w.slow_path += 1
            try:
                body = msg["merge"]
                self.delta(int(msg["from"]), int(msg["seq"]), int(body["ts"]), int(body["n"]), now)
            except (KeyError, TypeError, ValueError):
                w.unexpected["delta without from/seq/merge.ts/merge.n"] += 1
        elif t == "joined" and self.state == 1:
            self.last = int(msg["seq"])
            self.state = 2
            if not self.joined.done():
                self.joined.set_result(None)
        elif t == "reset":
            w.resets += 1
            self.last = int(msg["seq"])
        elif t == "error":
            w.unexpected["error " + str(msg.get("code"))] += 1
            if self.state == 1 and not self.joined.done():
                self.joined.set_exception(ClientError(f"join refused: {msg}"))
        else:
            w.unexpected[f"message t={t}"] += 1

    def control(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == 0x9:  # ping: the relay and websockets ping every 20 s
            self.transport.write(client_frame(0xA, payload))
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.closing:
                self.w.unexpected[f"closed by server {code}"] += 1
                self.closing = True
                if not self.transport.is_closing():
                    self.transport.write(client_frame(0x8, payload[:2]))
            self.transport.close()
        elif opcode != 0xA:
            self.w.unexpected[f"opcode {opcode}"] += 1


class Worker:
    """One client process: a share of the members, driven by commands over a pipe."""

    def __init__(self, conn: mpc.Connection) -> None:
        self.conn = conn
        self.host = ""
        self.port = 0
        self.room = ROOM
        self.members: set[Member] = set()
        self.reset_step(0, 1 << 62, 1)

    def reset_step(self, t_start: int, t_end: int, period: int) -> None:
        self.t_start, self.t_end, self.period = t_start, t_end, period
        self.fine = [0] * FINE_US
        self.coarse: Counter[int] = Counter()
        self.frames = self.deliveries = self.frames_in = self.deliveries_in = 0
        self.gaps = self.dups = self.mismatches = self.resets = self.lost = self.slow_path = 0
        self.unexpected: Counter[str] = Counter()

    def slow_bucket(self, us: int) -> None:
        self.coarse[max(0, us) // COARSE_US * COARSE_US] += 1

    def gone(self, member: Member) -> None:
        self.members.discard(member)

    def histogram(self) -> dict[int, int]:
        out = {us: c for us, c in enumerate(self.fine) if c}
        for us, c in self.coarse.items():
            out[us] = out.get(us, 0) + c
        return out

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A thread waits on the pipe: loop.add_reader would make its fd non-blocking,
            # and a large reply (a histogram) would then fail with EAGAIN.
            name, args = await loop.run_in_executor(None, self.conn.recv)
            if name == "exit":
                await self.cmd_close()
                self.conn.send({})
                return
            try:
                reply = await getattr(self, "cmd_" + name)(*args)
            except Exception as exc:
                reply = {"exception": f"{type(exc).__name__}: {exc}"}
            self.conn.send(reply)

    async def _connect_one(self, sem: asyncio.Semaphore) -> str | None:
        loop = asyncio.get_running_loop()
        async with sem:
            problem = "?"
            for _ in range(3):
                joined: asyncio.Future[None] = loop.create_future()
                transport = None
                try:
                    async with asyncio.timeout(30):
                        transport, member = await loop.create_connection(
                            lambda: Member(self, joined),  # noqa: B023 - awaited right here
                            self.host,
                            self.port,
                        )
                        await joined
                    self.members.add(member)
                    return None
                except (OSError, TimeoutError, ClientError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                    if transport is not None:
                        transport.abort()
                    await asyncio.sleep(0.2)
            return problem

    async def cmd_connect(
        self, host: str, port: int, room: str, count: int, concurrency: int
    ) -> dict[str, Any]:
        """Connect and join members until `count` are joined."""
        self.host, self.port, self.room = host, port, room
        started = time.perf_counter()
        sem = asyncio.Semaphore(concurrency)
        missing = count - len(self.members)
        problems = await asyncio.gather(*(self._connect_one(sem) for _ in range(missing)))
        failed = [p for p in problems if p is not None]
        return {
            "members": len(self.members),
            "failed": len(failed),
            "problems": dict(Counter(failed).most_common(3)),
            "seconds": time.perf_counter() - started,
        }

    async def cmd_start(self, t_start: int, t_end: int, period: int) -> dict[str, Any]:
        self.reset_step(t_start, t_end, period)
        # No cyclic-GC pause inside a step (a full collection over thousands of members
        # would show up as latency): collect now, then only between steps.
        gc.collect()
        gc.freeze()
        gc.disable()
        return {}

    async def cmd_finish(self, final_n: int, drain_s: float) -> dict[str, Any]:
        """Wait (up to drain_s) until every member has delta `final_n`, then report."""
        deadline = time.monotonic() + drain_s
        while True:
            behind = [m for m in self.members if m.offset is None or m.last - m.offset < final_n]
            if not behind or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        gc.unfreeze()
        gc.enable()
        return {
            "members": len(self.members),
            "incomplete": len(behind),
            "frames": self.frames,
            "deliveries": self.deliveries,
            "frames_in": self.frames_in,
            "deliveries_in": self.deliveries_in,
            "gaps": self.gaps,
            "dups": self.dups,
            "mismatches": self.mismatches,
            "resets": self.resets,
            "lost": self.lost,
            "slow_path": self.slow_path,
            "unexpected": dict(self.unexpected),
            "hist": self.histogram(),
        }

    async def cmd_quiet(self, quiet_s: float, max_s: float) -> dict[str, Any]:
        """Wait until no frame arrived for quiet_s (an overloaded server drains)."""
        deadline = time.monotonic() + max_s
        seen = -1
        while time.monotonic() < deadline and seen != self.frames:
            seen = self.frames
            await asyncio.sleep(quiet_s)
        return {"frames": self.frames}

    async def cmd_close(self) -> dict[str, Any]:
        members = list(self.members)
        for m in members:
            m.close()
        deadline = time.monotonic() + 10
        while self.members and time.monotonic() < deadline:  # noqa: ASYNC110 - polling is fine here
            await asyncio.sleep(0.05)
        for m in list(self.members):
            if m.transport is not None:
                m.transport.abort()
        self.members.clear()
        return {"closed": len(members)}


def worker_main(conn: mpc.Connection, cpus: list[int] | None) -> None:
    import uvloop

    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    uvloop.run(Worker(conn).run())


class Clients:
    """The client processes (multiprocessing, spawn) and their command pipes."""

    def __init__(self, procs: int, cpus: list[int] | None) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[mpc.Connection] = []
        self.procs: list[Any] = []
        for i in range(procs):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(theirs, cpus), name=f"fanout-clients-{i}", daemon=True
            )
            p.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def call(self, name: str, args: Sequence[tuple[Any, ...]] | tuple[Any, ...] = ()) -> list[Any]:
        """Run one command on every worker (per-worker args when given a list of tuples)."""
        per = list(args) if isinstance(args, list) else [tuple(args)] * len(self.pipes)
        for pipe, a in zip(self.pipes, per, strict=True):
            pipe.send((name, a))
        replies = [pipe.recv() for pipe in self.pipes]
        for r in replies:
            if isinstance(r, dict) and "exception" in r:
                raise RuntimeError(f"client worker failed in {name}: {r['exception']}")
        return replies

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                pipe.send(("exit", ()))
                pipe.recv()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------- publisher


class Publisher:
    """The open-loop publisher: a blocking socket, a thread reading its replies."""

    def __init__(self, host: str, port: int, room: str) -> None:
        self.room = room.encode()
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request, accept = handshake_request(host, port)
        self.sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ClientError("publisher: connection closed during the handshake")
            data += chunk
        head, _, self.pending = data.partition(b"\r\n\r\n")
        problem = check_handshake(head, accept)
        if problem is not None:
            raise ClientError(f"publisher: handshake refused: {problem}")
        self.sock.settimeout(None)
        self.n = 0
        self.acks = 0
        self.replies: Counter[str] = Counter()
        self.joined = threading.Event()
        self.lock = threading.Lock()  # pongs from the reader vs deltas from run()
        self.reader = threading.Thread(target=self._read, name="fanout-publisher", daemon=True)
        self.reader.start()

    def _send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        buf = self.pending
        while True:
            pos, n = 0, len(buf)
            while n - pos >= 2:
                length, start = buf[pos + 1] & 0x7F, pos + 2
                if length == 126:
                    length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
                elif length == 127:
                    length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
                if start + length > n:
                    break
                opcode, payload = buf[pos] & 0x0F, buf[start : start + length]
                pos = start + length
                if opcode == 0x9:
                    self._send(client_frame(0xA, payload))
                elif opcode == 0x1:
                    if payload.startswith(b'{"t":"ack"'):
                        self.acks += 1
                    else:
                        t = json.loads(payload).get("t", "?")
                        if t == "error":
                            t += " " + str(json.loads(payload).get("code"))
                        self.replies[t] += 1
                        if t == "joined":
                            self.joined.set()
                elif opcode == 0x8:
                    self.replies["closed"] += 1
                    return
            buf = buf[pos:]
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk

    def probe_join(self) -> None:
        """Join and leave once: the room exists and lazy code paths ran (RSS baseline)."""
        self._send(client_frame(0x1, b'{"t":"join","room":"%s"}' % self.room))
        if not self.joined.wait(10):
            raise ClientError(f"publisher: no joined reply ({dict(self.replies)})")
        self._send(client_frame(0x1, b'{"t":"leave","room":"%s"}' % self.room))
        time.sleep(0.2)
        self.replies.clear()  # joined and left: expected, not errors

    def run(self, t0: int, period: int, count: int) -> list[int]:
        """Send `count` deltas at t0 + i * period; returns how late each send started (ns).

        The sending thread asks for real-time scheduling (SCHED_FIFO; it sleeps between sends,
        so it takes little CPU): at normal priority it shares a core with busy clients and
        wakes up late, then sends the overdue deltas in a burst, which a merging server
        would rightly merge, and that would be the harness's doing, not the server's."""
        lateness: list[int] = []
        failure: list[BaseException] = []

        def send() -> None:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            try:
                self._run(t0, period, count, lateness)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=send, name="fanout-publish")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return lateness

    def _run(self, t0: int, period: int, count: int, lateness: list[int]) -> None:
        head = b'{"t":"delta","room":"%s","merge":{"ts":' % self.room
        for i in range(count):
            sched = t0 + i * period
            delay = sched - monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            self.n += 1
            late = monotonic_ns() - sched
            self._send(client_frame(0x1, head + b'%d,"n":%d}}' % (sched, self.n)))
            lateness.append(late)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(client_frame(0x8, (1000).to_bytes(2, "big")))
        self.reader.join(2)
        self.sock.close()


# --------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    name: str
    argv: list[str]


def server_specs(relay_args: Sequence[str], module: str = "kasagi_relay") -> dict[str, ServerSpec]:
    py = sys.executable
    # The publisher sends faster than the relay's default per-connection rate limits, and
    # waits between steps longer than its idle timeout (it joins no room); every member
    # connects from 127.0.0.1 (past the default per-address cap of 256).
    relay = [
        *(py, "-m", module, "--host", "127.0.0.1", "--port", "0"),
        *("--rate-limit", "0", "--rate-bytes", "0", "--idle-timeout", "0"),
        *("--max-connections-per-address", "0"),
    ]
    return {
        "floor": ServerSpec("floor", [py, str(HERE / "floor_server.py"), "--port", "0"]),
        "relay": ServerSpec("relay", [*relay, *relay_args]),
        "plain": ServerSpec("plain", [py, str(HERE / "plain_relay.py"), "--port", "0"]),
    }


_SERVING = re.compile(r"serving (ws://\S+)")


class ServerProcess:
    """The server under test as its own process, optionally pinned to some CPUs."""

    def __init__(self, spec: ServerSpec, cpus: list[int] | None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KASAGI_")}
        if "KASAGI_PURE_PYTHON" in os.environ:  # benchmark the pure-Python engine on request
            env["KASAGI_PURE_PYTHON"] = os.environ["KASAGI_PURE_PYTHON"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.spec = spec
        self.proc = subprocess.Popen(
            spec.argv,
            cwd=str(REPO),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pin,
        )
        self.stderr: deque[str] = deque(maxlen=200)
        assert self.proc.stderr is not None
        self.url = ""
        deadline = time.monotonic() + 30
        while not self.url:
            line = self.proc.stderr.readline().decode(errors="replace").rstrip("\n")
            if (not line and self.proc.poll() is not None) or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{spec.name} did not start: {list(self.stderr)}")
            self.stderr.append(line)
            m = _SERVING.search(line)
            if m:
                self.url = m.group(1).rstrip('",')
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of whole processes (all threads), from /proc/PID/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy (every CPU, every process), /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- profiles


def start_profiler(
    pid: int, seconds: float, out: Path, cpus: list[int] | None
) -> subprocess.Popen[bytes] | None:
    """py-spy on `pid` for `seconds`, collapsed stacks to `out` (None when not installed)."""
    exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not exe:
        log("--profile: py-spy not found (pip install py-spy, or set PY_SPY)")
        return None

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, math.ceil(seconds)))]
    argv += ["--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin
    )


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """The functions with the most samples, by self time and inclusive, from collapsed stacks
    (`frame;frame;... count` per line, as py-spy --format raw writes them)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r" \((?:[^()]*/)?([^()/]+)\)$", r" (\1)", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return ["(no samples)"]
    out = [f"{total} samples; self time:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("inclusive:")
    out += [f"  {n / total:6.1%}  {f}" for f, n in incl.most_common(top + 8)]
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class Config:
    members: int = 1000
    clients: int = 2
    duration: float = 3.0
    rates: list[float] | None = None  # fixed rates instead of the ramp
    start_rate: float | None = None
    max_rate: float | None = None
    refine: int = 2
    p99_bound_ms: float = 100.0
    # deltas/frame above which a server is behind: a saturated relay merges about rate/capacity
    # deltas per frame, so 1.05 is ~5% overload, near what the p99 bound allows the others.
    merge_limit: float = 1.05
    overload: float = 2.0  # the overload step's rate, x capacity (0: none)
    drain: float = 5.0
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    relay_args: list[str] = field(default_factory=list)
    tick_ms: int = 0
    pin: bool = True
    concurrency: int = 64
    profile: str | None = None  # directory for py-spy profiles of the overload step
    wait_quiet: float = 30.0  # seconds a step may wait for the rest of the machine to idle
    relay_module: str = "kasagi_relay"  # `python -m` this as the relay (a patched variant)

    def resolved_start(self) -> float:
        return self.start_rate or max(1.0, round(10_000 / self.members, 1))

    def resolved_max(self) -> float:
        # A bound on deliveries/s the clients are asked to count (about 1M/s: beyond, the
        # clients' own accounting, not the server, would set the pace).
        return self.max_rate or max(2.0, 1_000_000 / self.members)


@dataclass
class Step:
    rate: float
    duration: float
    deltas: int
    frames_per_s: float
    deliveries_per_s: float
    deltas_per_frame: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    server_cpu: float  # share of one core during the step
    clients_cpu: float
    other_cpu: float  # everything else on the machine (other engineers' work, kernel threads)
    frames_per_server_cpu_s: float  # member-frames delivered per CPU-second of the server
    publisher_late_p99_ms: float
    incomplete: int
    errors: dict[str, int]
    ok: bool
    kind: str = "ramp"

    merge_limit: float = 1.05
    p99_bound_ms: float = 100.0  # the bound this step was held to

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def keeps_up(self) -> bool:
        """Sustained, one frame per delta: under the server's capacity."""
        return self.ok and self.deltas_per_frame <= self.merge_limit

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "behind"
        return "ok" if self.keeps_up else "merging"


@dataclass
class ServerResult:
    name: str
    members: int
    url: str = ""
    rss_before_kib: int = 0
    rss_idle_kib: int = 0
    connect_seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)
    kept_up: float | None = None  # highest ramp rate kept up (one frame per delta, on time)
    half: Step | None = None
    failure: str | None = None
    profile: list[str] = field(default_factory=list)

    @property
    def rss_per_conn_kib(self) -> float:
        return (self.rss_idle_kib - self.rss_before_kib) / max(1, self.members)

    overloaded: Step | None = None

    def _loaded(self) -> list[Step]:
        return [s for s in self.steps if s.kind in ("ramp", "overload")]

    @property
    def peak(self) -> Step | None:
        """The step that delivered the most member-frames/s (saturation)."""
        loaded = self._loaded()
        return max(loaded, key=lambda s: s.frames_per_s) if loaded else None

    @property
    def frames_per_s(self) -> float:
        return max((s.frames_per_s for s in self._loaded()), default=0.0)

    @property
    def capacity(self) -> float | None:
        """Deltas/s the server fans out one frame each: saturation frames/s over members."""
        return self.frames_per_s / self.members if self.frames_per_s else None

    @property
    def deliveries_per_s(self) -> float:
        return max((s.deliveries_per_s for s in self._loaded()), default=0.0)

    @property
    def frames_per_cpu_s(self) -> float:
        """Server efficiency: member-frames per CPU-second of the server, over the loaded
        steps (server CPU >= 50%, where fixed per-step costs no longer count). It does not
        depend on who set the pace (the server, the clients, other load)."""
        loaded = [s for s in self._loaded() if s.server_cpu >= 0.5 and s.frames_per_server_cpu_s]
        if not loaded:
            peak = self.peak
            return peak.frames_per_server_cpu_s if peak is not None else 0.0
        frames = sum(s.frames_per_s * s.deltas / s.rate for s in loaded)
        cpu = sum(s.frames_per_s * s.deltas / s.rate / s.frames_per_server_cpu_s for s in loaded)
        return frames / cpu


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        ncpu = os.cpu_count() or 1
        self.server_cpus: list[int] | None = None
        self.client_cpus: list[int] | None = None
        if cfg.pin and ncpu >= 2:
            # The server gets CPU 0 to itself; clients and publisher share the rest.
            self.server_cpus = [0]
            self.client_cpus = list(range(1, ncpu))

    def run(self) -> dict[str, ServerResult]:
        cfg = self.cfg
        raise_nofile()
        if self.client_cpus:
            os.sched_setaffinity(0, self.client_cpus)  # the publisher, with the clients
        specs = server_specs([*cfg.relay_args, "--tick-ms", str(cfg.tick_ms)], cfg.relay_module)
        results: dict[str, ServerResult] = {}
        clients = Clients(cfg.clients, self.client_cpus)
        try:
            for name in cfg.servers:
                results[name] = self.bench_server(specs[name], clients)
        finally:
            clients.close()
        return results

    def bench_server(self, spec: ServerSpec, clients: Clients) -> ServerResult:
        cfg = self.cfg
        res = ServerResult(spec.name, cfg.members)
        log(f"{spec.name}: starting {' '.join(spec.argv[1:])}")
        server = ServerProcess(spec, self.server_cpus)
        res.url = server.url
        host, port = split_url(server.url)
        pub: Publisher | None = None
        try:
            pub = Publisher(host, port, ROOM)
            pub.probe_join()
            time.sleep(0.3)
            res.rss_before_kib = rss_kib(server.pid)
            shares = [
                cfg.members // cfg.clients + (1 if i < cfg.members % cfg.clients else 0)
                for i in range(cfg.clients)
            ]
            replies = clients.call(
                "connect", [(host, port, ROOM, k, cfg.concurrency) for k in shares]
            )
            joined = sum(r["members"] for r in replies)
            res.connect_seconds = max(r["seconds"] for r in replies)
            if joined != cfg.members:
                problems = [r["problems"] for r in replies]
                raise RuntimeError(f"only {joined}/{cfg.members} members joined: {problems}")
            time.sleep(1.0)  # let the server settle before reading its RSS
            res.rss_idle_kib = rss_kib(server.pid)
            log(
                f"{spec.name}: {joined} members joined in {res.connect_seconds:.1f} s; "
                f"RSS {res.rss_before_kib} -> {res.rss_idle_kib} KiB "
                f"({res.rss_per_conn_kib:.2f} KiB/conn)"
            )
            run = self._stepper(server, clients, pub, res)
            run(min(cfg.resolved_start(), 50.0), 0.5, "warmup")
            if cfg.rates:
                for rate in cfg.rates:
                    run(rate, cfg.duration, "ramp")
                passed = [s.rate for s in res.steps if s.kind == "ramp" and s.keeps_up]
                res.kept_up = max(passed) if passed else None
            else:
                res.kept_up = self._ramp(run)
                if res.kept_up and cfg.overload > 1 and res.kept_up < cfg.resolved_max():
                    res.overloaded = run(res.kept_up * cfg.overload, cfg.duration, "overload")
            if res.capacity:
                res.half = run(round(res.capacity / 2, 1), cfg.duration * 2, "half")
        except Exception as exc:
            res.failure = f"{type(exc).__name__}: {exc}"
            log(f"{spec.name}: FAILED: {res.failure}; server log tail: {list(server.stderr)[-5:]}")
        finally:
            with contextlib.suppress(Exception):
                clients.call("close")
            if pub is not None:
                pub.close()
            server.stop()
        return res

    def _ramp(self, run: Callable[[float, float, str], Step]) -> float | None:
        cfg = self.cfg
        rate, top = cfg.resolved_start(), cfg.resolved_max()
        lo: float | None = None
        hi: float | None = None
        while True:
            step = run(rate, cfg.duration, "ramp")
            if step.keeps_up:
                lo = rate
                if rate >= top:
                    break
                rate = min(rate * 2, top)
            else:
                hi = rate
                if lo is not None or rate <= 0.5:
                    break
                rate /= 2  # even the start failed: search downwards
        for _ in range(cfg.refine):
            if lo is None or hi is None or hi / lo < 1.1:
                break
            mid = round(math.sqrt(lo * hi), 1)
            if run(mid, cfg.duration, "ramp").keeps_up:
                lo = mid
            else:
                hi = mid
        return lo

    @staticmethod
    def _wait_quiet(ours: list[int], limit: float, threshold: float = 0.25) -> None:
        """Wait (at most `limit` s) until the rest of the machine uses under `threshold` of
        one core: other people's builds and tests on a shared box distort every number."""
        deadline = time.monotonic() + limit
        waited = False
        while True:
            m0, o0, w0 = machine_busy_seconds(), cpu_seconds(ours), time.monotonic()
            time.sleep(0.5)
            m1, o1, w1 = machine_busy_seconds(), cpu_seconds(ours), time.monotonic()
            other = max(0.0, (m1 - m0) - (o1 - o0)) / (w1 - w0)
            if other < threshold or time.monotonic() > deadline:
                if waited:
                    log(f"other load now {other:.0%} of a core; going on")
                return
            if not waited:
                log(f"other processes use {other:.0%} of a core: waiting up to {limit:g} s")
                waited = True

    def _stepper(
        self, server: ServerProcess, clients: Clients, pub: Publisher, res: ServerResult
    ) -> Callable[[float, float, str], Step]:
        cfg = self.cfg

        def run(rate: float, duration: float, kind: str) -> Step:
            if cfg.wait_quiet > 0:
                self._wait_quiet([server.pid, os.getpid(), *clients.pids], cfg.wait_quiet)
            count = max(3, round(rate * duration))
            period = round(1e9 / rate)
            t0 = monotonic_ns() + 150_000_000  # time for the workers to arm
            t_end = t0 + count * period
            clients.call("start", (t0, t_end, period))
            profiler = None
            if kind == "overload" and cfg.profile:
                profile_path = Path(cfg.profile) / f"{res.name}.txt"
                profiler = start_profiler(
                    server.pid, (t_end - monotonic_ns()) / 1e9, profile_path, self.client_cpus
                )
            ours = [os.getpid(), *clients.pids]
            s0, c0, m0 = cpu_seconds([server.pid]), cpu_seconds(ours), machine_busy_seconds()
            w0 = time.monotonic()
            lateness = pub.run(t0, period, count)
            s1, c1, m1 = cpu_seconds([server.pid]), cpu_seconds(ours), machine_busy_seconds()
            w1 = time.monotonic()
            replies = clients.call("finish", (pub.n, cfg.drain))
            if profiler is not None:
                try:
                    profiler.wait(30)
                    res.profile = summarize_profile(profile_path)
                except (subprocess.TimeoutExpired, OSError) as exc:
                    profiler.kill()
                    res.profile = [f"profile failed: {exc}"]
            hist = merge_counts([r["hist"] for r in replies])
            p50, p99, p999, pmax = percentiles_ms(hist, (0.5, 0.99, 0.999, 1.0))
            # The server's own latency at the first (lightest) ramp step scales the bound.
            first = next((st for st in res.steps if st.kind == "ramp"), None)
            base = first.p99_ms if first is not None else (p99 if kind == "ramp" else None)
            bound = max(cfg.p99_bound_ms, 3 * base) if base else cfg.p99_bound_ms
            window = (t_end - t0) / 1e9
            frames_in = sum(r["frames_in"] for r in replies)
            deliveries_in = sum(r["deliveries_in"] for r in replies)
            frames = sum(r["frames"] for r in replies)
            deliveries = sum(r["deliveries"] for r in replies)
            errors: Counter[str] = Counter()
            for r in replies:
                for key in ("gaps", "dups", "mismatches", "lost"):
                    errors[key] += r[key]
                errors.update(r["unexpected"])
            errors.update({f"publisher {k}": v for k, v in pub.replies.items() if k != "joined"})
            pub.replies.clear()
            if server.proc.poll() is not None:
                errors["server exited"] += 1
            incomplete = sum(r["incomplete"] for r in replies)
            members = sum(r["members"] for r in replies)
            if members != cfg.members:
                errors["members missing"] += cfg.members - members
            expected = count * cfg.members
            if deliveries < expected and not incomplete:
                errors["deliveries short"] += expected - deliveries
            errors = Counter({k: v for k, v in errors.items() if v})
            late = sorted(lateness)
            step = Step(
                rate=rate,
                duration=duration,
                deltas=count,
                frames_per_s=frames_in / window,
                deliveries_per_s=deliveries_in / window,
                deltas_per_frame=deliveries / frames if frames else 0.0,
                p50_ms=p50,
                p99_ms=p99,
                p999_ms=p999,
                max_ms=pmax,
                server_cpu=(s1 - s0) / (w1 - w0),
                clients_cpu=(c1 - c0) / (w1 - w0),
                other_cpu=max(0.0, (m1 - m0) - (s1 - s0) - (c1 - c0)) / (w1 - w0),
                frames_per_server_cpu_s=frames_in / (s1 - s0) if s1 > s0 else 0.0,
                publisher_late_p99_ms=late[min(len(late) - 1, int(0.99 * len(late)))] / 1e6,
                incomplete=incomplete,
                errors=dict(errors),
                ok=not errors and not incomplete and p99 is not None and p99 <= bound,
                kind=kind,
                merge_limit=cfg.merge_limit,
                p99_bound_ms=bound,
            )
            res.steps.append(step)
            log(
                f"{res.name} {kind} {rate:g}/s x {duration:g}s: {step.frames_per_s:,.0f} frames/s "
                f"{step.deliveries_per_s:,.0f} deliveries/s ({step.deltas_per_frame:.2f}/frame) "
                f"p50/p99/p99.9 {_ms(p50)}/{_ms(p99)}/{_ms(p999)} ms, "
                f"CPU server {step.server_cpu:.0%} clients {step.clients_cpu:.0%} "
                f"other {step.other_cpu:.0%}, "
                f"pub late p99 {step.publisher_late_p99_ms:.2f} ms, incomplete {incomplete}, "
                f"errors {dict(errors) or 0} -> {step.verdict}"
            )
            if not step.ok:
                # Let an overloaded server drain, and replace members it dropped.
                clients.call("quiet", (0.5, 60.0))
                shares = [
                    cfg.members // cfg.clients + (1 if i < cfg.members % cfg.clients else 0)
                    for i in range(cfg.clients)
                ]
                host, port = split_url(server.url)
                clients.call("connect", [(host, port, ROOM, k, cfg.concurrency) for k in shares])
            return step

        return run


# --------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


@dataclass
class Target:
    what: str
    value: float | None
    target: str
    ok: bool


def _ratio(a: float, b: float) -> float | None:
    return a / b if a and b else None


def targets(results: dict[str, ServerResult], tick_ms: int) -> list[Target]:
    """The issue's targets for the relay, on the measured numbers."""
    out: list[Target] = []
    relay, floor, plain = (results.get(k) for k in ("relay", "floor", "plain"))
    if relay is None:
        return out
    if floor is not None:
        r = _ratio(relay.frames_per_s, floor.frames_per_s)
        out.append(Target("relay frames/s vs floor", r, ">= 0.8x", r is not None and r >= 0.8))
    if plain is not None:
        r = _ratio(relay.frames_per_s, plain.frames_per_s)
        out.append(Target("relay frames/s vs plain", r, ">= 1.5x", r is not None and r >= 1.5))
    half = relay.half
    p99 = half.p99_ms if half is not None else None
    ok = half is not None and p99 is not None and p99 <= tick_ms + 5 and not half.error_total
    out.append(Target("relay p99 at half capacity (ms)", p99, f"<= {tick_ms + 5} ms", ok))
    rss = relay.rss_per_conn_kib
    out.append(Target("relay RSS per idle connection (KiB)", rss, "<= 16 KiB", rss <= 16))
    return out


def report(results: dict[str, ServerResult], cfg: Config, bench: Bench | None = None) -> str:
    pinned = (
        f"server pinned to CPU {bench.server_cpus}, clients + publisher to CPU {bench.client_cpus}"
        if bench is not None and bench.server_cpus
        else "no CPU pinning"
    )
    floor, plain = results.get("floor"), results.get("plain")
    lines = [
        f"Fan-out: one room, {cfg.members} members in {cfg.clients} client process(es), one "
        f"open-loop publisher; {_machine()}; {pinned}. On 2 cores the clients cost about as "
        "much CPU per frame as a server: absolute numbers are this box's, ratios are the point.",
        "frames/s and deliveries/s = the most any ramp or overload step delivered inside its "
        "window (saturation; server CPU = in that step); capacity = frames/s / members, the "
        "delta rate fanned out one frame each; latency at half of it, in a "
        f"{cfg.duration * 2:g} s step. kept up = highest ramp rate ({cfg.duration:g} s steps) "
        "with every delta at every member, no error, p99 <= max("
        f"{cfg.p99_bound_ms:g} ms, 3x its first step's) and <= {cfg.merge_limit:g} "
        "deltas/frame; at "
        f"{cfg.overload:g}x that rate: behind = backlog or members dropped, merging = on time "
        "with merged frames. frames/CPU-s = member-frames per CPU-second of the server over "
        "the steps where it used >= 50% of its core (its efficiency, whoever set the pace). "
        f"Relay tick {cfg.tick_ms} ms.",
        "",
        "| server | members | frames/s | deliveries/s | server CPU | frames/CPU-s | "
        "capacity (deltas/s) | kept up (deltas/s) | "
        f"at {cfg.overload:g}x kept up | latency at | p50 ms | p99 ms | "
        "p99.9 ms | RSS/conn KiB | frames/s vs floor | vs plain | frames/CPU-s vs floor | "
        "vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(a: float, ref: ServerResult | None, attr: str) -> str:
        r = _ratio(a, getattr(ref, attr)) if ref is not None else None
        return "-" if r is None else f"{r:.2f}x"

    notes: list[str] = []
    for name, r in results.items():
        if r.failure and not r.steps:
            lines.append(f"| {name} | {r.members} | failed: {r.failure} |" + " |" * 15)
            continue
        h, peak, over = r.half, r.peak, r.overloaded
        over_txt = "-"
        if over is not None:
            over_txt = (
                f"{over.verdict}: {over.deliveries_per_s:,.0f} deliveries/s, "
                f"{over.deltas_per_frame:.1f}/frame, p99 {_ms(over.p99_ms)} ms"
            )
        cap = f"{r.capacity:.1f}" if r.capacity else "-"
        kept = f"{r.kept_up:g}" if r.kept_up else "-"
        if r.kept_up and r.kept_up >= cfg.resolved_max() and not cfg.rates:
            kept = f">= {kept} (max tested)"
            cap = f">= {cap}"
        lines.append(
            f"| {name} | {r.members} | {r.frames_per_s:,.0f} | "
            f"{r.deliveries_per_s:,.0f} | {f'{peak.server_cpu:.0%}' if peak else '-'} | "
            f"{r.frames_per_cpu_s:,.0f} | {cap} | {kept} | {over_txt} | "
            f"{f'{h.rate:g}/s' if h else '-'} | "
            f"{_ms(h.p50_ms if h else None)} | {_ms(h.p99_ms if h else None)} | "
            f"{_ms(h.p999_ms if h else None)} | {r.rss_per_conn_kib:.2f} | "
            f"{ratio(r.frames_per_s, floor, 'frames_per_s')} | "
            f"{ratio(r.frames_per_s, plain, 'frames_per_s')} | "
            f"{ratio(r.frames_per_cpu_s, floor, 'frames_per_cpu_s')} | "
            f"{ratio(r.frames_per_cpu_s, plain, 'frames_per_cpu_s')} |"
        )
        if peak is not None and peak.server_cpu < 0.85:
            notes.append(
                f"- {name}: at its peak step the server used {peak.server_cpu:.0%} of its core "
                f"(clients + publisher {peak.clients_cpu:.0%}, other load "
                f"{peak.other_cpu:.0%}): its frames/s may be a lower bound; frames/CPU-s "
                "does not depend on that."
            )
        if r.failure:
            notes.append(f"- {name}: run aborted: {r.failure}")
    if floor is not None and floor.frames_per_cpu_s:
        # The floor writes one pre-built frame per member: N writes are the least CPU one
        # broadcast can take, and the last member cannot get a frame sooner than that.
        spread = cfg.members / floor.frames_per_cpu_s * 1000
        fits = int(5e-3 * floor.frames_per_cpu_s)
        notes.append(
            f"- one broadcast to {cfg.members} members costs even the floor about {spread:.1f} ms "
            f"of CPU ({floor.frames_per_cpu_s:,.0f} member-frames per CPU-second), so the last "
            f"member's latency is at least that; a p99 within 5 ms needs at most ~{fits:,} "
            "members per room on this CPU, whatever the server."
        )
    if floor is not None and plain is not None and floor.frames_per_s and plain.frames_per_s:
        # Both write one frame per member per delta. The floor pays the transport's per-write
        # work; kasagi-relay's native loop skips it and can pass the floor by that much.
        fp = floor.frames_per_s / plain.frames_per_s
        fpc = _ratio(floor.frames_per_cpu_s, plain.frames_per_cpu_s) or 0.0
        notes.append(
            f"- the floor itself delivers {fp:.2f}x the plain relay's frames/s ({fpc:.2f}x per "
            f"server CPU-second): >= 1.5x plain asks the relay for >= {1.5 / fp:.2f}x the floor "
            "(the floor writes through the transports; the relay's native send loop skips their "
            "per-write work, and the `send` per member is the same for both)."
        )
    if notes:
        lines += ["", *notes]
    checks = targets(results, cfg.tick_ms)
    if checks:
        lines += ["", "| target | measured | wanted | result |", "|---|---|---|---|"]
        for t in checks:
            v = "-" if t.value is None else f"{t.value:.2f}"
            lines.append(f"| {t.what} | {v} | {t.target} | {'PASS' if t.ok else 'FAIL'} |")
    lines += [
        "",
        "Steps (frames/s and deliveries/s inside the step's window; CPU = share of one core "
        "during the step, clients including the publisher, other = the rest of the machine; "
        "pub late = how late the publisher started its sends, p99):",
        "",
        "| server | kind | rate/s | frames/s | deliveries/s | deltas/frame | p50 ms | p99 ms | "
        "p99.9 ms | max ms | server CPU | frames/CPU-s | clients CPU | other CPU | "
        "pub late ms | errors | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for st in r.steps:
            errs = ", ".join(f"{k} {v}" for k, v in st.errors.items())
            if st.incomplete:
                errs = (errs + ", " if errs else "") + f"{st.incomplete} members behind"
            lines.append(
                f"| {name} | {st.kind} | {st.rate:g} | {st.frames_per_s:,.0f} | "
                f"{st.deliveries_per_s:,.0f} | {st.deltas_per_frame:.2f} | {_ms(st.p50_ms)} | "
                f"{_ms(st.p99_ms)} | {_ms(st.p999_ms)} | {_ms(st.max_ms)} | "
                f"{st.server_cpu:.0%} | {st.frames_per_server_cpu_s:,.0f} | "
                f"{st.clients_cpu:.0%} | {st.other_cpu:.0%} | {st.publisher_late_p99_ms:.2f} | "
                f"{errs or '-'} | {st.verdict} |"
            )
    for name, r in results.items():
        if r.profile:
            lines += ["", f"py-spy profile of {name} during its overload step:", "```"]
            lines += [*r.profile, "```"]
    return "\n".join(lines)


def to_json(results: dict[str, ServerResult], cfg: Config) -> dict[str, Any]:
    return {
        "config": asdict(cfg),
        "machine": _machine(),
        "servers": {
            name: {
                **asdict(r),
                "rss_per_conn_kib": r.rss_per_conn_kib,
                "frames_per_s": r.frames_per_s,
                "deliveries_per_s": r.deliveries_per_s,
                "frames_per_cpu_s": r.frames_per_cpu_s,
                "capacity": r.capacity,
            }
            for name, r in results.items()
        },
        "targets": [asdict(t) for t in targets(results, cfg.tick_ms)],
    }


def from_json(doc: dict[str, Any]) -> tuple[dict[str, ServerResult], Config]:
    """The results and config of a run saved with --json."""
    cfg = Config(**doc["config"])
    results: dict[str, ServerResult] = {}
    fields = set(ServerResult.__dataclass_fields__)
    for name, d in doc["servers"].items():
        kw = {k: v for k, v in d.items() if k in fields}
        kw["steps"] = [Step(**st) for st in d["steps"]]
        for key in ("half", "overloaded"):
            kw[key] = Step(**d[key]) if d.get(key) else None
        results[name] = ServerResult(**kw)
    return results, cfg


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, str | None, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m benches.fanout.harness",
        description="Fan-out load harness for kasagi-relay against a floor and a plain "
        "websockets relay (see the module docstring for what is measured and how).",
    )
    p.add_argument("--members", type=int, default=1000, help="members in the room")
    p.add_argument("--clients", type=int, default=2, help="client processes (1-2 fit 2 CPUs)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per ramp step")
    p.add_argument("--rates", help="comma-separated fixed rates (deltas/s) instead of a ramp")
    p.add_argument("--start-rate", type=float, help="first ramp rate (default 10000/members)")
    p.add_argument("--max-rate", type=float, help="ramp ceiling (default 1e6/members)")
    p.add_argument("--refine", type=int, default=2, help="bisection steps after the ramp")
    p.add_argument(
        "--p99-bound-ms",
        type=float,
        default=100.0,
        help="a step keeps up while p99 <= max(this, 3x the server's first step p99)",
    )
    p.add_argument(
        "--merge-limit", type=float, default=1.05, help="deltas/frame above which a step is behind"
    )
    p.add_argument(
        "--overload", type=float, default=2.0, help="overload step, x capacity (0: none)"
    )
    p.add_argument("--drain", type=float, default=5.0, help="seconds allowed to finish a step")
    p.add_argument("--servers", default=",".join(SERVERS), help="which servers, in order")
    p.add_argument("--tick-ms", type=int, default=0, help="the relay's --tick-ms")
    p.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        help="extra relay flag (repeat), e.g. --relay-arg=--send-queue-bytes=4MiB",
    )
    p.add_argument("--no-pin", action="store_true", help="no CPU affinity")
    p.add_argument(
        "--relay-module",
        default="kasagi_relay",
        help="run the relay as `python -m MODULE` (a variant on PYTHONPATH, to try a change)",
    )
    p.add_argument("--concurrency", type=int, default=64, help="connects in flight per client")
    p.add_argument("--json", metavar="PATH", help="also write every number here")
    p.add_argument("--from-json", metavar="PATH", help="print the tables of a saved run, no run")
    p.add_argument("--profile", metavar="DIR", help="py-spy each server in its overload step")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="S",
        help="before each step, wait up to S s for other processes to idle (0: never)",
    )
    a = p.parse_args(argv)
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    cfg = Config(
        members=a.members,
        clients=a.clients,
        duration=a.duration,
        rates=[float(r) for r in a.rates.split(",")] if a.rates else None,
        start_rate=a.start_rate,
        max_rate=a.max_rate,
        refine=a.refine,
        p99_bound_ms=a.p99_bound_ms,
        merge_limit=a.merge_limit,
        overload=a.overload,
        drain=a.drain,
        servers=servers,
        relay_args=a.relay_arg,
        tick_ms=a.tick_ms,
        pin=not a.no_pin,
        concurrency=a.concurrency,
        profile=a.profile,
        wait_quiet=a.wait_quiet,
        relay_module=a.relay_module,
    )
    return cfg, a.json, a.from_json


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path, saved = parse_args(argv)
    if saved:
        results, cfg = from_json(json.loads(Path(saved).read_text()))
        print(report(results, cfg))
        return 0
    bench = Bench(cfg)
    results = bench.run()
    print(report(results, cfg, bench))
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(results, cfg), indent=2) + "\n")
    return 0 if all(r.failure is None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
