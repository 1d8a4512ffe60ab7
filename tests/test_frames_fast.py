"""The relay's own reading of client data frames (session.RelayConnection._receive): complete
masked text and binary frames are read without websockets' parser, everything else goes to
websockets. Each test runs against a real relay over a real socket twice, with that reading
on and off (`fast`), and expects the same outcome: the same replies in the same order, the
same close codes (1002 unmasked, 1007 invalid UTF-8, 1009 too big)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from kasagi_relay import session
from kasagi_relay.server import Relay
from testkit.relay import parse_frames, raw_connect, start_relay

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _xor(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    masked: bool = True,
    wide: bool = False,
    mask: bytes | None = None,
) -> bytes:
    """A client frame; `wide`: the 64-bit length form whatever the size (RFC 6455 does not
    require the shortest, and websockets reads any); `mask`: else a random one."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if wide:
        head = struct.pack("!BBQ", first, bit | 127, n)
    elif n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    mask = mask or os.urandom(4)
    return head + mask + _xor(payload, mask)


def join(rid: int, size: int) -> bytes:
    """A join of room `r<rid>` padded with JSON whitespace to `size` bytes."""
    body = json.dumps({"t": "join", "room": f"r{rid}", "id": rid}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


# One payload size per length class: 7-bit (0-125), 16-bit (126-65535), 64-bit (65536+).
SIZES = (40, 125, 126, 1000, 65535, 65536, 200_000)


# The relay's two readers: the native one it runs (rust/frames.rs) and the Python one that
# is its reference (and the fallback with the pure-Python engine).
READERS: dict[str, Callable[[bytes, int | None], tuple[list[tuple[int, bytes]], int]]] = {
    "python": session._py_data_frames
}
if session._frame_reader() is not session._py_data_frames:
    READERS["native"] = session._frame_reader()


@pytest.fixture(params=[*READERS, "websockets"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The relay's reading on (with each reader) or off; the list counts the frames it
    read."""
    taken: list[int] = []
    if request.param == "websockets":
        monkeypatch.setattr(session, "_FAST_FRAMES", False)
        return taken
    real = READERS[request.param]

    def counting(data: bytes, max_size: int | None) -> tuple[list[tuple[int, bytes]], int]:
        frames, used = real(data, max_size)
        taken.append(len(frames))
        return frames, used

    monkeypatch.setattr(session, "_data_frames", counting)
    return taken


@contextlib.asynccontextmanager
async def raw_relay(**overrides: Any) -> AsyncIterator[tuple[Relay, socket.socket]]:
    async with start_relay(rate_limit=0, rate_bytes=0, **overrides) as relay:
        sock = await raw_connect(relay.port)
        try:
            yield relay, sock
        finally:
            sock.close()


async def read_until(
    sock: socket.socket, done: Callable[[list[tuple[int, bytes]]], bool], within: float = 10.0
) -> list[tuple[int, bytes]]:
    """Frames from the relay until `done(frames)` or the connection ends."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(within):
        while True:
            frames, _ = parse_frames(data)
            if done(frames):
                return frames
            try:
                chunk = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                return frames
            if not chunk:
                return frames
            data += chunk


def replies(frames: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(p) for op, p in frames if op == OP_TEXT]


def ids(frames: list[tuple[int, bytes]]) -> list[Any]:
    return [r.get("id") for r in replies(frames)]


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    for opcode, payload in frames:
        if opcode == OP_CLOSE:
            return int(struct.unpack("!H", payload[:2])[0])
    return None


def closed(frames: list[tuple[int, bytes]]) -> bool:
    return close_code(frames) is not None


def joined(n: int) -> Callable[[list[tuple[int, bytes]]], bool]:
    return lambda frames: len(replies(frames)) >= n or closed(frames)


# --------------------------------------------------------------------------- served


async def test_every_length_class_in_one_write(fast: list[int]) -> None:
    """Text and binary frames of each length class, back to back in one write, and the
    64-bit form of a short length: every one answered, in order."""
    wire = b""
    expected = []
    for i, size in enumerate(SIZES):
        opcode = OP_TEXT if i % 2 == 0 else OP_BINARY
        wire += frame(opcode, join(i, size))
        expected.append(i)
    wire += frame(OP_TEXT, join(99, 60), wide=True)
    expected.append(99)
    async with raw_relay() as (_, sock):
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        frames = await read_until(sock, joined(len(expected)))
    assert ids(frames) == expected
    assert all(r["t"] == "joined" for r in replies(frames))
    if fast:
        # The first write's slice (session.FEED_SLICE) starts with the small ones; the big
        # ones straddle slices, which websockets reads.
        assert sum(fast) >= 4


async def test_frames_split_anywhere(fast: list[int]) -> None:
    """Frames cut at every kind of point (inside the 2-byte head, after it with the length
    or mask still to come, inside the payload) across writes a moment apart: websockets'
    parser then waits in the middle of a frame, and the next bytes are its."""
    frames_out = [
        frame(OP_TEXT, join(1, 50)),
        frame(OP_TEXT, join(2, 300)),
        frame(OP_BINARY, join(3, 70_000)),
        frame(OP_TEXT, join(4, 50)),
    ]
    wire = b"".join(frames_out)
    a = len(frames_out[0])
    b = a + len(frames_out[1])
    c = b + len(frames_out[2])
    cuts = [1, 2, a + 2, a + 3, a + 6, b + 2, b + 10, b + 14, b + 40_000, c - 1, c + 2]
    async with raw_relay() as (_, sock):
        loop = asyncio.get_running_loop()
        start = 0
        for cut in [*cuts, len(wire)]:
            await loop.sock_sendall(sock, wire[start:cut])
            start = cut
            await asyncio.sleep(0.05)
        frames = await read_until(sock, joined(4))
    assert ids(frames) == [1, 2, 3, 4]


async def test_a_write_that_starts_inside_a_frame_is_not_read_as_a_frame(
    fast: list[int],
) -> None:
    """websockets' parser holds nothing once it read a frame's head and length, and waits
    for its mask: the next write (mask, payload) must go on with that frame, even when its
    bytes would read as a whole frame of their own."""
    body = join(1, 200)
    # Mask and masked payload read as: a text frame of 2 bytes, then more frames.
    mask = bytes((0x81, 0x82, 0x00, 0x00))
    whole = frame(OP_TEXT, body, mask=mask)
    assert whole[4:6] == bytes((0x81, 0x82))
    async with raw_relay() as (_, sock):
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, whole[:4])  # head and 16-bit length
        await asyncio.sleep(0.1)
        await loop.sock_sendall(sock, whole[4:] + frame(OP_TEXT, join(2, 60)))
        frames = await read_until(sock, joined(2))
    assert ids(frames) == [1, 2]


async def test_fragments_and_pings_between_data_frames(fast: list[int]) -> None:
    """A fragmented message with a ping inside it, pings between whole frames, all in one
    write: the pongs and the replies come in order, and whole frames after the fragmented
    message are read again."""
    first, second = join(2, 100)[:30], join(2, 100)[30:]
    wire = (
        frame(OP_TEXT, join(1, 60))
        + frame(OP_PING, b"a")
        + frame(OP_TEXT, first, fin=False)
        + frame(OP_PING, b"b")
        + frame(OP_CONT, second)
        + frame(OP_TEXT, join(3, 60))
        + frame(OP_PING, b"c")
        + frame(OP_BINARY, join(4, 200))
    )
    async with raw_relay() as (_, sock):
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, wire)
        frames = await read_until(
            sock, lambda f: len(replies(f)) >= 4 and len([op for op, _ in f if op == OP_PONG]) >= 3
        )
        # And again after it, in a later write.
        await loop.sock_sendall(sock, frame(OP_TEXT, join(5, 60)))
        later = await read_until(sock, joined(1))
    assert ids(frames) == [1, 2, 3, 4]
    assert [p for op, p in frames if op == OP_PONG] == [b"a", b"b", b"c"]
    assert ids(later) == [5]
    if fast:
        assert sum(fast) >= 2


# --------------------------------------------------------------------------- refused


async def test_invalid_utf8_in_a_text_frame_closes_1007(fast: list[int]) -> None:
    """A valid frame before it in the same write; the invalid one closes with 1007."""
    wire = frame(OP_TEXT, join(1, 50)) + frame(OP_TEXT, b'{"t":"join","room":"\xff\xfe"}')
    async with raw_relay() as (_, sock):
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        frames = await read_until(sock, closed)
    assert close_code(frames) == 1007


@pytest.mark.parametrize("size", [126 + 74, 70_000], ids=["16-bit", "64-bit"])
async def test_oversize_frame_closes_1009(fast: list[int], size: int) -> None:
    wire = frame(OP_TEXT, join(1, 50)) + frame(OP_TEXT, join(2, size))
    async with raw_relay(max_message_bytes=150) as (_, sock):
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        frames = await read_until(sock, closed)
    assert close_code(frames) == 1009


async def test_a_frame_at_the_limit_is_served(fast: list[int]) -> None:
    wire = frame(OP_TEXT, join(1, 150)) + frame(OP_BINARY, join(2, 150))
    async with raw_relay(max_message_bytes=150) as (_, sock):
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        frames = await read_until(sock, joined(2))
    assert ids(frames) == [1, 2]


async def test_unmasked_client_frame_closes_1002(fast: list[int]) -> None:
    # Four bytes more: read as masked, its first four bytes would be the mask and the write
    # one whole frame.
    wire = frame(OP_TEXT, join(1, 50)) + frame(OP_TEXT, join(2, 50), masked=False) + b"    "
    async with raw_relay() as (_, sock):
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        frames = await read_until(sock, closed)
    assert close_code(frames) == 1002


async def test_reserved_bits_and_unknown_opcodes_close_1002(fast: list[int]) -> None:
    for bad in (bytes((0xC1,)), bytes((0x83,))):  # RSV1 on a text frame; opcode 3
        wire = frame(OP_TEXT, join(1, 50)) + bad + frame(OP_TEXT, join(2, 50))[1:]
        async with raw_relay() as (_, sock):
            await asyncio.get_running_loop().sock_sendall(sock, wire)
            frames = await read_until(sock, closed)
        assert close_code(frames) == 1002


async def test_a_close_frame_is_answered_and_what_follows_is_not_read(fast: list[int]) -> None:
    wire = (
        frame(OP_TEXT, join(1, 50))
        + frame(OP_CLOSE, struct.pack("!H", 1000))
        + frame(OP_TEXT, join(2, 50))
    )
    async with raw_relay() as (_, sock):
        await asyncio.get_running_loop().sock_sendall(sock, wire)
        frames = await read_until(sock, closed)
    assert close_code(frames) == 1000


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_data_frames_reads_as_websockets_parses(reader: str, size: int) -> None:
    """Each reader gives the frames websockets' own parser gives for the same bytes."""
    payload = os.urandom(size)
    wire = frame(OP_BINARY, payload) + frame(OP_TEXT, b"x" * (size % 7)) + frame(OP_PING, b"p")
    frames, used = READERS[reader](wire, None)
    stream = StreamReader()
    stream.feed_data(wire)
    theirs = []
    for _ in range(2):
        parser = Frame.parse(stream.read_exact, mask=True, max_size=None)
        try:
            next(parser)
        except StopIteration as stop:  # a generator's return: the frame was complete
            theirs.append(stop.value)
        else:
            raise AssertionError("websockets waits for more of a complete frame")
    # Only final frames are read (fin=True).
    assert [(opcode, data, True) for opcode, data in frames] == [
        (f.opcode, bytes(f.data), f.fin) for f in theirs
    ]
    assert frames[0][0] == Opcode.BINARY
    assert used == len(wire) - len(frame(OP_PING, b"p"))


@pytest.mark.parametrize("reader", list(READERS))
def test_data_frames_stops_at_what_it_does_not_read(reader: str) -> None:
    whole = frame(OP_TEXT, b"abc")
    for rest in (
        whole[:5],  # incomplete
        frame(OP_TEXT, b"abc", fin=False),
        frame(OP_TEXT, b"abc", masked=False),
        frame(OP_CLOSE, b""),
        frame(OP_TEXT, b"x" * 11),  # over max_size below
        frame(OP_TEXT, b"x" * 300)[:8],  # 16-bit length, payload missing
        frame(OP_TEXT, b"x", wide=True)[:9],  # 64-bit length cut short
        struct.pack("!BBQ", 0x82, 0x80 | 127, 2**64 - 1) + b"mask",  # a length past any input
        frame(OP_TEXT, b"abc")[:1] + bytes([0xC1]),  # RSV1 set (in the first byte's place)
    ):
        frames, used = READERS[reader](whole + rest, 10)
        assert [data for _, data in frames] == [b"abc"]
        assert used == len(whole)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x81, 0x82, 0x01, 0x88, 0x89, 0xC1]),
            st.binary(max_size=300),
            st.booleans(),  # masked
            st.booleans(),  # wide
        ),
        max_size=6,
    ),
    st.integers(min_value=0, max_value=40),
    st.sampled_from([None, 0, 100, 200]),
)
def test_the_native_reader_reads_as_the_python_one(
    parts: list[tuple[int, bytes, bool, bool]], cut: int, max_size: int | None
) -> None:
    """The same frames, payloads and byte count from both readers, on runs of frames of
    every kind (data, continuation, control, RSV, unmasked, 64-bit lengths) cut short."""
    if "native" not in READERS:
        pytest.skip("no native engine")
    wire = b"".join(
        frame(first & 0x0F, payload, fin=bool(first & 0x80), masked=masked, wide=wide)
        if first != 0xC1
        else bytes([0xC1]) + frame(OP_TEXT, payload, masked=masked, wide=wide)[1:]
        for first, payload, masked, wide in parts
    )
    wire = wire[: max(0, len(wire) - cut)]
    assert READERS["native"](wire, max_size) == READERS["python"](wire, max_size)


def test_fast_reading_is_on_with_this_websockets() -> None:
    assert session._FAST_FRAMES
