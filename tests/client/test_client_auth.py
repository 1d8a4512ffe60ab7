"""The Python client with tokens against real relays with a JWT secret: `auth` first,
refresh before expiry, reconnect after 4001 with a fresh token, never after 1008; and
`kasagi-client token` / `--token` as a newcomer runs them (docs/operations.md's example)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest

from kasagi_relay.client import Client, ConnectionFailed
from kasagi_relay.client.cli import mint_token
from testkit.relay import relay_process, start_relay
from tests.client.test_cli import client as run_client

SECRET = "c" * 48


def token(ttl: float = 3600, sub: str = "alice", **over: Any) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": time.time() + ttl, "rooms": {"*": "rw"}}
    claims.update(over)
    return jwt.encode(claims, SECRET, algorithm="HS256")


def relay(**overrides: Any) -> Any:
    overrides.setdefault("jwt_secret", SECRET)
    overrides.setdefault("jwt_leeway_s", 0.0)
    return start_relay(**overrides)


async def test_a_token_authenticates_the_connection() -> None:
    async with relay() as r, Client(r.url, token=token()) as c:
        room = await c.join("lobby")
        assert await room.send(merge={"hp": 7}) == 1
        assert c.sub == "alice" and c.token_exp is not None


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_get_token_refreshes_before_expiry(kind: str) -> None:
    calls = 0

    def fresh() -> str:
        nonlocal calls
        calls += 1
        return token(ttl=3)

    async def fresh_async() -> str:
        return fresh()

    source: Any = fresh if kind == "sync" else fresh_async
    async with relay() as r, Client(r.url, get_token=source) as c:
        room = await c.join("lobby")
        deadline = time.time() + 5.5  # past the first two tokens' exp
        n = 0
        while time.time() < deadline:
            await room.send(merge={"n": n})
            n += 1
            await asyncio.sleep(0.1)
        assert c.disconnects == []
        assert calls >= 3
        assert room.seq == n


async def test_4001_reconnects_with_a_fresh_token_and_resumes() -> None:
    calls = 0

    def source() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the token service is down for the refresh")
        return token(ttl=1.0 if calls == 1 else 3600)

    async with relay() as r, Client(r.url, get_token=source, min_delay=0.05) as c:
        room = await c.join("lobby")
        await room.send(merge={"before": 1})
        changes = aiter(room)
        await anext(changes)
        async with asyncio.timeout(10):
            while not c.disconnects:  # noqa: ASYNC110 - the client appends it
                await asyncio.sleep(0.05)
        assert c.disconnects == [4001]
        assert await room.send(merge={"after": 1}) == 2
        change = await anext(changes)
        assert change.seq == 2 and room.state == {"before": 1, "after": 1}


async def test_a_fixed_token_ends_with_4001() -> None:
    async with relay() as r, Client(r.url, token=token(ttl=1.0)) as c:
        room = await c.join("lobby")
        with pytest.raises(ConnectionFailed) as info:
            async with asyncio.timeout(10):
                async for _ in room:
                    pass
        assert info.value.close_code == 4001


async def test_a_bad_token_is_never_retried() -> None:
    calls = 0

    def source() -> str:
        nonlocal calls
        calls += 1
        return jwt.encode({"sub": "x", "exp": time.time() + 60, "rooms": {}}, "w" * 48)

    async with relay() as r, Client(r.url, get_token=source) as c:
        with pytest.raises(ConnectionFailed) as info:
            await c.join("lobby")
        assert info.value.close_code == 1008
        await asyncio.sleep(0.5)
        assert calls == 1


async def test_the_cli_mints_a_token_and_uses_it() -> None:
    code, out, err = await run_client(
        "token", "--secret", SECRET, "--sub", "alice", "--rooms", '{"lobby":"rw"}', "--ttl", "600"
    )
    assert code == 0, err
    minted = out.strip()
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["rooms"] == {"lobby": "rw"}
    assert 590 <= claims["exp"] - time.time() <= 600
    env = {"KASAGI_JWT_SECRET": SECRET}
    async with relay_process(env=env) as proc:
        code, out, err = await run_client(
            "--token", minted, proc.url, "send", "lobby", '{"merge":{"hp":7}}'
        )
        assert code == 0, err
        assert json.loads(out) == {"room": "lobby", "seq": 1}
        code, out, err = await run_client(
            "--token", minted, proc.url, "send", "other", '{"merge":{"hp":7}}'
        )
        assert code == 1 and "forbidden" in err
        code, out, err = await run_client(proc.url, "state", "lobby")
        assert code == 1 and "unauthorized" in err


def test_mint_token_claims() -> None:
    minted = mint_token(SECRET, "bob", {"*": "r"}, 60, {"name": "Bob"}, now=1000)
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {
        "sub": "bob",
        "rooms": {"*": "r"},
        "iat": 1000,
        "exp": 1060,
        "info": {"name": "Bob"},
    }
