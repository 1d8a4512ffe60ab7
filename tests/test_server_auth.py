"""Identity against a real relay (docs/protocol.md, "Identity"): every bad token of issue 10's
list gets `unauthorized` and a 1008 close (or HTTP 401 in the handshake) and changes
nothing; grants give `forbidden` and keep the connection; refresh, expiry (4001), origins,
the URL query, idempotency keys per user, connections that never authenticate, and a JWKS
URL that rotates, hangs or returns garbage (served by a real local HTTP server)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kasagi_relay.server import Relay
from testkit.relay import (
    JSON,
    MSGPACK,
    Client,
    connect_client,
    raw_connect,
    relay_process,
    start_relay,
    text_frame,
)

SECRET = "k" * 48
OTHER = "o" * 48


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": time.time() + 3600, "rooms": {"*": "rw"}}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def token(secret: str = SECRET, alg: str = "HS256", **over: Any) -> str:
    return jwt.encode(claims(**over), secret, algorithm=alg)


@contextlib.asynccontextmanager
async def auth_relay(**overrides: Any) -> AsyncIterator[Relay]:
    overrides.setdefault("jwt_secret", SECRET)
    overrides.setdefault("jwt_leeway_s", 0.0)
    async with start_relay(**overrides) as relay:
        yield relay


async def authed(client: Client, tok: str, rid: int = 1) -> dict[str, Any]:
    await client.send({"t": "auth", "token": tok, "id": rid})
    reply = await client.expect("authed")
    return reply


async def refused(client: Client, tok: str) -> dict[str, Any]:
    """`auth` with a bad token: `error` unauthorized, then close 1008."""
    await client.send({"t": "auth", "token": tok, "id": 7})
    # A request sent behind it is not served: the connection is closing.
    await client.send({"t": "delta", "room": "lobby", "merge": {"x": 1}, "id": 8})
    error = await client.expect("error")
    assert error["code"] == "unauthorized" and error["id"] == 7
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 1008
    return error


async def lobby_seq(relay: Relay) -> int:
    async with connect_client(relay.url) as watcher:
        await authed(watcher, token())
        joined = await watcher.join("lobby")
        return int(joined["seq"])


def metric(relay: Relay, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "kasagi_auth_failures_total", {"reason": reason}
    )
    return value or 0.0


# --------------------------------------------------------------------------- the basics


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
async def test_an_authenticated_connection_is_served(codec: str) -> None:
    async with auth_relay() as relay, connect_client(relay.url, codec) as c:
        exp = int(time.time()) + 600
        reply = await authed(c, token(exp=exp, info={"name": "Alice"}))
        assert reply == {"t": "authed", "id": 1, "sub": "alice", "exp": exp}
        await c.join("lobby")
        ack = await c.delta("lobby", merge={"hp": 7})
        assert ack is not None and ack["seq"] == 1


async def test_without_a_token_requests_are_unauthorized_then_1008() -> None:
    async with auth_relay(auth_timeout_s=0.5) as relay, connect_client(relay.url) as c:
        await c.send({"t": "join", "room": "lobby", "id": 1})
        error = await c.expect("error")
        assert error["code"] == "unauthorized" and error["id"] == 1
        await c.send({"t": "delta", "room": "lobby", "merge": {"x": 1}, "id": 2})
        assert (await c.expect("error"))["code"] == "unauthorized"  # the connection stayed
        with pytest.raises(ConnectionClosed):
            await c.recv(within=5)
        assert c.ws.close_code == 1008
        assert metric(relay, "missing") == 1
        assert await lobby_seq(relay) == 0


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _alg_none() -> str:
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims())}."


def bad_tokens() -> dict[str, tuple[str, str]]:
    """Made when a test runs: times are relative to now."""
    return {
        "garbage": ("not-a-jwt", "malformed"),
        "alg none": (_alg_none(), "algorithm"),
        "wrong secret": (token(OTHER), "signature"),
        "expired": (token(exp=time.time() - 60), "expired"),
        "nbf in the future": (token(nbf=time.time() + 600), "not_yet_valid"),
        "missing sub": (token(sub=...), "claims"),
        "missing exp": (token(exp=...), "claims"),
        "missing rooms": (token(rooms=...), "claims"),
        "rooms not an object": (token(rooms=["lobby"]), "claims"),
        "rights other than r/w": (token(rooms={"lobby": "rwx"}), "claims"),
        "info over 1 KiB": (token(info={"bio": "x" * 1100}), "claims"),
    }


@pytest.mark.parametrize("case", sorted(bad_tokens()))
async def test_bad_tokens_in_auth(case: str) -> None:
    bad, reason = bad_tokens()[case]
    async with auth_relay() as relay:
        async with connect_client(relay.url) as c:
            await refused(c, bad)
        assert metric(relay, reason) == 1
        assert await lobby_seq(relay) == 0


@pytest.mark.parametrize("case", ["garbage", "wrong secret", "expired", "alg none"])
async def test_bad_tokens_in_the_header_get_401(case: str) -> None:
    bad, reason = bad_tokens()[case]
    async with auth_relay() as relay:
        with pytest.raises(InvalidStatus) as info:
            async with connect_client(
                relay.url, additional_headers={"Authorization": f"Bearer {bad}"}
            ):
                pass
        assert info.value.response.status_code == 401
        assert metric(relay, reason) == 1
        assert relay.sessions == set()


async def test_a_good_header_token_needs_no_auth_message() -> None:
    async with auth_relay() as relay:
        headers = {"Authorization": f"Bearer {token(rooms={'lobby': 'r'})}"}
        async with connect_client(relay.url, additional_headers=headers) as c:
            await c.join("lobby")
            await c.send({"t": "delta", "room": "lobby", "merge": {"x": 1}, "id": 3})
            assert (await c.expect("error"))["code"] == "forbidden"


async def test_audience_and_issuer() -> None:
    async with auth_relay(jwt_audience="kasagi", jwt_issuer="https://idp") as relay:
        for bad, reason in (
            (token(aud="other", iss="https://idp"), "audience"),
            (token(aud="kasagi", iss="https://evil"), "issuer"),
        ):
            async with connect_client(relay.url) as c:
                await refused(c, bad)
            assert metric(relay, reason) == 1
        async with connect_client(relay.url) as c:
            await authed(c, token(aud="kasagi", iss="https://idp"))


async def test_algorithm_confusion_with_the_public_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    head = _b64({"alg": "HS256", "typ": "JWT"}).encode()
    body = _b64(claims()).encode()
    sig = hmac.new(pem, head + b"." + body, hashlib.sha256).digest()
    forged = b".".join((head, body, base64.urlsafe_b64encode(sig).rstrip(b"="))).decode()
    async with start_relay(jwt_public_key=str(path)) as relay:
        async with connect_client(relay.url) as c:
            await refused(c, forged)
        assert metric(relay, "algorithm") == 1
        async with connect_client(relay.url) as c:
            await authed(c, jwt.encode(claims(), key, algorithm="RS256"))
            assert await lobby_seq_with(c) == 0


async def lobby_seq_with(c: Client) -> int:
    return int((await c.join("lobby"))["seq"])


# --------------------------------------------------------------------------- grants


async def test_grants_give_forbidden_and_the_connection_stays() -> None:
    async with auth_relay() as relay, connect_client(relay.url) as c:
        await authed(c, token(rooms={"match-42.*": "r", "match-42.chat": "w"}))
        await c.send({"t": "join", "room": "lobby", "id": 1})
        assert (await c.expect("error"))["code"] == "forbidden"
        await c.join("match-42.board")
        await c.send({"t": "delta", "room": "match-42.board", "merge": {"x": 1}, "id": 2})
        error = await c.expect("error")
        assert error["code"] == "forbidden" and error["room"] == "match-42.board"
        ack = await c.delta("match-42.chat", merge={"said": "hi"})
        assert ack is not None and ack["seq"] == 1
        assert (
            relay.metrics.registry.get_sample_value("kasagi_forbidden_total", {"action": "publish"})
            == 1
        )


# --------------------------------------------------------------------------- refresh, expiry


async def test_refresh_replaces_grants_and_leaves_rooms_no_longer_readable() -> None:
    async with auth_relay() as relay, connect_client(relay.url) as c:
        await authed(c, token(rooms={"a": "r", "b": "r"}, exp=int(time.time()) + 60))
        await c.join("a")
        await c.join("b")
        exp = int(time.time()) + 3600
        await c.send({"t": "auth", "token": token(rooms={"a": "rw"}, exp=exp), "id": 9})
        left = await c.expect("left")
        assert left == {"t": "left", "room": "b", "code": "forbidden"}
        assert await c.expect("authed") == {"t": "authed", "id": 9, "sub": "alice", "exp": exp}
        ack = await c.delta("a", merge={"now": "writable"})
        assert ack is not None


async def test_refresh_with_another_sub_is_1008() -> None:
    async with auth_relay() as relay, connect_client(relay.url) as c:
        await authed(c, token())
        await c.join("lobby")
        error = await refused(c, token(sub="mallory"))
        assert "sub" in error["message"]
        assert metric(relay, "sub_changed") == 1


async def test_expiry_without_refresh_closes_4001() -> None:
    async with auth_relay() as relay, connect_client(relay.url) as c:
        await authed(c, token(exp=time.time() + 1))
        await c.join("lobby")
        error = await c.expect("error", within=5)
        assert error["code"] == "unauthorized" and error["message"] == "token expired"
        with pytest.raises(ConnectionClosed):
            await c.recv()
        assert c.ws.close_code == 4001


async def test_a_refresh_moves_the_expiry() -> None:
    async with auth_relay() as relay, connect_client(relay.url) as c:
        await authed(c, token(exp=time.time() + 1))
        await authed(c, token(exp=time.time() + 3600), rid=2)
        await c.join("lobby")
        await c.nothing(within=1.5)  # past the first token's exp: still open
        assert (await c.delta("lobby", merge={"x": 1})) is not None


# --------------------------------------------------------------------------- the URL, origins


async def test_a_token_in_the_url_is_ignored_and_not_logged() -> None:
    good = token()
    env = {"KASAGI_JWT_SECRET": SECRET}
    async with relay_process("--log-level", "debug", env=env) as proc:
        async with connect_client(f"{proc.url}?token={good}&access_token={good}") as c:
            await c.send({"t": "join", "room": "lobby", "id": 1})
            assert (await c.expect("error"))["code"] == "unauthorized"
        bad = token(OTHER)
        async with connect_client(f"{proc.url}?token={bad}") as c:
            await refused(c, bad)
        await proc.terminate()
    log = "\n".join(proc.stderr_lines)
    assert "authentication failed" in log
    assert good not in log and bad not in log
    assert good.split(".")[2] not in log and bad.split(".")[2] not in log


@pytest.mark.parametrize(
    ("origin", "status"),
    [("https://app.example", None), ("https://evil.example", 403), ("null", 403), (None, None)],
)
async def test_allowed_origins(origin: str | None, status: int | None) -> None:
    async with auth_relay(
        allowed_origins=("https://app.example", "http://localhost:3000")
    ) as relay:
        kwargs: dict[str, Any] = {}
        if origin is not None:
            kwargs["origin"] = origin
        if status is None:
            async with connect_client(relay.url, **kwargs) as c:
                await authed(c, token())
        else:
            with pytest.raises(InvalidStatus) as info:
                async with connect_client(relay.url, **kwargs):
                    pass
            assert info.value.response.status_code == status


# --------------------------------------------------------------------------- keys per user


async def test_idempotency_keys_are_per_user() -> None:
    async with (
        auth_relay() as relay,
        connect_client(relay.url) as alice,
        connect_client(relay.url) as bob,
    ):
        await authed(alice, token(sub="alice"))
        await authed(bob, token(sub="bob"))
        a = await alice.delta("lobby", merge={"a": 1}, key="k1")
        b = await bob.delta("lobby", merge={"b": 1}, key="k1")
        assert a is not None and b is not None and a["seq"] != b["seq"]
        again = await alice.delta("lobby", merge={"a": 1}, key="k1")
        assert again is not None and again["seq"] == a["seq"]
        await alice.send({"t": "delta", "room": "lobby", "merge": {"z": 1}, "key": "k1"})
        error = await alice.expect("error")
        assert error["code"] == "key_conflict" and "'k1'" in error["message"]


async def test_an_anonymous_relay_keeps_working_and_refuses_tokens() -> None:
    async with start_relay() as relay, connect_client(relay.url) as c:
        await c.send({"t": "auth", "token": token(), "id": 1})
        assert (await c.expect("error"))["code"] == "bad_message"
        await c.join("lobby")


# --------------------------------------------------------------------------- many idle connections


async def test_connections_that_never_authenticate_are_closed_and_members_served() -> None:
    count = 1000
    async with (
        auth_relay(auth_timeout_s=1.5, max_connections_per_address=0, max_connections=0) as relay,
        connect_client(relay.url) as member,
    ):
        await authed(member, token())
        await member.join("lobby")
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        try:
            for i in range(0, count, 100):
                socks += await asyncio.gather(*(raw_connect(relay.port) for _ in range(100)))
                if i % 300 == 0:  # some say something other than auth
                    await loop.sock_sendall(socks[-1], text_frame(b'{"t":"join","room":"x"}'))
                ack = await member.delta("lobby", merge={"n": i})
                assert ack is not None
            assert len(relay.sessions) == count + 1

            async def closed(sock: socket.socket) -> None:
                async with asyncio.timeout(20):
                    while await loop.sock_recv(sock, 4096):
                        pass

            acks = 0
            waiting = asyncio.ensure_future(asyncio.gather(*(closed(s) for s in socks)))
            while not waiting.done():
                assert await member.delta("lobby", merge={"t": acks}) is not None
                acks += 1
                await asyncio.sleep(0.05)
            await waiting
            assert acks > 0
        finally:
            for sock in socks:
                sock.close()
        async with asyncio.timeout(10):
            while len(relay.sessions) > 1:  # noqa: ASYNC110 - sessions end on their own
                await asyncio.sleep(0.05)
        assert metric(relay, "missing") == count
        assert (
            relay.metrics.registry.get_sample_value("kasagi_closes_total", {"code": "1008"})
            == count
        )
        assert await member.delta("lobby", merge={"still": True}) is not None


# --------------------------------------------------------------------------- JWKS


class _Jwks:
    """A real HTTP server for the JWKS: serves `body`, or hangs while `hang` is set."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.hang = threading.Event()
        self.release = threading.Event()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if outer.hang.is_set():
                    outer.release.wait(10)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def serve(self, *keys: tuple[str, rsa.RSAPrivateKey]) -> None:
        docs = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            docs.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        self.body = json.dumps({"keys": docs}).encode()


@pytest.fixture
def jwks_server() -> Iterator[_Jwks]:
    server = _Jwks()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.server.shutdown()
        server.server.server_close()


def rs(key: rsa.RSAPrivateKey, kid: str, **over: Any) -> str:
    return jwt.encode(claims(**over), key, algorithm="RS256", headers={"kid": kid})


async def test_jwks_rotation_garbage_and_hangs(jwks_server: _Jwks) -> None:
    k1, k2, k3 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "123")
    jwks_server.serve(("k1", k1))
    async with start_relay(jwks=jwks_server.url) as relay:
        assert relay.auth is not None
        relay.auth.refetch_interval_s = 0.0  # the 10 s rule has its own test below
        relay.auth.timeout_s = 1.0
        async with connect_client(relay.url) as member:
            await authed(member, rs(k1, "k1"))
            await member.join("lobby")
            # Rotation: a new kid is fetched on first sight.
            jwks_server.serve(("k1", k1), ("k2", k2))
            async with connect_client(relay.url) as c:
                await authed(c, rs(k2, "k2"))
            # Garbage: the last good set stays.
            jwks_server.body = b"<html>oops</html>"
            async with connect_client(relay.url) as c:
                await refused(c, rs(k3, "k3"))
            async with connect_client(relay.url) as c:
                await authed(c, rs(k2, "k2"))
            # A hang: bounded by the timeout, the last good set stays, members are served.
            jwks_server.hang.set()
            async with connect_client(relay.url) as c:
                await refused(c, rs(k3, "k3"))
                assert await member.delta("lobby", merge={"during": "hang"}) is not None
            async with connect_client(relay.url) as c:
                await authed(c, rs(k1, "k1"))
            assert metric(relay, "unknown_kid") == 2
            # A wrong kid on a healthy endpoint.
            jwks_server.hang.clear()
            jwks_server.release.set()
            jwks_server.serve(("k1", k1))
            async with connect_client(relay.url) as c:
                await refused(c, rs(k1, "nope"))


async def test_unknown_kids_fetch_at_most_once_per_interval(jwks_server: _Jwks) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.serve(("k1", key))
    async with start_relay(jwks=jwks_server.url) as relay:
        assert relay.auth is not None
        first = jwks_server.requests
        for i in range(5):
            async with connect_client(relay.url) as c:
                await refused(c, rs(key, f"unknown-{i}"))
        assert jwks_server.requests - first <= 1


# --------------------------------------------------------------------------- start-up rule


async def test_start_up_rule() -> None:
    for args, env in (
        (("--host", "0.0.0.0"), {}),
        (("--host", "0.0.0.0", "--auth", "none"), {"KASAGI_JWT_SECRET": SECRET}),
        (("--jwt-secret", "short"), {}),
    ):
        with pytest.raises(AssertionError, match="exited with 2"):
            async with relay_process(*args, env=env):
                pass
    async with relay_process("--host", "0.0.0.0", "--auth", "none") as proc:
        assert proc.url
    async with relay_process("--host", "0.0.0.0", env={"KASAGI_JWT_SECRET": SECRET}) as proc:
        assert proc.url
        serving = next(line for line in proc.stderr_lines if "serving" in line)
        assert "tokens: --jwt-secret" in serving and SECRET not in serving


# --------------------------------------------------------------------------- 10,000 of them


async def _handshake(port: int) -> tuple[socket.socket, bytes]:
    """A bare WebSocket handshake read in chunks (raw_connect reads a byte at a time)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 4096)
        assert chunk, "closed during the handshake"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    return sock, rest


async def _close_code(sock: socket.socket, data: bytes) -> int | None:
    loop = asyncio.get_running_loop()
    while True:
        if len(data) >= 4 and data[0] & 0x0F == 0x8:
            return int.from_bytes(data[2:4], "big")
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            return None
        data += chunk


async def test_ten_thousand_connections_that_never_authenticate() -> None:
    """Issue 10's count, on a relay subprocess: each is closed with 1008 at its timeout, the
    relay lets go of every one, and an authenticated member keeps getting its acks."""
    count = 10_000
    args = ("--auth-timeout", "3", "--max-connections", "0", "--max-connections-per-address", "0")
    async with relay_process(*args, env={"KASAGI_JWT_SECRET": SECRET}) as proc:
        port = proc.port
        async with connect_client(proc.url) as member:
            await authed(member, token())
            await member.join("lobby")
            gate = asyncio.Semaphore(100)

            async def one() -> int | None:
                async with gate:
                    sock, rest = await _handshake(port)
                try:
                    async with asyncio.timeout(60):
                        return await _close_code(sock, rest)
                finally:
                    sock.close()

            everyone = asyncio.gather(*(one() for _ in range(count)))
            acks = 0
            while not everyone.done():
                assert await member.delta("lobby", merge={"n": acks}) is not None
                acks += 1
                await asyncio.sleep(0.1)
            codes = await everyone
            assert codes == [1008] * count
            assert acks > 10
            metrics = await asyncio.to_thread(_scrape, proc.url)
            assert 'kasagi_auth_failures_total{reason="missing"} 10000.0' in metrics
            async with asyncio.timeout(10):
                while "kasagi_connections 1.0" not in metrics:
                    await asyncio.sleep(0.2)
                    metrics = await asyncio.to_thread(_scrape, proc.url)
            assert await member.delta("lobby", merge={"still": True}) is not None


def _scrape(url: str) -> str:
    import urllib.request

    http_url = url.replace("ws://", "http://").replace("/ws", "/metrics")
    with urllib.request.urlopen(http_url, timeout=5) as reply:
        return str(reply.read().decode())


async def test_an_auth_flood_is_rate_limited() -> None:
    """Each `auth` costs a signature check: past a burst of 5 a connection gets
    `rate_limited` (nothing checked) and stays authenticated."""
    async with auth_relay() as relay, connect_client(relay.url) as c:
        for i in range(5):
            await authed(c, token(), rid=i)
        await c.send({"t": "auth", "token": token(), "id": 99})
        error = await c.expect("error")
        assert error["code"] == "rate_limited" and error["id"] == 99
        await c.join("lobby")
        assert await c.delta("lobby", merge={"still": "served"}) is not None
