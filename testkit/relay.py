"""Helpers to run real relays and talk to them with real WebSocket clients, for the tests
and the benchmarks (tests import it as `relay_helpers`, the name it had in tests/).

In-process (the relay runs on the test's event loop; any backend)::

    from testkit.relay import connect_client, start_relay

    async with start_relay(tick_ms=50) as relay:          # port 0: a free port
        async with connect_client(relay.url) as alice:     # kasagi.v1.json
            joined = await alice.join("lobby")
            ...

`start_relay(config=None, backend=None, **overrides)` starts `kasagi_relay.server.Relay`
(`.port`, `.url`, `.metrics`, `await .stop()`); pass `backend=` to run it on a backend you
built (e.g. a Redis one), else the config's backend is built.

As a subprocess (the real command line, real signals)::

    async with relay_process("--tick-ms", "10", env={"KASAGI_HISTORY": "50"}) as proc:
        async with connect_client(proc.url) as c: ...
    # proc.returncode, proc.stderr_lines after exit

It runs `python -m kasagi_relay --port 0 ARGS...` with the repository on PYTHONPATH, waits
for the start-up line (which carries the URL), and on exit sends SIGTERM and waits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from kasagi_relay.backends.base import Backend
from kasagi_relay.client import protocol
from kasagi_relay.config import Config
from kasagi_relay.server import Relay

REPO = Path(__file__).resolve().parent.parent
JSON = "kasagi.v1.json"
MSGPACK = "kasagi.v1.msgpack"
TIMEOUT = 5.0

Message = dict[str, Any]


@contextlib.asynccontextmanager
async def start_relay(
    config: Config | None = None, backend: Backend | None = None, **overrides: Any
) -> AsyncIterator[Relay]:
    """A relay on a free port of 127.0.0.1, stopped (gracefully) on exit."""
    base = config if config is not None else Config()
    overrides.setdefault("port", 0)
    relay = Relay(base.replace(**overrides), backend)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


class Client:
    """A real websockets client speaking one subprotocol, with message-level helpers.

    Raw on purpose: it sends whatever message (or bytes) a test gives it, malformed ones
    included, and hands back every reply as the plain dict that was on the wire, so tests
    can check exact fields. Every reply is also parsed by the project's client parser
    (`kasagi_relay.client.protocol.parse`): a reply that parser would reject fails the test,
    so the relay and the client agree on one definition of a valid message. Requests are
    encoded here, not with `protocol.encode_*`, which refuse malformed requests."""

    def __init__(self, ws: ClientConnection, codec: str) -> None:
        self.ws = ws
        self.codec = codec

    def encode(self, message: Message) -> str | bytes:
        if self.codec == MSGPACK:
            return bytes(msgpack.packb(message, use_bin_type=True))
        return json.dumps(message)

    def decode(self, data: str | bytes) -> Message:
        if self.codec == MSGPACK:
            assert isinstance(data, bytes), "msgpack replies come in binary frames"
            value = msgpack.unpackb(data, raw=False)
        else:
            assert isinstance(data, str), "json replies come in text frames"
            value = json.loads(data)
        assert isinstance(value, dict)
        self.parse(data)
        return value

    @staticmethod
    def parse(data: str | bytes) -> protocol.Reply:
        """The reply as the project's client reads it (typed); AssertionError if it would
        refuse it."""
        try:
            return protocol.parse(data)
        except protocol.ProtocolError as exc:
            raise AssertionError(f"the client's parser refuses {data!r:.200}: {exc}") from None

    async def send(self, message: Message) -> None:
        await self.ws.send(self.encode(message))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, within: float = TIMEOUT) -> Message:
        async with asyncio.timeout(within):
            return self.decode(await self.ws.recv())

    async def recv_until(
        self, pred: Callable[[Message], bool], within: float = TIMEOUT
    ) -> tuple[Message, list[Message]]:
        """The first message matching `pred`, and the ones before it."""
        skipped: list[Message] = []
        async with asyncio.timeout(within):
            while True:
                message = self.decode(await self.ws.recv())
                if pred(message):
                    return message, skipped
                skipped.append(message)

    async def expect(self, t: str, within: float = TIMEOUT) -> Message:
        """The next message, which must be of type `t`."""
        message = await self.recv(within)
        assert message.get("t") == t, f"expected {t}, got {message}"
        return message

    async def nothing(self, within: float = 0.3) -> None:
        """Assert that no message arrives for `within` seconds."""
        try:
            async with asyncio.timeout(within):
                message = self.decode(await self.ws.recv())
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {message}")

    async def join(self, room: str, since: int | None = None, **extra: Any) -> Message:
        message: Message = {"t": "join", "room": room, **extra}
        if since is not None:
            message["since"] = since
        await self.send(message)
        return await self.expect("joined")

    async def delta(
        self,
        room: str,
        patch: list[Any] | None = None,
        merge: Any = None,
        *,
        key: str | None = None,
        id: int | str | None = None,
        wait_ack: bool = True,
    ) -> Message | None:
        """Send a delta; with wait_ack, return its ack (deltas received meanwhile are
        skipped: use a second client to watch the stream)."""
        message: Message = {"t": "delta", "room": room}
        if patch is not None:
            message["patch"] = patch
        else:
            message["merge"] = merge
        if key is not None:
            message["key"] = key
        if id is not None:
            message["id"] = id
        await self.send(message)
        if not wait_ack:
            return None
        ack, _ = await self.recv_until(lambda m: m.get("t") in ("ack", "error"))
        assert ack["t"] == "ack", f"expected an ack, got {ack}"
        return ack


@contextlib.asynccontextmanager
async def connect_client(
    url: str, codec: str | None = JSON, **kwargs: Any
) -> AsyncIterator[Client]:
    """A client offering `codec` (None: offers no subprotocol, which means JSON)."""
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("compression", None)
    subprotocols = [codec] if codec is not None else None
    async with connect(url, subprotocols=subprotocols, **kwargs) as ws:  # type: ignore[arg-type]
        yield Client(ws, codec or JSON)


# --------------------------------------------------------------------------- raw sockets


async def raw_connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A hand-made WebSocket connection (JSON), after its 101; `rcvbuf` shrinks its receive
    window (a client that reads slowly fills it at once)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def text_frame(payload: bytes) -> bytes:
    """One masked client text frame (RFC 6455: a server closes on unmasked ones)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
    return head + mask + masked


async def raw_member(port: int, room: str) -> socket.socket:
    """A hand-made WebSocket client with a tiny receive window that joins `room` and then
    never reads again (until the test says so)."""
    sock = await raw_connect(port, rcvbuf=4096)
    payload = b'{"t":"join","room":"' + room.encode() + b'"}'
    await asyncio.get_running_loop().sock_sendall(sock, text_frame(payload))
    return sock


def split_frames(data: bytes) -> tuple[list[tuple[bool, int, bytes]], int]:
    """The complete unmasked frames at the start of `data` as (fin, opcode, payload), and
    the bytes they took."""
    frames = []
    pos = 0
    while pos + 2 <= len(data):
        fin, opcode, n = bool(data[pos] & 0x80), data[pos] & 0x0F, data[pos + 1] & 0x7F
        head = 2 + {126: 2, 127: 8}.get(n, 0)
        if pos + head > len(data):
            break
        if n == 126:
            (n,) = struct.unpack_from("!H", data, pos + 2)
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, pos + 2)
        if pos + head + n > len(data):
            break
        frames.append((fin, opcode, data[pos + head : pos + head + n]))
        pos += head + n
    return frames, pos


def parse_frames(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The complete unmasked frames at the start of `data` as (opcode, payload), and the
    bytes they took."""
    frames, used = split_frames(data)
    return [(opcode, payload) for _, opcode, payload in frames], used


async def read_frames(sock: socket.socket, count: int | None = None) -> list[tuple[int, bytes]]:
    """The next `count` frames, or (None) every frame until the connection ends."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(10):
        while True:
            frames, _ = parse_frames(data)
            if count is not None and len(frames) >= count:
                return frames[:count]
            chunk = await loop.sock_recv(sock, 1 << 16)
            if not chunk:
                if count is not None:
                    raise EOFError(f"connection ended after {len(frames)} of {count} frames")
                return frames
            data += chunk


# --------------------------------------------------------------------------- subprocess

_URL = re.compile(r"serving (wss?://\S+)")


@dataclass
class RelayProcess:
    proc: asyncio.subprocess.Process
    url: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def port(self) -> int:
        """The port it serves on (from `url`), for raw sockets."""
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    async def terminate(self, sig: int = signal.SIGTERM, within: float = 15.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(within):
            return await self.proc.wait()


def relay_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASAGI_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if "KASAGI_PURE_PYTHON" in os.environ:
        env["KASAGI_PURE_PYTHON"] = os.environ["KASAGI_PURE_PYTHON"]
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def relay_process(
    *args: str,
    env: Mapping[str, str] | None = None,
    port: str = "0",
    open_files: tuple[int, int] | None = None,
) -> AsyncIterator[RelayProcess]:
    """`python -m kasagi_relay --port 0 ARGS` until its start-up line; SIGTERM on exit.

    `open_files`: the (soft, hard) RLIMIT_NOFILE the relay starts with."""

    def limits() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    argv = [sys.executable, "-m", "kasagi_relay", *(["--port", port] if port else []), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=relay_env(env),
        cwd=str(REPO),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limits if open_files is not None else None,
    )
    rp = RelayProcess(proc)
    assert proc.stderr is not None
    stderr = proc.stderr

    async def pump() -> None:
        async for raw in stderr:
            rp.stderr_lines.append(raw.decode(errors="replace").rstrip("\n"))

    try:
        async with asyncio.timeout(20):
            while not rp.url:
                raw = await stderr.readline()
                if not raw:
                    code = await proc.wait()
                    raise AssertionError(f"relay exited with {code}: {rp.stderr_lines}")
                line = raw.decode(errors="replace").rstrip("\n")
                rp.stderr_lines.append(line)
                m = _URL.search(line)
                if m:
                    rp.url = m.group(1).rstrip('",')
        reader = asyncio.create_task(pump())
        try:
            yield rp
        finally:
            if proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await rp.terminate()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
