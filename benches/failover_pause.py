"""Failover pause: SIGKILL of the Redis master -> first delta acknowledged again through a
relay, on real processes (1 master, 2 replicas, 3 Sentinels with down-after-milliseconds
1000 and failover-timeout 3000; two relay processes; writers sending one keyed delta at a
time). Several runs, a fresh topology each; prints each run and the median.

    .venv/bin/python -m benches.failover_pause --runs 5 [--ack replica] [--json out.json]

The pause is measured from the SIGKILL to the ack of the first delta SENT after it, so a
delta acknowledged by the old master just before it died does not count. Also reported:
when all Sentinels named the new master ("switch"), and the worst time any member went
without a frame ("max gap").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kit.topology import REDIS_SERVER, running_topology
from testkit.failover import Stream, relay_args, wait_healthy
from testkit.relay import relay_process


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def redis_version() -> str:
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True)
    return out.stdout.strip()


async def one_run(root: Path, ack: str) -> dict[str, float | int | None]:
    with running_topology(root) as topo:
        args = relay_args(topo, ack)
        async with relay_process(*args) as a, relay_process(*args) as b:
            await wait_healthy([a.url, b.url], topo.master_addr(), 15)
            stream = Stream([a.url, b.url], writers=2, members=2)
            try:
                await stream.start()
                await asyncio.sleep(1.0)
                old = topo.master_addr()
                stream.fault_at = t0 = time.monotonic()
                topo.signal(topo.node_at(old), signal.SIGKILL)
                await asyncio.to_thread(topo.wait_master_change, old, 20.0)
                switch = time.monotonic() - t0
                await stream.wait_acks_after(time.monotonic(), 10, 30)
                out = await stream.finish(topo)
            finally:
                await stream.cancel()
    return {
        "pause_s": out.pause_s,
        "switch_s": round(switch, 3),
        "max_gap_s": round(out.max_gap_s, 3),
        "lost": len(out.lost),
        "acked": out.acked,
        "unavailable": out.unavailable,
    }


async def main_async(runs: int, ack: str) -> dict[str, object]:
    results = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="kasagi-failover-") as tmp:
            r = await one_run(Path(tmp), ack)
        results.append(r)
        print(f"run {i + 1}: " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    pauses = [float(r["pause_s"]) for r in results if r["pause_s"] is not None]
    switches = [float(r["switch_s"] or 0) for r in results]
    summary: dict[str, object] = {
        "machine": cpu_model(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "redis": await asyncio.to_thread(redis_version),
        "ack": ack,
        "runs": results,
        "pause_median_s": round(statistics.median(pauses), 3) if pauses else None,
        "pause_min_s": round(min(pauses), 3) if pauses else None,
        "pause_max_s": round(max(pauses), 3) if pauses else None,
        "switch_median_s": round(statistics.median(switches), 3),
        "lost_total": sum(int(r["lost"] or 0) for r in results),
    }
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ack", choices=("leader", "replica", "all"), default="replica")
    p.add_argument("--json", type=Path, help="also write the summary here")
    a = p.parse_args()
    summary = asyncio.run(main_async(a.runs, a.ack))
    print(
        f"\nfailover pause (SIGKILL master -> first ack), ack={a.ack}, {a.runs} runs on "
        f"{summary['machine']} ({summary['cores']} cores): median {summary['pause_median_s']} s "
        f"(min {summary['pause_min_s']}, max {summary['pause_max_s']}); Sentinel switch median "
        f"{summary['switch_median_s']} s; acknowledged deltas lost: {summary['lost_total']}"
    )
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
