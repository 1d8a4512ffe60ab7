"""What presence costs, in one run on one real redis-server: the join rate and the delta
throughput of a relay with `--presence on` (every member joins with `"presence": true`)
against the same relay with `--presence off`, and the time of a `presence` request for a
room of 5,000 members.

    .venv/bin/python -m benches.presence_cost [--clients 400] [--room-size 10]
        [--seconds 5] [--delta-members 50] [--rounds 3] [--members 5000] [--requests 50]
        [--json out.json]

Relays are subprocesses (`python -m kasagi_relay --redis ...`, the real CLI); the clients
are raw websockets clients in this process (JSON). Measured per mode:
- join rate: `--clients` connections in rooms of `--room-size`, each one joining its room,
  waiting for `joined`, leaving, waiting for `left`, in a loop for `--seconds`: joins/s.
  With presence on, each join and leave also writes the entry in Redis and sends a
  presence event to every other member of the room (they all asked for events);
- delta throughput: one room of `--delta-members` members (all asking for presence events
  when on), one writer with 32 deltas in flight for `--seconds`: deltas acknowledged per
  second, and delta frames received by the members per second.
A third mode, `entries`: presence on but no member asks for events (`"presence": false`):
what the entries alone cost (written and removed in Redis, no events sent).
The modes alternate `--rounds` times; the medians are reported, with every run.
Then, with presence on, `--members` entries written into one room (through the relay's
own backend role, as relays write them) and `--requests` `presence` requests timed from
send to reply (p50, p99), with the reply's size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from kasagi_relay.backends.redis import RedisBackend
from kasagi_relay.domain import Identity
from kasagi_relay.presence import _entry
from kit.topology import start_topology
from testkit.proc import cpu_seconds
from testkit.relay import relay_process


async def recv_type(ws: ClientConnection, t: str) -> None:
    """Until a message of type `t` (found by its prefix: the load generator must not spend
    its CPU decoding the presence events it skips)."""
    head = '{"t":"' + t + '"'
    async with asyncio.timeout(30):
        while True:
            data = await ws.recv()
            text = data if isinstance(data, str) else data.decode()
            if text.startswith(head):
                return


async def join_rate(url: str, clients: int, room_size: int, seconds: float, on: bool) -> float:
    async with contextlib.AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(connect(url, compression=None, max_size=None))
            for _ in range(clients)
        ]
        joins = 0
        end = 0.0

        async def loop(i: int, ws: ClientConnection) -> None:
            nonlocal joins
            room = f"j{i // room_size}"
            join = json.dumps({"t": "join", "room": room, "presence": on})
            leave = json.dumps({"t": "leave", "room": room})
            while time.monotonic() < end:
                await ws.send(join)
                await recv_type(ws, "joined")
                joins += 1
                await ws.send(leave)
                await recv_type(ws, "left")

        end = time.monotonic() + seconds
        t0 = time.monotonic()
        await asyncio.gather(*(loop(i, ws) for i, ws in enumerate(conns)))
        return joins / (time.monotonic() - t0)


async def delta_rate(url: str, members: int, seconds: float, on: bool) -> tuple[float, float]:
    async with contextlib.AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(connect(url, compression=None, max_size=None))
            for _ in range(members)
        ]
        for ws in conns:
            await ws.send(json.dumps({"t": "join", "room": "d", "presence": on}))
            await recv_type(ws, "joined")
        writer = await stack.enter_async_context(connect(url, compression=None))
        frames = 0
        stop = asyncio.Event()

        async def member(ws: ClientConnection) -> None:
            nonlocal frames
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(ws.recv(), 0.2)
                except TimeoutError:
                    continue
                if b'"t":"delta"' in (data if isinstance(data, bytes) else data.encode()):
                    frames += 1

        readers = [asyncio.create_task(member(ws)) for ws in conns]
        await asyncio.sleep(2.0)  # the presence events of the joins are read by now
        frames = 0
        acks = 0
        window = asyncio.Semaphore(32)

        async def read_acks() -> None:
            nonlocal acks
            while True:
                message = json.loads(await writer.recv())
                if message["t"] == "ack":
                    acks += 1
                    window.release()

        acker = asyncio.create_task(read_acks())
        t0 = time.monotonic()
        end = t0 + seconds
        n = 0
        while time.monotonic() < end:
            await window.acquire()
            n += 1
            await writer.send(json.dumps({"t": "delta", "room": "d", "merge": {"n": n}}))
        elapsed = time.monotonic() - t0
        got_acks, got_frames = acks, frames
        stop.set()
        acker.cancel()
        await asyncio.gather(*readers, acker, return_exceptions=True)
        return got_acks / elapsed, got_frames / elapsed


async def presence_time(url: str, redis_url: str, members: int, requests: int) -> dict[str, Any]:
    backend = RedisBackend(redis_url)
    await backend.start()
    try:
        for start in range(0, members, 500):
            batch = {}
            for i in range(start, min(start + 500, members)):
                conn = f"bench{i:05d}"
                batch[conn] = _entry(conn, Identity(sub=f"user{i}", info={"name": f"P{i}"}))
            await backend.presence.refresh("big", batch, 600)
    finally:
        await backend.close()
    times: list[float] = []
    size = 0
    count = 0
    async with connect(url, compression=None, max_size=None) as ws:
        for i in range(requests):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"t": "presence", "room": "big", "id": i}))
            reply = await ws.recv()
            times.append(time.perf_counter() - t0)
            size = len(reply)
            count = json.loads(reply)["count"]
    times.sort()
    return {
        "members": count,
        "reply_bytes": size,
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=400)
    ap.add_argument("--room-size", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--delta-members", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        topo = start_topology(Path(tmp) / "redis", sentinels=False)
        try:
            redis_url = f"redis://127.0.0.1:{topo.servers[0].port}/0"
            base = [
                "--redis", redis_url, "--rate-limit", "0", "--rate-bytes", "0",
                "--max-connections-per-address", "0",
            ]  # fmt: skip
            runs: dict[str, dict[str, list[float]]] = {}
            # The modes alternate, `--rounds` times each, and the median of each is kept,
            # so a noisy moment on a shared machine does not favour one.
            for mode in ("off", "on", "entries") * a.rounds:
                on = mode == "on"
                flag = "off" if mode == "off" else "on"
                async with relay_process(*base, "--presence", flag, env={}) as proc:
                    cpu0 = cpu_seconds(proc.proc.pid)
                    joins = await join_rate(proc.url, a.clients, a.room_size, a.seconds, on)
                    # The relay's CPU per join + leave cycle: what presence costs it,
                    # less sensitive to the machine's load than the rates.
                    cpu_us = (cpu_seconds(proc.proc.pid) - cpu0) / (joins * a.seconds) * 1e6
                    acks, frames = await delta_rate(proc.url, a.delta_members, a.seconds, on)
                r = runs.setdefault(
                    mode,
                    {
                        "joins_per_s": [],
                        "relay_cpu_us_per_join": [],
                        "acks_per_s": [],
                        "frames_per_s": [],
                    },
                )
                r["joins_per_s"].append(joins)
                r["relay_cpu_us_per_join"].append(cpu_us)
                r["acks_per_s"].append(acks)
                r["frames_per_s"].append(frames)
                print(mode, round(joins), round(cpu_us), round(acks), round(frames), flush=True)
            results = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}
            out["runs"] = {
                m: {k: [round(x) for x in v] for k, v in r.items()} for m, r in runs.items()
            }
            out["modes"] = {m: {k: round(v, 1) for k, v in r.items()} for m, r in results.items()}
            out["ratio_on_off"] = {
                k: round(results["on"][k] / results["off"][k], 3) for k in results["on"]
            }
            out["ratio_entries_off"] = {
                k: round(results["entries"][k] / results["off"][k], 3) for k in results["on"]
            }
            async with relay_process(*base, env={}) as proc:
                out["presence_request"] = await presence_time(
                    proc.url, redis_url, a.members, a.requests
                )
        finally:
            topo.stop()
    text = json.dumps(out, indent=2)
    print(text)
    if a.json is not None:
        a.json.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
