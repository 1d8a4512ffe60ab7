"""`--workers N` (kasagi_relay/workers.py): real relay processes on one port over a real
redis-server, real WebSocket clients; each connection learns its worker from the
`X-Kasagi-Worker` handshake header."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from websockets.exceptions import ConnectionClosed

from kasagi_relay.cli import parse_config
from kasagi_relay.workers import WORKER_HEADER
from testkit.redis import Topology, redis_server  # noqa: F401
from testkit.relay import REPO, Client, RelayProcess, connect_client, relay_env, relay_process

Clients = dict[int, list[Client]]


def redis_url(topo: Topology) -> str:
    return f"redis://127.0.0.1:{topo.servers[0].port}/0"


def worker_of(client: Client) -> int:
    assert client.ws.response is not None
    return int(client.ws.response.headers[WORKER_HEADER])


@contextlib.asynccontextmanager
async def workers_relay(topo: Topology, *args: str) -> AsyncIterator[RelayProcess]:
    async with relay_process("--redis", redis_url(topo), "--workers", "2", *args) as proc:
        yield proc


async def on_both_workers(
    url: str, stack: contextlib.AsyncExitStack, per_worker: int, **kwargs: object
) -> Clients:
    """Connect until each of the 2 workers holds `per_worker` clients (the kernel spreads
    connections by a hash of the peer address, so a few more may be needed)."""
    by_pid: Clients = defaultdict(list)
    for _ in range(100):
        client = await stack.enter_async_context(connect_client(url, **kwargs))  # type: ignore[arg-type]
        by_pid[worker_of(client)].append(client)
        if len(by_pid) == 2 and all(len(v) >= per_worker for v in by_pid.values()):
            return dict(by_pid)
    raise AssertionError(f"connections reached {len(by_pid)} worker(s): {dict(by_pid)}")


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def metric(text: bytes, name: str) -> float:
    m = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", text, re.M)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


async def deltas_until(client: Client, room: str, after: int, last: int) -> None:
    """Read `client`'s deltas for `room` from seq `after` + 1 to `last`: each frame must
    start where the previous one ended (no gap, no duplicate, in order)."""
    expected = after + 1
    while expected <= last:
        message, _ = await client.recv_until(
            lambda m: m.get("t") == "delta" and m.get("room") == room, within=10
        )
        assert message["from"] == expected, (message, expected)
        expected = message["seq"] + 1
    assert expected == last + 1


async def publish(writer: Client, room: str, count: int, tag: str) -> list[int]:
    seqs = []
    for i in range(count):
        ack = await writer.delta(room, merge={tag: i})
        assert ack is not None
        seqs.append(ack["seq"])
    return seqs


def test_workers_flag() -> None:
    redis = ("--redis", "redis://127.0.0.1:6379/0")
    assert parse_config([*redis]).workers == 1
    assert parse_config([*redis, "--workers", "3"]).workers == 3
    assert parse_config([*redis, "--workers", "auto"]).workers == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "257", "many"):
        with pytest.raises(SystemExit) as exc:
            parse_config([*redis, "--workers", bad])
        assert exc.value.code == 2
    assert parse_config(["--workers", "1"]).workers == 1  # memory backend, one process


def test_memory_backend_refuses_several_workers() -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "kasagi_relay", "--port", "0", "--workers", "2"],
        env=relay_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers needs --redis" in lines[0], proc.stderr


def test_a_taken_port_is_one_error(redis_server: Topology) -> None:  # noqa: F811
    """The parent reserves the port before any worker starts: a port another process
    listens on is the same one-line error, exit 1, as without workers."""
    import socket
    import subprocess

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kasagi_relay",
                "--port",
                str(port),
                "--workers",
                "2",
                "--redis",
                redis_url(redis_server),
            ],
            env=relay_env(),
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], proc.stderr


async def test_members_on_both_workers_get_every_delta_in_order(
    redis_server: Topology,  # noqa: F811
) -> None:
    async with workers_relay(redis_server) as proc, contextlib.AsyncExitStack() as stack:
        by_pid = await on_both_workers(proc.url, stack, per_worker=3)
        members = [c for clients in by_pid.values() for c in clients[1:]]
        writers = [clients[0] for clients in by_pid.values()]
        for member in members:
            await member.join("r")
        # One writer on each worker, concurrently: the room's order comes from Redis.
        acked = await asyncio.gather(*(publish(w, "r", 40, f"w{i}") for i, w in enumerate(writers)))
        seqs = sorted(s for one in acked for s in one)
        assert seqs == list(range(1, 81))
        await asyncio.gather(*(deltas_until(m, "r", 0, 80) for m in members))


async def test_a_killed_worker_is_restarted_and_its_members_resume(
    redis_server: Topology,  # noqa: F811
) -> None:
    async with workers_relay(redis_server) as proc, contextlib.AsyncExitStack() as stack:
        port = proc.port
        by_pid = await on_both_workers(proc.url, stack, per_worker=2)
        victim, survivor = list(by_pid)
        writer = by_pid[survivor][0]
        stay = by_pid[survivor][1:]
        moved = by_pid[victim]
        for member in [*stay, *moved]:
            await member.join("r")
        await publish(writer, "r", 10, "a")
        for member in moved:
            await deltas_until(member, "r", 0, 10)

        os.kill(victim, signal.SIGKILL)
        for member in moved:
            with pytest.raises(ConnectionClosed):
                await member.recv(within=10)
        # The room goes on on the surviving worker while the other one is down.
        await publish(writer, "r", 10, "b")

        async with asyncio.timeout(20):
            while True:
                _, _, body = await http_get(port, "/metrics")
                if metric(body, "kasagi_worker_restarts_total") == 1 and (
                    metric(body, "kasagi_workers") == 2
                ):
                    break
                await asyncio.sleep(0.1)
        assert any(f"(pid {victim}) killed by SIGKILL" in line for line in proc.stderr_lines)

        # Its members reconnect and resume from the last seq they hold: nothing missed.
        for _ in moved:
            back = await stack.enter_async_context(connect_client(proc.url))
            joined = await back.join("r", since=10)
            assert joined.get("resumed") is True and joined["seq"] == 10
            await deltas_until(back, "r", 10, 20)
        for member in stay:
            await deltas_until(member, "r", 0, 20)


async def test_sigterm_closes_every_member_with_1001_and_the_tree_exits(
    redis_server: Topology,  # noqa: F811
) -> None:
    async with workers_relay(redis_server) as proc, contextlib.AsyncExitStack() as stack:
        by_pid = await on_both_workers(proc.url, stack, per_worker=2)
        members = [c for clients in by_pid.values() for c in clients]
        for member in members:
            await member.join("r")
        assert await proc.terminate(signal.SIGTERM) == 0, proc.stderr_lines
        for member in members:
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        await member.ws.recv()
            assert member.ws.close_code == 1001
        for pid in by_pid:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    assert any(line.endswith("stopped") for line in proc.stderr_lines), proc.stderr_lines


async def test_metrics_and_health_count_every_worker(
    redis_server: Topology,  # noqa: F811
) -> None:
    async with workers_relay(redis_server) as proc, contextlib.AsyncExitStack() as stack:
        port = proc.port
        by_pid = await on_both_workers(proc.url, stack, per_worker=2)
        clients = [c for cs in by_pid.values() for c in cs]
        for i, client in enumerate(clients):
            await client.join(f"room{i}")
            await publish(client, f"room{i}", 3, "x")
        # Whichever worker answers, the numbers are the relay's.
        answered: set[int] = set()
        for _ in range(100):
            status, headers, body = await http_get(port, "/metrics")
            assert status == 200
            answered.add(int(headers[WORKER_HEADER.lower()]))
            assert metric(body, "kasagi_deltas_in_total") == 3 * len(clients)
            assert metric(body, "kasagi_connections") == len(clients)
            assert metric(body, "kasagi_workers") == 2
            status, headers, body = await http_get(port, "/healthz")
            assert status == 200
            health = json.loads(body)
            assert health["worker"] == int(headers[WORKER_HEADER.lower()])
            assert health["workers"]["running"] == 2
            assert sorted(health["workers"]["pids"]) == sorted(by_pid)
            if len(answered) == 2:
                break
        assert answered == set(by_pid)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(issued: trustme.LeafCert, chain: Path, key: Path) -> bytes:
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


async def test_sighup_reloads_tls_in_every_worker(
    redis_server: Topology,  # noqa: F811
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    first = write_cert(ca.issue_cert("127.0.0.1"), chain, key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    args = ("--tls-cert", str(chain), "--tls-key", str(key))
    async with workers_relay(redis_server, *args) as proc, contextlib.AsyncExitStack() as stack:
        by_pid = await on_both_workers(proc.url, stack, per_worker=1, ssl=context)
        for clients in by_pid.values():
            der = clients[0].ws.transport.get_extra_info("ssl_object").getpeercert(True)
            assert der == first
        second = write_cert(ca.issue_cert("127.0.0.1"), chain, key)
        seen = len(proc.stderr_lines)
        proc.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while sum("TLS certificate reloaded" in x for x in proc.stderr_lines[seen:]) < 2:  # noqa: ASYNC110 (another task appends the lines)
                await asyncio.sleep(0.05)
        # New connections on both workers get the new certificate; the old ones still work.
        renewed = await on_both_workers(proc.url, stack, per_worker=1, ssl=context)
        for clients in renewed.values():
            der = clients[0].ws.transport.get_extra_info("ssl_object").getpeercert(True)
            assert der == second
        for clients in by_pid.values():
            assert (await clients[0].join("r"))["t"] == "joined"
        assert proc.returncode is None


async def test_workers_stop_when_the_parent_is_killed(
    redis_server: Topology,  # noqa: F811
) -> None:
    """A SIGKILLed parent cannot relay anything: each worker sees its stdin close and stops
    gracefully on its own (members get 1001), leaving no orphan serving the port."""
    async with workers_relay(redis_server) as proc, contextlib.AsyncExitStack() as stack:
        by_pid = await on_both_workers(proc.url, stack, per_worker=1)
        members = [c for clients in by_pid.values() for c in clients]
        for member in members:
            await member.join("r")
        proc.proc.kill()
        for member in members:
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(15):
                    while True:
                        await member.ws.recv()
            assert member.ws.close_code == 1001
        async with asyncio.timeout(15):
            for pid in by_pid:
                while True:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    await asyncio.sleep(0.05)
