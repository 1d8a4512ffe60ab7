"""The publish path against itself: a baseline commit and this tree, same load, one run.

    .venv/bin/python -m benches.ingest [--baseline main] [--baseline-native SO]
        [--repeats 3] [--duration 3]
        [--scenarios ingest-memory,ingest-redis-leader,ingest-redis-replica,rooms]
        [--loadgen PATH] [--json out.json]

The baseline is `git archive`d into a temporary directory (with this tree's built engine),
so that both relays run in the same run on the same machine; the table gives medians of
`--repeats` and the ratio this tree / baseline. Scenarios (the ingest rows of issue 15):
- ingest-*: 200 publishers over WebSocket, each in its own room (no members), publishing as
  fast as a window of 4 unacknowledged deltas allows: acked/s, ack p99 and the relay's CPU
  per ack (from /proc/<pid>/stat over the measured window), on the memory backend and with
  a real redis-server (`--ack leader`; `--ack replica` with one replica).
- rooms: 1,000 rooms x 10 members, 50 publishers, max rate: deliveries/s; then a fixed
  3,000 publishes/s: delivery p99.
- churn: the same 1,000 x 10 at a fixed 3,000 publishes/s, CHURN_RUNS load-generator runs
  in a row on one relay, each with new connections (all 10,050 replaced per run): the
  worst run's delivery p99, the relay's RSS after the last run, and the full garbage
  collections it ran meanwhile (kasagi_gc_full_collection_seconds in /metrics; NaN on a
  baseline without that metric).

The load generator is the compiled one of benches/peers (`benches.peers.build.loadgen()`,
Go), or `--loadgen PATH`. The relay and its Redis are pinned to core 0, the load generator
to core 1 (`taskset`); on a shared machine the ratios are what to read, not the rates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testkit.proc import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("ingest-memory", "ingest-redis-leader", "ingest-redis-replica", "rooms")
CHURN_RUNS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() else []


@contextlib.contextmanager
def redis_servers(replicas: int) -> Iterator[int]:
    """A fresh redis-server (and `replicas` replicas of it), no persistence; its port."""
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory(prefix="kasagi-ingest-redis-")
    try:
        port = free_port()
        # A full resync writes an RDB even with --save "": into a scratch directory.
        base = ["redis-server", "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
        base += ["--dir", tmp.name]
        master = subprocess.Popen([*pin(0), *base, "--port", str(port)], stdout=subprocess.DEVNULL)
        procs.append(master)
        wait_port(port, master)
        for _ in range(replicas):
            rport = free_port()
            args = [*base, "--port", str(rport), "--replicaof", "127.0.0.1", str(port)]
            replica = subprocess.Popen([*pin(0), *args], stdout=subprocess.DEVNULL)
            procs.append(replica)
            wait_port(rport, replica)
        if replicas:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                out = subprocess.run(
                    ["redis-cli", "-p", str(port), "INFO", "replication"],
                    capture_output=True,
                    text=True,
                ).stdout
                if f"connected_slaves:{replicas}" in out and "state=online" in out:
                    break
                time.sleep(0.1)
        yield port
    finally:
        for p in reversed(procs):
            stop(p)
        tmp.cleanup()


@contextlib.contextmanager
def relay(tree: Path, extra: list[str]) -> Iterator[tuple[int, int]]:
    """`python -m kasagi_relay` from `tree` on core 0, no rate limits; (port, pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASAGI_")}
    env["PYTHONPATH"] = str(tree)
    argv = [
        *pin(0), sys.executable, "-m", "kasagi_relay", "--port", str(port),
        "--rate-limit", "0", "--rate-bytes", "0", "--max-connections", "0",
        "--max-connections-per-address", "0", "--log-level", "warning", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port, proc.pid
    finally:
        stop(proc)


def run_loadgen(loadgen: Path, url: str, pid: int, args: list[str]) -> list[dict[str, Any]]:
    """One loadgen run; its JSON lines, each with the relay's CPU seconds in its window."""
    argv = [*pin(1), str(loadgen), "-system", "kasagi", "-url", url, *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out: list[dict[str, Any]] = []
    cpu0 = cpu = 0.0
    for line in proc.stdout:
        line = line.strip()
        if line == "MEASURE_START":
            cpu0 = cpu_seconds(pid)
        elif line == "MEASURE_END":
            cpu = cpu_seconds(pid) - cpu0
        elif line.startswith("{"):
            res = json.loads(line)
            res["server_cpu_s"] = cpu
            out.append(res)
    if proc.wait() != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode})")
    return out


def scenario(name: str, tree: Path, loadgen: Path, duration: float) -> dict[str, float]:
    timing = ["-warmup", "1", "-duration", str(duration)]
    if name == "rooms":
        with relay(tree, []) as (port, pid):
            url = f"ws://127.0.0.1:{port}/ws"
            common = ["-rooms", "1000", "-members", "10", "-publishers", "50", *timing]
            top = run_loadgen(loadgen, url, pid, [*common, "-window", "4"])[-1]
            fixed = run_loadgen(loadgen, url, pid, [*common, "-rate", "3000"])[-1]
        return {
            "deliveries/s": top["delivered_per_s"],
            "server CPU us/delivery": 1e6 * top["server_cpu_s"] / max(1, top["delivered"]),
            "p99 ms @3000/s": fixed["deliver_p99_ms"],
        }
    if name == "churn":
        return churn(tree, loadgen, timing)
    args = ["-rooms", "200", "-members", "0", "-publishers", "200", "-window", "4", *timing]
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        if name.startswith("ingest-redis"):
            ack = name.rsplit("-", 1)[1]
            rport = stack.enter_context(redis_servers(1 if ack == "replica" else 0))
            extra = ["--redis", f"redis://127.0.0.1:{rport}/0", "--ack", ack]
        port, pid = stack.enter_context(relay(tree, extra))
        res = run_loadgen(loadgen, f"ws://127.0.0.1:{port}/ws", pid, args)[-1]
    return {
        "acked/s": res["acked_per_s"],
        "server CPU us/ack": 1e6 * res["server_cpu_s"] / max(1, res["acked"]),
        "ack p99 ms": res["ack_p99_ms"],
    }


def churn(tree: Path, loadgen: Path, timing: list[str]) -> dict[str, float]:
    with relay(tree, []) as (port, pid):
        url = f"ws://127.0.0.1:{port}/ws"
        shape = ["-rooms", "1000", "-members", "10", "-publishers", "50", "-rate", "3000"]
        before = full_collections(port)
        p99s = [run_loadgen(loadgen, url, pid, [*shape, *timing])[-1]["deliver_p99_ms"]]
        for _ in range(CHURN_RUNS - 1):
            p99s.append(run_loadgen(loadgen, url, pid, [*shape, *timing])[-1]["deliver_p99_ms"])
        after = full_collections(port)
        rss = rss_mb(pid)
    return {
        "worst p99 ms @3000/s": max(p99s),
        "relay RSS MB": rss,
        "full collections": after[0] - before[0],
        "full collection s": after[1] - before[1],
    }


def full_collections(port: int) -> tuple[float, float]:
    """(count, seconds) of the relay's full collections so far; NaN without the metric."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = dict.fromkeys(("_count", "_sum"), math.nan)
    for line in text.splitlines():
        for suffix in found:
            if line.startswith(f"kasagi_gc_full_collection_seconds{suffix} "):
                found[suffix] = float(line.split()[-1])
    return found["_count"], found["_sum"]


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def baseline_tree(ref: str, into: Path, native: Path) -> Path:
    """`ref` of this repository as files in `into`, with the built engine `native` (it
    must match the Python of `ref`: this tree's when the engine did not change)."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    if native.exists():
        shutil.copy(native, into / "kasagi_relay" / native.name)
    return into


def find_loadgen(given: str | None) -> Path:
    if given:
        return Path(given)
    from benches.peers.build import loadgen  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return Path(loadgen())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="main", help="git ref to compare with")
    ap.add_argument(
        "--baseline-native",
        default=str(REPO / "kasagi_relay" / "_native.abi3.so"),
        help="the built engine for the baseline (default: this tree's)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--loadgen", default=None, help="benches/peers load generator binary")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    loadgen = find_loadgen(a.loadgen)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="kasagi-baseline-") as tmp:
        before = baseline_tree(a.baseline, Path(tmp), Path(a.baseline_native))
        trees = {"before": before, "after": REPO}
        for name in a.scenarios.split(","):
            per: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
            for _ in range(a.repeats):
                for which, tree in trees.items():  # alternate: drift hits both alike
                    for metric, value in scenario(name, tree, loadgen, a.duration).items():
                        per[which].setdefault(metric, []).append(value)
            results[name] = per
            for metric in per["after"]:
                b = statistics.median(per["before"][metric])
                f = statistics.median(per["after"][metric])
                ratio = f / b if b else float("nan")
                print(f"{name:22} {metric:24} before {b:10.1f}  after {f:10.1f}  {ratio:5.2f}x")
                sys.stdout.flush()
    if a.json:
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "baseline": a.baseline}
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
