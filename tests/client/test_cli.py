"""`kasagi-client` (python -m kasagi_relay.client), run as a newcomer runs it against a
relay started in another terminal: real subprocesses on both sides."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tomllib
from typing import Any

import pytest

from kasagi_relay.client import cli
from testkit.relay import REPO, relay_env, relay_process

pytestmark = pytest.mark.timeout(60)


async def client(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kasagi_relay.client",
        *args,
        env=relay_env(),
        cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_watch_send_and_state_against_a_relay_process(fmt: str) -> None:
    async with relay_process() as relay:
        watch = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kasagi_relay.client",
            "--format",
            fmt,
            relay.url,
            "watch",
            "lobby",
            env=relay_env(),
            cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert watch.stdout is not None
        try:
            async with asyncio.timeout(20):
                first = json.loads(await watch.stdout.readline())
            assert first == {"room": "lobby", "seq": 0, "state": {}}

            code, out, err = await client(
                "--format", fmt, relay.url, "send", "lobby", '{"merge":{"hp":7}}'
            )
            assert (code, lines(out), err) == (0, [{"room": "lobby", "seq": 1}], "")
            patch = '{"patch":[{"op":"add","path":"/names","value":["ö"]}],"key":"once"}'
            code, out, _ = await client(relay.url, "send", "lobby", patch)
            assert (code, lines(out)) == (0, [{"room": "lobby", "seq": 2}])

            async with asyncio.timeout(10):
                seen = [json.loads(await watch.stdout.readline()) for _ in range(2)]
            assert seen == [
                {"room": "lobby", "from": 1, "seq": 1, "merge": {"hp": 7}},
                {
                    "room": "lobby",
                    "from": 2,
                    "seq": 2,
                    "patch": [{"op": "add", "path": "/names", "value": ["ö"]}],
                },
            ]
            code, out, _ = await client(relay.url, "state", "lobby")
            assert (code, lines(out)) == (
                0,
                [{"room": "lobby", "seq": 2, "state": {"hp": 7, "names": ["ö"]}}],
            )
        finally:
            if watch.returncode is None:
                watch.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                await watch.wait()
        assert watch.returncode == 0


async def test_refusals_and_mistakes_are_one_line_and_an_exit_status() -> None:
    async with relay_process() as relay:
        code, out, err = await client(
            relay.url, "send", "lobby", '{"patch":[{"op":"remove","path":"/x"}]}'
        )
        assert (code, out) == (1, "")
        assert (
            err.strip()
            == "kasagi-client: the relay answered bad_patch: op 0 (remove /x): path not found"
        )
        code, _, err = await client(relay.url, "send", "lobby", "{not json")
        assert code == 2 and "DELTA is not JSON" in err
        code, _, err = await client(relay.url, "send", "lobby", '{"patch":[],"merge":{}}')
        assert code == 2 and 'exactly one of "patch" or "merge"' in err
        code, _, err = await client(relay.url, "state", "no room")
        assert (code, err.strip()) == (2, "kasagi-client: not a valid room name: 'no room'")
    # The relay is gone: the first connection fails at once, in one line.
    code, _, err = await client(relay.url, "state", "lobby")
    assert (
        code == 1 and err.startswith("kasagi-client: cannot connect to ") and err.count("\n") == 1
    )


def test_the_console_script_is_declared() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["kasagi-client"] == "kasagi_relay.client.cli:main"
    assert callable(cli.main)
