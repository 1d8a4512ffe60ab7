"""Run the attack classes against fresh relays and print the table (see __init__.py)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import secrets
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from kasagi_relay.cli import parse_config
from kasagi_relay.config import Config

from .attacks import CLASSES, MiB, Seen, Target
from .procs import Probe, Redis, Relay

STALL_GOAL_MS = 50.0
RSS_MARGIN = 64 * MiB  # the interpreter, the engine, one message in flight, allocator slack


# RSS per byte of --max-state-memory that one room's state may take: the state itself
# (maps and arrays grow by doubling, and the delta being applied is parsed beside it) and
# the copy a room checks against while deltas are queued (room.py `_check_job`, made by
# `RoomState.copy`). Measured with tests/test_room_offloop.py's sequence of small deltas of
# many small members: +108 MiB at a 16 MiB limit, +229 MiB at 64 MiB (slope 2.5x).
ROOM_RSS_PER_MEMORY = 4


def room_budget(c: Config) -> int:
    """One room's state at its limits: ROOM_RSS_PER_MEMORY x --max-state-memory (the
    engine's estimate of the parsed state, docs/operations.md), and its cached JSON and
    MessagePack snapshots (--max-state-bytes each)."""
    return ROOM_RSS_PER_MEMORY * c.max_state_memory + 2 * c.max_state_bytes


def rss_budget(n: int, c: Config) -> int:
    """What the configured limits allow class `n` to hold, above the relay's idle RSS
    (docs/operations.md lists each limit): a room's state as `room_budget`, a message in
    flight at 4x its size."""
    state = room_budget(c)
    message = 4 * c.max_message_bytes
    return {
        1: state,
        2: 2 * state,  # two rooms
        3: message,
        4: c.send_queue_bytes + message,
        5: c.send_queue_bytes,
        6: c.history_bytes + state,
        7: state,
        8: min(c.send_budget_bytes, 40 * c.send_queue_bytes) + state,
        9: 320 * 64 * 1024,  # a few buffers per connection
        10: 0,
        11: 0,
        12: 0,
    }[n] + RSS_MARGIN


@dataclass
class Row:
    n: int
    name: str
    stall_ms: float = math.nan
    acked: str = ""
    peak_mib: float = math.nan
    budget_mib: float = math.nan
    alive: bool = False
    got: str = ""
    notes: list[str] = field(default_factory=list)
    wrong: bool = False  # the attacker saw a wrong outcome (data lost, input coerced)

    @property
    def ok(self) -> bool:
        return (
            self.alive
            and self.stall_ms <= STALL_GOAL_MS
            and self.peak_mib <= self.budget_mib
            and not self.notes
            and not self.wrong
        )


def summarize(seen: Seen, limit: int = 70) -> str:
    parts = [f"{what} x{n}" if n > 1 else what for what, n in seen.most_common()]
    text = ", ".join(parts) or "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def run_class(
    n: int,
    backend_flags: list[str],
    extra: list[str],
    config: Config,
    within: float,
    rss_cap_mib: int,
) -> Row:
    name, attack = CLASSES[n]
    row = Row(n, name)
    try:
        relay = await Relay.start([*backend_flags, *extra], rss_cap_kib=rss_cap_mib * 1024)
    except Exception as exc:
        row.notes.append(f"relay did not start: {exc}")
        return row
    idle_rss = relay.vm("VmRSS") or 0
    row.budget_mib = (idle_rss * 1024 + rss_budget(n, config)) / MiB
    seen: Seen = Counter()
    prefix = f"h{secrets.token_hex(3)}"
    host = "127.0.0.1"
    target = Target(host, relay.port, relay.url, config, prefix)
    probe: Probe | None = None
    try:
        probe = await Probe.start(relay.url, f"{prefix}-probe")
        try:
            async with asyncio.timeout(within):
                await attack(target, seen)
        except TimeoutError:
            seen[f"attack cut at {within:.0f}s"] += 1
        except Exception as exc:
            seen[f"{type(exc).__name__}: {str(exc)[:40]}"] += 1
        await asyncio.sleep(0.3)
    except Exception as exc:
        row.notes.append(f"probe: {exc}")
    finally:
        if probe is not None:
            result = await probe.finish()
            worst = result.get("worst_ms")
            row.stall_ms = float(worst) if isinstance(worst, int | float) else math.nan
            row.acked = f"{result.get('acked', 0)}/{result.get('sent', 0)}"
            errors = result.get("errors")
            if isinstance(errors, list) and errors:
                row.notes.append("probe: " + "; ".join(str(e) for e in errors)[:80])
        row.alive = relay.alive
        if relay.tracebacks:
            seen[f"!{relay.tracebacks} tracebacks logged"] += 1
        row.wrong = any(what.startswith("!") for what in seen)
        code = await relay.stop()
        if relay.killed_at_cap:
            row.notes.append(f"killed by the harness past {rss_cap_mib} MiB RSS (--rss-cap-mib)")
        elif not row.alive:
            row.notes.append(f"relay died (exit {code}): {' | '.join(relay.last_lines)[-160:]}")
        row.peak_mib = relay.peak_rss_kib / 1024
        row.got = summarize(seen)
    return row


def table(rows: list[Row], title: str) -> str:
    out = [
        f"### {title}",
        "",
        "| # | class | worst stall (ms) | probe acks | peak RSS (MiB) | budget (MiB) | alive"
        " | attacker got | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.n} | {r.name} | {r.stall_ms:.1f} | {r.acked} | {r.peak_mib:.0f} |"
            f" {r.budget_mib:.0f} | {'yes' if r.alive else 'no'} | {r.got} |"
            f" {'met' if r.ok else '**not met**'} |"
        )
    notes = [f"- {r.n}: {note}" for r in rows for note in r.notes]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def parse_classes(text: str) -> list[int]:
    picked: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            picked += range(int(lo), int(hi) + 1)
        elif part:
            picked.append(int(part))
    bad = [n for n in picked if n not in CLASSES]
    if bad:
        raise argparse.ArgumentTypeError(f"no class {bad}; classes are 1-{len(CLASSES)}")
    return picked


async def amain(args: argparse.Namespace) -> int:
    extra = shlex.split(args.relay_flags)
    backends: list[str] = ["memory"] + (["redis"] if args.redis else [])
    if args.redis_only:
        backends = ["redis"]
    print(
        f"# hostile harness: {platform.node()}, {os.cpu_count()} CPUs, Python"
        f" {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"# relay flags: {' '.join(extra) or '(defaults)'}; classes {args.classes}")
    # The machine is shared: stalls mean little without its load (docs/benchmarks.md).
    print(f"# load average at the start: {_load()}\n")
    for backend in backends:
        redis: Redis | None = None
        flags: list[str] = []
        if backend == "redis":
            redis = await Redis.start()
            flags = ["--redis", redis.url]
        try:
            config = parse_config(["--port", "0", *flags, *extra])
            rows = []
            for n in args.classes:
                row = await run_class(
                    n, flags, extra, config, args.attack_timeout, args.rss_cap_mib
                )
                rows.append(row)
                print(
                    f"  class {n:2d} {row.name}: stall {row.stall_ms:.1f} ms,"
                    f" peak {row.peak_mib:.0f} MiB, alive {row.alive}, {row.got}",
                    file=sys.stderr,
                    flush=True,
                )
            print(table(rows, f"{backend} backend"))
            print(f"\n# load average after the {backend} backend: {_load()}\n")
        finally:
            if redis is not None:
                await redis.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benches.hostile",
        description="Hostile-client harness (issue #11): one attack class at a time.",
    )
    p.add_argument(
        "--classes",
        type=parse_classes,
        default=list(CLASSES),
        help="classes to run, e.g. 3,11-12 (default: all)",
    )
    p.add_argument("--redis", action="store_true", help="also run against a redis-server")
    p.add_argument("--redis-only", action="store_true", help="only the redis-server backend")
    p.add_argument(
        "--relay-flags",
        default="",
        help="extra relay flags, one string: --relay-flags='--max-state-bytes 65536'",
    )
    p.add_argument(
        "--attack-timeout", type=float, default=30.0, help="cut any attack after this (s)"
    )
    p.add_argument(
        "--rss-cap-mib",
        type=int,
        default=2048,
        help="kill a relay whose RSS passes this (the machine is shared; 0 = no cap)",
    )
    return p


async def _cancellable(args: argparse.Namespace) -> int:
    # SIGINT/SIGTERM cancel the run, so that every relay, probe and redis-server it started
    # is stopped by the `finally` blocks rather than left behind.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await amain(args)
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_cancellable(build_parser().parse_args(argv)))
