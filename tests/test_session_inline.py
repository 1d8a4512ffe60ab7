"""Messages served from the connection's callback (session.Session.serve_now): a small delta
to a loaded room is answered without going through websockets' frame queue and the
session's task; anything else (a join, a room still to load, a check that must wait) goes
to the task, and every message after it too. A real relay, a hand-made client over a real
socket that sends several messages in one TCP write, so that one read holds them all."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from kasagi_relay import protocol
from kasagi_relay.config import Config
from kasagi_relay.server import Relay
from kasagi_relay.session import Session
from testkit.relay import parse_frames, raw_connect, read_frames, start_relay, text_frame

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """What each serve_now call answered (True: served there)."""
    answers: list[bool] = []
    real = Session.serve_now

    def counting(self: Session, message: str | bytes) -> bool:
        served = real(self, message)
        answers.append(served)
        return served

    monkeypatch.setattr(Session, "serve_now", counting)
    yield answers


@contextlib.asynccontextmanager
async def raw_client(relay: Relay) -> AsyncIterator[_Raw]:
    sock = await raw_connect(relay.port)
    try:
        yield _Raw(sock)
    finally:
        sock.close()


class _Raw:
    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.data = b""
        self.seen = 0

    async def send(self, *messages: dict[str, Any]) -> None:
        """All of `messages` in one write."""
        data = b"".join(text_frame(json.dumps(m).encode()) for m in messages)
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def replies(self, n: int) -> list[dict[str, Any]]:
        """The next `n` messages from the relay."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            while True:
                frames, _ = parse_frames(self.data)
                if len(frames) >= self.seen + n:
                    out = [json.loads(p) for _, p in frames[self.seen : self.seen + n]]
                    self.seen += n
                    return out
                chunk = await loop.sock_recv(self.sock, 1 << 16)
                assert chunk, "the relay closed the connection"
                self.data += chunk


def delta(room: str, i: int) -> dict[str, Any]:
    return {"t": "delta", "room": room, "merge": {f"k{i}": i}, "id": i}


async def test_a_join_between_deltas_keeps_request_order(inline: list[bool]) -> None:
    """delta, join, delta, delta in one write: the first is served at once, the join goes to
    the task and the deltas after it wait for it, so the replies come in request order."""
    async with start_relay(rate_limit=0, rate_bytes=0) as relay, raw_client(relay) as c:
        await c.send(delta("a", 0))
        assert (await c.replies(1))[0] == {"t": "ack", "room": "a", "seq": 1, "id": 0}
        await c.send(delta("b", 9))  # room b exists (seq 1) before the join
        assert (await c.replies(1))[0]["seq"] == 1
        inline.clear()
        await c.send(
            delta("a", 1),
            {"t": "join", "room": "b", "id": "j"},
            delta("a", 2),
            delta("b", 3),
        )
        got = await c.replies(5)
        assert [(m["t"], m.get("id")) for m in got[:3]] == [
            ("ack", 1),
            ("joined", "j"),
            ("ack", 2),
        ]
        assert got[0]["seq"] == 2 and got[2]["seq"] == 3
        # Member of b from its joined on: its own delta comes back as a frame, and its ack.
        assert {m["t"] for m in got[3:]} == {"delta", "ack"}
        ack_b = next(m for m in got[3:] if m["t"] == "ack")
        assert (ack_b["id"], ack_b["seq"]) == (3, 2)
        assert got[1]["seq"] == 1
        # Served at once: the first delta only; the join stopped serve_now for the rest.
        assert inline[:2] == [True, False]


async def test_a_message_handed_to_the_task_is_rate_limited_once(inline: list[bool]) -> None:
    """A delta to a room not loaded yet is admitted by serve_now and then served by the task:
    it must cost one message of the rate limit, not two."""
    limits = Config(rate_limit=0.001, rate_burst=3, rate_bytes=0)
    async with start_relay(limits) as relay, raw_client(relay) as c:
        await c.send(delta("fresh", 0), delta("fresh", 1), delta("fresh", 2))
        got = await c.replies(3)
        assert [(m["t"], m["id"]) for m in got] == [("ack", 0), ("ack", 1), ("ack", 2)]
        assert inline[0] is False  # the room had to be loaded: the task served it
        await c.send(delta("fresh", 3))
        (refused,) = await c.replies(1)
        assert (refused["t"], refused["code"]) == ("error", "rate_limited")


async def test_served_at_once_or_by_the_task_the_replies_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Errors and acks of a mixed burst (bad JSON, a patch that does not apply, an unknown
    type, good deltas) are the same whichever way the messages are served."""
    burst = [
        delta("m", 1),
        {"t": "delta", "room": "m", "patch": [{"op": "remove", "path": "/nope"}], "id": 2},
        {"t": "nope", "room": "m", "id": 3},
        {"t": "delta", "room": "bad room!", "merge": {}, "id": 4},
        delta("m", 5),
    ]

    async def run() -> list[dict[str, Any]]:
        async with start_relay(rate_limit=0, rate_bytes=0) as relay, raw_client(relay) as c:
            await c.send(delta("m", 0))
            await c.replies(1)
            await c.send(*burst)
            data = text_frame(b"{not json")
            await asyncio.get_running_loop().sock_sendall(c.sock, data)
            return await c.replies(len(burst) + 1)

    at_once = await run()
    monkeypatch.setattr(Session, "serve_now", lambda self, message: False)
    by_task = await run()
    assert at_once == by_task
    assert [(m["t"], m.get("code")) for m in at_once] == [
        ("ack", None),
        ("error", "bad_patch"),
        ("error", "bad_message"),
        ("error", "bad_room"),
        ("ack", None),
        ("error", "bad_message"),
    ]


async def test_a_bug_while_serving_at_once_closes_that_connection_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception out of serve_now (a bug: made here by a parser that raises, since no
    real message makes one) closes that connection with 1011, as websockets does when a
    handler raises, and the relay serves the others."""
    real = protocol.parse

    def parse(data: str | bytes, codec: protocol.Codec) -> protocol.Request:
        if "boom" in str(data):
            raise RuntimeError("boom")
        return real(data, codec)

    monkeypatch.setattr(protocol, "parse", parse)
    async with start_relay(rate_limit=0, rate_bytes=0) as relay, raw_client(relay) as c:
        await c.send(delta("a", 0))
        assert (await c.replies(1))[0]["t"] == "ack"
        await c.send({"t": "delta", "room": "a", "merge": {"boom": 1}, "id": 1})
        frames = await read_frames(c.sock)  # until the relay ends the connection
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert closes and int.from_bytes(closes[0][:2], "big") == 1011
        assert "serving a message failed" in caplog.text
        async with raw_client(relay) as other:
            await other.send(delta("a", 2))
            assert (await other.replies(1))[0] == {"t": "ack", "room": "a", "seq": 2, "id": 2}
