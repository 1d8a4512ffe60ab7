"""Fan-out: write one pre-built WebSocket frame to many connections.

A frame is encoded once per subprotocol and the same bytes go to every member. Rather than
`websockets.broadcast`, which serializes the frame again for every connection, the complete
frame (header + payload) is built once and handed to each connection's transport.

Why this is sound with websockets 17 (`asyncio/connection.py`, `protocol.py`):
- Server frames are unmasked and, with `compression=None`, no extension is negotiated, so
  `Frame(...).serialize(mask=False, extensions=[])` is the same bytes for every connection
  (`frame()` below builds exactly those bytes; a test holds them equal).
- websockets writes to the transport synchronously on the loop thread, whole frames at a
  time (`send_data()` after each protocol call), and never keeps unsent frames across an
  await. We also write whole frames synchronously on the same thread, so frames never
  interleave. We never send fragmented messages, so no continuation is ever pending.
- We write only while `protocol.state is OPEN`: once a close frame is sent, nothing follows.
Our writes bypass websockets' flow control (`drain`); instead each member has a byte limit
on its transport's write buffer and is dropped with 1013 past it.

With the native engine, the members whose transport has nothing buffered (nearly all of
them, nearly always) are written by one native call (`_native.send_frame`, rust/fanout.rs):
a non-blocking `send` per socket with the GIL released, without a Python call and the
transport's own bookkeeping per member (benches/fanout: at 500 members the relay went past
the floor, which writes through the transports, by 1.23x in frames per CPU-second). Whatever a
socket does not take is handed to its transport in the same synchronous step, so the
transport buffers it and nothing can be written in between: frame order is kept. A socket
is written directly only while its transport is open and not closing (a closing transport
may already have closed the descriptor, whose number could then be reused) and is plain
TCP (no TLS layer in the transport).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from kasagi_relay import delta
from kasagi_relay.protocol import JSON, Codec, DeltaFrame

__all__ = ["CLOSE_TOO_SLOW", "Member", "broadcast", "frame"]

logger = logging.getLogger("kasagi_relay.fanout")

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
CLOSE_TOO_SLOW: Final = 1013
OPEN: Final = State.OPEN


class SendFrame(Protocol):
    """`_native.send_frame`: (position, bytes taken) of each socket that took less."""

    def __call__(self, fds: list[int], frame: bytes, /) -> list[tuple[int, int]]: ...


def native_sender() -> SendFrame | None:
    """The native broadcast loop, or None with the pure-Python engine (or off Unix)."""
    if delta.IMPLEMENTATION != "native":
        return None
    from kasagi_relay import _native

    return getattr(_native, "send_frame", None)


# Replaced in tests to run the same broadcasts through both paths.
send_frame: SendFrame | None = native_sender()


def frame(opcode: int, payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket frame (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


class Member:
    """The writing side of one client connection."""

    __slots__ = (
        "_allowance",
        "_on_slow",
        "codec",
        "conn",
        "dropped",
        "fd",
        "limit",
        "opcode",
        "protocol",
        "transport",
    )

    def __init__(
        self,
        conn: ServerConnection,
        codec: Codec,
        limit: int,
        on_slow: Callable[[Member], None],
    ) -> None:
        self.conn = conn
        self.protocol = conn.protocol
        self.transport = conn.transport
        self.codec: Codec = codec
        self.opcode = OP_TEXT if codec == JSON else OP_BINARY
        self.limit = limit
        # A frame larger than the limit (a full state on join) must still go out: the
        # allowance grows for it and shrinks back once the buffer drains below the limit.
        self._allowance = limit
        self._on_slow = on_slow
        self.dropped = False
        self.fd = direct_fd(conn)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def is_open(self) -> bool:
        return not self.dropped and self.protocol.state is OPEN

    def write(self, data: bytes) -> bool:
        """Write one complete frame; False (and the member is being dropped) when it cannot."""
        if self.dropped or self.protocol.state is not OPEN:
            return False
        buffered = self.transport.get_write_buffer_size()
        size = len(data)
        if buffered <= self.limit:
            self._allowance = self.limit
        elif buffered + size > self._allowance:
            self.dropped = True
            self._on_slow(self)
            return False
        if size > self.limit:
            # A frame bigger than the limit (a full state) goes out whole; the member is
            # given the time to read it before the limit applies again.
            self._allowance = max(self._allowance, buffered + size + self.limit)
        self.transport.write(data)
        return True

    def send(self, payload: bytes) -> bool:
        """Frame and write one payload of this member's subprotocol."""
        return self.write(frame(self.opcode, payload))


def direct_fd(conn: ServerConnection) -> int:
    """The socket a broadcast may write to directly, or -1 (TLS, or no socket)."""
    transport = conn.transport
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return -1
    fd: int = sock.fileno()
    return fd


def broadcast(members: Iterable[Member], message: DeltaFrame) -> tuple[int, int]:
    """Write `message` to every member, encoding it at most once per subprotocol.

    Returns (frames written, bytes written)."""
    frames: dict[Codec, bytes] = {}
    sender = send_frame
    # Per subprotocol: the members written by the native loop, and their sockets.
    direct: dict[Codec, tuple[list[Member], list[int]]] = {}
    count = 0
    total = 0
    for member in members:
        data = frames.get(member.codec)
        if data is None:
            data = frames[member.codec] = frame(member.opcode, message.payload(member.codec))
        # Inlined fast path (open, nothing buffered or under its limit, a frame smaller than
        # the limit): at 5,000 members the method call and websockets' `state` property cost
        # about 7% of the broadcast (py-spy, benches/fanout). Everything else goes through
        # Member.write.
        transport = member.transport
        if (
            not member.dropped
            and member.protocol._state is OPEN
            and len(data) <= member.limit
            and (buffered := transport.get_write_buffer_size()) <= member.limit
        ):
            member._allowance = member.limit
            if (
                sender is not None
                and buffered == 0
                and member.fd >= 0
                and not transport.is_closing()
            ):
                batch = direct.get(member.codec)
                if batch is None:
                    batch = direct[member.codec] = ([], [])
                batch[0].append(member)
                batch[1].append(member.fd)
                continue
            transport.write(data)
        elif not member.write(data):
            continue
        count += 1
        total += len(data)
    if sender is not None:
        for codec, (batch_members, fds) in direct.items():
            data = frames[codec]
            for index, sent in sender(fds, data):
                # The rest is buffered by the transport before anything else can be written.
                batch_members[index].transport.write(memoryview(data)[sent:])
            count += len(fds)
            total += len(data) * len(fds)
    return count, total
