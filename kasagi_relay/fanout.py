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
  interleave.
- A big message (a room's state in `joined` or `reset`) is sent fragmented (RFC 6455 5.4)
  by the member's pump, as the member reads. While it is under way every data frame for
  that member goes through its backlog, behind it; websockets itself writes only control
  frames (ping, pong, close), which may come between fragments.
- We write only while `protocol.state is OPEN`: once a close frame is sent, nothing follows.
Broadcasts bypass websockets' flow control (`drain`); instead each member has a byte limit
on what is queued for it (its transport's write buffer and its backlog) and is dropped with
1013 past it; a relay-wide `SendBudget` bounds the sum. The pump, which produces big
messages, does wait for websockets' flow control (`conn.paused`, `conn.drain()`).

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

Replies to a connection's own requests (acks, `left`) are written once per loop turn
(`Member.send_soon`; `write_soon` for frames built already, such as the presence events
a member gets with its acks or its `left`): every `transport.write` of uvloop is a
`send` system call,
and a publisher with several deltas in flight gets several acks in the same turn. On the memory
backend the ack's `send` was the biggest single item of the publish path (py-spy, 14 % of
the loop thread; docs/benchmarks.md "Publish path"). What a member holds this way is written
before anything else is written to it (every other write flushes it first), so order is
kept; it counts in `queued()` and goes through `Member.write`'s limit when written. The
session writes it once no further message is queued to read (session.Session.run), so what
a member holds is bounded by the messages a session serves before it yields.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from kasagi_relay import delta
from kasagi_relay.loops import running_loop
from kasagi_relay.protocol import JSON, Codec, DeltaFrame

__all__ = [
    "CHUNK",
    "CLOSE_TOO_SLOW",
    "Member",
    "Payload",
    "SendBudget",
    "Stream",
    "broadcast",
    "frame",
]

logger = logging.getLogger("kasagi_relay.fanout")

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
CLOSE_TOO_SLOW: Final = 1013
OPEN: Final = State.OPEN
# Fragments of a streamed message: big enough that the per-frame cost is small, small
# enough that a member holds little of it at a time.
CHUNK: Final = 64 * 1024
# Bytes a member's pump writes before it lets the loop run other work.
PUMP_STEP: Final = 4 * CHUNK


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


def header(opcode: int, n: int, *, fin: bool = True) -> bytes:
    """The header of an unmasked frame of `n` payload bytes."""
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n))
    if n < 65536:
        return struct.pack("!BBH", first, 126, n)
    return struct.pack("!BBQ", first, 127, n)


class Stream(Protocol):
    """A message produced as its member reads (a snapshot in fragments, a replay)."""

    def remaining(self) -> int:
        """The bytes still to come that this stream alone holds (for the send budget)."""
        ...

    async def next_frame(self) -> bytes | None:
        """The next complete WebSocket frame to write, or None when the stream is done."""
        ...

    def close(self) -> None:
        """The member went: release what the stream holds."""
        ...


class Payload:
    """One message of any size, shared by every member that is sent it (the `joined` state
    of a room version, a `reset`): held once, written to each member in fragments as it
    reads (RFC 6455 5.4; control frames such as websockets' pings and pongs may come
    between fragments, data frames may not, and only the member's own stream writes data
    while it is pending)."""

    __slots__ = ("holders", "parts", "size")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.size = sum(len(p) for p in parts)
        self.holders = 0

    def stream(self, opcode: int, prefix: bytes = b"", suffix: bytes = b"") -> Fragments:
        """This payload framed for one member, with that member's own bytes around it."""
        return Fragments(self, opcode, prefix, suffix)


class Fragments:
    """A `Payload` (with a member's prefix and suffix) cut into frames of at most CHUNK."""

    __slots__ = ("_at", "_opcode", "_parts", "_payload", "_sent", "_total")

    def __init__(self, payload: Payload, opcode: int, prefix: bytes, suffix: bytes) -> None:
        self._payload: Payload | None = payload
        payload.holders += 1
        self._parts = [p for p in (prefix, *payload.parts, suffix) if p]
        self._total = len(prefix) + payload.size + len(suffix)
        self._opcode = opcode
        self._at = (0, 0)  # (part, offset) of the next byte
        self._sent = 0

    def remaining(self) -> int:
        payload = self._payload
        if payload is None:
            return 0
        # Shared bytes are counted once across the members holding them.
        return (self._total - self._sent) // max(1, payload.holders)

    async def next_frame(self) -> bytes | None:
        if self._sent >= self._total:
            self.close()
            return None
        part, offset = self._at
        chunks: list[bytes | memoryview] = []
        size = 0
        while size < CHUNK and part < len(self._parts):
            data = self._parts[part]
            take = min(CHUNK - size, len(data) - offset)
            chunks.append(memoryview(data)[offset : offset + take])
            size += take
            offset += take
            if offset == len(data):
                part, offset = part + 1, 0
        self._at = (part, offset)
        first = self._sent == 0
        self._sent += size
        fin = self._sent >= self._total
        opcode = self._opcode if first else OP_CONTINUATION
        return header(opcode, size, fin=fin) + b"".join(chunks)

    def close(self) -> None:
        if self._payload is not None:
            self._payload.holders -= 1
            self._payload = None
            self._parts = []


class SendBudget:
    """The relay-wide bound on bytes queued for members (config.send_budget_bytes).

    Members report what they hold when they queue bytes; the total is kept from those
    reports (drains make it an overestimate) and recounted exactly only when it passes the
    limit. Past the limit after the recount, the members holding the most are dropped with
    1013 until the total is back within it. A dropped member's buffer is no longer counted:
    it is freed when the connection closes (after the close frame, or at the close timeout),
    as for a member dropped for its own limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._members: weakref.WeakSet[Member] = weakref.WeakSet()

    def add(self, member: Member) -> None:
        self._members.add(member)

    def note(self, member: Member, queued: int) -> None:
        self.total += queued - member._counted
        member._counted = queued
        if self.limit and self.total > self.limit:
            self.shed()

    def shed(self) -> list[Member]:
        """Recount; drop the largest holders while the total is over the limit."""
        held = []
        total = 0
        for member in list(self._members):
            queued = member.queued() if not member.dropped else 0
            member._counted = queued
            total += queued
            if queued:
                held.append((queued, member))
        self.total = total
        dropped = []
        if total > self.limit:
            held.sort(key=lambda pair: pair[0], reverse=True)
            for _, member in held:
                if self.total <= self.limit:
                    break
                dropped.append(member)
                member.drop()
        return dropped


class Member:
    """The writing side of one client connection.

    Frames go straight to the transport, except while the member has a backlog (a stream
    being produced as it reads, and what was sent to it meanwhile): then they queue behind
    it, in order, and count against its limit like the transport's buffer does."""

    __slots__ = (
        "__weakref__",
        "_allowance",
        "_backlog_bytes",
        "_counted",
        "_on_slow",
        "_pending",
        "_pump",
        "backlog",
        "budget",
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
        budget: SendBudget | None = None,
    ) -> None:
        self.conn = conn
        self.protocol = conn.protocol
        self.transport = conn.transport
        self.codec: Codec = codec
        self.opcode = OP_TEXT if codec == JSON else OP_BINARY
        self.limit = limit
        # A frame larger than the limit (a big delta) must still go out: the allowance
        # grows for it and shrinks back once the buffer drains below the limit.
        self._allowance = limit
        self._on_slow = on_slow
        self.dropped = False
        self.fd = direct_fd(conn)
        # None, or what waits behind a stream: frames (bytes) and streams, in order.
        self.backlog: deque[bytes | Stream] | None = None
        self._backlog_bytes = 0
        # Frames held until the end of this loop turn (send_soon), or None.
        self._pending: list[bytes] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._counted = 0  # what the budget last recorded for this member
        self.budget = budget
        if budget is not None:
            budget.add(self)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def queued(self) -> int:
        """Bytes held for this member: its transport's buffer, its backlog, and its share
        of the streams it is being sent."""
        total = self.transport.get_write_buffer_size() + self._backlog_bytes
        if self._pending is not None:
            total += sum(len(data) for data in self._pending)
        if self.backlog is not None:
            for item in self.backlog:
                if not isinstance(item, bytes):
                    total += item.remaining()
        return total

    def is_open(self) -> bool:
        return not self.dropped and self.protocol.state is OPEN

    def drop(self) -> None:
        """Give up on this member (1013 through on_slow); its backlog is released."""
        if self.dropped:
            return
        self.dropped = True
        self._pending = None
        self._release()
        if self.budget is not None:
            # What it still holds is freed when its connection closes (within the close
            # timeout, after its 1013 close frame), not counted against the others.
            self.budget.total -= self._counted
            self._counted = 0
        self._on_slow(self)

    def detach(self) -> None:
        """Forget the owner's slow callback: its session has ended, and the callback (bound
        to it) would keep the two in a reference cycle."""
        self._on_slow = _ignore_slow

    def write(self, data: bytes) -> bool:
        """Write one complete frame; False (and the member is being dropped) when it cannot."""
        if self._pending is not None:
            self.flush_pending()
        if self.dropped or self.protocol.state is not OPEN:
            return False
        buffered = self.transport.get_write_buffer_size()
        size = len(data)
        if self.backlog is not None:
            # One frame of any size may wait (a big delta behind a snapshot), as below.
            if self._backlog_bytes and buffered + self._backlog_bytes + size > self.limit:
                self.drop()
                return False
            self.backlog.append(data)
            self._backlog_bytes += size
            self._note(buffered + self._backlog_bytes)
            return True
        if buffered <= self.limit:
            self._allowance = self.limit
        elif buffered + size > self._allowance:
            self.drop()
            return False
        if size > self.limit:
            # A frame bigger than the limit goes out whole; the member is given the time
            # to read it before the limit applies again.
            self._allowance = max(self._allowance, buffered + size + self.limit)
        self.transport.write(data)
        if self.budget is not None:
            self._note(self.transport.get_write_buffer_size())
        return True

    def send(self, payload: bytes) -> bool:
        """Frame and write one payload of this member's subprotocol."""
        return self.write(frame(self.opcode, payload))

    def send_soon(self, payload: bytes) -> bool:
        """Frame `payload` and write it at the end of this loop turn, with whatever else is
        sent this way in the turn: one `send` for all of them. False when the member is gone."""
        return self.write_soon(frame(self.opcode, payload))

    def write_soon(self, data: bytes) -> bool:
        """`send_soon` of complete frames (`data`, built by the caller)."""
        if self.dropped or self.protocol.state is not OPEN:
            return False
        if self.backlog is not None:
            return self.write(data)  # behind the stream, in order
        pending = self._pending
        if pending is None:
            self._pending = [data]
            _turn.add(self)
        else:
            pending.append(data)
        return True

    def flush_pending(self) -> None:
        """Write what `send_soon` holds now (before any other write to this member)."""
        pending, self._pending = self._pending, None
        if pending:
            self.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def send_stream(self, stream: Stream) -> bool:
        """Queue a message produced as the member reads; what is sent to the member later
        goes after it. False (and the stream is closed) when the member is gone."""
        if self._pending is not None:
            self.flush_pending()
        if not self.is_open():
            stream.close()
            return False
        if self.backlog is None:
            self.backlog = deque()
        self.backlog.append(stream)
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        return True

    def send_payload(self, payload: Payload, prefix: bytes = b"", suffix: bytes = b"") -> bool:
        """Send `prefix + payload + suffix` as one message; a big one as it reads."""
        if payload.size + len(prefix) + len(suffix) <= CHUNK and self.backlog is None:
            return self.send(b"".join((prefix, *payload.parts, suffix)))
        return self.send_stream(payload.stream(self.opcode, prefix, suffix))

    def _note(self, queued: int) -> None:
        if self.budget is not None:
            self.budget.note(self, queued)

    async def _run_pump(self) -> None:
        """Write the backlog as the transport drains (websockets' write limits pause it),
        yielding to the loop after each PUMP_STEP bytes; stop when the member goes."""
        try:
            while self.backlog and self.is_open():
                written = 0
                while self.backlog and not self.conn.paused and written < PUMP_STEP:
                    item = self.backlog[0]
                    if isinstance(item, bytes):
                        self.backlog.popleft()
                        self._backlog_bytes -= len(item)
                        data = item
                    else:
                        produced = await item.next_frame()
                        if not self.is_open():
                            return
                        if produced is None:
                            self.backlog.popleft()
                            continue
                        data = produced
                    self.transport.write(data)
                    written += len(data)
                if self.budget is not None:
                    self._note(self.queued())
                if self.conn.paused:
                    await self.conn.drain()
                else:
                    await asyncio.sleep(0)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._pump = None
            if not self.backlog or not self.is_open():
                self._release()

    def _release(self) -> None:
        backlog, self.backlog = self.backlog, None
        self._backlog_bytes = 0
        if backlog is not None:
            for item in backlog:
                if not isinstance(item, bytes):
                    item.close()
        pump = self._pump
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
            self._pump = None


class _Turn:
    """The members holding frames from `Member.send_soon`, written by one callback at the
    end of the loop turn (one handle for all of them, not one per member)."""

    __slots__ = ("handle", "loop", "members")

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.handle: asyncio.Handle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, member: Member) -> None:
        loop = running_loop()
        if self.handle is None or self.loop is not loop:
            # A handle of another (closed) loop never runs: its members are dropped here.
            self.members = []
            self.loop = loop
            self.handle = loop.call_soon(self.run)
        self.members.append(member)

    def run(self) -> None:
        members, self.members = self.members, []
        self.handle = None
        for member in members:
            if member._pending is not None:
                try:
                    member.flush_pending()
                except Exception:
                    # One connection's failure must not hold up the others' acks.
                    logger.exception("writing the held frames of a member failed")


_turn = _Turn()


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
            and member.backlog is None
            and member._pending is None
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
            if member.budget is not None:
                member.budget.note(member, transport.get_write_buffer_size())
        elif not member.write(data):
            continue
        count += 1
        total += len(data)
    if sender is not None:
        for codec, (batch_members, fds) in direct.items():
            data = frames[codec]
            for index, sent in sender(fds, data):
                # The rest is buffered by the transport before anything else can be written.
                member = batch_members[index]
                member.transport.write(memoryview(data)[sent:])
                if member.budget is not None:
                    member.budget.note(member, len(data) - sent)
            count += len(fds)
            total += len(data) * len(fds)
    return count, total


def _ignore_slow(member: Member) -> None:
    pass
