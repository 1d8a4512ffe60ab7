"""A member that stops reading is dropped with 1013; nobody else slows down."""

from __future__ import annotations

import asyncio
import struct

from testkit.relay import connect_client, raw_member, read_frames, start_relay


async def test_stalled_member_is_dropped_with_1013_others_keep_receiving() -> None:
    async with (
        start_relay(send_queue_bytes=64 * 1024, close_timeout_s=10) as relay,
        connect_client(relay.url) as writer,
        connect_client(relay.url) as reader,
    ):
        await reader.join("r")
        stalled = await raw_member(relay.port, "r")
        blob = "x" * 32000
        n = 0
        dropped = 0.0
        async with asyncio.timeout(30):
            while not dropped:
                n += 1
                await writer.delta("r", merge={"blob": blob, "n": n})
                # The reader keeps up, delta by delta: nobody waits for the stalled one.
                f, _ = await reader.recv_until(lambda m: m["t"] == "delta")
                assert f["seq"] == n
                dropped = relay.metrics.dropped_members._value.get()
        assert n < 400, n  # it took a bounded amount of data, not forever
        assert len(relay.rooms["r"].members) == 1  # only the reader is left
        # Still served after the drop.
        for _ in range(5):
            n += 1
            await writer.delta("r", merge={"n": n})
            f, _ = await reader.recv_until(lambda m: m["t"] == "delta")
            assert f["seq"] == n
        # The stalled client, reading at last, finds its data then a 1013 close frame.
        frames = await read_frames(stalled)
        stalled.close()
        assert frames[-1][0] == 0x8
        assert struct.unpack("!H", frames[-1][1][:2])[0] == 1013
        assert all(op == 0x1 for op, _ in frames[:-1])


async def test_a_state_bigger_than_the_send_queue_still_reaches_a_joiner() -> None:
    async with (
        start_relay(send_queue_bytes=16 * 1024) as relay,
        connect_client(relay.url) as writer,
    ):
        for i in range(8):
            await writer.delta("r", merge={f"k{i}": "v" * 30_000})
        async with connect_client(relay.url) as joiner:
            joined = await joiner.join("r")
            assert len(joined["state"]) == 8
            await writer.delta("r", merge={"next": 1})
            f = await joiner.expect("delta")
            assert f["seq"] == 9
        assert relay.metrics.dropped_members._value.get() == 0
