"""The server HTTP API (api.py; docs/protocol.md, "HTTP API") against real relays over real
loopback sockets: http.client (in a thread) for well-formed calls, raw asyncio streams for
hostile ones (a huge Content-Length, an endless chunked body, a slowloris), real WebSocket
members watching the rooms, and a real redis-server for the Redis backend."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import trustme
from websockets.exceptions import InvalidStatus

from kasagi_relay.cli import parse_config
from kasagi_relay.config import Config
from kasagi_relay.server import Relay
from testkit.redis import Topology, redis_server  # noqa: F401
from testkit.relay import connect_client, relay_process, start_relay

KEY = "k-0123456789abcdef"
OTHER_KEY = "k-rotated-fedcba9876"
TIMEOUT = 10.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _call(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None,
    key: str | None,
    headers: Mapping[str, str],
    tls: ssl.SSLContext | None = None,
) -> Reply:
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=tls)
        if tls is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    )
    try:
        sent = dict(headers)
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=sent)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


async def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Reply:
    """One request on its own connection; a dict or list body is sent as JSON."""
    if isinstance(body, dict | list):
        body = json.dumps(body)
    return await asyncio.to_thread(_call, port, method, path, body, key, headers or {}, tls)


async def publish(port: int, room: str, delta: Any, **kw: Any) -> Reply:
    return await call(port, "POST", f"/api/rooms/{room}/deltas", delta, **kw)


def error(reply: Reply) -> tuple[int, str]:
    body = reply.json()
    assert set(body) == {"code", "message"}, body
    assert reply.headers["content-type"] == "application/json"
    return reply.status, body["code"]


@contextlib.asynccontextmanager
async def api_relay(**overrides: Any) -> AsyncIterator[Relay]:
    overrides.setdefault("api_keys", (KEY,))
    async with start_relay(**overrides) as relay:
        yield relay


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response from a raw connection (Content-Length framed, as the API sends)."""
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body)


async def closed_by_relay(reader: asyncio.StreamReader) -> bool:
    """Whether the relay ended the connection (EOF or reset) rather than answering."""
    try:
        async with asyncio.timeout(TIMEOUT):
            return await reader.read(65536) == b""
    except ConnectionError:
        return True


def head(method: str, path: str, *extra: str, key: str | None = KEY) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: relay"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --------------------------------------------------------------------------- publishing


async def test_publish_reaches_members_and_reads_back() -> None:
    """An API delta gets the room's next seq, reaches the WebSocket members like any delta,
    and GET returns the state with it; WebSocket deltas and API deltas share one order."""
    async with api_relay() as relay, connect_client(relay.url) as member:
        await member.join("game")
        reply = await publish(relay.port, "game", {"merge": {"score": 1}})
        assert (reply.status, reply.json()) == (200, {"seq": 1})
        assert reply.headers["content-type"] == "application/json"
        frame = await member.expect("delta")
        assert (frame["from"], frame["seq"], frame["merge"]) == (1, 1, {"score": 1})
        ack = await member.delta("game", [{"op": "add", "path": "/who", "value": "ws"}])
        assert ack is not None and ack["seq"] == 2
        patch = [{"op": "replace", "path": "/score", "value": 5}]
        reply = await publish(relay.port, "game", {"patch": patch})
        assert reply.json() == {"seq": 3}
        state = await call(relay.port, "GET", "/api/rooms/game")
        assert state.status == 200
        assert state.json() == {"seq": 3, "state": {"score": 5, "who": "ws"}}
        metrics = relay.metrics.render().decode()
        assert 'kasagi_api_requests_total{route="deltas",status="200"} 2.0' in metrics
        assert 'kasagi_api_requests_total{route="state",status="200"} 1.0' in metrics


async def test_get_state_of_a_room_never_written_and_not_loaded() -> None:
    """GET loads the room as a join would: a room nobody wrote to is seq 0, {}; a room
    written through the API but not loaded on the relay is read from the backend."""
    async with api_relay() as relay:
        empty = await call(relay.port, "GET", "/api/rooms/nobody.here")
        assert (empty.status, empty.json()) == (200, {"seq": 0, "state": {}})
        await publish(relay.port, "cold", {"merge": {"a": [1, 2]}})
        await relay.registry._unload("cold")  # as --room-idle or the LRU limit would
        assert "cold" not in relay.rooms
        state = await call(relay.port, "GET", "/api/rooms/cold")
        assert state.json() == {"seq": 1, "state": {"a": [1, 2]}}


async def test_get_a_big_state() -> None:
    """A state of several MiB is sent whole (written a slice at a time as it is read)."""
    async with api_relay() as relay:
        for i in range(3):
            reply = await publish(relay.port, "big", {"merge": {f"k{i}": "v" * 900_000}})
            assert reply.status == 200
        state = await call(relay.port, "GET", "/api/rooms/big")
        assert len(state.body) > 2_700_000
        assert state.json() == {"seq": 3, "state": {f"k{i}": "v" * 900_000 for i in range(3)}}


async def test_idempotency_key_retry_and_conflict() -> None:
    """The same key and delta again is the first seq, published once; the same key with
    another delta is 409 key_conflict and stores nothing."""
    async with api_relay() as relay, connect_client(relay.url) as member:
        await member.join("r")
        first = await publish(relay.port, "r", {"merge": {"n": 1}, "key": "order-17"})
        retry = await publish(relay.port, "r", {"merge": {"n": 1}, "key": "order-17"})
        assert first.json() == retry.json() == {"seq": 1}
        clash = await publish(relay.port, "r", {"merge": {"n": 2}, "key": "order-17"})
        assert error(clash) == (409, "key_conflict")
        assert "order-17" in clash.json()["message"]
        after = await publish(relay.port, "r", {"merge": {"m": 1}})
        assert after.json() == {"seq": 2}
        frames = [await member.expect("delta"), await member.expect("delta")]
        assert [(f["seq"], f["merge"]) for f in frames] == [(1, {"n": 1}), (2, {"m": 1})]
        state = await call(relay.port, "GET", "/api/rooms/r")
        assert state.json() == {"seq": 2, "state": {"n": 1, "m": 1}}


async def test_requests_share_a_keep_alive_connection_and_pipeline() -> None:
    """Several requests on one connection, pipelined in one write: answered in order."""
    async with api_relay() as relay:
        reader, writer = await raw(relay.port)
        body = b'{"merge":{"x":1}}'
        post = head("POST", "/api/rooms/p/deltas", f"Content-Length: {len(body)}") + body
        writer.write(post + post.replace(b'"x":1', b'"x":2') + head("GET", "/api/rooms/p"))
        replies = [await read_reply(reader) for _ in range(3)]
        assert [r.status for r in replies] == [200, 200, 200]
        assert [r.json() for r in replies] == [
            {"seq": 1},
            {"seq": 2},
            {"seq": 2, "state": {"x": 2}},
        ]
        assert all("connection" not in r.headers for r in replies)
        writer.close()


async def test_head_is_405_with_headers_only() -> None:
    """HEAD gets its 405 without a body (as HTTP says), and the connection goes on."""
    async with api_relay() as relay:
        reader, writer = await raw(relay.port)
        writer.write(head("HEAD", "/api/rooms/r") + head("GET", "/api/rooms/r"))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert first.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        assert b"\r\nAllow: GET\r\n" in first
        assert (await read_reply(reader)).json() == {"seq": 0, "state": {}}
        writer.close()


async def test_expect_100_continue_and_chunked_body() -> None:
    """curl's way for bodies past 1 KiB (Expect: 100-continue), and a chunked body."""
    async with api_relay() as relay:
        reader, writer = await raw(relay.port)
        body = json.dumps({"merge": {"big": "x" * 2000}}).encode()
        writer.write(
            head(
                "POST",
                "/api/rooms/c/deltas",
                f"Content-Length: {len(body)}",
                "Expect: 100-continue",
            )
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        assert (await read_reply(reader)).json() == {"seq": 1}
        chunks = [b'{"merge":', b'{"y":', b"3}}"]
        writer.write(head("POST", "/api/rooms/c/deltas", "Transfer-Encoding: chunked"))
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        writer.write(b"0\r\n\r\n")
        assert (await read_reply(reader)).json() == {"seq": 2}
        writer.close()


async def test_first_request_line_in_pieces() -> None:
    """The relay tells API from WebSocket connections by the first request line, however it
    is cut: sent a byte at a time, an API request and a WebSocket handshake both work."""
    async with api_relay() as relay:
        reader, writer = await raw(relay.port)
        for byte in head("GET", "/api/rooms/r")[:40]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.005)  # pacing, so that the bytes arrive apart
        writer.write(head("GET", "/api/rooms/r")[40:])
        assert (await read_reply(reader)).json() == {"seq": 0, "state": {}}
        writer.close()
        handshake = (
            b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        reader, writer = await raw(relay.port)
        for byte in handshake[:30]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(handshake[30:])
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status.startswith(b"HTTP/1.1 101 ")
        writer.close()


# --------------------------------------------------------------------------- errors


async def test_every_error_status() -> None:
    """Each refusal with its documented status and code; nothing is published by any."""
    async with (
        api_relay(max_state_bytes=64, max_loaded_rooms=2) as relay,
        connect_client(relay.url) as member,
    ):
        await member.join("r")
        port = relay.port
        assert error(await publish(port, "r", "not json")) == (400, "bad_message")
        assert error(await publish(port, "r", [1, 2])) == (400, "bad_message")
        assert error(await publish(port, "r", {"key": "k"})) == (400, "bad_message")
        bad_key = {"merge": {}, "key": "k" * 65}
        assert error(await publish(port, "r", bad_key)) == (400, "bad_message")
        assert error(await publish(port, "r", b"\xff\xfe")) == (400, "bad_message")
        assert error(await publish(port, "r", None)) == (400, "bad_message")  # no body
        assert error(await publish(port, "bad%20room", {"merge": {}})) == (400, "bad_room")
        assert error(await publish(port, "x" * 129, {"merge": {}})) == (400, "bad_room")
        assert error(await call(port, "GET", "/api/rooms/%7Bx%7D")) == (400, "bad_room")
        assert error(await publish(port, "r", {"patch": [{"op": "jump"}]})) == (400, "bad_patch")
        missing = {"patch": [{"op": "remove", "path": "/nothing"}]}
        assert error(await publish(port, "r", missing)) == (400, "bad_patch")
        both: dict[str, Any] = {"patch": [], "merge": {}}
        assert error(await publish(port, "r", both)) == (400, "bad_patch")
        big = {"merge": {"x": "y" * 100}}  # the room's state would pass --max-state-bytes
        assert error(await publish(port, "r", big)) == (413, "too_large")
        # Two rooms loaded, both with members: a third cannot be (503 unavailable).
        await member.join("r2")
        assert error(await publish(port, "r3", {"merge": {}})) == (503, "unavailable")
        wrong = await call(port, "GET", "/api/rooms/r/deltas")
        assert error(wrong) == (405, "method_not_allowed") and wrong.headers["allow"] == "POST"
        assert error(await call(port, "POST", "/api/rooms/r", {})) == (405, "method_not_allowed")
        assert error(await call(port, "GET", "/api/nothing")) == (404, "not_found")
        assert error(await call(port, "GET", "/api/rooms/r/x/y")) == (404, "not_found")
        await member.nothing()  # no delta was published
        state = await call(port, "GET", "/api/rooms/r")
        assert state.json() == {"seq": 0, "state": {}}
        metrics = relay.metrics.render().decode()
        assert 'kasagi_api_requests_total{route="deltas",status="400"} 11.0' in metrics
        assert 'kasagi_api_requests_total{route="deltas",status="413"} 1.0' in metrics


async def test_missing_or_wrong_key_is_401_and_two_keys_both_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every route needs a configured key (two during a rotation); the key is never
    logged, not even at debug level."""
    caplog.set_level(logging.DEBUG)
    async with api_relay(api_keys=(KEY, OTHER_KEY)) as relay:
        port = relay.port
        for key in (KEY, OTHER_KEY):
            reply = await publish(port, "r", {"merge": {key: 1}}, key=key)
            assert reply.status == 200
        wrong: list[str | None] = [None, "nope", KEY[:-1], KEY + "x", f"{KEY},{OTHER_KEY}"]
        for bad in wrong:
            for method, path in (("POST", "/api/rooms/r/deltas"), ("GET", "/api/rooms/r")):
                reply = await call(port, method, path, {"merge": {}}, key=bad)
                assert error(reply) == (401, "unauthorized"), (bad, path)
                assert reply.headers["www-authenticate"] == "Bearer"
        basic = await call(port, "GET", "/api/rooms/r", key=None, headers={"Authorization": KEY})
        assert error(basic) == (401, "unauthorized")
        unknown = await call(port, "GET", "/api/nothing", key=None)
        assert error(unknown) == (401, "unauthorized")  # routes are not told apart unauthorized
        state = await call(port, "GET", "/api/rooms/r", key=OTHER_KEY)
        assert state.json() == {"seq": 2, "state": {KEY: 1, OTHER_KEY: 1}}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "unauthorized" in logged
    assert KEY not in logged and OTHER_KEY not in logged and "k-" not in logged


async def test_without_api_key_the_api_is_404() -> None:
    async with start_relay() as relay:
        for method, path in (("POST", "/api/rooms/r/deltas"), ("GET", "/api/rooms/r")):
            reply = await call(relay.port, method, path, {"merge": {}})
            assert error(reply) == (404, "not_found")
        async with connect_client(relay.url) as member:  # the port serves WebSockets as ever
            assert (await member.join("r"))["seq"] == 0


# --------------------------------------------------------------------------- bounded cost


async def test_huge_content_length_is_413_before_the_body() -> None:
    """A Content-Length past --max-message-bytes is answered 413 at once: the relay does
    not wait for (nor read) the body."""
    async with api_relay(max_message_bytes=64 * 1024) as relay:
        reader, writer = await raw(relay.port)
        writer.write(head("POST", "/api/rooms/r/deltas", f"Content-Length: {10 * 2**30}"))
        writer.write(b'{"merge":')  # 10 GiB announced, 9 bytes sent
        reply = await read_reply(reader)
        assert error(reply) == (413, "too_large") and reply.headers["connection"] == "close"
        assert await closed_by_relay(reader)
        writer.close()
        state = await call(relay.port, "GET", "/api/rooms/r")
        assert state.json() == {"seq": 0, "state": {}}


async def test_endless_chunked_body_is_cut_at_the_limit() -> None:
    """A chunked body is refused as soon as it passes --max-message-bytes and the connection
    closed: a client streaming 64 MiB cannot send it all (the relay stops reading)."""
    limit = 64 * 1024
    total = 64 * 2**20
    async with api_relay(max_message_bytes=limit) as relay:
        reader, writer = await raw(relay.port)
        writer.write(head("POST", "/api/rooms/r/deltas", "Transfer-Encoding: chunked"))
        chunk = b"x" * 16384
        sent = 0

        async def stream() -> None:
            nonlocal sent
            with contextlib.suppress(ConnectionError):
                while sent < total:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    sent += len(chunk)

        streaming = asyncio.create_task(stream())
        reply = await read_reply(reader)
        assert error(reply) == (413, "too_large")
        assert await closed_by_relay(reader)
        await asyncio.wait_for(streaming, TIMEOUT)
        assert sent < total
        writer.close()


async def test_slowloris_request_is_closed_at_the_timeout_while_members_are_served() -> None:
    """A request trickled a byte at a time is closed at --api-timeout (and an idle
    keep-alive connection too); a WebSocket member sending deltas meanwhile gets every ack."""
    async with api_relay(api_timeout_s=1.0) as relay, connect_client(relay.url) as member:
        await member.join("r")
        reader, writer = await raw(relay.port)
        idle_reader, idle_writer = await raw(relay.port)
        idle_writer.write(head("GET", "/api/rooms/r"))
        assert (await read_reply(idle_reader)).status == 200  # then says nothing more
        request = head("POST", "/api/rooms/r/deltas", "Content-Length: 100")
        closed = asyncio.Event()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in request:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if closed.is_set():
                        return

        async def watch() -> bool:
            ended = await closed_by_relay(reader)
            closed.set()
            return ended

        trickling = asyncio.create_task(trickle())
        watching = asyncio.create_task(watch())
        acks = 0
        while not watching.done():
            ack = await member.delta("r", merge={"n": acks})
            assert ack is not None and ack["seq"] == acks + 1
            acks += 1
            await asyncio.sleep(0.05)
        assert watching.result() and acks > 0
        assert await closed_by_relay(idle_reader)
        await trickling
        writer.close()
        idle_writer.close()


async def test_requests_past_the_cap_get_503() -> None:
    """--api-max-requests counts requests being served, body reading included: with one
    held open, another gets 503 (Retry-After); once it completes, requests go through."""
    async with api_relay(api_max_requests=1) as relay:
        reader, writer = await raw(relay.port)
        body = b'{"merge":{"a":1}}'
        writer.write(head("POST", "/api/rooms/r/deltas", f"Content-Length: {len(body)}"))
        writer.write(body[:5])
        await writer.drain()
        # The relay reads the head and holds the slot while the body comes; poll until then.
        for _ in range(100):
            busy = await publish(relay.port, "r", {"merge": {"b": 1}})
            if busy.status == 503:
                break
            await asyncio.sleep(0.02)
        assert error(busy) == (503, "unavailable") and busy.headers["retry-after"] == "1"
        writer.write(body[5:])
        reply = await read_reply(reader)
        assert reply.status == 200
        later = await publish(relay.port, "r", {"merge": {"c": 1}})
        assert later.status == 200
        writer.close()


async def test_api_connections_count_in_the_connection_limits() -> None:
    """An API connection takes a place in --max-connections-per-address (from its first
    request) like a WebSocket does, and gives it back when it ends."""
    async with api_relay(max_connections_per_address=1) as relay:
        reader, writer = await raw(relay.port)
        writer.write(head("GET", "/api/rooms/r"))
        assert (await read_reply(reader)).status == 200  # kept alive: holds the place
        refused = await call(relay.port, "GET", "/api/rooms/r")
        assert error(refused) == (503, "unavailable")
        assert refused.headers["connection"] == "close"
        with pytest.raises(InvalidStatus) as refusal:  # and a WebSocket handshake too
            async with connect_client(relay.url):
                pass
        assert refusal.value.response.status_code == 503
        writer.close()
        for _ in range(100):  # the relay sees the close soon after
            if (await call(relay.port, "GET", "/api/rooms/r")).status == 200:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the place was not given back")
        metrics = relay.metrics.render().decode()
        assert 'kasagi_connections_refused_total{reason="max_connections_per_address"}' in metrics


async def test_malformed_http_is_400_and_closed() -> None:
    async with api_relay() as relay:
        reader, writer = await raw(relay.port)
        writer.write(b"POST /api/rooms/r/deltas HTTP/1.1\r\nBad Header\r\n\r\n")
        reply = await read_reply(reader)
        assert error(reply) == (400, "bad_message")
        assert await closed_by_relay(reader)
        writer.close()


async def test_shutdown_closes_api_connections() -> None:
    relay = Relay(Config(port=0, api_keys=(KEY,)))
    await relay.start()
    try:
        reader, writer = await raw(relay.port)
        writer.write(head("GET", "/api/rooms/r"))
        assert (await read_reply(reader)).status == 200
    finally:
        await asyncio.wait_for(relay.stop(), TIMEOUT)
    assert await closed_by_relay(reader)
    writer.close()


# --------------------------------------------------------------------------- TLS, CLI


def tls_files(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    """A certificate for 127.0.0.1 (chain, key) and a client context trusting it."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(chain), str(key), context


async def test_api_over_tls(tmp_path: Path) -> None:
    chain, key, context = tls_files(tmp_path)
    async with api_relay(tls_cert=chain, tls_key=key) as relay:
        reply = await publish(relay.port, "r", {"merge": {"tls": True}}, tls=context)
        assert reply.json() == {"seq": 1}
        state = await call(relay.port, "GET", "/api/rooms/r", tls=context)
        assert state.json() == {"seq": 1, "state": {"tls": True}}
        assert error(await call(relay.port, "GET", "/api/rooms/r", key="x", tls=context)) == (
            401,
            "unauthorized",
        )


@pytest.mark.timeout(60)
async def test_command_line_relay_with_a_key_file_over_tls(tmp_path: Path) -> None:
    """The real command line (uvloop, --api-key-file, TLS): the key file's keys work, the
    key is nowhere in the relay's output."""
    chain, key, context = tls_files(tmp_path)
    keys = tmp_path / "api-keys"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    async with relay_process(
        "--tls-cert", chain, "--tls-key", key, "--api-key-file", str(keys)
    ) as proc:
        port = proc.port
        for api_key in (KEY, OTHER_KEY):
            reply = await publish(port, "r", {"merge": {"n": 1}}, key=api_key, tls=context)
            assert reply.status == 200
        assert error(await publish(port, "r", {"merge": {}}, key="no", tls=context)) == (
            401,
            "unauthorized",
        )
        async with connect_client(proc.url, ssl=context) as member:
            assert (await member.join("r"))["state"] == {"n": 1}
        await proc.terminate()
    assert proc.returncode == 0
    output = "\n".join(proc.stderr_lines)
    assert KEY not in output and OTHER_KEY not in output


# --------------------------------------------------------------------------- Redis


@pytest.mark.timeout(60)
async def test_publish_through_redis(redis_server: Topology) -> None:  # noqa: F811
    """On the Redis backend the 200 comes once the delta is in the room's stream; a member
    on another relay of the same Redis receives it; with Redis gone the API says 503."""
    port = redis_server.servers[0].port
    config = Config(redis=f"redis://127.0.0.1:{port}/0")
    async with (
        api_relay(config=config) as a,
        start_relay(config) as b,
        connect_client(b.url) as member,
    ):
        await member.join("r")
        reply = await publish(a.port, "r", {"merge": {"via": "api"}, "key": "once"})
        assert reply.json() == {"seq": 1}
        client = aioredis.Redis(port=port)
        try:
            # Stored when the 200 came (the same durability as an ack).
            ops = await client.xrange("room:{r}:ops")
            assert ops == [(b"1-0", {b"k": b"merge", b"d": b'{"via":"api"}'})]
        finally:
            await client.aclose()
        frame = await member.expect("delta")
        assert (frame["seq"], frame["merge"]) == (1, {"via": "api"})
        retry = await publish(a.port, "r", {"merge": {"via": "api"}, "key": "once"})
        assert retry.json() == {"seq": 1}
        state = await call(a.port, "GET", "/api/rooms/r")
        assert state.json() == {"seq": 1, "state": {"via": "api"}}
        redis_server.signal(redis_server.servers[0], signal.SIGKILL)
        down = await publish(a.port, "r", {"merge": {"x": 1}, "key": "later"})
        assert error(down) == (503, "unavailable")


# --------------------------------------------------------------------------- flags


def test_api_keys_from_flag_variable_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KASAGI_API_KEY", raising=False)
    assert parse_config([]).api_keys == ()
    assert parse_config(["--api-key", " a1 ,b2,,a1"]).api_keys == ("a1", "b2")
    monkeypatch.setenv("KASAGI_API_KEY", "from-env")
    assert parse_config([]).api_keys == ("from-env",)
    assert parse_config(["--api-key", "flag"]).api_keys == ("flag",)  # the flag wins
    keys = tmp_path / "keys"
    keys.write_text("new-key\nold-key\n\n")
    assert parse_config(["--api-key-file", str(keys)]).api_keys == (
        "from-env",
        "new-key",
        "old-key",
    )
    config = parse_config(["--api-key", "secret-value"])
    assert "secret-value" not in repr(config)


@pytest.mark.parametrize(
    "argv",
    [
        ["--api-key", "has space"],
        ["--api-key", "é"],
        ["--api-key-file", "/nonexistent/keys"],
        ["--api-timeout", "0"],
    ],
)
def test_bad_api_keys_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has space" not in err
