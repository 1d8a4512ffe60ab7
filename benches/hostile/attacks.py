"""One attack per class of issue #11 (docs/operations.md lists the limit that answers each).

Each attack is `async def(target, seen)`: it runs against the relay at `target`, bounded in
time and count, and counts in `seen` what the attacker got back (`ack`, `error:<code>`,
`close:<code>`, `http:<status>`, `timeout`, ...); an entry starting with `!` is a wrong
outcome in itself (data lost, input coerced) and fails the class's goal. The harness
measures the rest (the well-behaved member's stall, the relay's peak RSS, whether it is
still alive)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from kasagi_relay.config import Config

from . import wire

JSON = "kasagi.v1.json"
MSGPACK = "kasagi.v1.msgpack"
KiB = 1024
MiB = 1024 * KiB


@dataclass
class Target:
    host: str
    port: int
    url: str
    config: Config
    prefix: str  # room names of this run start with it

    def room(self, name: str) -> str:
        return f"{self.prefix}-{name}"


Seen = Counter[str]
Attack = Callable[[Target, Seen], Awaitable[None]]


class Attacker:
    """A websockets client that counts every reply and can wait for the reply to an id."""

    def __init__(self, ws: ClientConnection, codec: str, seen: Seen) -> None:
        self.ws = ws
        self.codec = codec
        self.seen = seen
        self._ids = itertools.count(1)
        self._waiting: dict[object, asyncio.Future[dict[str, Any]]] = {}
        self.messages: list[dict[str, Any]] = []
        self._closing = False
        self._reader = asyncio.create_task(self._read())

    def encode(self, message: dict[str, Any]) -> str | bytes:
        if self.codec == MSGPACK:
            return bytes(msgpack.packb(message, use_bin_type=True))
        # Compact: a 400k-element array must stay under --max-message-bytes.
        return json.dumps(message, separators=(",", ":"))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
                t = msg.get("t")
                self.seen[f"error:{msg.get('code')}" if t == "error" else str(t)] += 1
                if t in ("joined", "error", "ack", "left"):
                    self.messages.append(msg)
                fut = self._waiting.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except ConnectionClosed:
            pass
        finally:
            code = self.ws.close_code
            if not (self._closing and code == 1000):  # our own close is not news
                self.seen[f"close:{code}" if code is not None else "closed"] += 1
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        data = self.encode(message) if isinstance(message, dict) else message
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(data)

    async def call(self, message: dict[str, Any], within: float = 10.0) -> dict[str, Any] | None:
        """Send with a fresh id; the reply to it, or None (timeout, connection gone)."""
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        await self.send({**message, "id": rid})
        try:
            async with asyncio.timeout(within):
                return await fut
        except TimeoutError:
            self.seen["timeout"] += 1
            return None
        except ConnectionError:
            return None
        finally:
            self._waiting.pop(rid, None)

    async def settle(self, within: float = 2.0) -> None:
        """Let replies still on the way arrive."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self._reader)

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(WebSocketException, OSError, TimeoutError):
            async with asyncio.timeout(3):
                await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def attacker(t: Target, seen: Seen, codec: str = JSON) -> AsyncIterator[Attacker]:
    async with connect(
        t.url,
        subprotocols=[codec],  # type: ignore[list-item]
        open_timeout=10,
        max_size=None,
        compression=None,
        ping_interval=None,
    ) as ws:
        a = Attacker(ws, codec, seen)
        try:
            yield a
        finally:
            await a.close()


async def fill_state(a: Attacker, room: str, total: int, piece: int = 900 * KiB) -> None:
    """Grow `room`'s state to about `total` bytes with strings of `piece` bytes."""
    for i in range((total + piece - 1) // piece):
        n = min(piece, total - i * piece)
        await a.call({"t": "delta", "room": room, "merge": {f"s{i}": "x" * n}}, within=20)


# --------------------------------------------------------------------------- the classes


async def c01_copy_doubling(t: Target, seen: Seen) -> None:
    """A 2.8 KB delta of 40 whole-document copies; then one-op copies, one by one."""
    async with attacker(t, seen) as a:
        room = t.room("c01")
        await a.call({"t": "delta", "room": room, "merge": {"s": "x" * 1024}})
        ops = [{"op": "copy", "from": "", "path": f"/k{i}"} for i in range(40)]
        await a.call({"t": "delta", "room": room, "patch": ops}, within=10)
        room2 = t.room("c01b")
        await a.call({"t": "delta", "room": room2, "merge": {"s": "x" * 1024}})
        for i in range(14):
            op = {"op": "copy", "from": "", "path": f"/k{i}"}
            if await a.call({"t": "delta", "room": room2, "patch": [op]}, within=10) is None:
                break


async def c02_state_sized_work(t: Target, seen: Seen) -> None:
    """Small deltas whose work is in the size of the state: merge-nulling 2,000 keys of a
    400k-key object, copy/remove pairs of a big subtree, inserts at index 0 of a big array."""
    async with attacker(t, seen) as a:
        room = t.room("c02")
        n, step = 400_000, 50_000
        for start in range(0, n, step):
            keys = {f"k{i}": 0 for i in range(start, start + step)}
            await a.call({"t": "delta", "room": room, "merge": {"o": keys}}, within=20)
        await a.call(
            {"t": "delta", "room": room, "merge": {"o": {f"k{i}": None for i in range(2000)}}},
            within=30,
        )
        ops: list[dict[str, Any]] = []
        for _ in range(20):
            ops += [{"op": "copy", "from": "/o", "path": "/p"}, {"op": "remove", "path": "/p"}]
        await a.call({"t": "delta", "room": room, "patch": ops}, within=30)
        room2 = t.room("c02b")
        await a.call({"t": "delta", "room": room2, "merge": {"a": [0] * 400_000}}, within=20)
        ins = [{"op": "add", "path": "/a/0", "value": 1} for _ in range(200)]
        await a.call({"t": "delta", "room": room2, "patch": ins}, within=30)


def _msgpack_empty_arrays(room: str, size: int) -> bytes:
    p = msgpack.packb
    head = b"\x83" + p("t") + p("delta") + p("room") + p(room) + p("merge") + b"\x81" + p("x")
    n = size - len(head) - 5
    return bytes(head) + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


async def c03_decode_cost(t: Target, seen: Seen) -> None:
    """MessagePack frames of empty arrays just under --max-message-bytes, ~3 s, the last
    ones past the rate limit (refused messages must not be decoded in full)."""
    data = _msgpack_empty_arrays(t.room("c03"), t.config.max_message_bytes - 16)
    async with attacker(t, seen, MSGPACK) as a:
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        for _ in range(40):
            if loop.time() > end:
                break
            await a.send(data)
        await a.settle(3.0)


async def c04_pipelined(t: Target, seen: Seen) -> None:
    """800 KB of `{}` frames in one write (100,000 messages), replies read."""
    conn = await wire.raw_connect(t.host, t.port)
    seen[f"http:{conn.status}"] += 1
    try:
        one = wire.frame(wire.TEXT, b"{}", mask=b"\x00\x00\x00\x00")
        await conn.send(one * 100_000)
        frames, ended = await conn.read_frames(4.0)
        seen.update(wire.reply_codes(frames))
        if ended:
            seen["eof"] += 1
    finally:
        conn.close()


async def c05_pings_unread(t: Target, seen: Seen) -> None:
    """Pings (125-byte payloads) for 4 s from a connection that never reads."""
    conn = await wire.raw_connect(t.host, t.port, rcvbuf=4096)
    seen[f"http:{conn.status}"] += 1
    try:
        ping = wire.frame(wire.PING, b"p" * 125, mask=b"\x00\x00\x00\x00")
        batch = ping * 1000
        loop = asyncio.get_running_loop()
        end = loop.time() + 4.0
        sent = 0
        try:
            while loop.time() < end:
                async with asyncio.timeout(max(0.05, end - loop.time())):
                    await conn.send(batch)
                sent += len(batch)
                await asyncio.sleep(0)
        except TimeoutError:
            seen["relay stopped reading"] += 1
        except (ConnectionError, OSError):
            seen["reset"] += 1
        seen[f"sent {sent // MiB} MiB of pings"] += 1
        frames, ended = await conn.read_frames(1.0, max_bytes=4 * MiB)
        codes = wire.reply_codes(frames)
        seen.update(c for c in codes if c != "pong")
        if ended:
            seen["eof"] += 1
    finally:
        conn.close()


async def c06_history_bytes(t: Target, seen: Seen) -> None:
    """Deltas of 900 KB to one room (its state stays 900 KB) for up to 6 s or 400 deltas,
    then a joiner with `since` 1 that leaves at once."""
    room = t.room("c06")
    async with attacker(t, seen) as a:
        loop = asyncio.get_running_loop()
        end = loop.time() + 6.0
        pending: list[asyncio.Task[dict[str, Any] | None]] = []
        for i in range(400):
            if loop.time() > end:
                break
            big = chr(ord("a") + i % 26) * (900 * KiB)
            msg = {"t": "delta", "room": room, "merge": {"x": big}}
            pending.append(asyncio.create_task(a.call(msg, within=20)))
            if len(pending) >= 8:
                await pending.pop(0)
        await asyncio.gather(*pending)
    conn = await wire.raw_connect(t.host, t.port, rcvbuf=4096)
    seen[f"http:{conn.status}"] += 1
    await conn.send(
        wire.frame(wire.TEXT, wire.text_payload({"t": "join", "room": room, "since": 1}))
    )
    await asyncio.sleep(0.05)
    conn.close()
    await asyncio.sleep(2.0)  # the replay (if any) runs after the joiner is gone


async def c07_near_state_limit(t: Target, seen: Seen) -> None:
    """The state ~60 KB under --max-state-bytes, then 25-byte deltas for 3 s."""
    room = t.room("c07")
    async with attacker(t, seen) as a:
        await fill_state(a, room, t.config.max_state_bytes - 60 * KiB)
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        i = 0
        while loop.time() < end and i < 3000:
            i += 1
            window = [
                a.call({"t": "delta", "room": room, "merge": {"n": i * 10 + j}}, within=10)
                for j in range(10)
            ]
            await asyncio.gather(*window)


async def c08_unread_joiners(t: Target, seen: Seen) -> None:
    """40 joiners of a 7 MB room that never read, held 3 s."""
    room = t.room("c08")
    async with attacker(t, seen) as a:
        await fill_state(a, room, 7 * MiB)
    conns: list[wire.RawConn] = []
    try:
        for _ in range(40):
            conn = await wire.raw_connect(t.host, t.port, rcvbuf=4096)
            seen[f"http:{conn.status}"] += 1
            conns.append(conn)
            await conn.send(wire.frame(wire.TEXT, wire.text_payload({"t": "join", "room": room})))
        await asyncio.sleep(3.0)
        # What the joiners got in the end: read each a little (a closed one shows its close).
        for conn in conns[:10]:
            frames, ended = await conn.read_frames(0.3, max_bytes=16 * MiB)
            seen.update(c for c in wire.reply_codes(frames) if c.startswith("close"))
            if ended:
                seen["eof"] += 1
    finally:
        for conn in conns:
            conn.close()


async def c09_idle_and_partial(t: Target, seen: Seen) -> None:
    """300 connections from one address that never send; 20 that send the first 1 KB of a
    frame announcing 1 MB. Held until the idle and frame timeouts should have closed them
    (at most 15 s)."""
    conns: list[wire.RawConn] = []
    try:
        for i in range(320):
            try:
                conn = await wire.raw_connect(t.host, t.port, within=3)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                seen[f"connect failed: {type(exc).__name__}"] += 1
                continue
            seen[f"http:{conn.status}"] += 1
            if conn.status != 101:
                conn.close()
                continue
            conns.append(conn)
            if i >= 300:
                await conn.send(wire.frame_header(wire.TEXT, MiB) + b"x" * KiB)
        # Can a newcomer still get in?
        try:
            async with attacker(t, seen) as a:
                ok = await a.call({"t": "join", "room": t.room("c09")})
                seen[
                    "newcomer joined" if ok and ok.get("t") == "joined" else "newcomer refused"
                ] += 1
        except (OSError, InvalidStatus, WebSocketException, TimeoutError) as exc:
            seen[f"newcomer refused: {type(exc).__name__}"] += 1
        wait = min(15.0, max(t.config.idle_timeout_s, t.config.frame_timeout_s) + 2.0)
        await asyncio.sleep(wait)
        closed = Counter[str]()
        for conn in conns:
            frames, ended = await conn.read_frames(0.01)
            codes = [c for c in wire.reply_codes(frames) if c.startswith("close")]
            # Past the idle and frame timeouts every one of them should have been closed.
            closed.update(codes or (["eof"] if ended else ["!still open"]))
        for what, n in closed.items():
            seen[f"{'!' if what.startswith('!') else ''}after {wait:.0f}s: {what.lstrip('!')}"] += n
    finally:
        for conn in conns:
            conn.close()


async def c10_shared_keys(t: Target, seen: Seen) -> None:
    """Two clients use the same idempotency key for different deltas."""
    room = t.room("c10")
    other_seen: Seen = Counter()
    async with attacker(t, other_seen) as honest, attacker(t, seen) as a:
        first = await honest.call({"t": "delta", "room": room, "merge": {"a": 1}, "key": "1"})
        reply = await a.call({"t": "delta", "room": room, "merge": {"b": 2}, "key": "1"})
        if first and reply and reply.get("t") == "ack" and reply.get("seq") == first.get("seq"):
            seen["!ack with the other delta's seq (lost)"] += 1


async def c11_unencodable_replies(t: Target, seen: Seen) -> None:
    """On MessagePack: deltas whose id cannot be echoed (2**70 and a lone surrogate, sent as
    a text frame) and a string id that is not UTF-8, 100 of each."""
    room = t.room("c11")
    async with attacker(t, seen, MSGPACK) as a:
        for i in range(100):
            for rid in (2**70, "\ud800"):
                msg = {"t": "delta", "room": room, "merge": {"n": i}, "id": rid}
                await a.send(json.dumps(msg))
            raw = msgpack.packb(
                {"t": "delta", "room": room, "merge": {"n": i}, "id": "\udcff"},
                unicode_errors="surrogatepass",
            )
            await a.send(bytes(raw))
        await a.settle(2.0)


async def c12_coerced_input(t: Target, seen: Seen) -> None:
    """MessagePack map keys that are not strings (also nested) and UTF-16 binary JSON."""
    room = t.room("c12")
    async with attacker(t, seen, MSGPACK) as a:
        for merge in ({1: "a", "1": "b"}, {"x": {2: None}}):
            raw = msgpack.packb({"t": "delta", "room": room, "merge": merge, "id": 1})
            await a.send(bytes(raw))
        await a.settle(1.0)
    async with attacker(t, seen, JSON) as a:
        doc = json.dumps({"t": "delta", "room": room, "merge": {"u": 16}, "id": 2})
        for encoding in ("utf-16", "utf-32"):
            await a.send(doc.encode(encoding))
        await a.settle(1.0)
        joined = await a.call({"t": "join", "room": room})
        state = joined.get("state") if joined else None
        if isinstance(state, dict) and state:
            seen[f"!stored: {json.dumps(state)[:40]}"] += 1


CLASSES: dict[int, tuple[str, Attack]] = {
    1: ("copy doubling (memory)", c01_copy_doubling),
    2: ("state-sized work per delta", c02_state_sized_work),
    3: ("decoding refused messages", c03_decode_cost),
    4: ("pipelined messages", c04_pipelined),
    5: ("pings, never reading", c05_pings_unread),
    6: ("history by bytes", c06_history_bytes),
    7: ("near --max-state-bytes", c07_near_state_limit),
    8: ("joiners never reading", c08_unread_joiners),
    9: ("idle / partial frames", c09_idle_and_partial),
    10: ("shared idempotency keys", c10_shared_keys),
    11: ("unencodable replies", c11_unencodable_replies),
    12: ("coerced keys / UTF-16", c12_coerced_input),
}
