"""Presence events, this tree against a baseline commit, in one run on one real redis-server.

    PYTHONPATH=. .venv/bin/python -m benches.presence_ab [--baseline 6ab83db] [--rounds 4]
        [--calls 4000] [--per-call 20] [--joins-rounds 6] [--seconds 4] [--watchers 0]
        [--join-mode on|entries] [--json out.json]

Two parts, the two trees alternating round by round (drift on a shared machine hits both):
- the `kasagi_presence` library of each tree (`git show <baseline>:.../presence.lua`)
  loaded in turn: `--calls` calls of `kasagi_presence_write`, in pairs adding then
  removing `--per-call` members of one room (so `--per-call` events each), sent in pipelines of
  50 while this process listens to the room's events through this tree's `RedisPresence`
  (as a relay does). Per event: Redis's CPU (INFO cpu) and this process's (the sender,
  the same for both, plus the receiving feed and listener);
- the join loop of benches/presence_cost.py with every member asking for events (rooms
  of 10, 400 connections, the compiled load generator on core 1, the relay and Redis on
  core 0), a relay of each tree in turn: join+leave cycles/s, the relay's CPU per cycle
  and the events each cycle delivered. The events per cycle vary from run to run (a
  member that leaves while its join's write is still queued is never announced, and how
  often that happens depends on how long the writes wait): compare the CPU per cycle at
  similar events per cycle.
The baseline is `git archive`d with this tree's built engine (benches/ingest.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from benches.ingest import REPO, baseline_tree, relay
from benches.presence_cost import join_rate, pin
from kasagi_relay.backends.redis import RedisBackend
from kit.topology import start_topology
from testkit.wait import until

LIBRARY = "kasagi_relay/backends/presence.lua"
PIPELINE = 50


def _version(library: str) -> int:
    found = re.search(r"^local VERSION = '([0-9]+)'", library, re.MULTILINE)
    assert found is not None, "presence.lua must define VERSION"
    return int(found.group(1))


class _Count:
    own_mark = b""

    def __init__(self) -> None:
        self.n = 0

    def on_presence(self, room: str, kind: str, entry: bytes) -> None:
        self.n += 1

    def on_presence_resync(self) -> None:
        pass


def medians(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per tree, the median of each measure over its rounds."""
    return {
        name: {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
        for name, rows in runs.items()
    }


def _redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def library_cost(port: int, library: str, calls: int, per_call: int) -> dict[str, float]:
    """Redis's and this process's CPU per event with `library` loaded."""
    r = redis.Redis(port=port)
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0", op_timeout_s=5.0)
    await backend.start()
    # The backend loaded this tree's library as it started: the one measured goes back.
    r.function_load(library, replace=True)
    count = _Count()
    backend.presence.set_listener(count)
    await backend.presence.subscribe("bench")
    keys = ["room:{bench}:presence", "room:{bench}:presence-exp", "room:{bench}:presence-events"]
    entries = {f"c{i}": b'{"conn":"c%d","sub":null,"info":{},"j":"x"}' % i for i in range(per_call)}
    # Calls in pairs: one adds `per_call` members, the next removes them, in the calling
    # convention of the library's version (5: the relay nets the writes and makes the
    # message; before: (kind, conn, entry) triples).
    calls_args: list[list[str | bytes]] = []
    if _version(library) >= 5:
        for kind in ("join", "leave"):
            lines = (b'{"e":"%s","m":%s}' % (kind.encode(), e) for e in entries.values())
            message = b"\n".join(lines)
            pairs = [x for c, e in entries.items() for x in (c, e)] if kind == "join" else []
            drops = list(entries) if kind == "leave" else []
            calls_args.append([str(len(pairs) // 2), *pairs, *drops, message])
    else:
        for kind in ("a", "r"):
            calls_args.append([x for c, e in entries.items() for x in (kind, c, e)])

    def send() -> None:
        pipe = r.pipeline(transaction=False)
        for i in range(PIPELINE):
            pipe.fcall("kasagi_presence_write", 3, *keys, 60_000, *calls_args[i % 2])
        pipe.execute()

    loop = asyncio.get_running_loop()
    redis0, own0 = _redis_cpu(r), time.process_time()
    sent = 0
    while sent < calls:
        await loop.run_in_executor(None, send)
        sent += PIPELINE
    want = sent * per_call
    await until(lambda: count.n >= want, 60.0, f"{want} events received")
    redis_us = (_redis_cpu(r) - redis0) / want * 1e6
    own_us = (time.process_time() - own0) / want * 1e6
    await backend.close()
    r.close()
    return {"redis_cpu_us_per_event": redis_us, "this_process_cpu_us_per_event": own_us}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="main", help="git ref to compare with")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--per-call", type=int, default=20)
    ap.add_argument("--joins-rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument(
        "--watchers", type=int, default=0,
        help="join loop: connections per room that join once and stay (benches/presence_cost.py)",
    )  # fmt: skip
    ap.add_argument(
        "--join-mode", choices=("on", "entries"), default="on",
        help="join loop: members ask for events (on) or not (entries: the entries alone)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    native = REPO / "kasagi_relay" / "_native.abi3.so"
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "baseline": a.baseline,
    }
    with tempfile.TemporaryDirectory(prefix="kasagi-baseline-") as tmp:
        (Path(tmp) / "tree").mkdir()
        trees = {"baseline": baseline_tree(a.baseline, Path(tmp) / "tree", native), "this": REPO}
        topo = start_topology(Path(tmp) / "redis", sentinels=False)
        pin(topo.servers[0].pid, 0)
        port = topo.servers[0].port
        redis_url = f"redis://127.0.0.1:{port}/0"
        try:
            libs = {name: (tree / LIBRARY).read_text() for name, tree in trees.items()}
            lib_runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for i in range(a.rounds):
                for name in list(trees) if i % 2 == 0 else list(reversed(trees)):
                    got = await library_cost(port, libs[name], a.calls, a.per_call)
                    lib_runs[name].append(got)
                    print("library", name, {k: round(v, 2) for k, v in got.items()}, flush=True)
            if a.rounds:
                out["library_runs"] = lib_runs
                out["library"] = medians(lib_runs)
            join_runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for i in range(a.joins_rounds):
                for name in list(trees) if i % 2 == 0 else list(reversed(trees)):
                    # The library of the relay under test: it loads its own as it starts.
                    with contextlib.suppress(redis.ResponseError):  # none loaded yet
                        redis.Redis(port=port).function_delete("kasagi_presence")
                    extra = ["--redis", redis_url, "--presence", "on"]
                    with relay(trees[name], extra) as (ws_port, pid):
                        url = f"ws://127.0.0.1:{ws_port}/ws"
                        got = await join_rate(
                            url,
                            pid,
                            topo.servers[0].pid,
                            port,
                            400,
                            10,
                            a.seconds,
                            a.join_mode == "on",
                            a.watchers,
                        )
                    join_runs[name].append(got)
                    keep = (
                        "joins_per_s",
                        "relay_cpu_us_per_join",
                        "events_per_join",
                        "watched_per_join",
                    )
                    print("joins", name, {k: round(got[k], 2) for k in keep}, flush=True)
            out["join_runs"] = join_runs
            out["joins"] = medians(join_runs)
        finally:
            topo.stop()
    text = json.dumps(out, indent=2)
    print(text)
    if a.json is not None:
        a.json.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
