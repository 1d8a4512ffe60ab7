"""The python-socketio baseline of the peer benchmark: rooms over socket.io, the same work as
the relay's rooms without state (a `join` event enters a room; `pub(room, data)` emits `d` with
the data to the room and acknowledges with `true`). aiohttp on uvloop, the memory manager or
`--redis URL` for python-socketio's AsyncRedisManager.

Run:  python -m benches.peers.sio_server --port PORT [--redis redis://127.0.0.1:PORT/0]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

# Not project deps: benches/peers/setup.sh installs them; the ignores cover a type check run
# without them.
import socketio  # type: ignore[import-untyped, import-not-found, unused-ignore]
import uvloop
from aiohttp import web  # type: ignore[import-not-found, unused-ignore]


def build(redis_url: str | None) -> web.Application:
    manager = socketio.AsyncRedisManager(redis_url) if redis_url else None
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=manager,
        transports=["websocket"],
        logger=False,
        engineio_logger=False,
        max_http_buffer_size=1 << 20,
    )

    @sio.on("join")  # type: ignore[untyped-decorator]
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True

    @sio.on("pub")  # type: ignore[untyped-decorator]
    async def pub(sid: str, room: str, data: Any) -> bool:
        await sio.emit("d", data, room=room)
        return True

    app = web.Application()
    sio.attach(app)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis", default=None)
    a = ap.parse_args()
    uvloop.install()
    web.run_app(build(a.redis), host=a.host, port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
