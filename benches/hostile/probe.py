"""The well-behaved member: its own process, so that attack work in the harness never delays
it. `python -m benches.hostile.probe URL ROOM` joins ROOM, prints `ready`, then sends a small
delta every 10 ms (open loop: a late ack never delays the next send) until stdin closes,
and prints one JSON line: the worst ack latency, counts, and what went wrong.

A delta whose ack never came is charged from its send until the end, so a relay that stops
answering shows as a long stall rather than as a short one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

PERIOD_S = 0.010


async def run(url: str, room: str) -> dict[str, object]:
    sent: dict[int, float] = {}
    latency: dict[int, float] = {}
    all_acked = asyncio.Event()
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    try:
        async with connect(url, subprotocols=["kasagi.v1.json"], open_timeout=10) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"t": "join", "room": room}))
            async with asyncio.timeout(10):
                while json.loads(await ws.recv()).get("t") != "joined":
                    pass
            print("ready", flush=True)

            async def receive() -> None:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("t") == "ack":
                        latency[msg["id"]] = time.perf_counter() - sent[msg["id"]]
                        if stop.is_set() and len(latency) == len(sent):
                            all_acked.set()
                    elif msg.get("t") == "error":
                        errors.append(str(msg.get("code")))

            reader = asyncio.create_task(receive())
            i = 0
            next_at = time.perf_counter()
            while not stop.is_set() and not reader.done():
                i += 1
                sent[i] = time.perf_counter()
                await ws.send(json.dumps({"t": "delta", "room": room, "merge": {"n": i}, "id": i}))
                next_at += PERIOD_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))
            # Give the last acks a moment.
            if len(latency) == len(sent):
                all_acked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_acked.wait(), 0.5)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketException):
                await reader
    except (OSError, WebSocketException, TimeoutError) as exc:
        errors.append(f"connection: {type(exc).__name__}: {exc}")
        if not sent:
            print("ready", flush=True)
            await stop.wait()
    end = time.perf_counter()
    worst = max(
        [latency.get(i, end - t) for i, t in sent.items()],
        default=float("nan"),
    )
    return {
        "sent": len(sent),
        "acked": len(latency),
        "worst_ms": round(worst * 1000, 1),
        "errors": errors[:5],
    }


def main() -> None:
    url, room = sys.argv[1], sys.argv[2]
    result = asyncio.run(run(url, room))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
