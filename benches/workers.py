"""Workers: deltas delivered per second by one relay with `--workers 2` against `--workers 1`,
same load, same machine, in one run (ratios, not absolute numbers: the machine is shared).

    .venv/bin/python -m benches.workers [--seconds 10] [--rooms 20] [--members 25]
        [--writers 4] [--window 8] [--layouts 1,2] [--json out.json]

One redis-server (`--redis`, ack leader) and, per layout, the real command line
(`python -m kasagi_relay --workers N`). The load generator is this process (uvloop, raw
sockets, so that it costs as little as it can): per room, `--members` members that join and
then only read, and `--writers` writers that each keep `--window` deltas in flight (the
next one goes when an ack comes back; the relay handles one connection's requests in order,
so it is the writers that make requests concurrent). Connections are spread over the
workers by the kernel (SO_REUSEPORT), so a room's members sit on both workers.

Deltas delivered are counted from the members' streams: a member's last seen `seq` at the
end of the window minus the one at its start (frames that merge several deltas count each
delta; docs/protocol.md). Reported per layout: deltas delivered/s, acks/s, and the CPU
seconds per second (cores) that the relay processes, redis-server and the load generator
used during the window (from /proc), which says what limits the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from kit.topology import running_topology
from testkit.proc import cpu_seconds
from testkit.relay import relay_process

_SEQ = re.compile(rb'"seq":(\d+)[,}]')
# A zero masking key: valid framing (RFC 6455 asks for an unpredictable key, which only
# matters through proxies), and the payload goes out as is, with no per-byte work here.
_ZERO_MASK = b"\x00\x00\x00\x00"


def frame(payload: bytes) -> bytes:
    n = len(payload)
    assert n < 126
    return bytes((0x81, 0x80 | n)) + _ZERO_MASK + payload


def tree(pid: int) -> list[int]:
    """`pid` and its children (the workers of a relay)."""
    out = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RawClient(asyncio.Protocol):
    """A WebSocket client by hand: the upgrade, then `opened()` and `received()`."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.head = b""
        self.open = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport writes but is registered as none of asyncio's classes.
        self.transport = cast(asyncio.WriteTransport, transport)
        self.transport.write(_UPGRADE)

    def data_received(self, data: bytes) -> None:
        if not self.open.done():
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, rest = self.head.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            self.open.set_result(None)
            self.opened()
            if not rest:
                return
            data = rest
        self.received(data)

    def opened(self) -> None:
        pass

    def received(self, data: bytes) -> None:
        pass


class MemberProto(RawClient):
    """Joins `room`, then reads the stream, keeping only the last `seq` seen."""

    def __init__(self, room: str) -> None:
        super().__init__()
        self.room = room
        self.seq = 0
        self.tail = b""

    def opened(self) -> None:
        assert self.transport is not None
        self.transport.write(frame(b'{"t":"join","room":"%s"}' % self.room.encode()))

    def received(self, data: bytes) -> None:
        chunk = self.tail + data
        end = len(chunk)
        # The last complete `"seq":N,` in the chunk is the newest (frames are in order).
        pos = chunk.rfind(b'"seq":', 0, end)
        while pos != -1:
            m = _SEQ.match(chunk, pos)
            if m is not None:
                self.seq = int(m.group(1))
                break
            pos = chunk.rfind(b'"seq":', 0, pos)
        self.tail = chunk[-32:]


class WriterProto(RawClient):
    """Keeps `window` deltas in flight on one room."""

    def __init__(self, room: str, window: int) -> None:
        super().__init__()
        self.frames = [
            frame(b'{"t":"delta","room":"%s","merge":{"v":%d}}' % (room.encode(), i))
            for i in range(16)
        ]
        self.window = window
        self.sent = 0
        self.acks = 0
        self.tail = b""

    def opened(self) -> None:
        for _ in range(self.window):
            self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.frames[self.sent % 16])
        self.sent += 1

    def received(self, data: bytes) -> None:
        chunk = self.tail + data
        acks = chunk.count(b'"t":"ack"') - self.tail.count(b'"t":"ack"')
        self.tail = chunk[-8:]
        for _ in range(acks):
            self.acks += 1
            self.send()


async def deltas_per_frame(port: int) -> float:
    """The relay's mean deltas per broadcast frame since it started (its /metrics: every
    worker's, with --workers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    body = await reader.read()
    writer.close()
    values = dict(re.findall(rb"^kasagi_deltas_per_frame_(sum|count) (\S+)$", body, re.M))
    count = float(values.get(b"count", 0))
    return float(values.get(b"sum", 0)) / count if count else 0.0


async def run_layout(redis_url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    flags = [
        "--redis", redis_url, "--workers", str(workers), "--rate-limit", "0", "--rate-bytes",
        "0", "--max-connections-per-address", "0", "--max-connections", "0",
        "--idle-timeout", "0", "--compaction-interval", "1",
    ]  # fmt: skip
    async with relay_process(*flags) as proc:
        port = proc.port
        members: list[MemberProto] = []
        writers: list[WriterProto] = []
        for r in range(args.rooms):
            room = f"bench-{workers}-{r}"
            for _ in range(args.members):
                member = MemberProto(room)
                await loop.create_connection(lambda m=member: m, "127.0.0.1", port)  # type: ignore[misc]
                await member.open
                members.append(member)
        await asyncio.sleep(1.0)  # every join answered before the writers start
        for r in range(args.rooms):
            room = f"bench-{workers}-{r}"
            for _ in range(args.writers):
                writer = WriterProto(room, args.window)
                await loop.create_connection(lambda w=writer: w, "127.0.0.1", port)  # type: ignore[misc]
                await writer.open
                writers.append(writer)
        await asyncio.sleep(args.warmup)
        pids = tree(proc.proc.pid)
        seq0 = [m.seq for m in members]
        acks0 = sum(w.acks for w in writers)
        relay0 = sum(cpu_seconds(p) for p in pids)
        redis0 = cpu_seconds(args.redis_pid)
        gen0 = self_cpu()
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        merged = await deltas_per_frame(port)
        delivered = sum(m.seq for m in members) - sum(seq0)
        acks = sum(w.acks for w in writers) - acks0
        out = {
            "workers": workers,
            "relay_processes": len(pids),
            "delivered_per_s": delivered / elapsed,
            "acks_per_s": acks / elapsed,
            "fanout": delivered / acks if acks else 0.0,
            "deltas_per_frame": merged,
            "cpu_relay": (sum(cpu_seconds(p) for p in pids) - relay0) / elapsed,
            "cpu_redis": (cpu_seconds(args.redis_pid) - redis0) / elapsed,
            "cpu_loadgen": (self_cpu() - gen0) / elapsed,
        }
    return out


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp, running_topology(Path(tmp), sentinels=False) as t:
        server = t.servers[0]
        args.redis_pid = server.pid
        url = f"redis://127.0.0.1:{server.port}/0"
        for n in args.layouts:
            result = await run_layout(url, n, args)
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--members", type=int, default=25, help="members per room")
    p.add_argument("--writers", type=int, default=4, help="writers per room")
    p.add_argument("--window", type=int, default=8, help="deltas in flight per writer")
    p.add_argument("--layouts", default="1,2", help="worker counts to compare")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    args.layouts = [int(x) for x in args.layouts.split(",")]
    import uvloop

    results = uvloop.run(main_async(args))
    base = results[0]["delivered_per_s"]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "results": results,
        "ratio": {str(r["workers"]): r["delivered_per_s"] / base for r in results},
    }
    print(json.dumps(summary["ratio"]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
