"""HTTP API ingest against WebSocket ingest: acknowledged publishes per second into one relay
through `POST /api/rooms/{R}/deltas` and through WebSocket `delta` messages, same relay,
same load, in one run, with the relay's CPU per publish.

    .venv/bin/python -m benches.api_ingest [--seconds 5] [--concurrency 32] [--rounds 2]
        [--redis] [--json out.json]

The relay is the real command line (`python -m kasagi_relay`, memory backend, or one
redis-server started here with --redis), with --api-key and the per-connection rate limits
off (--rate-limit 0 --rate-bytes 0), so that both paths are limited by the relay alone. The
load generator (this process) keeps `--concurrency` publishes in flight: that many
keep-alive HTTP connections, each POSTing a ~40-byte merge delta and waiting for its 200,
or that many WebSocket connections, each sending a `delta` and waiting for its `ack`; each
connection writes its own room. The phases alternate (api, ws, api, ws, ...) for `--rounds`
rounds of `--seconds` each. Reported per phase: publishes/s, p50/p99 latency, and the
relay's CPU microseconds per publish (from /proc), which does not depend on how fast the
generator is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from testkit.proc import cpu_seconds
from testkit.relay import relay_process

KEY = "bench-api-key-0123456789"


async def api_worker(port: int, i: int, end: float, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /api/rooms/bench-api-{i}/deltas HTTP/1.1\r\nHost: relay\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
    ).encode()
    n = 0
    try:
        while time.monotonic() < end:
            body = b'{"merge":{"p":{"x":%d,"y":%d}}}' % (n, n)
            t0 = time.perf_counter()
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status = await reader.readuntil(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 200 "), status
            length = int(status.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            n += 1
    finally:
        writer.close()


async def ws_worker(url: str, i: int, end: float, lat: list[float]) -> None:
    async with connect(url, subprotocols=["kasagi.v1.json"], compression=None) as ws:  # type: ignore[list-item]
        n = 0
        room = f"bench-ws-{i}"
        while time.monotonic() < end:
            message = f'{{"t":"delta","room":"{room}","merge":{{"p":{{"x":{n},"y":{n}}}}}}}'
            t0 = time.perf_counter()
            await ws.send(message)
            while True:
                reply = json.loads(await ws.recv())
                if reply["t"] == "ack":
                    break
                assert reply["t"] != "error", reply
            lat.append(time.perf_counter() - t0)
            n += 1


async def phase(
    kind: str, url: str, port: int, pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    lat: list[float] = []
    end = time.monotonic() + args.seconds
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    if kind == "api":
        workers = [api_worker(port, i, end, lat) for i in range(args.concurrency)]
    else:
        workers = [ws_worker(url, i, end, lat) for i in range(args.concurrency)]
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    lat.sort()
    return {
        "kind": kind,
        "publishes": len(lat),
        "per_s": len(lat) / elapsed,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else None,
        "relay_cpu_us_per_publish": 1e6 * cpu / len(lat) if lat else None,
    }


@contextlib.asynccontextmanager
async def backend_args(use_redis: bool) -> AsyncIterator[list[str]]:
    if not use_redis:
        yield []
        return
    from kit.topology import running_topology

    with tempfile.TemporaryDirectory() as tmp, running_topology(Path(tmp), sentinels=False) as t:
        yield ["--redis", f"redis://127.0.0.1:{t.servers[0].port}/0"]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--redis", action="store_true", help="one redis-server instead of memory")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    results = []
    async with (
        backend_args(args.redis) as extra,
        relay_process(
            "--rate-limit",
            "0",
            "--rate-bytes",
            "0",
            *extra,
            env={"KASAGI_API_KEY": KEY},
        ) as relay,
    ):
        port = relay.port
        pid = relay.proc.pid
        for _ in range(args.rounds):
            for kind in ("api", "ws"):
                result = await phase(kind, relay.url, port, pid, args)
                results.append(result)
                print(json.dumps(result), file=sys.stderr)
    api = [r["per_s"] for r in results if r["kind"] == "api"]
    ws = [r["per_s"] for r in results if r["kind"] == "ws"]
    api_cpu = [r["relay_cpu_us_per_publish"] for r in results if r["kind"] == "api"]
    ws_cpu = [r["relay_cpu_us_per_publish"] for r in results if r["kind"] == "ws"]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "backend": "redis" if args.redis else "memory",
        "concurrency": args.concurrency,
        "api_per_s": api,
        "ws_per_s": ws,
        "api_over_ws": statistics.median(api) / statistics.median(ws),
        "relay_cpu_us_api": api_cpu,
        "relay_cpu_us_ws": ws_cpu,
        "results": results,
    }
    print(
        f"API {statistics.median(api):,.0f}/s vs WebSocket {statistics.median(ws):,.0f}/s "
        f"(ratio {summary['api_over_ws']:.2f}); relay CPU per publish "
        f"{statistics.median(api_cpu):.0f} us vs {statistics.median(ws_cpu):.0f} us"
    )
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230 - once, after the measurement
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
