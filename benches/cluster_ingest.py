"""Cluster ingest: acknowledged publishes per second over many rooms, a Redis Cluster of 3
primaries (+3 replicas) against one of 1 primary (+1 replica), same backend code, same load,
in one run; plus the p50/p99 ack latency and where the CPU went.

    .venv/bin/python -m benches.cluster_ingest [--seconds 5] [--rooms 512] [--procs 2]
        [--concurrency 64] [--ack replica] [--json out.json]

The load generator is `--procs` processes, each one `ClusterBackend` (the relay's storage
path: FCALL kasagi_publish + WAIT on the room's shard) with `--concurrency` publishes in
flight over random rooms. Each publish is a ~60-byte merge delta. Reported per layout:
acks/s, p50/p99 ack latency, and the CPU seconds each group of processes used during the
measured window (from /proc), which tells what limits the ratio on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kit.topology import REDIS_SERVER, ClusterTopology, running_cluster
from testkit.proc import cpu_seconds


async def worker(seeds: str, ack: str, rooms: int, concurrency: int, seconds: float) -> None:
    """One load-generator process: prints {"acks": n, "errors": n, "lat": [...]}."""
    from kasagi_relay.backends.redis_cluster import ClusterBackend
    from kasagi_relay.domain import BackendUnavailable

    addrs = [(h, int(p)) for h, p in (s.rsplit(":", 1) for s in seeds.split(","))]
    backend = ClusterBackend(addrs, ack=ack)  # type: ignore[arg-type]
    await backend.start()
    names = [f"bench-{i}" for i in range(rooms)]
    lat: list[float] = []
    errors = 0
    print("ready", flush=True)
    sys.stdin.readline()  # go
    end = time.monotonic() + seconds
    cpu0 = time.process_time()

    async def loop(i: int) -> None:
        nonlocal errors
        rng = random.Random(i)
        n = 0
        while time.monotonic() < end:
            room = rng.choice(names)
            body = b'{"p%d":{"x":%d,"y":%d,"t":"bench"}}' % (i, n, n)
            t0 = time.perf_counter()
            try:
                await backend.publish(room, "merge", body)
            except BackendUnavailable:
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)
            n += 1

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    cpu = time.process_time() - cpu0
    await backend.close()
    print(json.dumps({"acks": len(lat), "errors": errors, "lat": lat, "cpu": cpu}), flush=True)


def spawn_workers(topo: ClusterTopology, a: argparse.Namespace) -> list[subprocess.Popen[str]]:
    argv = [
        sys.executable, "-m", "benches.cluster_ingest", "--worker", topo.seeds(),
        "--ack", a.ack, "--rooms", str(a.rooms), "--concurrency", str(a.concurrency),
        "--seconds", str(a.seconds),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(a.procs)
    ]
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"worker did not start: {line!r}")
    return procs


def one_layout(root: Path, primaries: int, a: argparse.Namespace) -> dict[str, Any]:
    with running_cluster(root, primaries=primaries, replicas=1) as topo:
        procs = spawn_workers(topo, a)
        nodes = [(n.name, n.pid) for n in topo.servers]
        before = {name: cpu_seconds(pid) for name, pid in nodes}
        t0 = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            out = p.stdout.read()
            p.wait(30)
            results.append(json.loads(out.strip().splitlines()[-1]))
        elapsed = max(time.monotonic() - t0, a.seconds)
        redis_cpu = {name: cpu_seconds(pid) - before[name] for name, pid in nodes}
        primary_names = {n.name for n in topo.primaries()}
    lat = sorted(x for r in results for x in r["lat"])
    acks = len(lat)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [float("nan")] * 99
    return {
        "primaries": primaries,
        "acks": acks,
        "errors": sum(r["errors"] for r in results),
        "acks_per_s": acks / a.seconds,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "cpu_primaries_s": sum(v for k, v in redis_cpu.items() if k in primary_names),
        "cpu_replicas_s": sum(v for k, v in redis_cpu.items() if k not in primary_names),
        "cpu_generators_s": sum(r["cpu"] for r in results),
        # CPU per acknowledged publish: what one core of each part could sustain.
        "us_primary_per_ack": 1e6
        * sum(v for k, v in redis_cpu.items() if k in primary_names)
        / max(acks, 1),
        "us_generator_per_ack": 1e6 * sum(r["cpu"] for r in results) / max(acks, 1),
        "window_s": elapsed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rooms", type=int, default=512)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--ack", default="replica", choices=("leader", "replica", "all"))
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", metavar="SEEDS", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        asyncio.run(worker(a.worker, a.ack, a.rooms, a.concurrency, a.seconds))
        return 0
    if not os.path.exists(REDIS_SERVER):
        print(f"redis-server not found at {REDIS_SERVER}")
        return 1
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    )
    print(
        f"load: {a.procs} generator process(es) x {a.concurrency} in flight, {a.rooms} rooms, "
        f"ack {a.ack}, {a.seconds:.0f} s per layout"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="kasagi-cluster-bench-") as tmp:
        for primaries in (1, 3):
            rows.append(one_layout(Path(tmp) / f"p{primaries}", primaries, a))
            r = rows[-1]
            print(
                f"  {primaries} primar{'y' if primaries == 1 else 'ies'}: "
                f"{r['acks_per_s']:8.0f} acks/s  p50 {r['p50_ms']:6.2f} ms  "
                f"p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}  CPU s: primaries "
                f"{r['cpu_primaries_s']:.1f}, replicas {r['cpu_replicas_s']:.1f}, "
                f"generators {r['cpu_generators_s']:.1f} "
                f"(of {os.cpu_count() or 1} x {a.seconds:.0f} s); per ack: primary "
                f"{r['us_primary_per_ack']:.0f} us, generator {r['us_generator_per_ack']:.0f} us"
            )
    ratio = rows[1]["acks_per_s"] / rows[0]["acks_per_s"] if rows[0]["acks_per_s"] else 0.0
    print(f"ratio 3 primaries / 1: {ratio:.2f}x")
    one = rows[0]
    print(
        f"one primary's core would take ~{1e6 / max(one['us_primary_per_ack'], 1):.0f} acks/s; "
        f"one generator core ~{1e6 / max(one['us_generator_per_ack'], 1):.0f} acks/s: past "
        "that, more primaries only help with more client cores than this machine has"
    )
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
