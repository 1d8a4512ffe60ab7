"""Broadcast through both write paths: the native loop (`_native.send_frame`, used with the
native engine) and the transports (the pure-Python engine's path). Real relay, real sockets,
raw WebSocket members that check every byte they receive."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from relay_helpers import connect_client, raw_member, read_frames, start_relay

from kasagi_relay import delta, fanout

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
