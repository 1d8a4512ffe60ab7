"""The plain relay: what a relay written the idiomatic websockets way costs.

One handler coroutine per connection (`websockets.asyncio.server.serve`, on uvloop); each
message is `json.loads`-ed; a `delta` gets the room's next seq, is applied to the room's
state (RFC 7396 merge patches; JSON Patch deltas are forwarded without state), and is
`json.dumps`-ed into one `delta` message that `websockets.broadcast` sends to every member,
which frames it again for each connection. No merging, no limits beyond websockets' own.
Frames have the same bytes as the relay's (compact JSON, same key order), so the clients
parse exactly the same thing from every server.

Run:  python benches/fanout/plain_relay.py [--host 127.0.0.1] [--port 0]
It prints `plain serving ws://HOST:PORT/ws` on stderr once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
from typing import Any

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SUBPROTOCOLS = [Subprotocol("kasagi.v1.json")]


def dumps(message: Any) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


class Room:
    def __init__(self) -> None:
        self.seq = 0
        self.state: Any = {}
        self.members: set[ServerConnection] = set()


rooms: dict[str, Room] = {}


async def handler(ws: ServerConnection) -> None:
    mine: set[str] = set()
    try:
        async for message in ws:
            try:
                msg = json.loads(message)
                t, name = msg["t"], msg["room"]
            except (ValueError, KeyError, TypeError):
                await ws.send(dumps({"t": "error", "code": "bad_message", "message": "bad"}))
                continue
            room = rooms.setdefault(name, Room())
            if t == "join":
                await ws.send(
                    dumps({"t": "joined", "room": name, "seq": room.seq, "state": room.state})
                )
                room.members.add(ws)
                mine.add(name)
            elif t == "delta":
                room.seq += 1
                seq = room.seq
                out: dict[str, Any] = {"t": "delta", "room": name, "from": seq, "seq": seq}
                if "merge" in msg:
                    room.state = merge_patch(room.state, msg["merge"])
                    out["merge"] = msg["merge"]
                else:
                    out["patch"] = msg.get("patch", [])
                broadcast(room.members, dumps(out))
                await ws.send(dumps({"t": "ack", "room": name, "seq": seq}))
            elif t == "leave":
                room.members.discard(ws)
                mine.discard(name)
                await ws.send(dumps({"t": "left", "room": name}))
    except ConnectionClosed:
        pass
    finally:
        for name in mine:
            rooms[name].members.discard(ws)


async def main_async(host: str, port: int) -> None:
    async with serve(handler, host, port, subprotocols=SUBPROTOCOLS) as server:
        bound = next(iter(server.sockets)).getsockname()
        print(f"plain serving ws://{host}:{bound[1]}/ws", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(main_async(a.host, a.port))


if __name__ == "__main__":
    main()
