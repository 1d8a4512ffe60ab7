"""--max-connections, --max-connections-per-address and --trusted-proxies against a real
relay: past a cap the handshake gets 503, the connections already open are served, and a
place given back is taken again (issue 11, item 9)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kasagi_relay.admission import Admission, client_address
from kasagi_relay.server import Relay
from testkit.relay import connect_client, relay_process, start_relay


async def refused_status(url: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers, open_timeout=5):
            pass
    return info.value.response.status_code


def refusals(relay: Relay, reason: str) -> float:
    line = f'kasagi_connections_refused_total{{reason="{reason}"}} '
    for row in relay.metrics.render().decode().splitlines():
        if row.startswith(line):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def test_past_max_connections_handshakes_get_503_and_the_open_ones_are_served() -> None:
    async with start_relay(max_connections=3) as relay, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect_client(relay.url)) for _ in range(3)]
        assert await refused_status(relay.url) == 503
        assert refusals(relay, "max_connections") == 1
        for i, c in enumerate(clients):
            ack = await c.delta("r", merge={"i": i})
            assert ack is not None and ack["seq"] == i + 1
        # /healthz is not a WebSocket connection: answered at the cap.
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        await clients[0].ws.close()
        async with connect_client(relay.url) as late:  # the place given back is taken
            assert (await late.join("r"))["seq"] == 3
        async with connect_client(relay.url) as later:  # and given back again on close
            assert (await later.join("r"))["seq"] == 3


async def test_per_address_cap_refuses_the_address_not_the_relay() -> None:
    async with (
        start_relay(max_connections_per_address=2, max_connections=100) as relay,
        connect_client(relay.url) as a,
        connect_client(relay.url) as b,
    ):
        assert await refused_status(relay.url) == 503
        assert refusals(relay, "max_connections_per_address") == 1
        # An X-Forwarded-For from a peer that is not a trusted proxy changes nothing.
        assert await refused_status(relay.url, {"X-Forwarded-For": "203.0.113.9"}) == 503
        assert (await a.join("r"))["seq"] == 0
        assert (await b.join("r"))["seq"] == 0


async def test_behind_a_trusted_proxy_the_forwarded_address_counts() -> None:
    async with start_relay(
        max_connections_per_address=1, trusted_proxies=("127.0.0.0/8",)
    ) as relay:
        first = {"X-Forwarded-For": "198.51.100.1"}
        async with (
            connect_client(relay.url, additional_headers=first) as one,
            connect_client(relay.url, additional_headers={"X-Forwarded-For": "198.51.100.2"}),
        ):
            # A client spoofing a hop before the proxy's own entry does not escape its cap.
            spoofed = {"X-Forwarded-For": "10.9.9.9, 198.51.100.1"}
            assert await refused_status(relay.url, spoofed) == 503
            assert await refused_status(relay.url, first) == 503
            assert (await one.join("r"))["seq"] == 0
        async with connect_client(relay.url, additional_headers=first) as again:
            assert (await again.join("r"))["seq"] == 0


async def test_shutting_down_refusals_are_counted() -> None:
    async with start_relay() as relay:
        relay.service.closing = True
        assert await refused_status(relay.url) == 503
        assert refusals(relay, "shutting_down") == 1


def test_client_address_rules() -> None:
    import ipaddress

    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("127.0.0.1", ["1.2.3.4"], trusted) == "127.0.0.1"  # not a proxy
    assert client_address("10.0.0.5", ["1.2.3.4"], trusted) == "1.2.3.4"
    assert client_address("10.0.0.5", ["6.6.6.6, 1.2.3.4"], trusted) == "1.2.3.4"
    assert client_address("10.0.0.5", ["1.2.3.4, 10.0.0.7"], trusted) == "1.2.3.4"  # 2 proxies
    assert client_address("10.0.0.5", ["1.2.3.4:5678"], trusted) == "1.2.3.4"
    assert client_address("10.0.0.5", ["[2001:db8::1]:443"], trusted) == "2001:db8::1"
    assert client_address("10.0.0.5", ["garbage"], trusted) == "10.0.0.5"
    assert client_address("10.0.0.5", [], trusted) == "10.0.0.5"
    # Thousands of entries cost no more than a few.
    assert client_address("10.0.0.5", ["9.9.9.9," * 5000 + "1.2.3.4"], trusted) == "1.2.3.4"


def test_admission_counts_and_releases() -> None:
    adm = Admission(3, 2, ())
    assert [adm.admit(a) for a in ("x", "x", "x")] == [None, None, "max_connections_per_address"]
    assert adm.admit("y") is None
    assert adm.admit("z") == "max_connections"
    adm.release("x")
    assert adm.admit("z") is None
    for a in ("x", "y", "z"):
        adm.release(a)
    assert (adm.total, adm.per_address) == (0, {})
    unlimited = Admission(0, 0, ())
    assert all(unlimited.admit("x") is None for _ in range(1000))


async def test_one_address_cannot_take_every_descriptor_and_idle_connections_are_closed() -> None:
    """Issue 11: 286 idle connections took every descriptor of a relay limited to 300 open
    files, locking everyone out. With 128 open files and a cap of 60 per address, a
    hostile address gets its 60 and 503s, another address is served, and the idle ones
    are closed with 1008 after --idle-timeout."""
    hostile = {"X-Forwarded-For": "198.51.100.66"}
    async with (
        relay_process(
            "--max-connections-per-address",
            "60",
            "--trusted-proxies",
            "127.0.0.1/32",
            "--idle-timeout",
            "8",  # long enough that none is closed before the 150 attempts are made
            open_files=(128, 128),
        ) as proc,
        contextlib.AsyncExitStack() as stack,
    ):
        opened = []
        refused = 0
        for _ in range(150):
            try:
                ws = await stack.enter_async_context(
                    connect(proc.url, additional_headers=hostile, open_timeout=5)
                )
                opened.append(ws)
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
                refused += 1
        assert (len(opened), refused) == (60, 90)
        async with connect_client(
            proc.url, additional_headers={"X-Forwarded-For": "198.51.100.7"}
        ) as good:
            assert (await good.join("r"))["seq"] == 0
            async with asyncio.timeout(30):
                for ws in opened:
                    with contextlib.suppress(ConnectionClosed):
                        await ws.recv()
            assert {ws.close_code for ws in opened} == {1008}
            ack = await good.delta("r", merge={"still": "served"})
            assert ack is not None and ack["seq"] == 1
        assert proc.returncode is None
