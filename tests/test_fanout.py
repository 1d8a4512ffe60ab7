"""Broadcast through both write paths: the native loop (`_native.send_frame`, used with the
native engine) and the transports (the pure-Python engine's path). Real relay, real sockets,
raw WebSocket members that check every byte they receive."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator

import pytest

from kasagi_relay import delta, fanout
from kasagi_relay.fanout import SendBudget
from testkit.relay import (
    connect_client,
    parse_frames,
    raw_connect,
    raw_member,
    read_frames,
    start_relay,
    text_frame,
)

PATHS = ["native", "transport"]
N = 160


@pytest.fixture(params=PATHS)
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Selects the broadcast's write path for the relays started by the test."""
    if request.param == "native":
        if fanout.native_sender() is None:
            pytest.skip("the native engine is not built")
        monkeypatch.setattr(fanout, "send_frame", fanout.native_sender())
    else:
        monkeypatch.setattr(fanout, "send_frame", None)
    yield request.param


def test_the_native_loop_goes_with_the_native_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delta, "IMPLEMENTATION", "python")
    assert fanout.native_sender() is None
    if fanout.send_frame is None:
        pytest.skip("the native engine is not built")
    monkeypatch.setattr(delta, "IMPLEMENTATION", "native")
    assert fanout.native_sender() is fanout.send_frame


async def test_every_member_receives_the_same_bytes_in_order(write_path: str) -> None:
    async with start_relay() as relay, connect_client(relay.url) as writer:
        members = [await raw_member(relay.port, "r") for _ in range(5)]
        try:
            for m in members:
                [(opcode, body)] = await read_frames(m, 1)
                assert (opcode, json.loads(body)["t"]) == (0x1, "joined")
            for n in range(1, 31):
                await writer.delta("r", merge={"n": n, "pad": "p" * (n * 100)})
            streams = [await read_frames(m, 30) for m in members]
        finally:
            for m in members:
                m.close()
        assert all(s == streams[0] for s in streams[1:])  # the same frames, byte for byte
        frames = [json.loads(body) for _, body in streams[0]]
        assert [f["seq"] for f in frames] == list(range(1, 31))
        assert [f["merge"]["n"] for f in frames] == list(range(1, 31))


async def test_a_slow_reader_gets_every_frame_whole_and_in_order(
    write_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose socket fills up mid-frame: the rest of that frame and the frames after
    it queue in its transport and arrive intact once it reads again."""
    shortfalls: list[tuple[int, int]] = []
    if write_path == "native":
        real = fanout.send_frame
        assert real is not None

        def recording(fds: list[int], data: bytes, /) -> list[tuple[int, int]]:
            assert real is not None
            short = real(fds, data)
            shortfalls.extend(short)
            return short

        monkeypatch.setattr(fanout, "send_frame", recording)

    async with (
        start_relay(send_queue_bytes=16 << 20) as relay,
        connect_client(relay.url) as writer,
        connect_client(relay.url) as reader,
    ):
        await reader.join("r")
        slow: socket.socket = await raw_member(relay.port, "r")
        try:
            [(_, joined)] = await read_frames(slow, 1)
            assert json.loads(joined)["t"] == "joined"
            blob = "y" * 50_000
            # 8 MB: more than the slow socket's buffers hold (the kernel's send buffer grows
            # up to 4 MB by default, net.ipv4.tcp_wmem).
            for n in range(1, N + 1):
                await writer.delta("r", merge={"n": n, "blob": blob})
                f, _ = await reader.recv_until(lambda m: m["t"] == "delta")
                assert f["seq"] == n  # the others are not held up meanwhile
            got = await read_frames(slow, N)
        finally:
            slow.close()
        frames = [json.loads(body) for _, body in got]
        assert [f["seq"] for f in frames] == list(range(1, N + 1))
        assert all(f["merge"] == {"n": f["seq"], "blob": blob} for f in frames)
        assert relay.metrics.dropped_members._value.get() == 0
    if write_path == "native":
        # The slow socket did refuse part of the stream: the hand-over to the transport ran.
        assert shortfalls


async def test_past_the_send_budget_the_largest_queues_are_dropped_with_1013() -> None:
    """Each stalled member stays under its own limit (16 MiB), but together they pass the
    relay-wide budget (2 MiB): the relay drops those holding the most, with 1013, so the
    total queued for members it still serves stays bounded (a dropped member's buffer goes
    with its connection); a member that reads is never dropped and misses nothing."""
    async with (
        start_relay(
            send_queue_bytes=16 << 20, send_budget_bytes=2 << 20, close_timeout_s=30
        ) as relay,
        connect_client(relay.url) as writer,
        connect_client(relay.url) as reader,
    ):
        await reader.join("r")
        stalled = [await raw_member(relay.port, "r") for _ in range(6)]
        try:
            for m in stalled:
                [(opcode, _)] = await read_frames(m, 1)
                assert opcode == 0x1
            worst = 0
            blob = "z" * 64_000
            for n in range(1, 201):
                await writer.delta("r", merge={"n": n, "blob": blob})
                f, _ = await reader.recv_until(lambda m: m["t"] == "delta")
                assert f["seq"] == n  # the reader keeps up and is never the one dropped
                members = [s.member for s in relay.sessions]
                live = sum(m.queued() for m in members if not m.dropped)
                worst = max(worst, live)
                if relay.metrics.dropped_members._value.get() == len(stalled):
                    break
            # Bounded: the budget plus at most the frame being written when it was passed.
            assert worst <= relay.budget.limit + 2 * len(blob), worst
            assert relay.metrics.dropped_members._value.get() == len(stalled)
            assert len(relay.rooms["r"].members) == 1
            for m in stalled:
                frames = await read_frames(m)
                assert frames[-1][0] == 0x8
                assert struct.unpack("!H", frames[-1][1][:2])[0] == 1013
        finally:
            for m in stalled:
                m.close()


def test_the_budget_recounts_before_it_drops() -> None:
    """Reports only grow the recorded total; a member that drained since is not dropped
    for what it held before (the recount finds the total under the limit)."""

    class Drained:
        dropped = False
        _counted = 0

        def queued(self) -> int:
            return 0

        def drop(self) -> None:  # pragma: no cover - the test fails if this is reached
            raise AssertionError("dropped a member that holds nothing")

    budget = SendBudget(1000)
    member = Drained()
    budget.add(member)  # type: ignore[arg-type]
    budget.note(member, 600)  # type: ignore[arg-type]
    budget.note(member, 900)  # type: ignore[arg-type]
    assert budget.total == 900
    budget.note(member, 1200)  # type: ignore[arg-type]
    assert budget.total == 0  # recounted: it holds nothing now


async def test_pipelined_acks_are_coalesced_and_keep_their_order(write_path: str) -> None:
    """Deltas pipelined in one TCP write by a member of their room: the acks of one loop turn
    go out in one write (Member.send_soon), each before the delta frame that carries its seq,
    in seq order, nothing lost or doubled."""
    n = 20
    async with start_relay() as relay:
        sock = await raw_connect(relay.port)
        try:
            burst = [text_frame(b'{"t":"join","room":"r","id":"j"}')]
            burst += [
                text_frame(b'{"t":"delta","room":"r","id":%d,"merge":{"n":%d}}' % (i, i))
                for i in range(1, n + 1)
            ]
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"".join(burst))
            data = b""
            messages: list[dict[str, object]] = []
            async with asyncio.timeout(10):
                # Until the ack and the delta frame of the last seq are in.
                while sum(m["t"] == "ack" or m.get("seq") == n for m in messages) < n + 1:
                    data += await loop.sock_recv(sock, 1 << 16)
                    frames, used = parse_frames(data)
                    data = data[used:]
                    messages += [json.loads(body) for _, body in frames]
        finally:
            sock.close()
        assert messages[0]["t"] == "joined"
        acks: list[object] = []
        covered: list[int] = []
        for message in messages[1:]:
            if message["t"] == "ack":
                assert message["id"] == message["seq"]
                acks.append(message["seq"])
            else:
                assert message["t"] == "delta", message
                seq = message["seq"]
                assert isinstance(seq, int)
                assert acks and acks[-1] == seq  # its acks came first
                covered.extend(range(len(covered) + 1, seq + 1))
        assert acks == list(range(1, n + 1))
        assert covered == list(range(1, n + 1))
