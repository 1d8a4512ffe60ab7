"""A connection that ends leaves no reference cycle behind: reference counting frees it.

The relay freezes its long-lived objects (kasagi_relay/gcpolicy.py), and garbage cycles among
frozen objects wait for a full collection of the whole heap. Every connection used to end
as ~44 such objects (its session, member, websockets connection, protocol, transport...),
so under member churn the heap filled with them and the full collections that freed them
stopped every room for seconds (docs/benchmarks.md, "Many rooms"). Each way a connection
ends is checked here on a real relay and real sockets, with raw clients (a websockets
client would leave garbage of its own in this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from kasagi_relay.server import Relay
from testkit.relay import raw_connect, raw_member, read_frames, start_relay, text_frame
from testkit.wait import until

# Objects of these modules left unreachable are the server's connections (the test's own
# raw sockets and coroutines belong to neither).
SERVER_MODULES = ("kasagi_relay.", "websockets.", "uvloop.")
API_KEY = "k" * 32


@contextlib.asynccontextmanager
async def cycles_left(relay: Relay) -> AsyncIterator[Counter[str]]:
    """The server-side objects that only a cyclic collection would free, of what the block
    did (counted by type once the block's connections have ended)."""
    gc.collect()
    gc.disable()
    left: Counter[str] = Counter()
    try:
        yield left
        server = relay.server
        await until(
            lambda: not relay.sessions and (server is None or not server.connections),
            10,
            "every connection ended",
        )
        await asyncio.sleep(0.05)  # the handlers' last callbacks
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        for obj in gc.garbage:
            kind = type(obj)
            name = f"{kind.__module__}.{kind.__qualname__}"
            if name.startswith(SERVER_MODULES):
                left[name] += 1
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def close_frame(code: int) -> bytes:
    payload = struct.pack("!H", code)
    mask = os.urandom(4)
    return (
        bytes((0x88, 0x80 | len(payload)))
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def joined_and_published(relay: Relay) -> socket.socket:
    sock = await raw_connect(relay.port)
    await send(sock, text_frame(b'{"t":"join","room":"r"}'))
    await send(sock, text_frame(b'{"t":"delta","room":"r","merge":{"a":1},"id":1}'))
    await read_frames(sock, 3)  # joined, the ack, the delta
    return sock


async def client_closes(relay: Relay) -> None:
    sock = await joined_and_published(relay)
    await send(sock, close_frame(1000))
    frames = await read_frames(sock)
    assert frames[-1][0] == 0x8
    sock.close()


async def client_vanishes(relay: Relay) -> None:
    sock = await joined_and_published(relay)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, no close frame


async def presence_member_vanishes(relay: Relay) -> None:
    watcher = await raw_connect(relay.port)
    await send(watcher, text_frame(b'{"t":"join","room":"p","presence":true}'))
    await read_frames(watcher, 1)  # joined
    sock = await raw_connect(relay.port)
    await send(sock, text_frame(b'{"t":"join","room":"p","presence":true}'))
    await read_frames(sock, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    events = await read_frames(watcher, 2)  # its presence_join, then its presence_leave
    assert b"presence_leave" in events[-1][1], events
    watcher.close()


async def protocol_error(relay: Relay) -> None:
    sock = await joined_and_published(relay)
    await send(sock, b"\x81\x02{}")  # unmasked: 1002
    frames = await read_frames(sock)
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1002
    sock.close()


async def dropped_as_slow(relay: Relay) -> None:
    stalled = await raw_member(relay.port, "r")
    writer = await raw_connect(relay.port)
    blob = b"x" * 32000
    dropped = relay.metrics.dropped_members._value.get()
    async with asyncio.timeout(20):
        while relay.metrics.dropped_members._value.get() == dropped:
            delta = b'{"t":"delta","room":"r","merge":{"b":"' + blob + b'"},"id":1}'
            await send(writer, text_frame(delta))
            await read_frames(writer, 1)  # the ack
    frames = await read_frames(stalled)
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1013
    stalled.close()
    writer.close()


async def never_authenticates(relay: Relay) -> None:
    sock = await raw_connect(relay.port)
    await send(sock, text_frame(b'{"t":"join","room":"r"}'))
    (reply,) = await read_frames(sock, 1)
    assert b"unauthorized" in reply[1]
    sock.close()


async def http_requests(relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    for path in ("/healthz", "/api/rooms/r"):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", relay.port))
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        await send(sock, head.encode() + b"Connection: close\r\n\r\n")
        data = b""
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:80]
        sock.close()


Scenario = Callable[[Relay], Awaitable[None]]
CASES: list[tuple[Scenario, dict[str, Any]]] = [
    (client_closes, {}),
    (client_vanishes, {}),
    (presence_member_vanishes, {}),
    (protocol_error, {}),
    (dropped_as_slow, {"send_queue_bytes": 64 * 1024}),
    (never_authenticates, {"jwt_secret": "s" * 32}),
    (http_requests, {"api_keys": (API_KEY,)}),
]


@pytest.mark.parametrize(("scenario", "overrides"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_an_ended_connection_leaves_no_cycle(
    scenario: Scenario, overrides: dict[str, Any]
) -> None:
    async with start_relay(**overrides) as relay:
        await scenario(relay)  # once first: what a first connection creates for good
        async with cycles_left(relay) as left:
            for _ in range(3):
                await scenario(relay)
        assert not left, f"objects only a cyclic collection frees: {dict(left)}"
