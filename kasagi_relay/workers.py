"""`--workers N`: N relay processes serving one port, supervised by the parent.

The parent reserves the port (a socket bound with SO_REUSEPORT that never listens, so that
`--port 0` has a number and a restarted worker gets the same port back), then starts each
worker as `python -m kasagi_relay.workers`, its Config pickled on stdin. Every worker is a
whole relay (kasagi_relay.server.Relay: its own event loop, backend connections and TLS
context) listening on that port with SO_REUSEPORT: the kernel spreads new connections over
the workers' listening sockets by a hash of the peer address, where one shared accepting
socket would let whichever worker wakes first take a whole burst.

The parent:
- restarts a worker that dies, after a backoff (0.5 s doubling to 30 s while it keeps dying
  within 30 s of its start), and logs it; a worker that dies before the relay first served
  fails the start (its status is the relay's);
- on SIGTERM/SIGINT sends SIGTERM to every worker, which stops as a single relay does (in
  flight acks answered, members closed with 1001); a second signal is relayed too and the
  workers exit at once (status 1). Workers ignore SIGINT: Ctrl-C in a terminal reaches the
  whole process group, and the parent relays it once;
- relays SIGHUP (TLS reload) to every worker when TLS is on.
A worker whose parent is gone (its stdin closes) stops gracefully.

/healthz and /metrics describe the whole relay whichever worker answers: metrics use
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a directory the parent
creates and removes: counters add up over every worker that ever ran, gauges over the
running ones), and the parent keeps `workers.json` there (the workers running, restarts)
for both endpoints. Every response carries `X-Kasagi-Worker: PID`, the worker that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasagi_relay._version import __version__
from kasagi_relay.config import Config, ConfigError

__all__ = ["STATE_FILE", "WORKER_HEADER", "supervise"]

logger = logging.getLogger("kasagi_relay.workers")

# In the metrics directory: the parent's view of its workers, for /healthz and /metrics.
STATE_FILE = "workers.json"
# Response header naming the worker (its pid) that answered.
WORKER_HEADER = "X-Kasagi-Worker"
# The line a worker writes to the parent once it serves.
_READY = b"ready\n"
# Restart backoff: first delay, cap, and how long a worker must have run to reset it.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 30.0
# A worker refreshes what cannot be computed at scrape time in another process this often.
REFRESH_S = 1.0


# --------------------------------------------------------------------------- the parent


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int = -1  # read end of the worker's ready pipe; EOF when the worker exits
    ready: bool = False
    started: float = 0.0
    quick_deaths: int = 0  # consecutive deaths within BACKOFF_RESET_S of the start
    restart_at: float | None = None
    buffer: bytes = field(default=b"")


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT that never listens: it holds the
    port (a number for --port 0) while the workers bind it too."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Supervisor:
    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.workers = [_Worker(i) for i in range(config.workers)]
        self.selector = selectors.DefaultSelector()
        self.restarts = 0
        self.serving = False  # every worker was ready once: the relay has started
        self.stopping = False
        self.forced = False
        self.failed: int | None = None  # a worker died before the relay started
        self.env = dict(os.environ)
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(state_dir)
        # The worker imports this package from where the parent did.
        root = str(Path(__file__).resolve().parent.parent)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))

    # -- workers

    def spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kasagi_relay.workers"],
                stdin=subprocess.PIPE,
                pass_fds=(wfd,),
                env=self.env,
            )
        finally:
            os.close(wfd)
        assert proc.stdin is not None
        # Config, index and the ready fd; stdin then stays open: its EOF tells the worker
        # that the parent is gone.
        proc.stdin.write(pickle.dumps((self.config, w.index, wfd)))
        proc.stdin.flush()
        w.proc, w.ready_fd, w.ready, w.buffer = proc, r, False, b""
        w.started = time.monotonic()
        w.restart_at = None
        self.selector.register(r, selectors.EVENT_READ, w)
        logger.debug("worker %d started (pid %d)", w.index, proc.pid)

    def on_readable(self, w: _Worker) -> None:
        data = os.read(w.ready_fd, 64)
        if data:
            w.buffer += data
            if not w.ready and _READY in w.buffer:
                w.ready = True
                assert w.proc is not None
                logger.info("worker %d ready (pid %d)", w.index, w.proc.pid)
                self.write_state()
                if not self.serving and all(x.ready for x in self.workers):
                    self.serving = True
                    self.announce()
            return
        self.reap(w)

    def reap(self, w: _Worker) -> None:
        """The worker's ready pipe closed: it exited (or is exiting)."""
        self.selector.unregister(w.ready_fd)
        os.close(w.ready_fd)
        w.ready_fd = -1
        proc = w.proc
        assert proc is not None
        code = proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        w.proc, w.ready = None, False
        _mark_dead(proc.pid, self.state_dir)
        self.write_state()
        if self.stopping:
            # -SIGTERM: a worker still starting up, before it handles the signal itself.
            clean = code in (0, -signal.SIGTERM)
            level = logging.INFO if clean else logging.WARNING
            logger.log(level, "worker %d (pid %d) %s", w.index, proc.pid, _describe(code))
            if not clean:
                self.forced = True
            return
        if not self.serving:
            logger.error(
                "worker %d (pid %d) %s before serving; stopping", w.index, proc.pid, _describe(code)
            )
            self.failed = code if code > 0 else 1
            self.stop()
            return
        if time.monotonic() - w.started >= BACKOFF_RESET_S:
            w.quick_deaths = 0
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**w.quick_deaths)
        w.quick_deaths += 1
        w.restart_at = time.monotonic() + delay
        self.restarts += 1
        logger.error(
            "worker %d (pid %d) %s; restarting it in %.1f s",
            w.index,
            proc.pid,
            _describe(code),
            delay,
        )

    def announce(self) -> None:
        cfg = self.config
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        scheme = "wss" if cfg.tls_cert is not None else "ws"
        logger.info(
            "kasagi-relay %s serving %s://%s:%d/ws (%s backend, ack %s, tick %d ms, %d workers)",
            __version__,
            scheme,
            host,
            cfg.port,
            cfg.backend_name,
            cfg.ack_level,
            cfg.tick_ms,
            cfg.workers,
        )

    def write_state(self) -> None:
        state = {
            "configured": self.config.workers,
            "pids": [w.proc.pid for w in self.workers if w.proc is not None and w.ready],
            "restarts": self.restarts,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_dir / STATE_FILE)

    # -- signals

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def stop(self) -> None:
        self.stopping = True
        for w in self.workers:
            w.restart_at = None
        self.signal_all(signal.SIGTERM)

    def on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            logger.info("SIGHUP: reloading TLS in every worker")
            self.signal_all(signal.SIGHUP)
        elif not self.stopping:
            logger.info("shutting down (a second SIGTERM or SIGINT exits at once)")
            self.stop()
        else:
            logger.warning("second signal: the workers exit without finishing the shutdown")
            self.forced = True
            self.signal_all(signal.SIGTERM)

    # -- the loop

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        handled = [signal.SIGTERM, signal.SIGINT]
        if self.config.tls_cert is not None:
            handled.append(signal.SIGHUP)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(wake_r, selectors.EVENT_READ, None)
        try:
            self.write_state()
            for w in self.workers:
                self.spawn(w)
            while any(w.proc is not None for w in self.workers) or not self.stopping:
                now = time.monotonic()
                due = [w.restart_at for w in self.workers if w.restart_at is not None]
                timeout = max(0.0, min(due) - now) if due else None
                for key, _ in self.selector.select(timeout):
                    if key.data is None:
                        for sig in wake_r.recv(64):
                            self.on_signal(sig)
                    else:
                        self.on_readable(key.data)
                now = time.monotonic()
                for w in self.workers:
                    if w.restart_at is not None and w.restart_at <= now and not self.stopping:
                        self.spawn(w)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.selector.close()
            wake_r.close()
            wake_w.close()
        if self.failed is not None:
            return self.failed
        logger.info("stopped")
        return 1 if self.forced else 0


def supervise(config: Config) -> int:
    """Run `config.workers` relay processes on the port until SIGTERM/SIGINT; the exit
    status (0 after a graceful stop)."""
    from kasagi_relay import tls

    try:
        tls.server_context(config)  # a bad file is one error here, not one per worker
    except ConfigError as exc:
        print(f"kasagi-relay: error: {exc}", file=sys.stderr)
        return 2
    try:
        reservation = _reserve(config.host, config.port)
    except OSError as exc:
        reason = exc.strerror or exc
        print(
            f"kasagi-relay: error: cannot listen on {config.host}:{config.port}: {reason}",
            file=sys.stderr,
        )
        return 1
    config = config.replace(port=reservation.getsockname()[1])
    state_dir = Path(tempfile.mkdtemp(prefix="kasagi-workers-"))
    try:
        return _Supervisor(config, state_dir).run()
    finally:
        reservation.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def _mark_dead(pid: int, state_dir: Path) -> None:
    """Drop a dead worker's live gauges (its counters stay: totals never go back)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(state_dir))  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- a worker


def _state(state_dir: str) -> dict[str, Any]:
    try:
        value = json.loads((Path(state_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _health_extra(state_dir: str) -> Callable[[dict[str, object]], dict[str, object]]:
    def extra(health: dict[str, object]) -> dict[str, object]:
        state = _state(state_dir)
        return {
            **health,
            "worker": os.getpid(),
            "workers": {
                "configured": state.get("configured"),
                "running": len(state.get("pids", [])),
                "pids": state.get("pids", []),
                "restarts": state.get("restarts", 0),
            },
        }

    return extra


def _render_all(state_dir: str) -> Callable[[], bytes]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    class _Workers(Collector):
        def collect(self) -> Iterator[Metric]:
            state = _state(state_dir)
            yield GaugeMetricFamily(
                "kasagi_workers", "Worker processes serving now.", len(state.get("pids", []))
            )
            yield CounterMetricFamily(
                "kasagi_worker_restarts",
                "Workers that died and were restarted.",
                state.get("restarts", 0),
            )

    def render() -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, state_dir)  # type: ignore[no-untyped-call]
        registry.register(_Workers())
        return generate_latest(registry)

    return render


async def _serve(config: Config, index: int, ready_fd: int) -> int:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request, Response

    from kasagi_relay.backends.factory import build_backend
    from kasagi_relay.cli import _exit_now, raise_open_files_limit
    from kasagi_relay.gcpolicy import Collector
    from kasagi_relay.server import Relay

    state_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    pid = str(os.getpid())
    try:
        relay = Relay(config, build_backend(config))
    except ConfigError as exc:
        logger.error("worker %d: %s", index, exc)
        return 2
    raise_open_files_limit()

    def tag(conn: ServerConnection, request: Request, response: Response) -> Response:
        response.headers[WORKER_HEADER] = pid
        return response

    relay.serve_options = {"reuse_port": True, "process_response": tag}
    relay.routes.health_extra = _health_extra(state_dir)
    render = _render_all(state_dir)

    def render_fresh() -> bytes:
        relay.metrics.send_queue_bytes.set(relay._send_queue_total())
        return render()

    relay.metrics.multiprocess = render_fresh
    try:
        await relay.start()
    except OSError as exc:
        await relay.stop()
        logger.error("worker %d cannot listen on port %d: %s", index, config.port, exc)
        return 1
    os.write(ready_fd, _READY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    collector = (  # gcpolicy.py
        Collector(observe=relay.metrics.gc_full.observe) if config.gc == "freeze" else None
    )
    if collector is not None:
        collector.start(loop)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if config.tls_cert is not None:
        loop.add_signal_handler(signal.SIGHUP, relay.reload_tls)

    def parent_gone() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            logger.warning("worker %d: the parent is gone; stopping", index)
            stop.set()

    loop.add_reader(0, parent_gone)

    async def refresh() -> None:
        # The send queue total is computed at scrape time in one process; the other
        # workers' values come from their files, kept fresh here.
        while True:
            relay.metrics.send_queue_bytes.set(relay._send_queue_total())
            await asyncio.sleep(REFRESH_S)

    refresher = asyncio.create_task(refresh())
    await stop.wait()
    refresher.cancel()
    loop.add_signal_handler(signal.SIGTERM, _exit_now)
    await relay.stop()
    if collector is not None:
        collector.stop()
    return 0


class _WorkerTag(logging.Filter):
    """Prefixes a worker's lines with its index: the workers share the parent's stderr."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(logger.name):
            record.msg = self.prefix + str(record.msg)
        return True


def _worker_main() -> int:
    # Ctrl-C reaches the whole process group; the parent relays it as one SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config, index, ready_fd = pickle.load(sys.stdin.buffer)
    assert isinstance(config, Config)
    from kasagi_relay.cli import setup_logging

    setup_logging(config)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))
    import uvloop

    code: int = uvloop.run(_serve(config, index, ready_fd))
    return code


if __name__ == "__main__":
    raise SystemExit(_worker_main())
