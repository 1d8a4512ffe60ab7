"""Graceful shutdown: stop accepting, answer what is in flight, close members with 1001."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from testkit.relay import connect_client, raw_member, read_frames, relay_process, start_relay


async def closed_code(client_ws: object) -> int | None:
    from websockets.asyncio.client import ClientConnection

    assert isinstance(client_ws, ClientConnection)
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await client_ws.recv()
    return client_ws.close_code


async def test_stop_closes_members_with_1001_and_stops_accepting() -> None:
    async with start_relay() as relay:
        url = relay.url
        async with connect_client(url) as a, connect_client(url) as b:
            await a.join("r")
            await b.join("r")
            await relay.stop()
            assert await closed_code(a.ws) == 1001
            assert await closed_code(b.ws) == 1001
        with pytest.raises(OSError):
            async with connect(url, open_timeout=2):
                pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_subprocess_signal_exits_0_after_closing_members(sig: int) -> None:
    async with (
        relay_process() as proc,
        connect_client(proc.url) as member,
        connect_client(proc.url) as writer,
    ):
        await member.join("r")
        ack = await writer.delta("r", merge={"a": 1})
        assert ack is not None and ack["seq"] == 1
        assert (await member.expect("delta"))["seq"] == 1
        # A delta sent as the signal lands is answered (ack, or `unavailable` when it
        # arrived after shutdown began); never left without a reply.
        await writer.send({"t": "delta", "room": "r", "id": "last", "merge": {"b": 2}})
        code = await proc.terminate(sig)
        assert code == 0, proc.stderr_lines
        reply, _ = await writer.recv_until(lambda m: m.get("id") == "last")
        assert reply["t"] == "ack" or reply["code"] == "unavailable"
        assert await closed_code(member.ws) == 1001
    assert any("stopped" in line for line in proc.stderr_lines), proc.stderr_lines


async def test_second_signal_exits_at_once_while_a_member_holds_up_the_close() -> None:
    """A member that never answers the close frame holds the graceful stop for close_timeout;
    a second SIGTERM ends the process at once, with status 1."""
    async with relay_process() as proc:
        port = proc.port
        stalled = await raw_member(port, "r")
        try:
            (joined,) = await read_frames(stalled, 1)
            assert b'"joined"' in joined[1]
            proc.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                while not any("shutting down" in line for line in proc.stderr_lines):  # noqa: ASYNC110 (another task appends the lines)
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            assert proc.returncode is None, "the stop should still be waiting for the member"
            started = time.monotonic()
            code = await proc.terminate(signal.SIGTERM, within=5)
            assert code == 1, proc.stderr_lines
            assert time.monotonic() - started < 2.0
        finally:
            stalled.close()
        await asyncio.sleep(0.1)  # the stderr reader sees the last lines
        assert any("second signal" in line for line in proc.stderr_lines), proc.stderr_lines
