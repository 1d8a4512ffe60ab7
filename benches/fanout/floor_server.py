"""The floor of fan-out: the least work a Python server can do per member per delta.

A raw uvloop `asyncio.Protocol` per connection, with a hand-written WebSocket handshake and
frame parser (no websockets library, no per-connection task). On each `delta` from a
client it builds ONE complete WebSocket frame and hands the same bytes to every member's
`transport.write`: no per-member encoding, no flow control, no slow-member policy. What
kasagi-relay does on top of this (ordering, state, merging, limits) is its overhead.

It speaks just enough of docs/protocol.md for the harness: `join` -> `joined` (seq, empty state),
`delta` with `merge` or `patch` -> a `delta` frame with `from`/`seq` to every member of the
room and an `ack` to the sender, `leave` -> `left`; ping -> pong, close -> close. The frame
has the same shape and byte order as the relay's, so clients parse the same bytes.

Run:  python benches/fanout/floor_server.py [--host 127.0.0.1] [--port 0]
It prints `floor serving ws://HOST:PORT/ws` on stderr once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import resource
import signal
import struct
import sys
from typing import Any, cast

import uvloop

try:  # websockets' C helper, only to unmask the few client frames (joins, deltas)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - pure-Python fallback
    from websockets.utils import apply_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOLS = ("kasagi.v1.json",)
MAX_HEAD = 16 * 1024
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def frame(opcode: int, payload: bytes) -> bytes:
    """One complete, final, unmasked frame (server to client, RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def text(message: dict[str, Any]) -> bytes:
    return frame(0x1, _DUMPS(message).encode())


class Room:
    __slots__ = ("name", "seq", "writers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        # conn -> its transport's bound write: the fan-out loop is one call per member.
        self.writers: dict[Conn, Any] = {}


ROOMS: dict[str, Room] = {}


class Conn(asyncio.Protocol):
    __slots__ = ("buf", "open", "rooms", "transport")

    def __init__(self) -> None:
        self.buf = b""
        self.open = False
        self.rooms: list[Room] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only compatible.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for room in self.rooms:
            room.writers.pop(self, None)
        self.rooms.clear()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _refuse(self, status: str) -> None:
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        self.transport.close()

    def _handshake(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "GET" or parts[1].partition("?")[0] != "/ws":
            self._refuse("404 Not Found")
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if key is None or "websocket" not in headers.get("upgrade", "").lower():
            self._refuse("400 Bad Request")
            return False
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        offered = [p for p in offered if p]
        chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
        if offered and chosen is None:
            self._refuse("400 Bad Request")
            return False
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        proto = f"Sec-WebSocket-Protocol: {chosen}\r\n" if chosen else ""
        self._write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{proto}\r\n"
            ).encode()
        )
        self.open = True
        return True

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                if len(buf) > MAX_HEAD:
                    self._refuse("431 Request Header Fields Too Large")
                return
            if not self._handshake(buf[:end]):
                return
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            masked = b1 & 0x80
            if masked:
                head += 4
            stop = pos + head + length
            if stop > n:
                break
            payload = buf[pos + head : stop]
            if masked:
                payload = apply_mask(payload, buf[pos + head - 4 : pos + head])
            self._frame(b0 & 0x0F, payload)
            pos = stop
        self.buf = buf[pos:]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            self._message(payload)
        elif opcode == 0x8:  # close: echo the code, then end TCP
            self._write(frame(0x8, payload[:2]))
            assert self.transport is not None
            self.transport.close()
        elif opcode == 0x9:
            self._write(frame(0xA, payload))

    def _message(self, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            t, name = msg["t"], msg["room"]
        except (ValueError, KeyError, TypeError):
            self._write(text({"t": "error", "code": "bad_message", "message": "bad message"}))
            return
        room = ROOMS.get(name)
        if room is None:
            room = ROOMS[name] = Room(name)
        rid = msg.get("id")
        if t == "join":
            assert self.transport is not None
            self._write(text({"t": "joined", "room": name, "seq": room.seq, "state": {}}))
            room.writers[self] = self.transport.write
            self.rooms.append(room)
        elif t == "delta":
            kind = "merge" if "merge" in msg else "patch"
            room.seq += 1
            seq = room.seq
            # The one frame of this delta, built once; the same bytes go to every member.
            out = frame(
                0x1,
                b'{"t":"delta","room":"%s","from":%d,"seq":%d,"%s":%s}'
                % (name.encode(), seq, seq, kind.encode(), _DUMPS(msg[kind]).encode()),
            )
            for write in room.writers.values():
                write(out)
            ack = {"t": "ack", "room": name, "seq": seq}
            if rid is not None:
                ack["id"] = rid
            self._write(text(ack))
        elif t == "leave":
            room.writers.pop(self, None)
            if room in self.rooms:
                self.rooms.remove(room)
            self._write(text({"t": "left", "room": name}))
        else:
            self._write(text({"t": "error", "code": "bad_message", "message": f"unknown t {t}"}))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"floor serving ws://{host}:{bound[1]}/ws", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(a.host, a.port))


if __name__ == "__main__":
    main()
