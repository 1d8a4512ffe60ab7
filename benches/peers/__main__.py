"""kasagi-relay against its peers: Centrifuge, Nchan and python-socketio, same load, one run.

    benches/peers/setup.sh                      # once: Go, Centrifuge and Nchan from Debian, pip
    python -m benches.peers [--quick] [--scenario ingest ...] [--repeats 3]

Every scenario runs every system in turn, `--repeats` times (systems interleaved, so that a
noisy minute hits all of them), each time on a fresh server (and a fresh redis-server) on free
ports. The server (and its Redis) is pinned to core 0 with `taskset`, the load generator
(benches/peers/loadgen, Go, one process) to core 1. The table reports the median of the repeats
and the ratios kasagi / Centrifuge and kasagi / Nchan; the raw runs go to
.benchmarks/peers/<time>.json and the table to .benchmarks/peers/<time>.md.

Scenarios (publishers are not members; payloads ~100 bytes of JSON, merge deltas for kasagi):
- ingest: 200 publishers, each its own room, as fast as 4 unacknowledged publishes each allow:
  acknowledged publishes/s, server CPU per ack (utime+stime of the server's processes over the
  measured window / acks), ack p99. `ingest-redis`: the same on the Redis backends (kasagi
  --ack leader and --ack replica with a real replica).
- fanout-N: 1 room x N members, one publisher with one publish in flight: max deliveries/s
  (deltas received by members per second; a kasagi frame that merges k deltas counts k) and
  frames/s; then the p99 delivery latency at half of that system's capacity (frames/s / N
  publishes/s) and the server CPU at a fixed 50 publishes/s. `fanout-redis-1000` on Redis.
- rooms: 1,000 rooms x 10 members, 50 publishers, one publish in flight each: max deliveries/s;
  then p99 at a fixed 3,000 publishes/s.
- idle: RSS per idle connection joined to one room (server RSS after N connect, minus before).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import build, systems

OUT = systems.REPO / ".benchmarks" / "peers"


@dataclass
class Ctx:
    loadgen: Path
    server_core: int | None
    load_core: int | None
    quick: bool
    warmup: float
    duration: float
    timeout: float


Metrics = dict[str, Any]


class LoadError(RuntimeError):
    pass


def load(ctx: Ctx, srv: systems.Server, *flags: str, room_prefix: str = "r") -> list[Metrics]:
    """One loadgen process against `srv`: the metrics of each of its steps (one unless -rates),
    with the server's (and Redis') CPU over each step's measured window."""
    argv = [
        *systems.pin(ctx.load_core), str(ctx.loadgen),
        "-system", srv.system, "-url", srv.url, "-pub-url", srv.pub_url,
        "-warmup", str(ctx.warmup), "-duration", str(ctx.duration),
        "-timeout", str(ctx.timeout), "-room-prefix", room_prefix, *flags,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killer = threading.Timer(ctx.timeout + 12 * (ctx.warmup + ctx.duration + 1) + 60, proc.kill)
    killer.start()
    steps: list[Metrics] = []
    mark: tuple[float, float, float] = (0.0, 0.0, 0.0)
    span: tuple[float, float, float] = (1.0, 0.0, 0.0)
    try:
        assert proc.stdout is not None
        pids, rpids = srv.pids(), srv.redis_pids()
        for line in proc.stdout:
            line = line.strip()
            sample = (time.monotonic(), systems.cpu_seconds(pids), systems.cpu_seconds(rpids))
            if line == "MEASURE_START":
                mark = sample
            elif line == "MEASURE_END":
                span = (sample[0] - mark[0], sample[1] - mark[1], sample[2] - mark[2])
            elif line.startswith("{"):
                m: Metrics = json.loads(line)
                m["server_cpu"] = span[1] / span[0]  # cores
                m["redis_cpu"] = span[2] / span[0]
                m["server_cpu_s"] = span[1]
                m["redis_cpu_s"] = span[2]
                steps.append(m)
        proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0 or not steps:
        raise LoadError(f"loadgen exited with {proc.returncode}: {err.strip()[-800:]}")
    if srv.proc.poll() is not None:
        raise LoadError(f"the server exited with {srv.proc.returncode} during the run")
    return steps


def per_delivery(m: Metrics) -> float | None:
    """Server CPU (with its Redis) per delivery, in us: robust to other load on the machine,
    which lowers rates but hardly the CPU time a delivery costs."""
    if not m["delivered"]:
        return None
    return float((m["server_cpu_s"] + m["redis_cpu_s"]) / m["delivered"] * 1e6)


def per_frame(m: Metrics) -> float | None:
    """Server CPU (with its Redis) per frame (message) received by a member, in us: the same
    as per delivery for the peers; for kasagi a merged frame covers several deliveries."""
    frames = m["frames_per_s"] * m["seconds"]
    if not frames:
        return None
    return float((m["server_cpu_s"] + m["redis_cpu_s"]) / frames * 1e6)


def doubling(start: float, count: int) -> str:
    return ",".join(f"{start * 2**i:g}" for i in range(count))


# ---- scenarios: each returns the metrics of one system, one repeat -------------------------


def ingest(ctx: Ctx, name: str) -> Metrics:
    with systems.server(name, ctx.server_core) as srv:
        (m,) = load(
            ctx, srv, "-rooms", "200", "-members", "0", "-publishers", "200", "-window", "4"
        )
    acks = max(m["acked"], 1)
    return {
        "acked_per_s": m["acked_per_s"],
        "cpu_us_per_ack": m["server_cpu_s"] / acks * 1e6,
        "redis_cpu_us_per_ack": m["redis_cpu_s"] / acks * 1e6,
        "ack_p99_ms": m["ack_p99_ms"],
        "loadgen_cpu": m["loadgen_cpu"],
        "errors": m["errors"],
        "raw": m,
    }


def fanout(members: int) -> Callable[[Ctx, str], Metrics]:
    """Three phases, each on a fresh server (an overloaded step leaves a backlog behind): a
    fixed 50 publishes/s (CPU, p99); capacity by doubling the publish rate from 25/s (x 1,000 /
    members) until the members fall behind, the best delivered rate of the steps being the
    max; half of the capacity (frames/s / members publishes/s: one frame per delta) for p99."""

    def run(ctx: Ctx, name: str) -> Metrics:
        n = str(members)
        start = 25.0 * 1000 / members
        # Each phase on a fresh server: an overloaded step leaves a backlog behind.
        with systems.server(name, ctx.server_core) as srv:
            (fixed,) = load(ctx, srv, "-rooms", "1", "-members", n, "-window", "16", "-rate", "50")
        with systems.server(name, ctx.server_core) as srv:
            search = load(
                ctx, srv, "-rooms", "1", "-members", n, "-window", "16",
                "-search", "-rates", doubling(start, 9),
            )  # fmt: skip
        top_delivered = max(m["delivered_per_s"] for m in search)
        top_frames = max(m["frames_per_s"] for m in search)
        half_rate = max(1.0, 0.5 * top_frames / members)
        with systems.server(name, ctx.server_core) as srv:
            (half,) = load(
                ctx, srv, "-rooms", "1", "-members", n, "-window", "16", "-rate", f"{half_rate:.1f}"
            )
        return {
            "delivered_per_s": top_delivered,
            "frames_per_s": top_frames,
            "half_rate": half_rate,
            "half_p99_ms": half["deliver_p99_ms"],
            "fixed50_cpu": fixed["server_cpu"],
            "fixed50_us_per_delivery": per_delivery(fixed),
            "fixed50_us_per_frame": per_frame(fixed),
            "fixed50_p99_ms": fixed["deliver_p99_ms"],
            "loadgen_cpu": max(m["loadgen_cpu"] for m in search),
            "errors": sum(m["errors"] for m in [*search, half, fixed]),
            "raw": {"search": search, "half": half, "fixed50": fixed},
        }

    return run


def rooms(ctx: Ctx, name: str) -> Metrics:
    """p99 at 3,000 publishes/s; then (on a fresh server) capacity by doubling the total
    publish rate from 500/s."""
    shape = ["-rooms", "1000", "-members", "10", "-publishers", "50", "-window", "16"]
    with systems.server(name, ctx.server_core) as srv:
        (fixed,) = load(ctx, srv, *shape, "-rate", "3000")
    with systems.server(name, ctx.server_core) as srv:
        search = load(ctx, srv, *shape, "-search", "-rates", doubling(500, 8))
    return {
        "delivered_per_s": max(m["delivered_per_s"] for m in search),
        "frames_per_s": max(m["frames_per_s"] for m in search),
        "fixed_p99_ms": fixed["deliver_p99_ms"],
        "fixed_delivered_per_s": fixed["delivered_per_s"],
        "fixed_cpu": fixed["server_cpu"],
        "fixed_us_per_delivery": per_delivery(fixed),
        "loadgen_cpu": max(m["loadgen_cpu"] for m in search),
        "errors": sum(m["errors"] for m in [*search, fixed]),
        "raw": {"search": search, "fixed": fixed},
    }


def idle(ctx: Ctx, name: str) -> Metrics:
    with systems.server(name, ctx.server_core) as srv:
        return idle_on(ctx, srv)


def idle_on(ctx: Ctx, srv: systems.Server) -> Metrics:
    n = 1000 if ctx.quick else 5000

    def hold(count: int, prefix: str) -> int:
        argv = [
            *systems.pin(ctx.load_core), str(ctx.loadgen), "-system", srv.system, "-url", srv.url,
            "-mode", "idle", "-rooms", "1", "-members", str(count), "-room-prefix", prefix,
            "-timeout", str(ctx.timeout),
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        killer = threading.Timer(ctx.timeout + 30, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().strip()
            if line != "READY":
                raise LoadError(f"idle loadgen: {line} {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(1.0)  # let the server settle (Go's GC, Python's allocator)
            rss = systems.rss_bytes(srv.pids())
            proc.stdin.close()
            proc.wait(30)
            return rss
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    hold(50, "probe")  # first-use allocations (modules, buffers) are not per connection
    time.sleep(0.5)
    before = systems.rss_bytes(srv.pids())
    after = hold(n, "idle")
    return {"kib_per_conn": (after - before) / n / 1024, "connections": n, "errors": 0}


MEMORY = ["kasagi", "centrifuge", "nchan", "socketio"]
SCENARIOS: dict[str, tuple[Callable[[Ctx, str], Metrics], list[str]]] = {
    "ingest": (ingest, MEMORY),
    "ingest-redis": (
        ingest,
        [
            "kasagi+redis",
            "kasagi+redis/replica",
            "centrifuge+redis",
            "nchan+redis",
            "socketio+redis",
        ],
    ),
    "fanout-1000": (fanout(1000), MEMORY),
    "fanout-5000": (fanout(5000), MEMORY),
    "fanout-redis-1000": (fanout(1000), ["kasagi+redis", "centrifuge+redis", "nchan+redis"]),
    "rooms": (rooms, MEMORY),
    "idle": (idle, MEMORY),
}
QUICK_SKIP = {"fanout-5000"}


# ---- the table ------------------------------------------------------------------------------

COLUMNS = ["kasagi", "centrifuge", "nchan", "socketio"]
HEADS = ["kasagi-relay", "Centrifuge", "Nchan (nginx)", "python-socketio"]

# (label, scenario, metric, system suffix, format, higher is better)
ROWS: list[tuple[str, str, str, str, str, bool]] = [
    (
        "ingest: 200 publishers, own room each, acked/s, memory",
        "ingest",
        "acked_per_s",
        "",
        "int",
        True,
    ),
    ("same, server CPU per ack", "ingest", "cpu_us_per_ack", "", "us", False),
    ("same, ack p99", "ingest", "ack_p99_ms", "", "ms", False),
    (
        "ingest with Redis (kasagi `--ack leader`), acked/s",
        "ingest-redis",
        "acked_per_s",
        "+redis",
        "int",
        True,
    ),
    ("same, server CPU per ack", "ingest-redis", "cpu_us_per_ack", "+redis", "us", False),
    ("same, Redis CPU per ack", "ingest-redis", "redis_cpu_us_per_ack", "+redis", "us", False),
    ("same, ack p99", "ingest-redis", "ack_p99_ms", "+redis", "ms", False),
    (
        "kasagi `--ack replica` (a real replica), acked/s",
        "ingest-redis",
        "acked_per_s",
        "+redis/replica",
        "int",
        True,
    ),
    ("same, server CPU per ack", "ingest-redis", "cpu_us_per_ack", "+redis/replica", "us", False),
    ("same, ack p99", "ingest-redis", "ack_p99_ms", "+redis/replica", "ms", False),
    ("1 room x 1,000 members: max deliveries/s", "fanout-1000", "delivered_per_s", "", "int", True),
    ("same, frames/s (kasagi merges)", "fanout-1000", "frames_per_s", "", "int", True),
    ("same, p99 at half load", "fanout-1000", "half_p99_ms", "", "ms", False),
    (
        "same, server CPU at 50 publishes/s (cores)",
        "fanout-1000",
        "fixed50_cpu",
        "",
        "cores",
        False,
    ),
    ("same, p99 at 50 publishes/s", "fanout-1000", "fixed50_p99_ms", "", "ms", False),
    (
        "same, server CPU per delivery at 50/s",
        "fanout-1000",
        "fixed50_us_per_delivery",
        "",
        "us2",
        False,
    ),
    ("same, server CPU per frame sent", "fanout-1000", "fixed50_us_per_frame", "", "us2", False),
    ("1 room x 5,000 members: max deliveries/s", "fanout-5000", "delivered_per_s", "", "int", True),
    ("same, p99 at half load", "fanout-5000", "half_p99_ms", "", "ms", False),
    (
        "1 room x 1,000 members, with Redis: max deliveries/s",
        "fanout-redis-1000",
        "delivered_per_s",
        "+redis",
        "int",
        True,
    ),
    ("same, p99 at half load", "fanout-redis-1000", "half_p99_ms", "+redis", "ms", False),
    (
        "same, server + Redis CPU per delivery at 50/s",
        "fanout-redis-1000",
        "fixed50_us_per_delivery",
        "+redis",
        "us2",
        False,
    ),
    (
        "same, server + Redis CPU per frame sent",
        "fanout-redis-1000",
        "fixed50_us_per_frame",
        "+redis",
        "us2",
        False,
    ),
    (
        "1,000 rooms x 10 members, 50 publishers: max deliveries/s",
        "rooms",
        "delivered_per_s",
        "",
        "int",
        True,
    ),
    ("same, p99 at a fixed 3,000 publishes/s", "rooms", "fixed_p99_ms", "", "ms", False),
    ("same, server CPU at 3,000 publishes/s (cores)", "rooms", "fixed_cpu", "", "cores", False),
    ("same, server CPU per delivery", "rooms", "fixed_us_per_delivery", "", "us2", False),
    (
        "same, deliveries/s reached at 3,000 publishes/s (30,000 offered)",
        "rooms",
        "fixed_delivered_per_s",
        "",
        "int",
        True,
    ),
    ("idle memory per connection", "idle", "kib_per_conn", "", "kib", False),
]


def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "us2":
        return f"{v:.2f} us"
    if kind == "us":
        return f"{v:,.0f} us"
    if kind == "ms":
        return f"{v:,.1f} ms" if v < 1000 else f"{v / 1000:,.2f} s"
    if kind == "cores":
        return f"{v:.2f}"
    if kind == "kib":
        return f"{v:.1f} KiB"
    return str(v)


def median_of(
    results: dict[str, dict[str, list[Metrics]]], scenario: str, system: str, metric: str
) -> float | None:
    runs = results.get(scenario, {}).get(system, [])
    values = [
        r[metric] for r in runs if "error" not in r and r.get(metric) is not None and r[metric] >= 0
    ]
    return statistics.median(values) if values else None


def table(results: dict[str, dict[str, list[Metrics]]]) -> str:
    lines = [
        "| scenario | " + " | ".join(HEADS) + " | kasagi / Centrifuge | kasagi / Nchan |",
        "|---|" + "---|" * (len(HEADS) + 2),
    ]
    for label, scenario, metric, suffix, kind, _higher in ROWS:
        if scenario not in results:
            continue
        cells, vals = [], {}
        for col in COLUMNS:
            name = col + suffix if col + suffix in systems.SYSTEMS else None
            if suffix == "+redis/replica" and col != "kasagi":
                name = None
            v = median_of(results, scenario, name, metric) if name else None
            failed = name is not None and any("error" in r for r in results[scenario].get(name, []))
            vals[col] = v
            cells.append(fmt(v, kind) + (" (failed)" if failed and v is None else ""))
        ratios = []
        for peer in ("centrifuge", "nchan"):
            k, p = vals["kasagi"], vals[peer]
            ratios.append(f"{k / p:.2f}x" if k is not None and p else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    py = sys.version.split()[0]
    return f"{model}, {os.cpu_count()} CPUs{mem}, Python {py}, load {os.getloadavg()[0]:.1f}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benches.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 repeat, short windows, no 5,000-member fan-out"
    )
    ap.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="run only these (repeatable)"
    )
    ap.add_argument(
        "--systems", default="", help="comma-separated system names to keep (default: all)"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="repeats per scenario (default 3, --quick 1)"
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per run (default 4, --quick 2)",
    )
    ap.add_argument(
        "--no-pin", action="store_true", help="do not pin server and load to separate cores"
    )
    a = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so that every server is stopped by its `with` block.
    signal.signal(signal.SIGTERM, _interrupt)

    repeats = a.repeats or (1 if a.quick else 3)
    duration = a.duration or (2.0 if a.quick else 4.0)
    pinned = not a.no_pin and (os.cpu_count() or 1) >= 2
    try:
        loadgen = build.loadgen()
    except build.Missing as e:
        print(f"peers: the load generator cannot be built: {e}", file=sys.stderr)
        return 2
    ctx = Ctx(
        loadgen=loadgen,
        server_core=0 if pinned else None,
        load_core=1 if pinned else None,
        quick=a.quick,
        warmup=1.0 if a.quick else 2.0,
        duration=duration,
        timeout=180.0,
    )
    keep = {s for s in a.systems.split(",") if s}
    chosen = a.scenario or [s for s in SCENARIOS if not (a.quick and s in QUICK_SKIP)]

    missing: dict[str, str] = {}
    for name in sorted({n for s in chosen for n in SCENARIOS[s][1]}):
        try:
            systems.check(name)
        except build.Missing as e:
            missing[name] = str(e)
            print(f"peers: skipping {name}: {e}", file=sys.stderr)

    results: dict[str, dict[str, list[Metrics]]] = {}
    started = datetime.now(UTC)
    busy0 = busy_jiffies()
    for scenario in chosen:
        fn, names = SCENARIOS[scenario]
        names = [n for n in names if n not in missing and (not keep or n in keep)]
        results[scenario] = {n: [] for n in names}
        for rep in range(repeats):
            for name in names:
                t = time.monotonic()
                try:
                    m = fn(ctx, name)
                except (LoadError, RuntimeError, OSError) as e:
                    m = {"error": str(e)}
                results[scenario][name].append(m)
                brief = {k: round(v, 2) for k, v in m.items() if isinstance(v, float)}
                status = m.get("error") or brief
                print(
                    f"[{scenario} {rep + 1}/{repeats}] {name}"
                    f" ({time.monotonic() - t:.0f} s): {status}",
                    file=sys.stderr,
                )

    md = table(results)
    busy1 = busy_jiffies()
    ncpu = os.cpu_count() or 1
    busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * ncpu
    header = (
        f"peers run {started:%Y-%m-%d %H:%M} UTC, {machine()}, repeats {repeats}, "
        f"{duration:g} s windows, {'server core 0 / load core 1' if pinned else 'not pinned'}, "
        f"all processes together kept {busy:.2f} of {ncpu} CPUs busy on average over the run"
    )
    notes = [f"- {n}: not run: {why.splitlines()[0]}" for n, why in missing.items()]
    for scenario, per in results.items():
        for name, runs in per.items():
            for r in runs:
                if "error" in r:
                    notes.append(
                        f"- {scenario} / {name} failed: {r['error'].splitlines()[0][:300]}"
                    )
                elif r.get("errors"):
                    notes.append(f"- {scenario} / {name}: {r['errors']} client-side errors")
    print(f"\n{header}\n\n{md}\n" + ("\n".join(notes) + "\n" if notes else ""))
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = f"{started:%Y%m%dT%H%M%S}"
    (OUT / f"{stamp}.json").write_text(
        json.dumps({"header": header, "results": results, "missing": missing}, indent=1)
    )
    (OUT / f"{stamp}.md").write_text(f"{header}\n\n{md}\n" + "\n".join(notes) + "\n")
    print(f"raw results: {OUT / stamp}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
