"""What a compaction pass costs, from the history (snapshot and ops read back from Redis and
replayed) against from the rooms' live state (kasagi_snapshot_live), in one run on one real
redis-server.

    .venv/bin/python -m benches.compaction_live [--rooms 200] [--state-kb 1024]
        [--deltas 5] [--rounds 5] [--json out.json]

The relay side runs in this process, as in a relay: a RedisBackend, `--rooms` loaded rooms
(room.Room, native state) of about `--state-kb` KiB of JSON each (an object of records with
strings, numbers and arrays), subscribed through the backend's feed. Before each pass every
room gets `--deltas` small merge deltas (about 100 bytes each, published through
kasagi_publish and applied by the rooms from the feed): the rooms are active, so every pass
writes a snapshot per room. Then one `Compactor.run_once()`, by one method or the other,
the two alternating (the order swapped every round), `--rounds` times. Measured per pass:
- relay CPU: this process's CPU (every thread: the compaction's worker threads too), ms;
- Redis CPU: the redis-server's CPU from /proc, ms;
- wall time of the pass, and the longest the event loop went without running a 1 ms timer
  during it (compaction must not block the loop);
- snapshots written (both methods must write one per room).
Medians with ranges; the ratio history / live of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kasagi_relay import delta
from kasagi_relay.backends.base import Op
from kasagi_relay.backends.redis import RedisBackend
from kasagi_relay.compaction import Compactor
from kasagi_relay.metrics import Metrics
from kasagi_relay.room import Room
from kit.topology import start_topology
from testkit.proc import cpu_seconds

METHODS = ("history", "live")


class Rooms:
    """The backend's listener: each op to the room of that name."""

    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}

    def on_op(self, room: str, op: Op) -> None:
        r = self.rooms.get(room)
        if r is not None:
            r.on_op(op)

    def on_resync(self, rooms: frozenset[str] | None) -> None:
        for name, r in self.rooms.items():
            if rooms is None or name in rooms:
                r.start_backfill()


def big_state(kb: int) -> bytes:
    """About `kb` KiB of JSON: records as a game or a document editor would hold them."""
    records: dict[str, Any] = {}
    i = 0
    size = 0
    while size < kb * 1024:
        rec = {
            "id": i,
            "name": f"entity-{i:06d}",
            "pos": [i * 0.5, i * 0.25, -i],
            "tags": ["alpha", "beta", str(i % 17)],
            "hp": 100 - i % 100,
            "note": "lorem ipsum dolor sit amet " * 3,
        }
        records[f"e{i}"] = rec
        size += len(json.dumps(rec)) + 10
        i += 1
    return json.dumps({"records": records, "meta": {"v": 0}}, separators=(",", ":")).encode()


async def until_applied(rooms: dict[str, Room], last: dict[str, int]) -> None:
    async with asyncio.timeout(120):
        while any(rooms[n].seq < s for n, s in last.items()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def stall_probe(stop: asyncio.Event, out: list[float]) -> None:
    """The longest gap between runs of a 1 ms timer, while the pass runs."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    before = loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = loop.time()
        worst = max(worst, now - before)
        before = now
    out.append(worst)


async def check(backend: RedisBackend, name: str) -> None:
    """Outside the measured pass: the snapshot just written (either way) is, byte for byte,
    the room's whole history replayed (it is kept from seq 1: --history exceeds the ops)."""
    snap = await backend.snapshots.read_snapshot(name)
    ops = await backend.log.read_ops(name, 0)
    if snap is None or ops is None or snap.seq != ops[-1].seq:
        raise SystemExit(f"{name}: no snapshot at the last seq, or the history was trimmed")
    if snap.data != delta.compact(b"{}", [op.delta for op in ops]):
        raise SystemExit(f"{name}: the snapshot differs from the history replayed")


async def run(a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        topo = start_topology(Path(tmp) / "redis", sentinels=False)
        try:
            return await measure(a, topo.servers[0].port, topo.servers[0].pid)
        finally:
            topo.stop()


async def measure(a: argparse.Namespace, port: int, redis_pid: int) -> dict[str, Any]:
    listener = Rooms()
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0", op_timeout_s=30.0)
    backend.set_listener(listener)
    await backend.start()
    names = [f"room{i:04d}" for i in range(a.rooms)]
    state = big_state(a.state_kb)
    last: dict[str, int] = {}
    try:
        for name in names:
            last[name] = await backend.log.publish(name, "merge", state)
        compactors = {
            method: Compactor(
                backend,
                lambda: list(last.items()),
                Metrics(),
                interval_s=0,
                history=a.history,
                history_age_s=3600,
                live=listener.rooms.get if method == "live" else None,
            )
            for method in METHODS
        }
        # The first snapshots (and the big op trimmed) before the rooms load: as a room
        # that has been running for a while.
        await compactors["history"].run_once()
        for name in names:
            room = Room(name, backend, Metrics())
            listener.rooms[name] = room
            await room.ensure_loaded()
        results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        tick = 0
        for rnd in range(a.rounds + 1):  # round 0 warms both up, not reported
            order = METHODS if rnd % 2 == 0 else METHODS[::-1]
            for method in order:
                for _ in range(a.deltas):
                    tick += 1
                    body = json.dumps(
                        {"meta": {"v": tick}, "records": {f"e{tick % 50}": {"hp": tick % 100}}}
                    ).encode()
                    seqs = await asyncio.gather(
                        *(backend.log.publish(n, "merge", body) for n in names)
                    )
                    last.update(zip(names, seqs, strict=True))
                await until_applied(listener.rooms, last)
                await asyncio.sleep(0.2)
                stop = asyncio.Event()
                stalls: list[float] = []
                probe = asyncio.create_task(stall_probe(stop, stalls))
                await asyncio.sleep(0.005)
                cpu0, redis0, wall0 = (
                    time.process_time(),
                    cpu_seconds(redis_pid),
                    time.perf_counter(),
                )
                written = await compactors[method].run_once()
                wall = time.perf_counter() - wall0
                cpu, redis = time.process_time() - cpu0, cpu_seconds(redis_pid) - redis0
                stop.set()
                await probe
                if written != a.rooms:
                    raise SystemExit(f"{method}: {written} snapshots written, not {a.rooms}")
                await check(backend, names[0])
                if rnd == 0:
                    continue
                results[method].append(
                    {
                        "relay_cpu_ms": cpu * 1e3,
                        "redis_cpu_ms": redis * 1e3,
                        "wall_ms": wall * 1e3,
                        "stall_ms": stalls[0] * 1e3,
                    }
                )
        refused = compactors["live"].stats.refused
        live_written = compactors["live"].stats.live
    finally:
        for room in listener.rooms.values():
            await room.close()
        await backend.close()
    return {
        "rooms": a.rooms,
        "state_bytes": len(state),
        "deltas_per_pass": a.deltas,
        "rounds": a.rounds,
        "live_written": live_written,
        "live_refused": refused,
        "passes": results,
    }


def summary(res: dict[str, Any]) -> str:
    passes = res["passes"]
    lines = [
        f"{res['rooms']} rooms of {res['state_bytes'] / 1e6:.2f} MB, {res['deltas_per_pass']} "
        f"deltas per room per pass, {res['rounds']} rounds (medians, [min-max])",
        "",
        "| per pass | from the history | from live state | history / live |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("relay_cpu_ms", "relay CPU, ms"),
        ("redis_cpu_ms", "Redis CPU, ms"),
        ("wall_ms", "wall time, ms"),
        ("stall_ms", "longest event-loop stall, ms"),
    ):
        cells = []
        meds = []
        for method in METHODS:
            vals = [p[key] for p in passes[method]]
            med = statistics.median(vals)
            meds.append(med)
            cells.append(f"{med:,.1f} [{min(vals):,.1f}-{max(vals):,.1f}]")
        ratio = meds[0] / meds[1] if meds[1] else float("inf")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio:.1f}x |")
    per_room = [
        statistics.median(p["relay_cpu_ms"] for p in passes[m]) * 1e3 / res["rooms"]
        for m in METHODS
    ]
    lines.append(f"| relay CPU per room, us | {per_room[0]:,.0f} | {per_room[1]:,.0f} | |")
    lines.append("")
    lines.append(
        f"live snapshots written: {res['live_written']}, refused by the store: "
        f"{res['live_refused']}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rooms", type=int, default=200)
    p.add_argument("--state-kb", type=int, default=1024)
    p.add_argument("--deltas", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--history", type=int, default=1000)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    load0 = os.getloadavg()
    res = asyncio.run(run(a))
    res["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    res["load_before"] = load0
    res["load_after"] = os.getloadavg()
    print(summary(res))
    print(f"load average before {load0}, after {res['load_after']}")
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
