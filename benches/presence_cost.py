"""What presence costs, in one run on one real redis-server: the join rate and the delta
throughput of a relay with `--presence on` (every member joins with `"presence": true`)
against the same relay with `--presence off`, and the time of a `presence` request for a
room of 5,000 members.

    .venv/bin/python -m benches.presence_cost [--clients 400] [--room-size 10]
        [--watchers 0] [--hold-ms 0] [--seconds 5] [--delta-members 50] [--rounds 3]
        [--members 5000] [--requests 50] [--redis-core 0] [--modes off,on,entries,on@0]
        [--parts joins,deltas] [--json out.json]

Relays are subprocesses (`python -m kasagi_relay --redis ...`, the real CLI). Measured per
mode:
- join rate: the compiled load generator of benches/peers (`-mode joins`, Go) opens
  `--clients` connections in rooms of `--room-size`, each one joining its room, waiting for
  `joined`, leaving, waiting for `left`, in a loop for `--seconds`: join+leave cycles/s, and
  the relay's and Redis's CPU per cycle over the same window (from /proc; the primary
  figures: they are what presence costs the relay and its core, whatever bounds the rate
  on a shared machine). `--watchers` W adds W connections per room that join once and
  stay (in every mode; asking for events when on): each announced join and leave reach
  them however short the visit (a leaver gets no event its relay had not sent when it
  left, so with W = 0 few events are delivered). A visit whose leave came while its
  join's write was still queued is announced to nobody, so even with watchers the events
  per cycle follow how long the writes wait: read them beside the rates. `--hold-ms` H
  keeps each member H ms in its room before it leaves (in every mode): visits that
  outlast the writes are all announced, so the events per cycle no longer swing with the
  writes' wait from run to run (with H = 0 they moved by 10x between rounds of one run).
  With presence on, each join and leave
  also writes the entry in Redis and sends a presence event to every other member of the
  room (they all asked for events). The relay and its Redis are pinned to core 0, the load
  generator to core 1 (`taskset`), so the client does not take the relay's CPU; its own CPU
  share is reported (near 1.0: the client bounded the rate). `--redis-core 1` puts Redis on
  the load generator's core instead, as a deployment has it on a host of its own: then
  the rate ratio is the relay's own cost ratio;
- delta throughput: one room of `--delta-members` members (all asking for presence events
  when on), one writer with 32 deltas in flight for `--seconds`: deltas acknowledged per
  second, and delta frames received by the members per second (websockets clients in this
  process, which runs on core 1).
A third mode, `entries`: presence on but no member asks for events (`"presence": false`):
what the entries alone cost (written and removed in Redis, no events sent). `on@S` (and
`entries@S`) run the relay with `--presence-event-delay S` (e.g. `on@0`: events at the end
of each loop turn), to compare with the default in the same run.
The modes alternate `--rounds` times; the medians are reported, with every run. `--parts`
picks what a round measures (`deltas` alone: more rounds of the delta throughput, whose
rounds spread widely, in the same time).
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
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from benches.peers.build import loadgen
from kasagi_relay.backends.redis import RedisBackend
from kasagi_relay.domain import Identity
from kasagi_relay.presence import _entry
from kit.topology import call, start_topology
from testkit.proc import cpu_seconds, write_calls
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


def pin(pid: int, core: int) -> None:
    """Every thread of `pid` onto `core` (nothing without taskset or a second core)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(core), str(pid)],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def fcalls(port: int) -> int:
    """FCALLs the server has run so far (INFO commandstats)."""
    text = call(port, "INFO", "commandstats")
    text = text.decode() if isinstance(text, bytes) else str(text)
    m = re.search(r"cmdstat_fcall:calls=(\d+)", text)
    return int(m.group(1)) if m else 0


async def join_rate(
    url: str,
    pid: int,
    redis_pid: int,
    redis_port: int,
    clients: int,
    room_size: int,
    seconds: float,
    on: bool,
    watchers: int = 0,
    hold_ms: float = 0.0,
) -> dict[str, float]:
    """The load generator's join+leave loop; cycles/s, the relay's and Redis's CPU per
    cycle (us; both on core 0), Redis function calls, presence events and the relay's
    write system calls per cycle, and the load generator's CPU share, over its measured
    window."""
    rooms = max(1, clients // room_size)
    argv = [
        str(loadgen()), "-system", "kasagi", "-url", url, "-mode", "joins",
        f"-presence={'true' if on else 'false'}", "-rooms", str(rooms),
        "-members", str(room_size), "-watchers", str(watchers), "-hold", f"{hold_ms}ms",
        "-warmup", "1",
        "-duration", str(seconds),
    ]  # fmt: skip
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        argv = ["taskset", "-c", "1", *argv]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    cpu0 = cpu = redis0 = redis = 0.0
    calls0 = calls = writes0 = writes = 0
    res: dict[str, Any] = {}
    async for raw in proc.stdout:
        line = raw.decode().strip()
        if line == "MEASURE_START":
            cpu0, redis0 = cpu_seconds(pid), cpu_seconds(redis_pid)
            calls0 = fcalls(redis_port)
            writes0 = write_calls(pid)
        elif line == "MEASURE_END":
            cpu, redis = cpu_seconds(pid) - cpu0, cpu_seconds(redis_pid) - redis0
            calls = fcalls(redis_port) - calls0
            writes = write_calls(pid) - writes0
        elif line.startswith("{"):
            res = json.loads(line)
    if await proc.wait() != 0 or not res.get("cycles"):
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {res}")
    if res.get("errors"):
        raise RuntimeError(f"loadgen saw errors: {res}")
    return {
        "joins_per_s": res["cycles_per_s"],
        "relay_cpu_us_per_join": cpu / res["cycles"] * 1e6,
        "redis_cpu_us_per_join": redis / res["cycles"] * 1e6,
        "relay_cpu_share": cpu / res["seconds"],
        "loadgen_cpu_share": res["loadgen_cpu"],
        "events_per_s": res["events_per_s"],
        "events_per_join": res["events_per_s"] / res["cycles_per_s"],
        "watched_per_join": res.get("watched_per_s", 0) / res["cycles_per_s"],
        "fcalls_per_join": calls / res["cycles"],
        # Presence events go out by the transports' writes (uvloop: write/writev), one per
        # listener and flush: what they cost is mostly these.
        "relay_writes_per_join": writes / res["cycles"],
    }


async def delta_rate(
    url: str, pid: int, members: int, seconds: float, on: bool
) -> tuple[float, float, float]:
    """Deltas acknowledged/s, delta frames received/s by the members, and the relay's CPU
    per delta frame received (us: what one frame to one member costs the relay, the
    publish and ack shared among the members)."""
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
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        end = t0 + seconds
        n = 0
        while time.monotonic() < end:
            await window.acquire()
            n += 1
            await writer.send(json.dumps({"t": "delta", "room": "d", "merge": {"n": n}}))
        elapsed = time.monotonic() - t0
        got_acks, got_frames = acks, frames
        cpu = cpu_seconds(pid) - cpu0
        stop.set()
        acker.cancel()
        await asyncio.gather(*readers, acker, return_exceptions=True)
        return got_acks / elapsed, got_frames / elapsed, cpu / max(got_frames, 1) * 1e6


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
    ap.add_argument(
        "--watchers", type=int, default=0,
        help="connections per room that join once and stay (they get every member's events)",
    )  # fmt: skip
    ap.add_argument(
        "--hold-ms", type=float, default=0.0,
        help="how long each cycling member stays in its room before it leaves",
    )  # fmt: skip
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--delta-members", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--redis-core", type=int, choices=(0, 1), default=0,
        help="the core of Redis: 0, the relay's (default), or 1, the load generator's",
    )  # fmt: skip
    ap.add_argument(
        "--modes", default="off,on,entries",
        help="modes to run, comma-separated (ratios need off; the cost per event on and "
        "entries); `on@S` is `on` with --presence-event-delay S (the relay's default otherwise)",
    )  # fmt: skip
    ap.add_argument(
        "--parts", default="joins,deltas",
        help="what each round measures, comma-separated: joins, deltas (the presence "
        "request is measured once, after the rounds)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    modes = tuple(a.modes.split(","))
    parts = set(a.parts.split(","))
    if not parts or not parts <= {"joins", "deltas"}:
        ap.error("--parts takes joins, deltas or both")
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "redis_core": a.redis_core,
        "watchers": a.watchers,
        "hold_ms": a.hold_ms,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # This process (the delta clients) on core 1; the relays and Redis on core 0.
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        topo = start_topology(Path(tmp) / "redis", sentinels=False)
        pin(topo.servers[0].pid, a.redis_core)
        try:
            redis_url = f"redis://127.0.0.1:{topo.servers[0].port}/0"
            base = [
                "--redis", redis_url, "--rate-limit", "0", "--rate-bytes", "0",
                "--max-connections-per-address", "0",
            ]  # fmt: skip
            runs: dict[str, dict[str, list[float]]] = {}
            # The modes alternate, `--rounds` times each, and the median of each is kept,
            # so a noisy moment on a shared machine does not favour one.
            for mode in modes * a.rounds:
                kind, _, delay = mode.partition("@")
                on = kind == "on"
                flag = "off" if kind == "off" else "on"
                delay_args = ["--presence-event-delay", delay] if delay else []
                async with relay_process(*base, "--presence", flag, *delay_args, env={}) as proc:
                    pin(proc.proc.pid, 0)
                    joins = {}
                    if "joins" in parts:
                        joins = await join_rate(
                            proc.url,
                            proc.proc.pid,
                            topo.servers[0].pid,
                            topo.servers[0].port,
                            a.clients,
                            a.room_size,
                            a.seconds,
                            on,
                            a.watchers,
                            a.hold_ms,
                        )
                    measured: dict[str, float] = dict(joins)
                    if "deltas" in parts:
                        acks, frames, frame_us = await delta_rate(
                            proc.url, proc.proc.pid, a.delta_members, a.seconds, on
                        )
                        measured["acks_per_s"] = acks
                        measured["frames_per_s"] = frames
                        measured["relay_cpu_us_per_delta_frame"] = frame_us
                r = runs.setdefault(mode, {})
                for k, v in measured.items():
                    r.setdefault(k, []).append(v)
                print(mode, {k: round(v[-1], 2) for k, v in r.items()}, flush=True)
            results = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}
            out["runs"] = {
                m: {k: [round(x, 2) for x in v] for k, v in r.items()} for m, r in runs.items()
            }
            out["modes"] = {m: {k: round(v, 2) for k, v in r.items()} for m, r in results.items()}
            for mode in results:
                if mode != "off" and "off" in results:
                    out[f"ratio_{mode}_off"] = {
                        k: round(results[mode][k] / results["off"][k], 3)
                        for k in results[mode]
                        if results["off"][k]
                    }
            if "on" in results and "entries" in results and "joins" in parts:
                # What one presence event costs the relay: the CPU per cycle that events
                # add over entries alone, per event frame sent; beside a delta frame's cost.
                on, entries = results["on"], results["entries"]
                extra = on["relay_cpu_us_per_join"] - entries["relay_cpu_us_per_join"]
                per_event = extra / max(on["events_per_join"], 1e-9)
                out["relay_cpu_us_per_event_frame"] = round(per_event, 2)
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
