"""The `kasagi-relay` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from kasagi_relay.cli import parse_config
from kasagi_relay.config import Config
from testkit.relay import REPO, connect_client, relay_env, relay_process


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kasagi_relay", *args],
        env=relay_env(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_explains_every_flag() -> None:
    r = run("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for flag, env in [
        ("--host", "KASAGI_HOST"),
        ("--port", "KASAGI_PORT"),
        ("--tls-cert", "KASAGI_TLS_CERT"),
        ("--tls-key", "KASAGI_TLS_KEY"),
        ("--redis", "KASAGI_REDIS"),
        ("--sentinels", "KASAGI_SENTINELS"),
        ("--master", "KASAGI_MASTER"),
        ("--redis-password", "KASAGI_REDIS_PASSWORD"),
        ("--sentinel-password", "KASAGI_SENTINEL_PASSWORD"),
        ("--ack", "KASAGI_ACK"),
        ("--tick-ms", "KASAGI_TICK_MS"),
        ("--history", "KASAGI_HISTORY"),
        ("--max-message-bytes", "KASAGI_MAX_MESSAGE_BYTES"),
        ("--max-state-bytes", "KASAGI_MAX_STATE_BYTES"),
        ("--send-queue-bytes", "KASAGI_SEND_QUEUE_BYTES"),
        ("--log-level", "KASAGI_LOG_LEVEL"),
        ("--log-format", "KASAGI_LOG_FORMAT"),
        ("--max-rooms", "KASAGI_MAX_ROOMS"),
        ("--max-loaded-rooms", "KASAGI_MAX_LOADED_ROOMS"),
        ("--no-inspector", "KASAGI_NO_INSPECTOR"),
        ("--gc", "KASAGI_GC"),
        ("--jwt-secret", "KASAGI_JWT_SECRET"),
        ("--jwt-secret-file", "KASAGI_JWT_SECRET_FILE"),
        ("--jwt-public-key", "KASAGI_JWT_PUBLIC_KEY"),
        ("--jwks", "KASAGI_JWKS"),
        ("--jwt-audience", "KASAGI_JWT_AUDIENCE"),
        ("--jwt-issuer", "KASAGI_JWT_ISSUER"),
        ("--jwt-leeway", "KASAGI_JWT_LEEWAY"),
        ("--auth-timeout", "KASAGI_AUTH_TIMEOUT"),
        ("--auth", "KASAGI_AUTH"),
        ("--allowed-origins", "KASAGI_ALLOWED_ORIGINS"),
    ]:
        assert flag in text and env in text, flag
    assert "ws://127.0.0.1:8765/ws" in text
    assert "default: kasagi-master" in text


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--bogus"], None, "unrecognized arguments: --bogus"),
        (["--port", "http"], None, "--port"),
        (["--port", "70000"], None, "between 0 and 65535"),
        (["--ack", "some"], None, "--ack"),
        (["--tick-ms", "-5"], None, "--tick-ms"),
        (["--max-state-bytes", "lots"], None, "not a size"),
        (["--sentinels", "nohostport"], None, "host:port"),
        (["--log-format", "xml"], None, "--log-format"),
        ([], {"KASAGI_TICK_MS": "soon"}, "--tick-ms"),
        (["--max-rooms", "-1"], None, "--max-rooms"),
        ([], {"KASAGI_MAX_LOADED_ROOMS": "many"}, "--max-loaded-rooms"),
        (["--redis", "redis://x", "--sentinels", "a:1"], None, "exclusive"),
        (["--cluster", "a:1", "--sentinels", "a:1"], None, "exclusive"),
        (["--redis", "redis://x"], {"KASAGI_CLUSTER": "a:1"}, "exclusive"),
        (["--cluster", "nohostport"], None, "host:port"),
        (["--tls-cert", "/nonexistent/chain.pem"], None, "no such file: /nonexistent/chain.pem"),
        ([], {"KASAGI_TLS_KEY": "key.pem"}, "--tls-key needs --tls-cert"),
        (["--host", "0.0.0.0"], None, "refusing to serve anonymously on 0.0.0.0"),
        (["--host", "0.0.0.0", "--api-key", "k" * 24], None, "refusing to serve anonymously"),
        ([], {"KASAGI_HOST": "10.1.2.3"}, "--auth none"),
        (["--auth", "none"], {"KASAGI_JWT_SECRET": "s" * 32}, "contradict"),
        (["--jwt-secret", "s" * 32, "--jwks", "keys.json"], None, "only one of"),
        (["--jwt-secret", "short"], None, "at least 32 bytes"),
        (["--jwt-secret-file", "/nonexistent/secret"], None, "--jwt-secret-file"),
        (["--jwt-public-key", "/nonexistent/key.pem"], None, "--jwt-public-key"),
        (["--jwks", "http://idp.example/jwks"], None, "https"),
        (["--jwt-leeway", "11"], None, "--jwt-leeway"),
        (["--auth-timeout", "0"], None, "--auth-timeout"),
        (["--auth", "maybe"], None, "--auth"),
        (["--presence-event-delay", "1.5"], None, "--presence-event-delay"),
        (["--presence-event-delay", "-0.1"], None, "--presence-event-delay"),
    ],
)
def test_bad_flag_or_value_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str] | None, needle: str
) -> None:
    r = run(*args, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kasagi-relay: error:") and needle in lines[0]


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KASAGI_PORT", "KASAGI_HOST", "KASAGI_ACK", "KASAGI_SENTINELS", "KASAGI_TICK_MS"):
        monkeypatch.delenv(name, raising=False)
    c = parse_config([])
    assert (c.host, c.port, c.backend_name, c.ack_level) == ("127.0.0.1", 8765, "memory", "leader")
    monkeypatch.setenv("KASAGI_TICK_MS", "25")
    monkeypatch.setenv("KASAGI_SEND_QUEUE_BYTES", "256KiB")
    c = parse_config([])
    assert (c.tick_ms, c.send_queue_bytes) == (25, 256 * 1024)
    assert parse_config(["--tick-ms", "5"]).tick_ms == 5  # the flag wins
    assert parse_config([]).max_rooms == 100
    monkeypatch.setenv("KASAGI_MAX_ROOMS", "0")
    assert parse_config([]).max_rooms == 0
    assert parse_config(["--max-rooms", "7"]).max_rooms == 7
    assert parse_config([]).max_loaded_rooms == 10_000
    monkeypatch.setenv("KASAGI_MAX_LOADED_ROOMS", "0")
    assert parse_config([]).max_loaded_rooms == 0
    assert parse_config(["--max-loaded-rooms", "50"]).max_loaded_rooms == 50
    assert parse_config([]).gc == "freeze"
    monkeypatch.setenv("KASAGI_GC", "default")
    assert parse_config([]).gc == "default"
    assert parse_config(["--gc", "freeze"]).gc == "freeze"
    # --max-state-memory defaults to 8x --max-state-bytes, whichever way that is set.
    assert parse_config([]).max_state_memory == 64 * 1024 * 1024 == Config().max_state_memory
    assert parse_config(["--max-state-bytes", "1MiB"]).max_state_memory == 8 * 1024 * 1024
    assert parse_config(["--max-state-memory", "3MiB"]).max_state_memory == 3 * 1024 * 1024
    monkeypatch.setenv("KASAGI_MAX_STATE_MEMORY", "2MiB")
    assert parse_config([]).max_state_memory == 2 * 1024 * 1024
    c = parse_config(["--sentinels", "a:1,b:2"])
    assert c.sentinels == (("a", 1), ("b", 2)) and c.ack_level == "replica"
    assert parse_config(["--sentinels", "a:1", "--ack", "all"]).ack_level == "all"
    c = parse_config(["--cluster", "a:1,b:2"])
    assert c.cluster == (("a", 1), ("b", 2)) and c.ack_level == "replica"
    assert c.backend_name == "cluster"
    assert parse_config([]).presence_event_delay_s == 0.02
    monkeypatch.setenv("KASAGI_PRESENCE_EVENT_DELAY", "0")
    assert parse_config([]).presence_event_delay_s == 0
    assert parse_config(["--presence-event-delay", "0.25"]).presence_event_delay_s == 0.25


def test_identity_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KASAGI_HOST", "KASAGI_JWT_SECRET", "KASAGI_AUTH", "KASAGI_ALLOWED_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
    c = parse_config([])
    assert not c.jwt_configured and not c.auth_none and c.allowed_origins == ("*",)
    assert (c.auth_timeout_s, c.jwt_leeway_s) == (5.0, 5.0)
    for host in ("localhost", "127.0.0.2", "::1", "[::1]"):
        assert parse_config(["--host", host]).host == host  # loopback: anonymous is fine
    assert parse_config(["--host", "0.0.0.0", "--auth", "none"]).auth_none
    secret = tmp_path / "secret"
    secret.write_text("f" * 40 + "\n")
    c = parse_config(["--host", "0.0.0.0", "--jwt-secret-file", str(secret)])
    assert c.jwt_secret == "f" * 40
    monkeypatch.setenv("KASAGI_JWT_SECRET", "e" * 32)
    monkeypatch.setenv("KASAGI_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    c = parse_config(["--host", "0.0.0.0", "--auth-timeout", "2.5"])
    assert c.jwt_secret == "e" * 32 and c.auth_timeout_s == 2.5
    assert c.allowed_origins == ("https://a.example", "https://b.example")


async def test_no_arguments_serves_memory_and_says_so_in_one_line() -> None:
    # No flags at all; the port comes from the environment only so parallel runs of the
    # suite cannot collide on 8765 (the default itself is checked above).
    async with relay_process(port="", env={"KASAGI_PORT": "0"}) as proc:
        lines = [line for line in proc.stderr_lines if "serving" in line]
        assert len(lines) == 1
        assert "ws://127.0.0.1:" in lines[0] and "memory backend" in lines[0]
        assert "anonymous" in lines[0]
        async with connect_client(proc.url) as c:
            assert (await c.join("lobby"))["state"] == {}
        assert await proc.terminate() == 0


async def test_json_logs() -> None:
    import json

    async with relay_process("--log-format", "json") as proc:
        entry = json.loads(proc.stderr_lines[0])
        assert entry["level"] == "info" and "serving ws://" in entry["msg"]


async def open_members(url: str, n: int, stack: contextlib.AsyncExitStack) -> int:
    """Open up to `n` WebSocket connections (kept open by `stack`); how many succeeded."""
    for i in range(n):
        try:
            await stack.enter_async_context(connect(url, open_timeout=3, compression=None))
        except (InvalidHandshake, OSError, TimeoutError):
            return i
    return n


async def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """Started with a soft limit of 64 open files (hard 4096), the relay takes 300
    connections: it raised its own soft limit, and says nothing about it."""
    # Within this process's own hard limit: only root may raise a hard limit.
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    # All 300 come from 127.0.0.1: the per-address cap (256 by default) is not under test.
    async with (
        relay_process("--max-connections-per-address", "0", open_files=(64, hard)) as proc,
        contextlib.AsyncExitStack() as stack,
    ):
        assert await open_members(proc.url, 300, stack) == 300
        async with connect_client(proc.url) as client:
            assert (await client.join("r"))["seq"] == 0
    assert not any("open files limit" in line for line in proc.stderr_lines), proc.stderr_lines


async def test_at_the_open_files_limit_new_connections_fail_and_the_rest_are_served() -> None:
    """With a hard limit of 64 the relay warns at start-up; past the limit a new connection
    fails, the relay stays up, the open connections are served, and a slot freed is reusable."""
    async with relay_process(open_files=(64, 64)) as proc:
        warning = [line for line in proc.stderr_lines if "open files limit is 64" in line]
        assert len(warning) == 1, proc.stderr_lines
        async with connect_client(proc.url) as first, contextlib.AsyncExitStack() as stack:
            opened = await open_members(proc.url, 100, stack)
            assert 10 < opened < 64  # refused before the 100th
            assert (await first.join("r"))["seq"] == 0
            await stack.aclose()  # frees every slot but `first`'s
            await asyncio.sleep(0.5)
            async with connect_client(proc.url) as later:
                assert (await later.join("r"))["seq"] == 0
        assert proc.returncode is None
