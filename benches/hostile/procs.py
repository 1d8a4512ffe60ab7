"""The processes a hostile run needs: the relay under attack, a redis-server, the probe.

Each is started on a free loopback port and stopped by its PID (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_URL = re.compile(r"serving (wss?://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASAGI_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


async def _stop(proc: asyncio.subprocess.Process, within: float = 10.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@dataclass
class Relay:
    """`python -m kasagi_relay --port P FLAGS`, its stderr drained (a relay that logs
    tracebacks must never block on a full pipe) and its peak RSS sampled."""

    proc: asyncio.subprocess.Process
    url: str = ""
    port: int = 0
    lines: int = 0
    tracebacks: int = 0
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    peak_rss_kib: int = 0
    # Past this RSS the harness kills the relay: the machine is shared, and an attack that
    # makes the relay grow without bound is already a result.
    rss_cap_kib: int = 0
    killed_at_cap: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, flags: list[str], rss_cap_kib: int = 0) -> Relay:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kasagi_relay",
            "--port",
            str(port),
            *flags,
            env=_env(),
            cwd=str(REPO),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        relay = cls(proc, port=port, rss_cap_kib=rss_cap_kib)
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                while not relay.url:
                    raw = await proc.stderr.readline()
                    if not raw:
                        await proc.wait()
                        raise RuntimeError(
                            f"relay exited with {proc.returncode}: {list(relay.last_lines)}"
                        )
                    relay._line(raw)
                    m = _URL.search(raw.decode(errors="replace"))
                    if m:
                        relay.url = m.group(1).rstrip('",')
        except BaseException:
            await _stop(proc)
            raise
        relay._tasks = [asyncio.create_task(relay._pump()), asyncio.create_task(relay._sample())]
        return relay

    def _line(self, raw: bytes) -> None:
        self.lines += 1
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("Traceback"):
            self.tracebacks += 1
        self.last_lines.append(line)

    async def _pump(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self._line(raw)

    def vm(self, field_name: str) -> int | None:
        """A field of /proc/PID/status in KiB (None once the process is gone)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) if m else None

    async def _sample(self) -> None:
        # VmHWM is the peak itself; sampling keeps the last value of a relay that died.
        while self.proc.returncode is None:
            hwm = self.vm("VmHWM")
            if hwm is not None:
                self.peak_rss_kib = max(self.peak_rss_kib, hwm)
                if self.rss_cap_kib and hwm > self.rss_cap_kib and not self.killed_at_cap:
                    self.killed_at_cap = True
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
            await asyncio.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and self.vm("VmRSS") is not None

    async def stop(self) -> int | None:
        hwm = self.vm("VmHWM")
        if hwm is not None:
            self.peak_rss_kib = max(self.peak_rss_kib, hwm)
        await _stop(self.proc)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.proc.returncode


@dataclass
class Redis:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    async def start(cls) -> Redis:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        redis = cls(proc, port)
        try:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(OSError):
                        r, w = await asyncio.open_connection("127.0.0.1", port)
                        w.write(b"PING\r\n")
                        ok = await r.readline()
                        w.close()
                        if ok.startswith(b"+PONG"):
                            return redis
                    await asyncio.sleep(0.05)
        except BaseException:
            await _stop(proc)
            raise

    async def stop(self) -> None:
        await _stop(self.proc)


@dataclass
class Probe:
    """The well-behaved member (benches/hostile/probe.py) in its own process."""

    proc: asyncio.subprocess.Process

    @classmethod
    async def start(cls, url: str, room: str) -> Probe:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benches.hostile.probe",
            url,
            room,
            env=_env(),
            cwd=str(REPO),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(20):
                line = await proc.stdout.readline()
        except BaseException:
            await _stop(proc)
            raise
        if line.strip() != b"ready":
            await _stop(proc)
            raise RuntimeError(f"probe did not start: {line!r}")
        return cls(proc)

    async def finish(self) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            async with asyncio.timeout(15):
                line = await self.proc.stdout.readline()
                await self.proc.wait()
        except TimeoutError:
            await _stop(self.proc)
            return {"worst_ms": float("nan"), "errors": ["probe did not finish"]}
        try:
            result = json.loads(line)
        except ValueError:
            return {"worst_ms": float("nan"), "errors": [f"probe said {line!r}"]}
        assert isinstance(result, dict)
        return result
