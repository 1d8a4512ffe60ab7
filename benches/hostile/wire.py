"""Hand-made WebSocket client pieces for attacks that websockets' client will not do:
partial frames, pings without reading, thousands of frames in one write, tiny receive
windows. Client frames are masked as RFC 6455 requires (a server closes on unmasked ones)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from dataclasses import dataclass

from testkit.relay import parse_frames

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One masked client frame."""
    key = mask if mask is not None else os.urandom(4)
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 1 << 16:
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    return head + key + _xor(payload, key)


def _xor(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    # int.from_bytes XOR: one C-speed operation instead of a per-byte Python loop.
    reps = (len(payload) + 3) // 4
    stream = (key * reps)[: len(payload)]
    x = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return x.to_bytes(len(payload), "big")


def frame_header(opcode: int, length: int) -> bytes:
    """The header of a masked frame announcing `length` bytes (its mask included)."""
    return frame(opcode, b"")[:1] + _length_bytes(length) + b"\x00\x00\x00\x00"


def _length_bytes(n: int) -> bytes:
    if n < 126:
        return bytes((0x80 | n,))
    if n < 1 << 16:
        return bytes((0x80 | 126,)) + struct.pack("!H", n)
    return bytes((0x80 | 127,)) + struct.pack("!Q", n)


@dataclass
class RawConn:
    """A raw WebSocket connection after the handshake (or the refused handshake's status)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    buffered: bytes = b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.transport.abort()

    async def read_frames(
        self, within: float, max_bytes: int = 64 << 20
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Frames received within `within` s (up to `max_bytes`), and whether the connection
        ended (EOF or reset)."""
        data = self.buffered
        ended = False
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while len(data) < max_bytes:
            left = end - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), left)
            except TimeoutError:
                break
            except (ConnectionError, OSError):
                ended = True
                break
            if not chunk:
                ended = True
                break
            data += chunk
        frames, used = parse_frames(data)
        self.buffered = data[used:]
        return frames, ended


async def raw_connect(
    host: str,
    port: int,
    *,
    subprotocol: str | None = "kasagi.v1.json",
    rcvbuf: int | None = None,
    within: float = 5.0,
) -> RawConn:
    """TCP connect and send the upgrade request; the status of the reply (101 on success).

    With `rcvbuf`, the socket's receive buffer is that small and the stream reader pauses
    the transport early, so a caller that never reads makes the server's writes back up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    limit = 4096 if rcvbuf is not None else 1 << 16
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    key = base64.b64encode(os.urandom(16)).decode()
    proto = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{proto}\r\n"
        ).encode()
    )
    try:
        async with asyncio.timeout(within):
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
    except BaseException:
        writer.transport.abort()
        raise
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return RawConn(reader, writer, status)


def text_payload(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def reply_codes(frames: list[tuple[int, bytes]]) -> list[str]:
    """`error:<code>`, `ack`, ... for JSON replies; `close:<code>` for a close frame."""
    out: list[str] = []
    for opcode, payload in frames:
        if opcode == CLOSE:
            out.append(f"close:{close_code(payload)}")
        elif opcode == TEXT:
            try:
                msg = json.loads(payload)
            except ValueError:
                out.append("text?")
                continue
            if isinstance(msg, dict):
                t = msg.get("t")
                out.append(f"error:{msg.get('code')}" if t == "error" else str(t))
        elif opcode == PONG:
            out.append("pong")
    return out
